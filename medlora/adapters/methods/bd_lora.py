"""Block-diagonal LoRA factors (BD-LoRA, MeLoRA) on the ``O x F`` matricisation, ``F = I * prod k``.

``dW = s * B @ A`` with ``s = alpha / r`` (r = total rank) and ``n`` blocks (``nblocks``):

- ``block_diagonal="both"`` (MeLoRA: Ren et al., "MELoRA: Mini-Ensemble Low-Rank Adapters for
  Parameter-Efficient Fine-Tuning", ACL 2024, arXiv 2402.17263): ``n`` independent mini-LoRAs of rank
  ``r/n`` on the diagonal blocks, ``dW = blockdiag(B_1 A_1, ..., B_n A_n)`` with ``B_i: O/n x r/n`` and
  ``A_i: r/n x F/n``; rank up to r for ``r (O + F) / n`` parameters.
- ``block_diagonal="B"`` / ``"A"`` (BD-LoRA: arXiv 2510.23346, PEFT's ``use_bdlora``): only B (or only A)
  is block-diagonal, the other factor is dense; the point there is tensor-parallel serving, here it is
  just the parameter count.

For a convolution with n | I the fan-in blocks are groups of whole input channels (columns are ordered
input channel first, then kernel taps). B starts at zero (dW = 0). A: with ``block_diagonal="A"`` as PEFT's
``BlockDiagonalLinear`` (the stacked blocks, ``r x F/n``, kaiming-uniform with torch's default a = 0, bound
``sqrt(6 n / F)``; the stacked layout is PEFT's weight layout); with ``"B"`` the dense A is PEFT's ``lora_A``
(kaiming-uniform a = sqrt 5); with ``"both"`` each mini-LoRA's A is a LoRA A of its own (a = sqrt 5, fan-in F/n),
as MeLoRA's mini-ensemble of ordinary LoRAs.
The factors are stored compactly as ``bd_A`` (stacked ``A_i``) and ``bd_B`` (stacked ``B_i``), not as
``lora_A``/``lora_B``: they are not one dense ``r x F`` / ``O x r`` pair, so the LoRA-pair optimiser rules
(LoRA-Pro, ...) do not apply to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..base import AdditiveReparam, kaiming_uniform_like_lora, zeros_param
from ..config import option, register_method


@dataclass
class BDLoRAOptions:
    nblocks: int = option(2, "number n of diagonal blocks; must divide the rank and the factor's block axes")
    block_diagonal: str = option("both", "which factor is block-diagonal: both (MeLoRA), B or A (BD-LoRA)")


def block_diag_stack(blocks: torch.Tensor) -> torch.Tensor:
    """``(n, p, q)`` stacked blocks -> the ``(n p, n q)`` block-diagonal matrix."""
    n, p, q = blocks.shape
    eye = torch.eye(n, dtype=blocks.dtype, device=blocks.device)
    return (eye[:, None, :, None] * blocks[:, :, None, :]).reshape(n * p, n * q)


@register_method(
    "bd_lora",
    label="BD-LoRA",
    family="structure",
    options=BDLoRAOptions,
    summary="block-diagonal LoRA factors (MeLoRA mini-ensemble, or BD-LoRA with one block-diagonal factor); "
            "trainable r(O+F)/n (both) or r(O/n+F) / r(O+F/n)",
    citation="Ren et al. 2024 (MeLoRA), arXiv 2402.17263; BD-LoRA arXiv 2510.23346",
    trains="bd_A (stacked diagonal blocks of A, or dense A), bd_B (stacked blocks of B, or dense B)",
)
class BDLoRA(AdditiveReparam):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: BDLoRAOptions) -> None:
        super().__init__(scaling)
        n, mode = options.nblocks, options.block_diagonal
        if mode not in ("both", "A", "B"):
            raise ValueError(f"bd_lora: block_diagonal must be 'both', 'A' or 'B', got {mode!r}")
        out_channels, fan_in = w0.shape[0], math.prod(w0.shape[1:])
        need = {"rank": rank}
        if mode in ("both", "B"):
            need["O"] = out_channels
        if mode in ("both", "A"):
            need["F = I*prod k"] = fan_in
        bad = [f"{k}={v}" for k, v in need.items() if v % n]
        if n < 1 or bad:
            raise ValueError(f"bd_lora: nblocks={n} must divide {', '.join(bad) or 'every block axis'} "
                             f"(weight of shape {tuple(w0.shape)}, block_diagonal={mode!r})")
        self.nblocks, self.mode = n, mode
        a_blocked, b_blocked = mode in ("both", "A"), mode in ("both", "B")
        a_rows, a_cols = rank // n, fan_in // n
        if mode == "A":  # PEFT's BlockDiagonalLinear: one (r x F/n) weight, kaiming-uniform with a = 0
            a = torch.empty(rank, a_cols, dtype=w0.dtype, device=w0.device)
            self.bd_A = nn.Parameter(nn.init.kaiming_uniform_(a))
        elif a_blocked:  # n mini-LoRA A blocks of (r/n x F/n), stacked along rows
            self.bd_A = nn.Parameter(torch.cat([kaiming_uniform_like_lora(a_rows, a_cols, like=w0).data
                                                for _ in range(n)]))
        else:
            self.bd_A = kaiming_uniform_like_lora(rank, fan_in, like=w0)
        self.bd_B = zeros_param(out_channels, rank // n if b_blocked else rank, like=w0)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense ``B`` (O x r) and ``A`` (r x F) the blocks stand for."""
        n = self.nblocks
        a, b = self.bd_A, self.bd_B
        if self.mode in ("both", "A"):
            a = block_diag_stack(a.view(n, a.shape[0] // n, a.shape[1]))
        if self.mode in ("both", "B"):
            b = block_diag_stack(b.view(n, b.shape[0] // n, b.shape[1]))
        return b, a

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        b, a = self.factors()
        return (b @ a).view(w0.shape) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nblocks={self.nblocks}, block_diagonal={self.mode!r}"
