"""DyLoRA: one LoRA trained for a whole range of ranks, the deployment rank chosen afterwards.

Valipour et al., "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free
Low-Rank Adaptation", EACL 2023, arXiv 2210.07558. Factors as LoRA (``lora_A: R x F`` kaiming-uniform,
``lora_B: O x R`` zeros, ``F = I * prod k``). At each training step a rank ``b`` is drawn uniformly from
``{r_min..R}`` and the layer uses ``dW = (alpha / b) * B[:, :b] @ A[:b]``; in the "frozen" mode (default,
also LyCORIS's ``dylora``) only the b-th component receives a gradient, the components below it are
treated as constants for that step. After training any rank ``r <= R`` is used as is:
``medlora.adapters.set_active_rank(model, r)`` evaluates every nested-rank layer at rank r and
``medlora.adapters.truncate_rank(model, r)`` turns the adapters into plain rank-r ``lora`` adapters (the
same weights, a PEFT-exportable file). Without an active rank, evaluation uses the full rank R.

Sampling: the paper draws one b per step for the model; call :func:`draw_dylora_rank` once per step
(before the forward) for that. Without it each adapted layer draws its own b at each training forward,
as LyCORIS does. A rank is drawn only when the module is in training mode *and* gradients are enabled,
so ``merge`` and ``torch.no_grad()`` evaluation are deterministic. With ``use_rslora`` the scale at rank b
is ``alpha / sqrt(b)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..base import AdditiveReparam, kaiming_uniform_like_lora, zeros_param
from ..config import option, register_method


class NestedRankLoRA(AdditiveReparam):
    """LoRA factors whose leading components form a usable adapter at every rank ``r <= R``."""

    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float) -> None:
        super().__init__(scaling)
        self.max_rank = rank
        self.active_rank: int | None = None
        self.lora_A = kaiming_uniform_like_lora(rank, math.prod(w0.shape[1:]), like=w0)
        self.lora_B = zeros_param(w0.shape[0], rank, like=w0)

    def rank_scale(self, r: int) -> float:
        """The scale of ``B[:, :r] @ A[:r]`` when the adapter is used at rank ``r``."""
        raise NotImplementedError

    def rule_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        # Not a plain pair: the training update is s B diag(P) A (matryoshka) or a truncated product whose lower
        # components are frozen for the step (dylora); a pair rule would compute wrong gradients for it.
        return []

    def truncated(self, w0: torch.Tensor, r: int) -> torch.Tensor:
        return (self.lora_B[:, :r] @ self.lora_A[:r]).view(w0.shape) * self.rank_scale(r)

    def set_active_rank(self, r: int | None) -> None:
        if r is not None and not 1 <= r <= self.max_rank:
            raise ValueError(f"{self.config.method}: rank {r} is outside 1..{self.max_rank}, "
                             "the ranks it was trained for")
        self.active_rank = r

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active_rank={self.active_rank}"


@dataclass
class DyLoRAOptions:
    r_min: int = option(1, "smallest rank drawn during training (ranks are drawn uniformly from r_min..rank)")
    frozen: bool = option(True, "only the drawn b-th component trains at each step (the paper's frozen mode, LyCORIS); "
                          "False: all components up to b train")


@register_method(
    "dylora",
    label="DyLoRA",
    family="nested-rank",
    options=DyLoRAOptions,
    summary="DyLoRA: LoRA trained at a rank drawn from r_min..R each step, usable at any rank afterwards; "
            "trainable R(O + F)",
    citation="Valipour et al. 2023, arXiv 2210.07558",
    trains="lora_A (R x F), lora_B (O x R); frozen mode: only the drawn component per step",
)
class DyLoRA(NestedRankLoRA):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: DyLoRAOptions) -> None:
        super().__init__(w0, rank=rank, scaling=scaling)
        if not 1 <= options.r_min <= rank:
            raise ValueError(f"dylora: r_min must be in 1..{rank}, got {options.r_min}")
        self.r_min, self.frozen = options.r_min, options.frozen

        self.drawn_rank: int | None = None

    def rank_scale(self, r: int) -> float:
        ratio = self.max_rank / r  # alpha / r, written through the configured alpha / R
        use_rslora = getattr(getattr(self, "config", None), "use_rslora", False)
        return self.scaling * (math.sqrt(ratio) if use_rslora else ratio)

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        if self.active_rank is not None:
            return self.truncated(w0, self.active_rank)
        if not (self.training and torch.is_grad_enabled()):
            return self.truncated(w0, self.max_rank)
        b = self.drawn_rank or int(torch.randint(self.r_min, self.max_rank + 1, ()).item())
        a, bb = self.lora_A[:b], self.lora_B[:, :b]
        if self.frozen and b > 1:
            a = torch.cat([a[:-1].detach(), a[-1:]])
            bb = torch.cat([bb[:, :-1].detach(), bb[:, -1:]], dim=1)
        return (bb @ a).view(w0.shape) * self.rank_scale(b)


def draw_dylora_rank(model: torch.nn.Module, generator: torch.Generator | None = None) -> dict[str, int]:
    """Draw one rank for the next training steps of every ``dylora`` layer (the paper's one b per step).

    One uniform number u is drawn and each layer takes ``b = r_min + floor(u * (R - r_min + 1))`` of its
    own range (the same b when the layers share r_min and R). Call it once per step before the forward;
    the draw holds until the next call. Returns ``{layer name: b}``.
    """
    from ..inject import iter_adapters

    u = float(torch.rand((), generator=generator))
    drawn = {}
    for name, _, reparam in iter_adapters(model):
        if isinstance(reparam, DyLoRA):
            span = reparam.max_rank - reparam.r_min + 1
            reparam.drawn_rank = reparam.r_min + min(int(u * span), span - 1)
            drawn[name] = reparam.drawn_rank
    if not drawn:
        raise ValueError("the model has no dylora adapters")
    return drawn
