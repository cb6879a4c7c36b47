"""Adapter files: safetensors holding only adapter tensors, plus JSON metadata.

The metadata (under the safetensors header key ``medlora``) records the adapter configuration of
every adapted layer, the layer's type and weight shape, the library version, and two kinds of
SHA-256 digests:

* ``tensors_sha256``, a checksum of the file's own tensors (names, dtypes, shapes and bytes, in sorted
  name order), verified on every read: a bit flip in the data section is refused even where it leaves
  every value finite (non-finite values are refused by the reader before that);
* ``base``, a fingerprint of every tensor of the frozen base model the adapter was trained on: all
  ``state_dict`` entries (biases, normalisation parameters and statistics, buffers, layers that were not
  adapted), with an adapted layer's original ``W0`` under the plain layer's key, except what the file
  itself carries (its ``extra_tensors``). Loading compares it before touching the model, so an adapter
  cannot be silently applied to a different base; the first differing tensor is named. Each adapted
  layer also keeps its own ``base_sha256`` (merging compares them, and files written before the
  whole-base fingerprint are checked on those alone).

Fingerprints are taken over contiguous CPU bytes in a fixed order, so they do not depend on the device,
the memory layout or the DDP rank that wrote the file. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import TensorFileError, atomic_save_safetensors, read_safetensors
from .config import AdapterConfig
from .inject import adapters_of, base_weight, inject, iter_adapters, remove
from .shared import own_parameters, shared_states

FORMAT = "medlora.adapter/1"


class AdapterFileError(TensorFileError):
    """An adapter file that cannot be read or does not belong to this model."""


def weight_fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 of a tensor's shape and values (independent of device and memory layout).

    Floating-point tensors are hashed as float32 values, so a base held in float64 fingerprints as the
    float32 file it came from; other dtypes (e.g. BatchNorm's ``num_batches_tracked``) as their own bytes,
    tagged with the dtype.
    """
    t = weight.detach()
    if t.is_floating_point():
        digest = hashlib.sha256(str(tuple(t.shape)).encode())
        t = t.to("cpu", torch.float32)
    else:
        digest = hashlib.sha256(f"{tuple(t.shape)}{t.dtype}".encode())
        t = t.to("cpu")
    digest.update(_raw_bytes(t))
    return digest.hexdigest()


def _raw_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a CPU tensor, row-major (a uint8 view also covers dtypes numpy lacks, e.g. bfloat16)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def base_fingerprint(model: nn.Module, layer_names: list[str] | None = None) -> str:
    """One fingerprint over the frozen weights of the given (default: all adapted) layers only; the whole
    base is fingerprinted by :func:`base_record`."""
    modules = dict(model.named_modules())
    names = layer_names if layer_names is not None else [n for n, _, _ in iter_adapters(model)]
    return _digest_of({name: weight_fingerprint(base_weight(modules[name])) for name in names})


_ORIGINAL = re.compile(r"(.+)\.parametrizations\.([^.]+)\.original")


def _base_key(name: str) -> str | None:
    """The plain model's ``state_dict`` key of an adapted model's entry: ``W0`` under ``<layer>.weight``;
    None for the parametrisation's own tensors (adapter parameters and buffers), which are not base."""
    found = _ORIGINAL.fullmatch(name)
    if found:
        return f"{found.group(1)}.{found.group(2)}"
    return None if ".parametrizations." in f".{name}" else name


