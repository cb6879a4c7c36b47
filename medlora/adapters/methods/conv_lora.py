"""convLoRA: the loralib ConvLoRA operator, with the shape fix for 3D kernels.

Aleem et al., "ConvLoRA and AdaBN based Domain Adaptation via Self-Training", ISBI 2024,
arXiv 2402.04964, which uses microsoft/loralib's ``ConvLoRA``: ``A: (r*k1) x (I*k1)``,
``B: (O*k2..kd) x (r*k1)``, ``dW = s * (B @ A).view(W.shape)`` (the row-major ``view`` ties kernel rows to
output rows; loralib PR #157 made B's first dimension ``O * k2..kd`` so that 1D/3D kernels work).
The update has rank ``r*k1`` and ``r*k1*(I*k1 + O*k2..kd)`` trainable parameters: on a 32-channel
3x3x3 convolution, rank 16 already equals the layer's own size. A Linear layer reduces to plain LoRA.

Backward (``medlora.adapters.factored``): on Linear and 1D layers loralib's view is the plain ``O x (I k)``
matricisation and the factors train in rank space like LoRA's (rank ``r k1``). On 2D/3D kernels a row of the
``(O k2..kd) x (I k1)`` view holds ``I k1`` consecutive entries of the row-major kernel, which straddle input
channels and kernel taps, so ``B A`` is not a convolution of the input followed by a mixing into the outputs and
has no rank-space gradient: those layers keep the dense path (autograd through ``W_eff``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..base import AdditiveReparam, kaiming_uniform_like_lora, zeros_param
from ..config import register_method
from ..factored import Factors, low_rank_factors


@register_method(
    "conv_lora",
    label="convLoRA",
    family="low-rank",
    summary="loralib ConvLoRA: rank r*k1, A (r*k1)x(I*k1), B (O*k2..kd)x(r*k1)",
    citation="Aleem et al. 2024 (ISBI), arXiv 2402.04964; microsoft/LoRA loralib ConvLoRA",
    trains="lora_A (r*k1 x I*k1), lora_B (O*k2..kd x r*k1)",
    lora_pair=True,
)
class ConvLoRA(AdditiveReparam):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: object) -> None:
        super().__init__(scaling)
        out_channels, in_channels, *kernel = w0.shape
        k1 = kernel[0] if kernel else 1
        self.lora_A = kaiming_uniform_like_lora(rank * k1, in_channels * k1, like=w0)
        self.lora_B = zeros_param(out_channels * math.prod(kernel[1:]), rank * k1, like=w0)

    def rule_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        return [(self.lora_A, self.lora_B, self.scaling)]

    def factored(self, w0: torch.Tensor) -> Factors | None:
        if w0.dim() > 3:
            return None  # see the module docstring: no convolution-and-mixing form on 2D/3D kernels
        return low_rank_factors(self.lora_A, self.lora_B, self.scaling, w0)

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(w0.shape) * self.scaling
