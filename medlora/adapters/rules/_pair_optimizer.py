"""The base of the rules that update LoRA pairs themselves: AdamW for everything else in the same optimiser."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ._registry import LoRAPair, trainable


class PairOptimizer(torch.optim.AdamW):
    """AdamW for the non-pair parameters; subclasses update the ``(A, B)`` pairs themselves in ``_pair_step``.

    Param groups: 0 = other trainable parameters, 1 = every ``A``, 2 = every ``B`` (same order), so a learning-rate
    scheduler and ``state_dict`` work as for any optimiser.
    """

    def __init__(self, model: nn.Module, pairs: list[LoRAPair], lr: float, betas, eps: float, weight_decay: float):
        self.pairs = [p for p in pairs if p.A.requires_grad or p.B.requires_grad]
        in_pairs = {id(t) for p in self.pairs for t in (p.A, p.B)}
        others = [p for p in trainable(model) if id(p) not in in_pairs]
        groups = [
            {"params": others},
            {"params": [p.A for p in self.pairs]},
            {"params": [p.B for p in self.pairs]},
        ]
        super().__init__(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    def _pair_step(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._pair_step()
        # AdamW skips parameters without a gradient: hide the pairs' gradients from it for this step.
        hidden = []
        for group in self.param_groups[1:]:
            for p in group["params"]:
                hidden.append((p, p.grad))
                p.grad = None
        try:
            super().step()
        finally:
            for p, g in hidden:
                p.grad = g
        return loss