def frozen_base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model inside ``model`` as a plain ``state_dict``: every tensor under its un-adapted key,
    ``W0`` for each adapted layer's weight, the adapters' own tensors left out.

    BatchNorm's ``num_batches_tracked`` is left out too: a counter of training steps that no forward pass
    reads (it only sets the averaging factor of later statistic updates when ``momentum`` is None), and
    one that any training in train mode advances, so fingerprinting it would refuse bases that compute
    exactly the same function.
    """
    state: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        key = _base_key(name)
        if key is not None and isinstance(value, torch.Tensor) and key.rsplit(".", 1)[-1] != "num_batches_tracked":
            state[key] = value
    return state


def base_record(model: nn.Module, carried: Iterable[str] = ()) -> dict[str, Any]:
    """The whole-base fingerprint stored in adapter metadata: ``{"tensors": {key: sha256}, "sha256": ...}``
    over :func:`frozen_base_state` except the ``carried`` entries (names of ``model.state_dict()``), which
    the adapter file brings itself. ``sha256`` digests the per-tensor ones in sorted key order."""
    skip = {_base_key(n) or n for n in carried}
    tensors = {k: weight_fingerprint(v) for k, v in frozen_base_state(model).items() if k not in skip}
    return {"sha256": _digest_of(tensors), "tensors": tensors}


def _digest_of(fingerprints: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(fingerprints):
        digest.update(name.encode() + b"\0" + fingerprints[name].encode())
    return digest.hexdigest()


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in sorted name order.

    Each tensor contributes a JSON line ``[name, dtype, shape, byte count]`` then its raw bytes, so the
    concatenation cannot be read two ways. Bytes are the CPU's (little-endian, as safetensors stores them).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu")
        raw = _raw_bytes(t)
        digest.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape), len(raw)]).encode())
        digest.update(b"\n" + raw)
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
    meta = adapter_metadata(configs, layers, base=base_record(model, extra_tensors or []), extra=extra_metadata,
                            extra_tensors=extra_tensors, shared=groups)
    return write_adapter_file(path, meta, {**adapter_state(model), **extras})


def adapter_metadata(
    configs: list[dict[str, Any]],
    layers: dict[str, dict[str, Any]],
    *,
    base: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    extra_tensors: Sequence[str] | None = None,
    shared: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``medlora`` metadata of an adapter file (the one builder; :func:`write_adapter_file` adds the checksum).

    ``layers``: per adapted layer ``{"config": index into configs, "layer_type", "weight_shape",
    "base_sha256"}``; ``base``: the whole-base record of :func:`base_record` (None only where it cannot be
    known, e.g. merging files written before it existed); ``shared``: the shared-state groups, if any.
    """
    from .. import __version__

    meta: dict[str, Any] = {
        "format": FORMAT,
        "medlora_version": __version__,
        "configs": configs,
        "layers": layers,
        # the adapted layers' W0 only: kept so that older medlora versions can still check new files
        "base_fingerprint": _digest_of({n: info["base_sha256"] for n, info in layers.items()}),
        "extra": extra or {},
        "extra_tensors": sorted(extra_tensors or []),
    }
    if base is not None:
        meta["base"] = base
    if shared:
        meta["shared"] = shared
    return meta


