"""Exchange ``lora`` and ``dora`` adapters with Hugging Face PEFT's on-disk format.

PEFT's directory format (``adapter_config.json`` + ``adapter_model.safetensors``) is the ecosystem's
de-facto adapter format. Tensor keys are ``base_model.model.<module path>.lora_A.weight``,
``...lora_B.weight`` and, for DoRA, ``...lora_magnitude_vector``. For a convolution PEFT stores A as a
``(r, I, *k)`` convolution and B as a ``(O, r, 1, ..)`` 1x1 convolution; its update
``B.flatten(1) @ A.flatten(1)`` is the same matrix product as medlora's weight-space LoRA, and its DoRA
magnitude (shape ``(O,)`` for Linear, ``(1, O, 1, ..)`` for convolutions) is the same per-output-channel
vector. Nothing here imports PEFT: files are written and read directly, so PEFT is needed only by
whoever loads them there.

PEFT's ``vera``, ``randlora`` and ``unilora`` formats (peft 0.21) are covered too, for Linear and transformers'
Conv1D layers (the only layers PEFT gives these methods): the generic part is the section at the end of this
module, what is particular to each is a :class:`PeftFormat` its method file registers. Convolutions adapted with
them in medlora raise a ``ValueError`` on export: PEFT has no such layer to load them into.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_save_safetensors, atomic_write_bytes, read_safetensors
from .config import AdapterConfig
from .inject import iter_adapters
from .io import AdapterFileError
from .layout import _is_hf_conv1d
from .shared import shared_states

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
    """Write the model's ``lora``/``dora`` (or ``vera``/``randlora``/``unilora``) adapters as a PEFT directory.

    ``peft.PeftModel.from_pretrained(base, directory)`` on the same base model then computes the same
    outputs. Layers or methods PEFT cannot represent raise ``ValueError`` naming the layer.
    """
    directory = Path(directory)
    adapted = list(iter_adapters(model))
    if not adapted:
        raise ValueError("the model has no adapters to export")
    methods = {r.config.method for _, _, r in adapted}
    formats = peft_formats()
    if len(methods) == 1 and next(iter(methods)) in formats:
        method = next(iter(methods))
        config, tensors = _export_shared(adapted, method, formats[method])
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(tensors, directory / WEIGHTS_NAME, {"format": "pt"})
        atomic_write_bytes(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
        return directory
    if not methods <= set(_PEFT_METHODS) or len(methods) > 1:
        raise ValueError(
            f"PEFT export supports one of {sorted(_PEFT_METHODS)} (or of {sorted(formats)}) per file; "
            f"this model holds {sorted(methods)}"
        )
    rslora = {r.config.use_rslora for _, _, r in adapted}
    if len(rslora) > 1:
        raise ValueError("PEFT export needs the same use_rslora setting on every layer")
    problems = [p for name, m, _ in adapted if (p := _peft_compatible(name, m))]
    problems += [f"{name}: LoRA on fused output blocks {lora.adapt_outputs} (SAMed q/v); PEFT adapts a whole layer"
                 for name, _, r in adapted
                 if getattr(lora := getattr(r, "inner", r), "adapt_outputs", None) is not None]
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
    """Attach the LoRA/DoRA (or VeRA, RandLoRA, Uni-LoRA) adapter of a PEFT directory to ``model`` (the plain base).

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
    peft_type = config.get("peft_type")
    shared_format = _format_by_type(peft_type)
    if shared_format is not None:
        return _import_shared(model, *shared_format, config, _read_peft_tensors(weights_path), config_path,
                              weights_path)
    if peft_type != "LORA":
        known = ", ".join(["LORA", *sorted(f.peft_type for f in peft_formats().values())])
        raise AdapterFileError(f"{config_path}: peft_type {peft_type!r}; {known} adapters import")
    for key, allowed in _UNSUPPORTED_KEYS.items():
        if config.get(key, allowed[0]) not in allowed:
            raise AdapterFileError(f"{config_path}: {key}={config[key]!r} is not supported by medlora")
    tensors = _read_peft_tensors(weights_path)

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


# ---------------------------------------------------------------------------------------------------------------
# Methods whose layers share one state (PEFT 0.21 ``peft_type`` VERA, RANDLORA, UNILORA)
#
# The generic part lives here: PEFT applies these types to Linear and transformers' Conv1D only, so only those layers
# export; all layers must come from one ``inject`` call (one shared state) with one rank, alpha and option set; the
# shared tensors go under ``base_model.<key>`` and each layer's under ``base_model.model.<layer>.<key>``. What is
# particular to a method (its PEFT type, tensor names, config entries and how they map to medlora's options) is a
# :class:`PeftFormat` registered by the method's own file with :func:`register_peft_format`.


