"""IntTune: the NLoRA start with A and B frozen; only the r x r middle factor N trains.

Guo et al., "NLoRA: Nystrom-Initiated Low-Rank Adaptation for Large Language Models", arXiv 2502.14482; official
code TracyGuo2001/NLoRA (``inttune.py``). ``dW = s B N A`` with ``A = W[:r, :]``, ``B = W[:, :r]`` frozen and
``N = W[:r, :r]`` trainable (r^2 per layer); options and the start point as ``nlora`` (``nlora.py``).
"""

from __future__ import annotations

import torch

from ..config import register_method
from .nlora import NystromOptions, ThreeFactorLoRA


@register_method(
    "inttune",
    label="IntTune",
    family="initialisation",
    options=NystromOptions,
    summary="IntTune: the NLoRA start with A, B frozen; only the r x r middle factor N trains",
    citation="Guo et al. 2025, arXiv 2502.14482",
    starts_at_base=False,
    trains="lora_N (r x r); lora_A, lora_B frozen",
)
def build_inttune(w0: torch.Tensor, *, rank: int, scaling: float, options: NystromOptions) -> ThreeFactorLoRA:
    return ThreeFactorLoRA(w0, rank=rank, scaling=scaling, nystrom=options, train_outer=False)
