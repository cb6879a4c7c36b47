"""LoRA-C: layer-wise low-rank update with the first kernel axis folded into the output side.

Ding et al., "LoRA-C: Parameter-Efficient Fine-Tuning of Robust CNN for IoT Devices", arXiv 2410.16954
(2024), layer-wise form: ``A: r x (I*k2..kd)``, ``B: (O*k1) x r``, ``BA`` reshaped to the kernel.
Resolution used here (the SAH paper's own equation could not be read, see docs/adapter_methods.md): permute the
canonical weight to ``(O, k1, I, k2..kd)``, apply the rank-r update to its ``(O*k1) x (I*k2..kd)``
unfolding, permute back. Trainable ``r (O*k1 + I*k2..kd)``. The paper finds ``alpha/r = 2`` best, which
is the default here. A Linear layer has no kernel axis and reduces to plain LoRA.

In training the update is two separable convolutions (``medlora.adapters.factored``): ``A`` over the input
channels and the kernel axes 2..d, ``B`` over the first kernel axis into the outputs; their rank-space gradients
cost ``2 r (I k2..kd + O k1)`` per output voxel against ``O I k`` for the dense weight gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..base import AdditiveReparam, kaiming_uniform_like_lora, zeros_param
from ..config import register_method
from ..factored import Factors, low_rank_factors


@register_method(
    "lora_c",
    label="LoRA-C",
    family="low-rank",
    summary="LoRA-C: rank r on the (O*k1) x (I*k2..kd) unfolding; trainable r(O*k1 + I*k2..kd)",
    citation="Ding et al. 2024, arXiv 2410.16954 (layer-wise LoRA-C)",
    alpha_over_rank=2.0,
    trains="lora_A (r x I*k2..kd), lora_B (O*k1 x r)",
    lora_pair=True,
)
class LoRAC(AdditiveReparam):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: object) -> None:
        super().__init__(scaling)
        out_channels, in_channels, *kernel = w0.shape
        k1 = kernel[0] if kernel else 1
        self.lora_A = kaiming_uniform_like_lora(rank, in_channels * math.prod(kernel[1:]), like=w0)
        self.lora_B = zeros_param(out_channels * k1, rank, like=w0)

    def rule_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        return [(self.lora_A, self.lora_B, self.scaling)]

    def factored(self, w0: torch.Tensor) -> Factors:
        out_channels, in_channels, *kernel = w0.shape
        if not kernel:
            return low_rank_factors(self.lora_A, self.lora_B, self.scaling, w0)
        # A convolves over (I, k2..kd), B over kernel axis 1: dW[o, i, a, ...] = sum_j B[o k1 + a, j] A[j, i, ...]
        rank = self.lora_A.shape[0]
        a = self.lora_A.view(rank, in_channels, 1, *kernel[1:])
        b = (self.lora_B * self.scaling).view(out_channels, kernel[0], rank).transpose(1, 2)
        return Factors(a=a, b=b.reshape(out_channels, rank, kernel[0], *[1] * (len(kernel) - 1)), b_axes=(0,))

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        out_channels, in_channels, *kernel = w0.shape
        if not kernel:
            return (self.lora_B @ self.lora_A) * self.scaling
        # (O*k1) x (I*k2..) -> (O, k1, I, k2..) -> (O, I, k1, k2..)
        unfolded = (self.lora_B @ self.lora_A).view(out_channels, kernel[0], in_channels, *kernel[1:])
        return unfolded.transpose(1, 2).reshape(w0.shape) * self.scaling
