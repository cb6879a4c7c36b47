"""Attaching adapters to any ``nn.Module``, listing them, counting their parameters, merging them."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import factored
from .base import Reparam
from .config import AdapterConfig
from .layout import SUPPORTED_LAYER_TYPES, layout_of
from .shared import attach_shared, shared_parameter_ids, shared_states


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def adapters_of(module: nn.Module) -> Reparam | None:
    """The adapter attached to ``module.weight``, if any."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, Reparam):
            return p
    return None


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module, Reparam]]:
    """``(layer name, layer, adapter)`` for every adapted layer, in module order."""
    for name, module in model.named_modules():
        reparam = adapters_of(module)
        if reparam is not None:
            yield name, module, reparam


def base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen weight ``W0`` of a layer, adapted or not."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


def _is_parametrization_internal(name: str) -> bool:
    return ".parametrizations." in f".{name}."


def candidate_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All layers of supported types (adapted or not), by name."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if name and not _is_parametrization_internal(name) and layout_of(m) is not None
    ]


def select_layers(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """The layers ``config`` selects, or a ``ValueError`` that lists what exists."""
    candidates = candidate_layers(model)
    selected = []
    for name, module in candidates:
        if config.target_types is not None and type(module).__name__ not in config.target_types:
            continue
        if config.targets is not None and not any(_matches(name, p) for p in config.targets):
            continue
        if config.exclude is not None and any(_matches(name, p) for p in config.exclude):
            continue
        selected.append((name, module))
    if not selected:
        shown = ", ".join(f"{n} ({type(m).__name__})" for n, m in candidates[:40])
        more = f", ... ({len(candidates) - 40} more)" if len(candidates) > 40 else ""
        raise ValueError(
            f"no layer matches targets={config.targets} target_types={config.target_types} "
            f"exclude={config.exclude}; supported layers in this model: {shown or 'none'}{more} "
            f"(supported types: {', '.join(SUPPORTED_LAYER_TYPES)})"
        )
    return selected


def layer_config(config: AdapterConfig, name: str) -> AdapterConfig:
    """The configuration of layer ``name``: rank, alpha and options from the first matching pattern of
    ``rank_pattern``, ``alpha_pattern`` and ``options_pattern`` (the patterns themselves are dropped)."""
    if not (config.rank_pattern or config.alpha_pattern or config.options_pattern):
        return config

    def first(patterns: dict[str, Any]) -> Any:
        return next((v for p, v in patterns.items() if _matches(name, p)), None)

    rank, alpha, options = first(config.rank_pattern), first(config.alpha_pattern), first(config.options_pattern)
    return dataclasses.replace(
        config,
        rank=config.rank if rank is None else rank,
        alpha=config.alpha if alpha is None else alpha,
        options={**config.options, **(options or {})},
        rank_pattern={},
        alpha_pattern={},
        options_pattern={},
    )


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze every base parameter of ``model`` and attach ``config``'s adapter to the selected layers.

    Returns the same model (modified in place). Only the adapter parameters are trainable afterwards;
    unfreeze other parameters (normalisation layers, a new head) explicitly if a recipe needs them.
    A layer can hold one adapter; calling ``inject`` again with other targets adds adapters there.
    """
    spec = config.spec
    layers = select_layers(model, config)
    taken = [name for name, m in layers if adapters_of(m) is not None]
    if taken:
        raise ValueError(f"layer(s) already adapted: {', '.join(taken[:10])}; merge or remove them first")
    for p in model.parameters():
        p.requires_grad_(False)
    plan = []
    for name, module in layers:
        layout = layout_of(module)
        assert layout is not None
        plan.append((name, module, layout, layout.to_canonical(module.weight.detach()), layer_config(config, name)))
    shared = None
    if spec.build_shared is not None:  # one state for all selected layers (see medlora.adapters.shared)
        shared = spec.build_shared([(name, w0, own) for name, _, _, w0, own in plan], config)
    attached: list[tuple[nn.Module, Reparam]] = []
    try:
        for name, module, layout, w0, own in plan:
            extra = {} if shared is None else {"shared": shared}
            reparam = spec.build(w0, rank=own.rank, scaling=own.scaling(), options=own.method_options(), **extra)
            reparam.layout = layout
            reparam.config = own
            n_adapter = sum(p.numel() for p in reparam.parameters())
            if shared is not None:
                attach_shared(reparam, shared)
            if n_adapter >= module.weight.numel():
                warnings.warn(
                    f"{config.method} rank {own.rank} on {name} {tuple(module.weight.shape)}: "
                    f"{n_adapter} adapter parameters >= the layer's {module.weight.numel()} weights",
                    stacklevel=2,
                )
            parametrize.register_parametrization(module, "weight", reparam)
            attached.append((module, reparam))
            reparam.attach(module)
            if type(reparam).factored is not Reparam.factored:
                factored.install(module)
    except BaseException:
        for module, reparam in reversed(attached):  # leave no half-adapted model behind
            reparam.detach(module)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        raise
    return model


def merge(model: nn.Module) -> nn.Module:
    """Evaluate every adapter once and write ``W_eff`` into its layer, leaving plain layers only.

    Exact: the merged layer computes with the very weight the adapted layer used. Parameters keep the
    ``requires_grad`` they had as frozen base weights. Raises ``ValueError`` (and changes nothing) when
    an adapter's method is not mergeable.
    """
    adapted = list(iter_adapters(model))
    unmergeable = sorted({reparam.config.method for _, _, reparam in adapted if not reparam.config.spec.mergeable})
    if unmergeable:
        raise ValueError(
            f"adapter method(s) {', '.join(unmergeable)} cannot be merged into plain layers "
            "(the update depends on the input); keep the adapters attached or remove() them"
        )
    for _, module, reparam in adapted:
        reparam.detach(module)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Detach every adapter and restore the original weights ``W0`` (the adapters are discarded)."""
    for _, module, reparam in list(iter_adapters(model)):
        reparam.detach(module)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return model


@dataclass
class LayerReport:
    name: str
    layer_type: str
    weight_shape: tuple[int, ...]
    method: str
    base_params: int
    trainable_params: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.base_params, 1)


