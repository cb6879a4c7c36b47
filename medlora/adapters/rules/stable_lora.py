"""Training rule ``stable_lora``: Stable-LoRA, AdamW with A shrunk until the pair is balanced.

Stable-LoRA (Yize-Wu/Stable-LoRA): AdamW, and before every update each ``A`` is multiplied by
``1 - shrink_ratio`` while ``||A|| >= (numel A / numel B) * ||B||``; once that fails the pair never shrinks again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import option
from ._pair_optimizer import PairOptimizer
from ._registry import register_rule


@dataclass
class StableLoRAOptions:
    shrink_ratio: float = option(5e-4, "each step A <- (1 - shrink_ratio) A while ||A|| >= (|A|/|B|) ||B||")
    betas: tuple[float, float] = option((0.9, 0.999), "Adam moment decay rates")
    eps: float = option(1e-8, "Adam denominator epsilon")
    weight_decay: float = option(0.01, "decoupled weight decay")


class StableLoRA(PairOptimizer):
    def __init__(self, model, pairs, lr, o: StableLoRAOptions):
        super().__init__(model, pairs, lr, o.betas, o.eps, o.weight_decay)
        self.shrink_ratio = o.shrink_ratio
        self.keep_shrinking = [True] * len(self.pairs)

    def _pair_step(self) -> None:
        for i, pair in enumerate(self.pairs):
            if not self.keep_shrinking[i]:
                continue
            if pair.A.norm() >= (pair.A.numel() / pair.B.numel()) * pair.B.norm():
                pair.A.mul_(1.0 - self.shrink_ratio)
            else:
                self.keep_shrinking[i] = False

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._pair_step()
        torch.optim.AdamW.step(self)  # then plain AdamW on everything, the pairs included
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["keep_shrinking"] = list(self.keep_shrinking)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.keep_shrinking = list(state_dict.pop("keep_shrinking", self.keep_shrinking))
        super().load_state_dict(state_dict)


@register_rule("stable_lora", label="Stable-LoRA", options=StableLoRAOptions,
               summary="Stable-LoRA: AdamW plus shrinking A until ||A|| < (|A|/|B|) ||B||, then never again",
               citation="Yize-Wu/Stable-LoRA (stable_lora.py)")
def _build_stable(model, pairs, lr, o: StableLoRAOptions) -> torch.optim.Optimizer:
    return StableLoRA(model, pairs, lr, o)
