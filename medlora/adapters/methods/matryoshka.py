"""MatryoshkaLoRA: every nested rank of one LoRA trained in a single forward pass.

Modoranu, Safaryan & Alistarh, "MatryoshkaLoRA: Learning Accurate Hierarchical Low-Rank Representations for
LLM Fine-Tuning", arXiv 2605.07850 (2026); official code IST-DASLab/MatryoshkaLoRA
(``adapters/matryoshka.py``). Factors as LoRA (``lora_A: R x F`` kaiming-uniform, ``lora_B: O x R`` zeros).
For the set of nested ranks ``S = {r_1 < ... < r_n} <= R`` and per-rank scales ``s_r`` (``scale``: none 1,
rank 1/r, sqrt 1/sqrt(r)). Defaults as the authors' ``scripts/bash_run.sh``: ``S`` = the powers of two up to R
(its ``TRAIN_EVAL_RANKS=1,2,4,...,256`` with the ranks above R removed) and sqrt scaling. One addition of ours:
when R is not a power of two, R itself joins the default S, since the components above the largest power of
two would otherwise get weight 0 and never train (the script runs R = 32, where nothing changes).

- ``mask_type="diag"`` (the paper's Algorithm 1): ``dW = B diag(P) A`` with ``P_i = sum of s_r over the r in
  S with r >= i + 1``, i.e. the sum over S of every nested adapter ``s_r B[:, :r] A[:r]``.
- ``mask_type="binary"``: ``dW = sum_{r in S} (s_r / |S|) B[:, :r] A[:r]`` (the same directions, 1/|S| the size;
  evaluated here as ``B diag(P/|S|) A``, which has the same value and gradient as the official loop).

At rank r (after ``medlora.adapters.set_active_rank(model, r)``, or as a plain ``lora`` adapter after
``truncate_rank``): ``dW = s_r B[:, :r] A[:r]``. Without an active rank the layer keeps the training form.
All scales are multiplied by the configured ``alpha / R`` (1 by default, which gives the official scales).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import option, register_method
from .dylora import NestedRankLoRA

SCALES = {"none": lambda r: 1.0, "rank": lambda r: 1.0 / r, "sqrt": lambda r: 1.0 / math.sqrt(r)}


def default_train_ranks(rank: int) -> list[int]:
    """The authors' script's nested ranks for rank R: powers of two <= R (plus R itself, ours, if not one)."""
    ranks = [2**i for i in range(rank.bit_length()) if 2**i <= rank]
    return ranks if ranks[-1] == rank else [*ranks, rank]


@dataclass
class MatryoshkaOptions:
    train_ranks: list[int] | None = option(None, "the nested ranks S trained together; None: the powers of two <= R "
                                           "as the authors' script (and R itself when it is not one)")
    mask_type: str = option("diag", "diag (Algorithm 1: sum over S) or binary (mean over S)")
    scale: str = option("sqrt", "per-rank scale s_r: none (1), rank (1/r) or sqrt (1/sqrt r, the authors' script)")


@register_method(
    "matryoshka",
    label="MatryoshkaLoRA",
    family="nested-rank",
    options=MatryoshkaOptions,
    summary="MatryoshkaLoRA: all nested ranks of one LoRA trained at once (weights diag(P)), deploy any rank; "
            "trainable R(O + F)",
    citation="Modoranu, Safaryan & Alistarh 2026, arXiv 2605.07850",
    trains="lora_A (R x F), lora_B (O x R)",
)
class MatryoshkaLoRA(NestedRankLoRA):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: MatryoshkaOptions) -> None:
        super().__init__(w0, rank=rank, scaling=scaling)
        if options.mask_type not in ("diag", "binary") or options.scale not in SCALES:
            raise ValueError(f"matryoshka: mask_type must be diag or binary and scale one of {sorted(SCALES)}, got "
                             f"{options.mask_type!r}, {options.scale!r}")
        ranks = sorted(set(options.train_ranks or default_train_ranks(rank)))
        if not ranks or ranks[0] < 1 or ranks[-1] > rank:
            raise ValueError(f"matryoshka: train_ranks must lie in 1..{rank}, got {options.train_ranks}")
        self.train_ranks, self.scale_kind = ranks, options.scale
        weights = [sum(SCALES[options.scale](r) for r in ranks if r >= i + 1) for i in range(rank)]
        if options.mask_type == "binary":
            weights = [w / len(ranks) for w in weights]
        self.register_buffer("rank_weights", torch.tensor(weights, dtype=w0.dtype, device=w0.device),
                             persistent=False)

    def rank_scale(self, r: int) -> float:
        return self.scaling * SCALES[self.scale_kind](r)

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        if self.active_rank is not None:
            return self.truncated(w0, self.active_rank)
        return (self.lora_B @ (self.lora_A * self.rank_weights[:, None])).view(w0.shape) * self.scaling