@dataclass(frozen=True)
class PeftFormat:
    """How one medlora method reads and writes a PEFT ``peft_type`` whose layers share state.

    ``layer_keys``: the per-layer tensors PEFT stores; ``shared_keys``: the model-wide ones (attributes of the
    method's shared state). ``config(adapter_config)`` gives the method's own ``adapter_config.json`` entries and
    ``import_options(peft_config)`` the medlora ``(options, alpha)`` back. ``layer_tensors(reparam, shared)``
    (default: the reparameterisation's ``layer_keys`` attributes) are the tensors written per layer, and
    ``load_layers(adapted, per_layer, shared, copy)`` (default: copied into those attributes) reads them back;
    ``copy(target, source, what)`` checks the shape. ``targets_from_config``: without per-layer tensors in the file
    the layers come from ``target_modules`` (a file saved without them, e.g. Uni-LoRA's ``save_indices=False``).
    """

    peft_type: str
    layer_keys: tuple[str, ...]
    shared_keys: tuple[str, ...]
    default_rank: int
    config: Callable[[AdapterConfig], dict[str, Any]]
    import_options: Callable[[dict[str, Any]], tuple[dict[str, Any], float | None]]
    layer_tensors: Callable[[nn.Module, nn.Module], dict[str, torch.Tensor]] | None = None
    load_layers: Callable[..., None] | None = None
    targets_from_config: bool = False


_FORMATS: dict[str, PeftFormat] = {}


def register_peft_format(method: str, fmt: PeftFormat) -> None:
    """Register the PEFT format of a shared-state method (called by the method's own file)."""
    if method in _FORMATS:
        raise ValueError(f"a PEFT format for {method!r} is already registered")
    _FORMATS[method] = fmt


def peft_formats() -> dict[str, PeftFormat]:
    """``{method: PeftFormat}`` of the registered shared-state methods (the built-in methods loaded first)."""
    from .config import list_methods

    list_methods()
    return dict(_FORMATS)


def _format_by_type(peft_type: Any) -> tuple[str, PeftFormat] | None:
    return next(((m, f) for m, f in peft_formats().items() if f.peft_type == peft_type), None)


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_hf_conv1d(module)


