"""LoRA on the ``O x (I*prod k)`` matricisation of a weight.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685 (2021).
``dW = s * (B @ A).view(W.shape)``, ``A: r x (I*prod k)`` kaiming-uniform(a=sqrt 5), ``B: O x r`` zeros,
``s = alpha / r``. For a convolution these are the same numbers as PEFT's conv LoRA (A is a ``k``-sized
convolution to ``r`` channels, B a 1x1 convolution), evaluated here in weight space.

Fused projections (SAMed, Zhang & Liu 2023, arXiv 2304.13785): a ViT's ``qkv`` Linear stacks q, k and v
along its outputs. With ``fused_outputs=3, adapt_outputs=[0, 2]`` each listed output block gets its own
rank-r pair (``A_j: r x I``, ``B_j: (O/3) x r``) and the other blocks stay frozen: SAMed's q/v-only LoRA,
``dW = [s B_q A_q; 0; s B_v A_v]``. The pairs are stored stacked: ``lora_A`` (n r x I), ``lora_B`` (n O/3 x r).

Training computes the factors' gradients in rank space where that is cheaper (``medlora.adapters.factored``; the
fused blocks as one rank-``k r`` LoRA with a block-diagonal ``B``).

Training rules (``medlora.adapters.optim``): the layer declares ``(lora_A, lora_B)`` as a plain LoRA pair, except
with two or more fused blocks (stacked pairs), where the pair rules refuse it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..base import AdditiveReparam, kaiming_uniform_like_lora, zeros_param
from ..config import option, register_method
from ..factored import Factors, low_rank_factors


@dataclass
class LoRAOptions:
    fused_outputs: int = option(
        1, "the layer's outputs are this many equal fused blocks (3 for a ViT's fused qkv projection)"
    )
    adapt_outputs: list[int] | None = option(
        None, "indices of the fused output blocks that get their own rank-r update (SAMed: [0, 2] = q and v); "
        "None: one update of the whole layer"
    )


@register_method(
    "lora",
    label="LoRA",
    family="low-rank",
    options=LoRAOptions,
    summary="low-rank update of the O x (I*prod k) weight matrix; trainable r(O + I*prod k)",
    citation="Hu et al. 2021, arXiv 2106.09685",
    trains="lora_A (r x I*prod k), lora_B (O x r)",
    lora_pair=True,
)
class LoRA(AdditiveReparam):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: LoRAOptions | None = None) -> None:
        super().__init__(scaling)
        options = options if isinstance(options, LoRAOptions) else LoRAOptions()
        out_channels, fan_in = w0.shape[0], math.prod(w0.shape[1:])
        self.fused_outputs, self.adapt_outputs = options.fused_outputs, None
        if options.adapt_outputs is not None:
            n = options.fused_outputs
            blocks = sorted(set(options.adapt_outputs))
            if n < 1 or out_channels % n or not blocks or not all(0 <= b < n for b in blocks):
                raise ValueError(f"lora: adapt_outputs {options.adapt_outputs} must index the {n} fused output blocks "
                                 f"of a layer with {out_channels} outputs (which must divide into {n} equal blocks)")
            self.adapt_outputs = blocks
            a = torch.cat([kaiming_uniform_like_lora(rank, fan_in, like=w0).data for _ in blocks])
            self.lora_A = torch.nn.Parameter(a)
            self.lora_B = zeros_param(len(blocks) * (out_channels // n), rank, like=w0)
        else:
            self.lora_A = kaiming_uniform_like_lora(rank, fan_in, like=w0)
            self.lora_B = zeros_param(out_channels, rank, like=w0)

    def rank_factors(self) -> LoRA | None:
        return self if self.adapt_outputs is None else None  # fused blocks: one rank per block, not squeezable

    def rule_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        # Several fused blocks are several pairs stacked in one tensor: no single (A, B) describes them.
        if self.adapt_outputs is not None and len(self.adapt_outputs) > 1:
            return []
        return [(self.lora_A, self.lora_B, self.scaling)]

    def factored(self, w0: torch.Tensor) -> Factors:
        if self.adapt_outputs is None:
            return low_rank_factors(self.lora_A, self.lora_B, self.scaling, w0)
        # Fused blocks: one LoRA of rank k r whose B is block-diagonal over the adapted output blocks.
        n, k, rank = self.fused_outputs, len(self.adapt_outputs), self.lora_B.shape[1]
        diagonal = torch.block_diag(*self.lora_B.view(k, -1, rank))
        index = torch.tensor(self.adapt_outputs, device=w0.device)
        b = diagonal.new_zeros(n, w0.shape[0] // n, k * rank).index_copy(0, index, diagonal.view(k, -1, k * rank))
        return low_rank_factors(self.lora_A, b.view(w0.shape[0], k * rank), self.scaling, w0)

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        if self.adapt_outputs is None:
            return (self.lora_B @ self.lora_A).view(w0.shape) * self.scaling
        n, k = self.fused_outputs, len(self.adapt_outputs)
        b = self.lora_B.view(k, -1, self.lora_B.shape[1])
        per_block = torch.bmm(b, self.lora_A.view(k, -1, self.lora_A.shape[1]))
        index = torch.tensor(self.adapt_outputs, device=w0.device)
        full = per_block.new_zeros(n, *per_block.shape[1:]).index_copy(0, index, per_block)
        return full.view(w0.shape) * self.scaling
