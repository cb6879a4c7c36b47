"""Training rule ``ffa``: FFA-LoRA, A frozen at its random start.

FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): ``A`` stays at its random initialisation
(``requires_grad`` is switched off), only ``B`` trains.
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import LoRAPair, register_rule
from .adamw import AdamWOptions, build_adamw


@register_rule("ffa", label="FFA-LoRA", options=AdamWOptions,
               summary="FFA-LoRA: A frozen at its random init, only B (and non-LoRA parameters) train with AdamW",
               citation="Sun et al. 2024 (ICLR), arXiv 2403.12313")
def _build_ffa(model: nn.Module, pairs: list[LoRAPair], lr: float, o: AdamWOptions) -> torch.optim.Optimizer:
    for pair in pairs:
        pair.A.requires_grad_(False)
    return build_adamw(model, pairs, lr, o)
