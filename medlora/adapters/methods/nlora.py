"""Three-matrix LoRA with an r x r middle factor: SLoRA, NLoRA (Nystrom initialisation) and IntTune.

Guo et al., "NLoRA: Nystrom-Initiated Low-Rank Adaptation for Large Language Models", arXiv 2502.14482;
official code TracyGuo2001/NLoRA (a PEFT fork, ``init_lora_weights='s_lora' | 'n_lora'``, and ``inttune.py``).
``dW = s B N A`` with ``A: r x I*prod k``, ``N: r x r``, ``B: O x r`` on the ``O x (I*prod k)`` matricisation,
``s = alpha / r`` (README example: r = alpha = 128).

- ``slora`` (``slora.py``): A and N kaiming-uniform (a = sqrt 5, as ``nn.Linear``), B = 0; starts at ``W0``;
  A, N, B train.
- ``nlora`` (this file): Nystrom-style start from the weight itself, ``A = W[:r, :]``, ``B = W[:, :r]``,
  ``N = W[:r, :r]``; A, N, B train.
- ``inttune`` (``inttune.py``): the NLoRA start with A and B frozen; only N trains (r^2 per layer).

As the official code, N is ``W_II = W[:r, :r]`` itself (the paper's Nystrom formula uses its pseudo-inverse, whose
line is commented out there; ``use_pinv=True`` selects it) and the base weight is not reduced, so NLoRA and
IntTune start at ``W0 + s W[:, :r] N W[:r, :]``, not at ``W0``. ``subtract_init=True`` instead cancels the initial
product with a frozen offset (``W_eff = W0 + s (B N A - B0 N0 A0)``, ``W0`` exactly at the start; not in the paper).
Conv layers (reference applicability: MAYBE — the first r "columns" of a kernel matrix are (c_in, k) tuples, an
arbitrary choice) use the matricised kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .._linalg import compute_dtype
from ..base import AdditiveReparam, check_rank, kaiming_uniform_like_lora, zeros_param
from ..config import option, register_method


@dataclass
class NystromOptions:
    use_pinv: bool = option(
        False, "N = pinv(W[:r, :r]) as the paper's Nystrom formula; False: W[:r, :r] (official code)"
    )
    subtract_init: bool = option(
        False, "cancel the initial B N A with a frozen offset so that the model starts at W0 (not in the paper)"
    )


class ThreeFactorLoRA(AdditiveReparam):
    """``dW = s (B N A - B0 N0 A0)``; the offset exists only when ``subtract_init``."""

    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, nystrom: NystromOptions | None,
                 train_outer: bool) -> None:
        super().__init__(scaling)
        out_channels, fan_in = w0.shape[0], math.prod(w0.shape[1:])
        if nystrom is None:  # SLoRA
            a = kaiming_uniform_like_lora(rank, fan_in, like=w0).data
            n = kaiming_uniform_like_lora(rank, rank, like=w0).data
            b = zeros_param(out_channels, rank, like=w0).data
        else:
            check_rank("nlora/inttune", rank, min(out_channels, fan_in), w0)
            w = w0.detach().flatten(1)
            a, b, n = w[:rank].clone(), w[:, :rank].clone(), w[:rank, :rank].clone()
            if nystrom.use_pinv:
                n = torch.linalg.pinv(n.to(compute_dtype(n))).to(w0.dtype)
        self.lora_A = nn.Parameter(a, requires_grad=train_outer)
        self.lora_N = nn.Parameter(n)
        self.lora_B = nn.Parameter(b, requires_grad=train_outer)
        self.subtract_init = nystrom is not None and nystrom.subtract_init
        if self.subtract_init:
            self.offset_A = nn.Parameter(a.clone(), requires_grad=False)
            self.offset_N = nn.Parameter(n.clone(), requires_grad=False)
            self.offset_B = nn.Parameter(b.clone(), requires_grad=False)

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        product = self.lora_B @ self.lora_N @ self.lora_A
        if self.subtract_init:
            product = product - self.offset_B @ self.offset_N @ self.offset_A
        return (product * self.scaling).view(w0.shape)


@register_method(
    "nlora",
    label="NLoRA",
    family="initialisation",
    options=NystromOptions,
    summary="NLoRA: dW = s B N A, Nystrom start A = W[:r,:], B = W[:,:r], N = W[:r,:r] (model perturbed at start)",
    citation="Guo et al. 2025, arXiv 2502.14482",
    starts_at_base=False,
    trains="lora_A (r x I*prod k), lora_N (r x r), lora_B (O x r)",
)
def build_nlora(w0: torch.Tensor, *, rank: int, scaling: float, options: NystromOptions) -> ThreeFactorLoRA:
    return ThreeFactorLoRA(w0, rank=rank, scaling=scaling, nystrom=options, train_outer=True)
