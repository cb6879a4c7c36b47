"""LoRA on the ``O x (I*prod k)`` matricisation of a weight.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685 (2021).
``dW = s * (B @ A).view(W.shape)``, ``A: r x (I*prod k)`` kaiming-uniform(a=sqrt 5), ``B: O x r`` zeros,
``s = alpha / r``. For a convolution these are the same numbers as PEFT's conv LoRA (A is a ``k``-sized
convolution to ``r`` channels, B a 1x1 convolution), evaluated here in weight space.
"""

from __future__ import annotations

import math

import torch

from ..base import AdditiveReparam, kaiming_uniform_like_lora, zeros_param
from ..config import register_method


@register_method(
    "lora",
    summary="low-rank update of the O x (I*prod k) weight matrix; trainable r(O + I*prod k)",
    citation="Hu et al. 2021, arXiv 2106.09685",
    trains="lora_A (r x I*prod k), lora_B (O x r)",
)
class LoRA(AdditiveReparam):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: object) -> None:
        super().__init__(scaling)
        out_channels, fan_in = w0.shape[0], math.prod(w0.shape[1:])
        self.lora_A = kaiming_uniform_like_lora(rank, fan_in, like=w0)
        self.lora_B = zeros_param(out_channels, rank, like=w0)

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(w0.shape) * self.scaling
