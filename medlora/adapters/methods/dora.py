"""The DoRA family: weight decomposition into magnitude and direction around any additive method.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv 2402.09353:
``W_eff = m * V / ||V||`` with ``V = W0 + dW`` and the norm taken per output channel (over every axis but
the output one, as PEFT's ``DoraConvNdLayer``), ``m`` initialised to ``||W0||``. The norm is detached from
the graph by default (paper sec. 4.3; PEFT does the same), which saves memory and changes the gradient
only through the norm. One wrapper serves every inner method (:func:`register_dora`): this file registers
dora = DoRA(lora); ``dora_c.py``, ``conv_dora.py`` and ``cp_dora.py`` register DoRA(lora_c), DoRA(conv_lora)
and DoRA(cp_lora), as in Minoccheri, Hodgman et al. 2025 (arXiv 2508.01772). A wrapper declares the inner
method's LoRA pair (training rules then update the direction V as they would a LoRA; m trains with AdamW).

Where the inner method has factors, training takes the factored backward (``medlora.adapters.factored``): the
inner factors' rank-space gradients with dy scaled by ``m / ||V||``, and ``dL/dm`` from the layer's output.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, make_dataclass
from typing import Any

import torch
from torch import nn

from ..base import AdditiveReparam, Reparam
from ..config import get_method, option, register_method
from ..factored import Factors
from . import lora  # noqa: F401  (the inner method must be registered first)


@dataclass
class DoRAOptions:
    detach_norm: bool = option(True, "treat ||W0 + dW|| as a constant in backward (DoRA sec. 4.3, PEFT default)")


def channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel (row of the canonical weight)."""
    return weight.flatten(1).norm(dim=1)


class DoRA(Reparam):
    def __init__(self, inner: AdditiveReparam, w0: torch.Tensor, *, detach_norm: bool = True) -> None:
        super().__init__()
        self.inner = inner
        self.detach_norm = detach_norm
        self.magnitude = nn.Parameter(channel_norm(w0).detach().clone())

    def rank_factors(self) -> Reparam | None:
        return self.inner.rank_factors()  # the magnitude does not depend on the rank

    def rule_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        # A pair rule then updates the direction V = W0 + dW as it would update a LoRA; m trains with AdamW.
        return self.inner.rule_pairs()

    def factored(self, w0: torch.Tensor) -> Factors | None:
        inner = self.inner.factored(w0)
        if inner is None:
            return None
        with torch.no_grad() if self.detach_norm else contextlib.nullcontext():
            v = w0 + self.inner.delta(w0)
        norm = channel_norm(v.detach())
        # The direction's gradient is LoRA's with dy scaled by m / ||V|| per output channel: B's rows carry it.
        scale = (self.magnitude.detach() / norm.clamp_min(torch.finfo(norm.dtype).tiny))
        b = inner.b * scale.view(-1, *[1] * (inner.b.dim() - 1))
        return Factors(inner.a, b, inner.b_axes, magnitude=self.magnitude, direction=v, norm=norm)

    def effective(self, w0: torch.Tensor) -> torch.Tensor:
        v = w0 + self.inner.delta(w0)
        norm = channel_norm(v)
        if self.detach_norm:
            norm = norm.detach()
        # A zero row stays zero instead of becoming NaN.
        norm = norm.clamp_min(torch.finfo(norm.dtype).tiny)
        return v * (self.magnitude / norm).view(-1, *([1] * (v.dim() - 1)))


def register_dora(name: str, inner_name: str, citation: str, *, label: str) -> None:
    """Register ``name`` as DoRA around the registered method ``inner_name`` (its options plus ``detach_norm``)."""
    inner_spec = get_method(inner_name)
    # The wrapper's options are the inner method's plus DoRA's own, in one flat dataclass.
    fields = [
        (f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
        for cls in (inner_spec.options_cls, DoRAOptions)
        for f in dataclasses.fields(cls)
    ]
    options_cls = make_dataclass(f"{name.title().replace('_', '')}Options", fields)

    def build(w0: torch.Tensor, *, rank: int, scaling: float, options: Any) -> DoRA:
        values = dataclasses.asdict(options)
        detach_norm = values.pop("detach_norm")
        inner = inner_spec.build(w0, rank=rank, scaling=scaling, options=inner_spec.options_cls(**values))
        return DoRA(inner, w0, detach_norm=detach_norm)

    register_method(
        name,
        options=options_cls,
        summary=f"DoRA magnitude/direction wrapper around {inner_name}; trainable {inner_name} + O",
        citation=citation,
        label=label,
        family=inner_spec.family,
        alpha_over_rank=inner_spec.alpha_over_rank,
        trains=f"{inner_name} factors + magnitude m (O)",
        lora_pair=inner_spec.lora_pair,
    )(build)


register_dora("dora", "lora", "Liu et al. 2024, arXiv 2402.09353", label="DoRA")
