"""Training rule ``adamw``: the baseline every other rule is compared with.

Plain AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101; torch.optim.AdamW) on everything trainable, whatever the
method: the one rule that needs no declared LoRA pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import option
from ._registry import LoRAPair, register_rule, trainable


@dataclass
class AdamWOptions:
    betas: tuple[float, float] = option((0.9, 0.999), "Adam moment decay rates")
    eps: float = option(1e-8, "Adam denominator epsilon")
    weight_decay: float = option(0.01, "decoupled weight decay (torch AdamW default)")


@register_rule("adamw", label="AdamW", options=AdamWOptions,
               summary="plain AdamW on every trainable parameter",
               citation="Loshchilov & Hutter 2019, arXiv 1711.05101", needs_pairs=False)
def build_adamw(model: nn.Module, pairs: list[LoRAPair], lr: float, o: AdamWOptions) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable(model), lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