@dataclass
class ParameterReport:
    """Per adapted layer and for the whole model: base parameters, trainable parameters, percentage."""

    layers: list[LayerReport] = field(default_factory=list)
    total_base_params: int = 0
    total_trainable_params: int = 0
    adapter_params: int = 0
    # Trainable parameters shared by several layers (Uni-LoRA's global vector), counted once, not per layer.
    shared_trainable_params: int = 0

    @property
    def percent(self) -> float:
        return 100.0 * self.total_trainable_params / max(self.total_base_params, 1)

    def to_dict(self) -> dict:
        return {
            "layers": [{**vars(r), "weight_shape": list(r.weight_shape), "percent": r.percent} for r in self.layers],
            "total_base_params": self.total_base_params,
            "total_trainable_params": self.total_trainable_params,
            "adapter_params": self.adapter_params,
            "shared_trainable_params": self.shared_trainable_params,
            "percent": self.percent,
        }

    def table(self) -> str:
        header = ("layer", "type", "weight", "method", "base", "trainable", "%")
        rows = [
            (r.name, r.layer_type, "x".join(map(str, r.weight_shape)), r.method,
             f"{r.base_params:,}", f"{r.trainable_params:,}", f"{r.percent:.1f}")
            for r in self.layers
        ]
        if self.shared_trainable_params:
            rows.append(("(shared by the layers)", "", "", "", "", f"{self.shared_trainable_params:,}", ""))
        others = self.total_trainable_params - self.adapter_params
        if others:  # unfrozen norms, position embeddings, a decoder... (the SALT paper's table counts them too)
            pct = 100.0 * others / self.total_base_params if self.total_base_params else 0.0
            rows.append(("other trainable (not adapters)", "", "", "", "", f"{others:,}", f"{pct:.2f}"))
        rows.append(("TOTAL (model)", "", "", "", f"{self.total_base_params:,}",
                     f"{self.total_trainable_params:,}", f"{self.percent:.2f}"))
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count base and trainable parameters per adapted layer and in total.

    Base parameters are the model's own (adapter parameters excluded); trainable parameters are
    everything with ``requires_grad`` (adapters plus anything the user unfroze); the percentage is
    trainable over base.
    """
    report = ParameterReport()
    adapter_ids: set[int] = set()
    adapted = list(iter_adapters(model))
    shared_ids = shared_parameter_ids(r for _, _, r in adapted)
    for shared in shared_states(r for _, _, r in adapted):
        report.shared_trainable_params += sum(p.numel() for p in shared.parameters() if p.requires_grad)
    for name, module, reparam in adapted:
        adapter_ids.update(id(p) for p in reparam.parameters())
        params = [p for p in reparam.parameters() if id(p) not in shared_ids]
        w0 = base_weight(module)
        bias = getattr(module, "bias", None)
        report.layers.append(
            LayerReport(
                name=name,
                layer_type=type(module).__name__.replace("Parametrized", ""),
                weight_shape=tuple(w0.shape),
                method=reparam.config.method,
                base_params=w0.numel() + (bias.numel() if isinstance(bias, torch.Tensor) else 0),
                trainable_params=sum(p.numel() for p in params if p.requires_grad),
            )
        )
    for p in model.parameters():
        if id(p) in adapter_ids:
            report.adapter_params += p.numel()
        else:
            report.total_base_params += p.numel()
        if p.requires_grad:
            report.total_trainable_params += p.numel()
    return report
