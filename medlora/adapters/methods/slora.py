"""SLoRA: three-factor LoRA ``dW = s B N A`` with an r x r middle factor, started at ``W0``.

Guo et al., "NLoRA: Nystrom-Initiated Low-Rank Adaptation for Large Language Models", arXiv 2502.14482; official
code TracyGuo2001/NLoRA (``init_lora_weights='s_lora'``). A and N kaiming-uniform (a = sqrt 5, as ``nn.Linear``),
B = 0; A, N and B train. The factor module is ``nlora.ThreeFactorLoRA``; its middle factor makes ``dW`` something
other than ``s B A``, so it declares no LoRA pair to the training rules.
"""

from __future__ import annotations

import torch

from ..config import register_method
from .nlora import ThreeFactorLoRA


@register_method(
    "slora",
    label="SLoRA",
    family="initialisation",
    summary="SLoRA: dW = s B N A with an r x r middle factor N; A, N kaiming, B = 0",
    citation="Guo et al. 2025, arXiv 2502.14482",
    trains="lora_A (r x I*prod k), lora_N (r x r), lora_B (O x r)",
)
def build_slora(w0: torch.Tensor, *, rank: int, scaling: float, options: object) -> ThreeFactorLoRA:
    return ThreeFactorLoRA(w0, rank=rank, scaling=scaling, nystrom=None, train_outer=True)
