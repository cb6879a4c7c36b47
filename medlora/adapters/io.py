"""Adapter files: safetensors holding only adapter tensors, plus JSON metadata.

The metadata (under the safetensors header key ``medlora``) records the adapter configuration of
every adapted layer, the layer's type and weight shape, the library version and a SHA-256
fingerprint of each frozen base weight the adapter was trained on. Loading checks the fingerprints
before touching the model, so an adapter cannot be silently applied to a different base; nothing is
ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..errors import MedloraError
from ..fileio import atomic_save_safetensors
from .config import AdapterConfig
from .inject import adapters_of, base_weight, inject, iter_adapters, remove
from .shared import own_parameters, shared_states

FORMAT = "medlora.adapter/1"


class AdapterFileError(MedloraError, ValueError):
    """An adapter file that cannot be read or does not belong to this model."""


def weight_fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 of a weight's shape and float32 values (independent of device and memory layout)."""
    digest = hashlib.sha256(str(tuple(weight.shape)).encode())
    digest.update(weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def base_fingerprint(model: nn.Module, layer_names: list[str] | None = None) -> str:
    """One fingerprint over the frozen weights of the given (default: all adapted) layers."""
    modules = dict(model.named_modules())
    names = layer_names if layer_names is not None else [n for n, _, _ in iter_adapters(model)]
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0" + weight_fingerprint(base_weight(modules[name])).encode())
    return digest.hexdigest()


SHARED_PREFIX = "shared::"


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors an adapter file holds: ``<layer>.<name>`` for each layer's own parameters and the
    buffers it lists in ``saved_buffers``, ``shared::<group>.<name>`` once per shared state."""
    adapted = list(iter_adapters(model))
    tensors: dict[str, torch.Tensor] = {}
    for layer, _, reparam in adapted:
        for pname, p in own_parameters(reparam):
            tensors[f"{layer}.{pname}"] = p
        buffers = dict(reparam.named_buffers(recurse=False))
        for bname in getattr(reparam, "saved_buffers", ()):
            tensors[f"{layer}.{bname}"] = buffers[bname]
    for index, shared in enumerate(shared_states(r for _, _, r in adapted)):
        for name, t in shared.adapter_tensors():
            tensors[f"{SHARED_PREFIX}{index}.{name}"] = t
    return tensors


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<layer>.<adapter parameter>": tensor}`` for every adapter parameter of ``model`` (shared tensors
    under ``shared::<group>.<name>``)."""
    return {key: t.detach().contiguous().clone() for key, t in _adapter_tensors(model).items()}


EXTRA_PREFIX = "extra::"


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    extra_metadata: dict[str, Any] | None = None,
    extra_tensors: list[str] | None = None,
) -> Path:
    """Write the adapters of ``model`` to ``path`` (safetensors, written atomically).

    ``extra_tensors`` names entries of ``model.state_dict()`` that travel with the adapter because
    training changed them too (PEFT's ``modules_to_save``): e.g. normalisation statistics re-estimated
    on the target domain, or a layer that was unfrozen. ``extra_metadata`` is stored as given (JSON).
    """
    from .. import __version__

    path = Path(path)
    adapted = list(iter_adapters(model))
    if not adapted:
        raise ValueError("the model has no adapters to save; call medlora.adapters.inject first")
    state = model.state_dict()
    unknown = [n for n in extra_tensors or [] if n not in state]
    if unknown:
        raise ValueError(f"extra_tensors not in the model's state_dict: {', '.join(unknown[:5])}")
    extras = {f"{EXTRA_PREFIX}{n}": state[n].detach().contiguous().clone() for n in extra_tensors or []}
    configs: list[dict[str, Any]] = []
    layers: dict[str, Any] = {}
    for name, module, reparam in adapted:
        cfg = reparam.config.to_dict()
        if cfg not in configs:
            configs.append(cfg)
        w0 = base_weight(module)
        layers[name] = {
            "config": configs.index(cfg),
            "layer_type": type(module).__name__.replace("Parametrized", ""),
            "weight_shape": list(w0.shape),
            "base_sha256": weight_fingerprint(w0),
        }
    groups = [
        {"config": shared.config.to_dict(), "layers": list(shared.layer_names)}
        for shared in shared_states(r for _, _, r in adapted)
    ]
    meta = {
        "format": FORMAT,
        "medlora_version": __version__,
        "configs": configs,
        "layers": layers,
        "base_fingerprint": base_fingerprint(model, list(layers)),
        "extra": extra_metadata or {},
        "extra_tensors": sorted(extra_tensors or []),
    }
    if groups:
        meta["shared"] = groups
    atomic_save_safetensors({**adapter_state(model), **extras}, path, {"format": "pt", "medlora": json.dumps(meta)})
    return path


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors of an adapter file, validated; never unpickles anything."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated/foreign files
        raise AdapterFileError(f"{path}: not a readable safetensors adapter file ({exc})") from None
    if "medlora" not in header:
        raise AdapterFileError(
            f"{path}: safetensors file without medlora adapter metadata "
            "(a PEFT adapter directory loads with medlora.adapters.import_peft)"
        )
    try:
        meta = json.loads(header["medlora"])
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{path}: corrupt medlora metadata ({exc})") from None
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: unsupported adapter format {meta.get('format')!r} (expected {FORMAT})")
    return meta, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Load the adapters in ``path`` into ``model``, attaching them first if the model has none.

    With ``check_base`` (default) every targeted base weight must have the fingerprint recorded at
    save time; otherwise one ``AdapterFileError`` names the file and the first differing layer and
    the model is left untouched. ``check_base=False`` skips only that check (shapes must still match).
    """
    path = Path(path)
    meta, tensors = read_adapter_file(path)
    extras = {k[len(EXTRA_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(EXTRA_PREFIX)}
    state = model.state_dict()
    for name, value in extras.items():
        if name not in state or tuple(state[name].shape) != tuple(value.shape):
            raise AdapterFileError(f"{path}: extra tensor {name!r} {tuple(value.shape)} does not fit this model")
    modules = dict(model.named_modules())
    layers: dict[str, Any] = meta["layers"]
    for name, info in layers.items():
        if name not in modules:
            raise AdapterFileError(f"{path}: adapter targets layer {name!r}, which this model does not have")
        module = modules[name]
        w0 = base_weight(module)
        if list(w0.shape) != info["weight_shape"]:
            raise AdapterFileError(
                f"{path}: layer {name!r} has weight shape {list(w0.shape)}, the adapter was made for "
                f"{info['weight_shape']}: this adapter belongs to a different base model"
            )
        if check_base and weight_fingerprint(w0) != info["base_sha256"]:
            raise AdapterFileError(
                f"{path}: base weights differ from those the adapter was trained on (first at layer "
                f"{name!r}); load the matching base checkpoint, or pass check_base=False to apply it anyway"
            )
    existing = {n: r for n, _, r in iter_adapters(model)}
    if existing:
        if set(existing) != set(layers):
            raise AdapterFileError(
                f"{path}: the model already holds adapters on other layers than the file "
                f"({len(existing)} vs {len(layers)} layers); load into the plain base model instead"
            )
        for name, info in layers.items():
            saved = AdapterConfig.from_dict(meta["configs"][info["config"]])
            if saved.to_dict() != existing[name].config.to_dict():
                raise AdapterFileError(
                    f"{path}: layer {name!r} holds a {existing[name].config.method} adapter configured "
                    f"differently from the file's {saved.method} adapter"
                )
        _copy_adapter_tensors(model, tensors, path)
        _copy_extras(model, extras)
        return model
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    try:
        grouped: set[str] = set()
        for group in meta.get("shared", []):
            # A shared state spans exactly the layers of one inject call: rebuild it with one call again.
            names = list(group["layers"])
            grouped.update(names)
            exact = AdapterConfig.from_dict({**group["config"], "targets": [f"re:{re.escape(n)}" for n in names],
                                             "target_types": None, "exclude": None})
            inject(model, exact)
            for n in names:
                reparam = adapters_of(modules[n])
                reparam.config = AdapterConfig.from_dict(meta["configs"][layers[n]["config"]])
            shared_states([adapters_of(modules[names[0]])])[0].config = AdapterConfig.from_dict(group["config"])
        for idx, cfg in enumerate(meta["configs"]):
            names = [n for n, info in layers.items() if info["config"] == idx and n not in grouped]
            if not names:
                continue
            saved = AdapterConfig.from_dict(cfg)
            exact = AdapterConfig.from_dict({**cfg, "targets": [f"re:{re.escape(n)}" for n in names],
                                             "target_types": None, "exclude": None})
            inject(model, exact)
            for n in names:  # remember the user's selection, not the exact names used to re-attach
                adapters_of(modules[n]).config = saved
        _copy_adapter_tensors(model, tensors, path)
        _copy_extras(model, extras)
    except BaseException:
        # Leave the model as it was given to us.
        remove(model)
        for p in model.parameters():
            p.requires_grad_(trainable.get(id(p), p.requires_grad))
        raise
    return model


def _copy_extras(model: nn.Module, extras: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()  # tensors share storage with the model's parameters and buffers
    with torch.no_grad():
        for name, value in extras.items():
            state[name].copy_(value)


def _copy_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = _adapter_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"{path}: adapter tensors do not match the attached adapters "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    with torch.no_grad():
        for key, p in expected.items():
            if tuple(tensors[key].shape) != tuple(p.shape):
                raise AdapterFileError(
                    f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(tensors[key])


__all__ = [
    "AdapterFileError",
    "adapter_state",
    "base_fingerprint",
    "load_adapter",
    "read_adapter_file",
    "save_adapter",
    "weight_fingerprint",
]
