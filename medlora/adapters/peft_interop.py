"""Exchange ``lora`` and ``dora`` adapters with Hugging Face PEFT's on-disk format.

PEFT's directory format (``adapter_config.json`` + ``adapter_model.safetensors``) is the ecosystem's
de-facto adapter format. Tensor keys are ``base_model.model.<module path>.lora_A.weight``,
``...lora_B.weight`` and, for DoRA, ``...lora_magnitude_vector``. For a convolution PEFT stores A as a
``(r, I, *k)`` convolution and B as a ``(O, r, 1, ..)`` 1x1 convolution; its update
``B.flatten(1) @ A.flatten(1)`` is the same matrix product as medlora's weight-space LoRA, and its DoRA
magnitude (shape ``(O,)`` for Linear, ``(1, O, 1, ..)`` for convolutions) is the same per-output-channel
vector. Nothing here imports PEFT: files are written and read directly, so PEFT is needed only by
whoever loads them there.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..fileio import atomic_save_safetensors, atomic_write_bytes
from .config import AdapterConfig
from .inject import iter_adapters
from .io import AdapterFileError

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_METHODS = {"lora": False, "dora": True}  # medlora method -> PEFT use_dora

# PEFT config keys whose non-default values change the adapter's function in ways medlora does not model.
_UNSUPPORTED_KEYS = {
    "modules_to_save": (None, []),
    "bias": ("none",),
    "lora_bias": (False,),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False,),
    "use_bdlora": (None, False),
}


def _peft_compatible(name: str, module: nn.Module) -> str | None:
    """Why PEFT cannot reproduce this layer's adapter, or None if it can."""
    kind = type(module).__name__.replace("Parametrized", "")
    if kind.startswith("ConvTranspose"):
        return f"{name}: PEFT has no LoRA for {kind}"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            return f"{name}: grouped convolution (groups={module.groups}); PEFT's grouped LoRA is a different operator"
        if any(d != 1 for d in module.dilation):
            return f"{name}: dilated convolution; PEFT's lora_A ignores dilation"
        if module.padding_mode != "zeros":
            return f"{name}: padding_mode={module.padding_mode!r}; PEFT's LoRA branch pads with zeros"
    return None


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's ``lora``/``dora`` adapters as a PEFT adapter directory.

    ``peft.PeftModel.from_pretrained(base, directory)`` on the same base model then computes the same
    outputs. Layers or methods PEFT cannot represent raise ``ValueError`` naming the layer.
    """
    directory = Path(directory)
    adapted = list(iter_adapters(model))
    if not adapted:
        raise ValueError("the model has no adapters to export")
    methods = {r.config.method for _, _, r in adapted}
    if not methods <= set(_PEFT_METHODS) or len(methods) > 1:
        raise ValueError(
            f"PEFT export supports one of {sorted(_PEFT_METHODS)} per file; this model holds {sorted(methods)}"
        )
    rslora = {r.config.use_rslora for _, _, r in adapted}
    if len(rslora) > 1:
        raise ValueError("PEFT export needs the same use_rslora setting on every layer")
    problems = [p for name, m, _ in adapted if (p := _peft_compatible(name, m))]
    if problems:
        raise ValueError("cannot export to PEFT: " + "; ".join(problems[:5]))

    ranks = [r.config.rank for _, _, r in adapted]
    alphas = [r.config.resolved_alpha() for _, _, r in adapted]
    r_default = max(set(ranks), key=ranks.count)
    a_default = max(set(alphas), key=alphas.count)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    use_dora = _PEFT_METHODS[methods.pop()]
    for (name, module, reparam), rank, alpha in zip(adapted, ranks, alphas, strict=True):
        lora = reparam.inner if use_dora else reparam
        w_shape = reparam.layout.canonical_shape(module.parametrizations["weight"].original.shape)
        kernel = w_shape[2:]
        key = PREFIX + name
        tensors[f"{key}.lora_A.weight"] = lora.lora_A.detach().reshape(rank, *w_shape[1:]).contiguous()
        tensors[f"{key}.lora_B.weight"] = lora.lora_B.detach().reshape(w_shape[0], rank, *[1] * len(kernel))
        if use_dora:
            magnitude = reparam.magnitude.detach()
            tensors[f"{key}.lora_magnitude_vector"] = (
                magnitude.reshape(1, -1, *[1] * len(kernel)) if kernel else magnitude
            ).contiguous()
        if rank != r_default:
            rank_pattern[f"^{re.escape(name)}$"] = rank
        if alpha != a_default:
            alpha_pattern[f"^{re.escape(name)}$"] = alpha
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r_default,
        "lora_alpha": a_default,
        "lora_dropout": 0.0,
        "target_modules": "^(" + "|".join(re.escape(n) for n, _, _ in adapted) + ")$",
        "use_dora": use_dora,
        "use_rslora": rslora.pop(),
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
    }
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, directory / WEIGHTS_NAME, {"format": "pt"})
    atomic_write_bytes(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
    return directory


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    # PEFT's rule (tuners_utils.get_pattern_key): a key matches a module whose name ends with it as a regex.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def import_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach the LoRA/DoRA adapter of a PEFT adapter directory to ``model`` (the plain base model).

    The adapted model then computes what ``peft.PeftModel.from_pretrained(model, directory)`` computes.
    Only safetensors files are read (a pickled ``adapter_model.bin`` is refused).
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterFileError(f"{directory}: no {CONFIG_NAME}; not a PEFT adapter directory")
    if not weights_path.is_file():
        legacy = " (only a pickled adapter_model.bin, which medlora never loads)" if (
            directory / "adapter_model.bin").exists() else ""
        raise AdapterFileError(f"{directory}: no {WEIGHTS_NAME}{legacy}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{config_path}: invalid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{config_path}: peft_type {config.get('peft_type')!r}; only LORA adapters import")
    for key, allowed in _UNSUPPORTED_KEYS.items():
        if config.get(key, allowed[0]) not in allowed:
            raise AdapterFileError(f"{config_path}: {key}={config[key]!r} is not supported by medlora")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise AdapterFileError(f"{weights_path}: not a readable safetensors file ({exc})") from None

    pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
    per_layer: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        match = pattern.match(key)
        if match is None:
            raise AdapterFileError(f"{weights_path}: unexpected tensor {key!r}")
        per_layer[match.group(1)][match.group(2)] = value

    use_dora = bool(config.get("use_dora", False))
    modules = dict(model.named_modules())
    groups: dict[tuple[int, float], list[str]] = defaultdict(list)
    for name, parts in per_layer.items():
        if name not in modules:
            raise AdapterFileError(f"{weights_path}: adapter targets layer {name!r}, which this model does not have")
        expected = {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if use_dora else set())
        if set(parts) != expected:
            raise AdapterFileError(
                f"{weights_path}: layer {name!r} has tensors {sorted(parts)}, expected {sorted(expected)}"
            )
        reason = _peft_compatible(name, modules[name])
        if reason:
            raise AdapterFileError(f"{weights_path}: {reason}")
        rank = parts["lora_A.weight"].shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
        groups[(rank, alpha)].append(name)

    from .inject import inject

    for (rank, alpha), names in groups.items():
        inject(model, AdapterConfig(
            method="dora" if use_dora else "lora", rank=rank, alpha=alpha,
            targets=[f"re:{re.escape(n)}" for n in names], use_rslora=bool(config.get("use_rslora", False)),
        ))
    with torch.no_grad():
        for name, _, reparam in iter_adapters(model):
            if name not in per_layer:
                continue
            parts = per_layer[name]
            lora = reparam.inner if use_dora else reparam
            for attr, key in (("lora_A", "lora_A.weight"), ("lora_B", "lora_B.weight")):
                target = getattr(lora, attr)
                source = parts[key]
                if source.numel() != target.numel():
                    raise AdapterFileError(
                        f"{weights_path}: {name}.{key} has shape {tuple(source.shape)}, "
                        f"which does not fit the layer (expected {target.numel()} values)"
                    )
                target.copy_(source.reshape(target.shape))
            if use_dora:
                reparam.magnitude.copy_(parts["lora_magnitude_vector"].reshape(-1))
    return model
