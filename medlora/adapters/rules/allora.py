"""Training rule ``allora``: ALLoRA, a per-row learning rate from each row's norm.

ALLoRA (Huang & Balestriero 2024, arXiv 2410.09692): the update of each row of ``A`` and ``B`` gets
its own learning rate ``lr * c_i`` with ``c_i = 1 / sqrt(||row_i||^2 + 1 / eta^2)``, so rows near zero (``B`` at
start) move fast; the paper also drops dropout (our methods have none) and the ``alpha / r`` scale (a warning
is given when ``s != 1``; create the adapter with ``alpha = rank``). The exact coefficient could not be read
from the paper; this one is our resolution of "inversely proportional to the row's l2 norm, regularised at 0"
and is applied to the AdamW direction.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..config import option
from ._pair_optimizer import PairOptimizer
from ._registry import register_rule


@dataclass
class ALLoRAOptions:
    eta: float = option(
        10.0, "row coefficient 1/sqrt(||row||^2 + 1/eta^2): at most eta (a zero row), ~1/||row|| for large rows "
        "(our default; the paper's value could not be read)")
    betas: tuple[float, float] = option((0.9, 0.999), "Adam moment decay rates of the update direction")
    eps: float = option(1e-8, "Adam denominator epsilon")
    weight_decay: float = option(0.0, "decoupled weight decay")


def allora_row_coefficient(t: torch.Tensor, eta: float) -> torch.Tensor:
    """``1 / sqrt(||row||^2 + 1/eta^2)`` for every row of a matrix, shaped to broadcast over the row."""
    return (t.pow(2).sum(dim=1, keepdim=True) + 1.0 / eta**2).rsqrt()


class ALLoRA(PairOptimizer):
    def __init__(self, model, pairs, lr, o: ALLoRAOptions):
        super().__init__(model, pairs, lr, o.betas, o.eps, o.weight_decay)
        self.eta = o.eta
        if any(abs(p.scaling - 1.0) > 1e-12 for p in self.pairs):
            warnings.warn("ALLoRA is scaling-free: create the adapter with alpha = rank (scale 1)", stacklevel=3)

    def _pair_step(self) -> None:
        beta1, beta2 = self.param_groups[1]["betas"]
        for group in self.param_groups[1:]:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = int(state["step"])  # (a float tensor after load_state_dict)
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                direction = (state["exp_avg"] / (1 - beta1**t)) / ((state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps)
                coefficient = allora_row_coefficient(p, self.eta)  # from the weights before this update
                p.mul_(1 - lr * wd)
                p.sub_(lr * coefficient * direction)


@register_rule("allora", label="ALLoRA", options=ALLoRAOptions,
               summary="ALLoRA: per-row learning rate lr / sqrt(||row||^2 + 1/eta^2) for A and B; no alpha/r scale",
               citation="Huang & Balestriero 2024, arXiv 2410.09692 [coefficient unverified]")
def _build_allora(model, pairs, lr, o: ALLoRAOptions) -> torch.optim.Optimizer:
    return ALLoRA(model, pairs, lr, o)
