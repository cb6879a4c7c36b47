"""PiSSA: LoRA started on the principal singular components of the frozen weight.

Meng, Wang & Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language
Models", NeurIPS 2024, arXiv 2404.02948. With the thin SVD of the ``O x (I*prod k)`` matricisation
``W0 = U diag(S) V^T`` and ``s = alpha / r``:
``A0 = diag(sqrt(S_r / s)) V_r^T`` (r x I*prod k), ``B0 = U_r diag(sqrt(S_r / s))`` (O x r), so ``s B0 A0`` is the
best rank-r approximation of ``W0``; both A and B train. These are the numbers of PEFT's
``init_lora_weights="pissa"`` (``niter`` selects ``"pissa_niter_N"``, a randomised ``svd_lowrank``).

Differences from PEFT / the official code: PEFT overwrites the base weight with the residual ``W0 - s B0 A0``.
Here the base weight is never modified; the offset lives in the reparameterisation,
``W_eff = W0 + s (B A - B0 A0)``, with ``B0, A0`` stored as frozen tensors of the adapter (saved with it), so
the start point is ``W0`` exactly, the base fingerprint stays that of the pretrained model, and the adapter
file reproduces ``W_eff`` bitwise. PEFT refuses PiSSA on convolutions; here it applies to every layer type
through the canonical matricisation (the same SVD SALT uses). The SVD is taken from the weight the layer holds
at ``inject`` time: load the pretrained weights first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .._linalg import top_svd
from ..base import AdditiveReparam, check_rank, frozen
from ..config import option, register_method
from ..factored import Factors, low_rank_factors


class OffsetLoRA(AdditiveReparam):
    """``W_eff = W0 + s (B A - B0 A0)``: LoRA whose initial product is cancelled by a frozen offset.

    ``lora_A: r x I*prod k`` and ``lora_B: O x r`` train; ``offset_A``, ``offset_B`` are their frozen initial
    values. The difference is exactly zero while ``A == A0`` and ``B == B0`` (same kernels on the same inputs).
    """

    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float) -> None:
        super().__init__(scaling)
        out_channels, fan_in = w0.shape[0], math.prod(w0.shape[1:])
        self.lora_A = nn.Parameter(torch.full((rank, fan_in), float("nan"), dtype=w0.dtype, device=w0.device))
        self.lora_B = nn.Parameter(torch.full((out_channels, rank), float("nan"), dtype=w0.dtype, device=w0.device))
        self.offset_A = frozen(rank, fan_in, like=w0)
        self.offset_B = frozen(out_channels, rank, like=w0)

    @torch.no_grad()
    def set_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Start at ``A = a``, ``B = b`` with the offset cancelling ``s b a``."""
        for target, value in ((self.lora_A, a), (self.lora_B, b), (self.offset_A, a), (self.offset_B, b)):
            target.copy_(value)

    def rule_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        return [(self.lora_A, self.lora_B, self.scaling)]  # the frozen offset is a constant for the rules

    def factored(self, w0: torch.Tensor) -> Factors:
        return low_rank_factors(self.lora_A, self.lora_B, self.scaling, w0)  # the offset is a constant

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        return ((self.lora_B @ self.lora_A - self.offset_B @ self.offset_A) * self.scaling).view(w0.shape)


@dataclass
class PiSSAOptions:
    niter: int | None = option(
        None, "None: exact SVD (PEFT 'pissa'); N: randomised svd_lowrank with N subspace iterations ('pissa_niter_N')"
    )


@register_method(
    "pissa",
    label="PiSSA",
    family="initialisation",
    options=PiSSAOptions,
    summary="PiSSA: LoRA initialised on the top-r singular triplets of W0, residual offset inside the adapter",
    citation="Meng, Wang & Zhang 2024, arXiv 2404.02948",
    trains="lora_A (r x I*prod k), lora_B (O x r); frozen offset B0 A0",
    lora_pair=True,
)
class PiSSA(OffsetLoRA):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: PiSSAOptions) -> None:
        super().__init__(w0, rank=rank, scaling=scaling)
        matrix = w0.detach().flatten(1)
        check_rank("pissa", rank, min(matrix.shape), w0)
        u, s, vh = top_svd(matrix, rank, options.niter)
        root = torch.sqrt(s / scaling)
        self.set_factors((root[:, None] * vh).to(w0.dtype), (u * root).to(w0.dtype))