def write_adapter_file(path: str | os.PathLike, meta: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write an adapter file atomically (temporary file beside it, then ``os.replace``): ``tensors`` and
    ``meta`` (from :func:`adapter_metadata`) with the checksum of exactly the bytes written."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # a diverged training must not leave a file that looks like a result (loading would refuse it later)
    bad = next((k for k, v in clean.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise AdapterFileError(f"{path}: not written: tensor {bad!r} holds non-finite values (the training diverged; "
                               "lower the learning rate or check the data)")
    meta = {**meta, "tensors_sha256": tensors_checksum(clean)}
    return atomic_save_safetensors(clean, Path(path), {"format": "pt", "medlora": json.dumps(meta)})


def merged_base_record(sources: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The whole-base record of an adapter merged from ``(label, metadata)`` sources that carry no extras.

    Every tensor some source fingerprinted is checked (all sources that fingerprinted it must agree, else
    they were trained on different bases: ``ValueError``); tensors every source carried itself (e.g. its
    re-estimated BatchNorm statistics, which are not merged) are listed as ``unchecked``. None when a
    source predates whole-base records.
    """
    if any("base" not in meta for _, meta in sources):
        return None
    tensors: dict[str, str] = {}
    owner: dict[str, str] = {}
    for label, meta in sources:
        for name, fingerprint in meta["base"]["tensors"].items():
            if tensors.setdefault(name, fingerprint) != fingerprint:
                raise ValueError(f"merge_adapters: {label} and {owner[name]} were trained on different base models "
                                 f"(first at tensor {name!r}); merging needs one base model")
            owner.setdefault(name, label)
    unchecked = {_base_key(n) or n for _, meta in sources for n in meta.get("extra_tensors", [])}
    unchecked |= {n for _, meta in sources for n in meta["base"].get("unchecked", [])}
    record: dict[str, Any] = {"sha256": _digest_of(tensors), "tensors": tensors}
    if unchecked - set(tensors):
        record["unchecked"] = sorted(unchecked - set(tensors))
    return record


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors of an adapter file, validated; never unpickles anything.

    Refused with one line naming the file: a missing, truncated or foreign file, a NaN/Inf tensor, and
    tensors that do not match the checksum stored at save. Files written before checksums were stored
    load with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: adapter file not found")
    tensors, header = read_safetensors(path, error=AdapterFileError)
    if "medlora" not in header:
        raise AdapterFileError(
            f"{path}: safetensors file without medlora adapter metadata "
            "(a PEFT adapter directory loads with medlora.adapters.import_peft)"
        )
    try:
        meta = json.loads(header["medlora"])
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{path}: corrupt medlora metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise AdapterFileError(f"{path}: unsupported adapter format {found!r} (expected {FORMAT})")
    stored = meta.get("tensors_sha256")
    if stored is None:
        warnings.warn(f"{path}: adapter file without a checksum (written by medlora "
                      f"{meta.get('medlora_version', '?')}); its tensors cannot be verified", stacklevel=2)
    elif stored != tensors_checksum(tensors):
        raise AdapterFileError(f"{path}: adapter tensors do not match the checksum stored when the file was "
                               "written; the file is corrupt (copy it again from its source)")
    return meta, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Load the adapters in ``path`` into ``model``, attaching them first if the model has none.

    With ``check_base`` (default) the base inside ``model`` must be the one the adapter was trained on:
    every tensor of the whole-base fingerprint (everything but what the file carries) must match, and the
    model must hold no other base tensor; files written before whole-base fingerprints are checked on the
    adapted layers' weights. Otherwise one ``AdapterFileError`` names the file and the first differing
    tensor (or layer), and the model is left untouched. ``check_base=False`` is the deliberate override
    (e.g. to try an adapter on a related base): it skips only this check, shapes must still match.
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
        if check_base and "base" not in meta and weight_fingerprint(w0) != info["base_sha256"]:
            _refuse_base(path, meta, f"layer {name!r}")
    if check_base and "base" in meta:
        _check_whole_base(model, meta["base"], set(extras), path, meta)
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


def _refuse_base(path: Path, meta: dict[str, Any], where: str) -> None:
    # No remedy that exists in one interface only (the CLI has no override; Python's is documented).
    recorded = (meta.get("extra") or {}).get("pretrained")
    trained_on = f" ({recorded})" if isinstance(recorded, str) and recorded else ""
    raise AdapterFileError(
        f"{path}: base weights differ from those the adapter was trained on (first at {where}); "
        f"use it with the base model it was trained on{trained_on}"
    )


def _check_whole_base(model: nn.Module, record: dict[str, Any], carried: set[str], path: Path,
                      meta: dict[str, Any]) -> None:
    """Compare ``model``'s base with the file's whole-base record, first difference in ``state_dict`` order."""
    recorded: dict[str, str] = record["tensors"]
    free = {_base_key(n) or n for n in carried} | set(record.get("unchecked", []))
    state = frozen_base_state(model)
    for name, value in state.items():
        if name in free:
            continue
        if name not in recorded:
            _refuse_base(path, meta, f"tensor {name!r}, which that base did not have")
        if weight_fingerprint(value) != recorded[name]:
            _refuse_base(path, meta, f"tensor {name!r}")
    missing = [n for n in recorded if n not in state and n not in free]
    if missing:
        _refuse_base(path, meta, f"tensor {missing[0]!r}, which this model does not have")


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
    "adapter_metadata",
    "adapter_state",
    "base_fingerprint",
    "base_record",
    "frozen_base_state",
    "load_adapter",
    "merged_base_record",
    "read_adapter_file",
    "save_adapter",
    "tensors_checksum",
    "weight_fingerprint",
    "write_adapter_file",
]