def _export_shared(adapted: list, method: str, fmt: PeftFormat) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    problems = [f"{name}: PEFT's {method} adapts Linear and transformers' Conv1D only, not "
                f"{type(m).__name__.replace('Parametrized', '')}" for name, m, _ in adapted if not _linear_like(m)]
    if problems:
        raise ValueError("cannot export to PEFT: " + "; ".join(problems[:5]))
    names = [name for name, _, _ in adapted]
    states = shared_states(r for _, _, r in adapted)
    if len(states) != 1 or states[0].layer_names != names:
        raise ValueError(f"PEFT export of {method} needs every adapted layer to come from one inject() call "
                         f"(one shared state); this model holds {len(states)}")
    cfgs = [r.config for _, _, r in adapted]
    ranks = {c.rank for c in cfgs}
    options = {json.dumps(c.to_dict()["options"], sort_keys=True) for c in cfgs}
    alphas = {c.resolved_alpha() for c in cfgs}
    if len(ranks) > 1 or len(options) > 1 or len(alphas) > 1:
        raise ValueError(f"PEFT's {method} has one rank, alpha and option set for all layers; this model has ranks "
                         f"{sorted(ranks)}, alphas {sorted(alphas)}")
    if any(c.use_rslora for c in cfgs):
        raise ValueError(f"PEFT's {method} has no rsLoRA scale")
    kinds = {_is_hf_conv1d(m) for _, m, _ in adapted}
    if len(kinds) > 1:
        raise ValueError("PEFT export needs all layers to be nn.Linear or all transformers Conv1D (fan_in_fan_out)")
    shared = states[0]
    config: dict[str, Any] = {
        "peft_type": fmt.peft_type,
        "task_type": None,
        "base_model_name_or_path": None,
        "r": cfgs[0].rank,
        "target_modules": "^(" + "|".join(re.escape(n) for n in names) + ")$",
        "fan_in_fan_out": kinds.pop(),
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "inference_mode": True,
        **fmt.config(cfgs[0]),
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, _, reparam in adapted:
        own = (fmt.layer_tensors(reparam, shared) if fmt.layer_tensors is not None
               else {key: getattr(reparam, key) for key in fmt.layer_keys})
        for key, value in own.items():
            tensors[f"{PREFIX}{name}.{key}"] = value.detach().clone().contiguous()  # safetensors refuses shared storage
    for key in fmt.shared_keys:
        tensors[f"base_model.{key}"] = getattr(shared, key).detach().clone().contiguous()
    return config, tensors


def _read_peft_tensors(weights_path: Path) -> dict[str, torch.Tensor]:
    """A PEFT adapter's tensors (finite-checked: a NaN adapter is refused naming the file and tensor)."""
    return read_safetensors(weights_path, error=AdapterFileError)[0]


def _peft_target_names(model: nn.Module, target_modules: Any) -> list[str]:
    """PEFT's matching (``check_target_module_exists``) over the Linear/Conv1D layers of ``model``."""
    names = [n for n, m in model.named_modules() if n and _linear_like(m)]
    if isinstance(target_modules, str):
        return [n for n in names if re.fullmatch(target_modules, n)]
    wanted = list(target_modules or [])
    return [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]


def _import_shared(model: nn.Module, method: str, fmt: PeftFormat, config: dict[str, Any],
                   tensors: dict[str, torch.Tensor], config_path: Path, weights_path: Path) -> nn.Module:
    for key, allowed in (("modules_to_save", (None, [])), ("bias", ("none",)), ("layers_to_transform", (None,)),
                         ("exclude_modules", (None, [], ""))):
        if config.get(key, allowed[0]) not in allowed:
            raise AdapterFileError(f"{config_path}: {key}={config[key]!r} is not supported by medlora")
    layer_keys, shared_keys = fmt.layer_keys, fmt.shared_keys
    pattern = re.compile(r"^base_model\.model\.(.+)\.(" + "|".join(layer_keys + shared_keys) + r")$")
    per_layer: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    shared_tensors: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        match = pattern.match(key)
        if key.startswith("base_model.") and key[len("base_model."):] in shared_keys:
            shared_tensors[key[len("base_model."):]] = value
        elif match is not None and match.group(2) in layer_keys:
            per_layer[match.group(1)][match.group(2)] = value
        elif match is None:  # (a per-layer copy of a shared basis, as RandLoRA writes, is skipped)
            raise AdapterFileError(f"{weights_path}: unexpected tensor {key!r} for a {config['peft_type']} adapter")
    modules = dict(model.named_modules())
    order = [n for n in modules if n in per_layer]
    if fmt.targets_from_config and not per_layer:
        order = _peft_target_names(model, config.get("target_modules"))
    missing = sorted(set(per_layer) - set(modules))
    if missing:
        raise AdapterFileError(f"{weights_path}: adapter targets layer {missing[0]!r}, which this model does not have")
    if not order:
        raise AdapterFileError(f"{weights_path}: no layer of this model is targeted by the adapter")
    for name in order:
        if not _linear_like(modules[name]):
            raise AdapterFileError(f"{weights_path}: {name} is a {type(modules[name]).__name__}; PEFT's {method} "
                                   "adapts Linear and transformers' Conv1D only")
        if per_layer and set(per_layer[name]) != set(layer_keys):
            raise AdapterFileError(f"{weights_path}: layer {name!r} has tensors {sorted(per_layer[name])}, "
                                   f"expected {sorted(layer_keys)}")
    rank = int(config.get("r", fmt.default_rank))
    options, alpha = fmt.import_options(config)
    from .inject import inject

    inject(model, AdapterConfig(method=method, rank=rank, alpha=alpha, options=options,
                                targets=[f"re:{re.escape(n)}" for n in order]))
    adapted = [(n, m, r) for n, m, r in iter_adapters(model) if n in set(order)]
    shared = shared_states(r for _, _, r in adapted)[0]

    def copy(target: torch.Tensor, source: torch.Tensor, what: str) -> None:
        if tuple(source.shape) != tuple(target.shape):
            raise AdapterFileError(f"{weights_path}: {what} has shape {tuple(source.shape)}, expected "
                                   f"{tuple(target.shape)} (different rank, seed-sized bases or layer set)")
        target.copy_(source.to(target.dtype))

    with torch.no_grad():
        for key, value in shared_tensors.items():
            copy(getattr(shared, key), value, f"base_model.{key}")
        if fmt.load_layers is not None:
            fmt.load_layers(adapted, per_layer, shared, copy)
        else:
            for name, _, reparam in adapted:
                for key in layer_keys:
                    copy(getattr(reparam, key), per_layer[name][key], f"{name}.{key}")
    return model
