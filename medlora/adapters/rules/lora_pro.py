"""Training rule ``lora_pro``: LoRA-Pro, full-size Adam on the equivalent gradient, projected back to A and B.

LoRA-Pro (Wang et al., ICLR 2025, OpenReview gTwRMU3lJ5, arXiv 2407.18242), as the official
``lorapro_full_adjustment`` (mrflogs/LoRA-Pro, DeepSpeed ``stage_1_and_2.py``): the raw LoRA gradients are first
adjusted, ``g_A' = (1/s^2)(B^T B)^-1 g_A`` and ``g_B' = (1/s^2)(I - P_B) g_B (A A^T)^-1`` with
``P_B = B (B^T B)^-1 B^T``, so that the equivalent gradient ``g~ = s (B g_A' + g_B' A) = P_B G + (I - P_B) G P_A``
is the best approximation of the full gradient ``G`` that the pair can express; ``g~`` drives full-size Adam
moments, and the resulting full update ``g`` is projected back to the pair by least squares,
``g_A = (1/s)(B^T B)^-1 B^T g + X A``, ``g_B = (1/s)(I - P_B) g A^T (A A^T)^-1 - B X``, with ``X`` the solution of
the Sylvester equation ``B^T B X + X A A^T = -(1/s)(B^T B)^-1 B^T g A^T`` (solved at every step, the first
included), then ``A -= lr g_A``, ``B -= lr g_B`` (and decoupled weight decay; the official code runs plain SGD
on the adjusted gradients). Inverses are of ``M + delta I``. The official code writes ``g_A = s B^T g`` and
``1/s^2`` factors; the products are identical. One deviation: Adam's bias corrections use the step count t
(the paper's Adam); the official code uses t + 1 because DeepSpeed advances its ``global_step`` before
calling the adjustment (which is also why its t = 1 branches never run), which makes its first steps up to
26% shorter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ._pair_optimizer import PairOptimizer
from ._registry import register_rule


@dataclass
class LoRAProOptions:
    betas: tuple[float, float] = option((0.9, 0.999), "decay rates of the full-size Adam moments of the equivalent "
                                        "gradient")
    eps: float = option(1e-8, "Adam denominator epsilon")
    weight_decay: float = option(0.0, "decoupled weight decay on A and B (and the other parameters)")
    delta: float = option(1e-8, "ridge added before inverting B^T B and A A^T")
    use_sylvester: bool = option(True, "choose X (the free r x r term) by the Sylvester equation at every step, as "
                                 "the official code; False: X = 0")


def _sym_inv(m: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.linalg.pinv(m + delta * torch.eye(m.shape[0], dtype=m.dtype, device=m.device), hermitian=True)


def solve_sym_sylvester(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor, delta: float = 0.0) -> torch.Tensor:
    """``X`` with ``P X + X Q = C`` for symmetric positive semi-definite ``P``, ``Q`` (eigen-decomposition)."""
    lp, up = torch.linalg.eigh(p)
    lq, uq = torch.linalg.eigh(q)
    denominator = lp[:, None] + lq[None, :] + delta
    return up @ ((up.T @ c @ uq) / denominator) @ uq.T


class LoRAPro(PairOptimizer):
    def __init__(self, model, pairs, lr, o: LoRAProOptions):
        super().__init__(model, pairs, lr, o.betas, o.eps, o.weight_decay)
        self.delta = o.delta
        self.use_sylvester = o.use_sylvester

    def _pair_step(self) -> None:
        group = self.param_groups[1]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        for pair in self.pairs:
            a, b, s = pair.A, pair.B, pair.scaling
            if a.grad is None or b.grad is None:
                continue
            ga, gb = a.grad, b.grad
            state = self.state[a]
            if not state:
                state["step"] = 0
                state["full_exp_avg"] = torch.zeros(b.shape[0], a.shape[1], dtype=a.dtype, device=a.device)
                state["full_exp_avg_sq"] = torch.zeros_like(state["full_exp_avg"])
            state["step"] += 1
            t = int(state["step"])  # (a float tensor after load_state_dict)
            btb, aat = b.T @ b, a @ a.T
            btb_inv, aat_inv = _sym_inv(btb, self.delta), _sym_inv(aat, self.delta)
            # The adjusted LoRA gradients make s (B g_A + g_B A) the best low-rank approximation
            # P_B G + (I - P_B) G P_A of the full gradient G; the raw ones would give s^2 (B B^T G + G A^T A).
            adjusted_ga = btb_inv @ ga / s**2
            adjusted_gb = (gb - b @ (btb_inv @ (b.T @ gb))) @ aat_inv / s**2
            equivalent = s * (b @ adjusted_ga + adjusted_gb @ a)
            state["full_exp_avg"].mul_(beta1).add_(equivalent, alpha=1 - beta1)
            state["full_exp_avg_sq"].mul_(beta2).addcmul_(equivalent, equivalent, value=1 - beta2)
            g = (state["full_exp_avg"] / (1 - beta1**t)) / ((state["full_exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps)
            proj_a = btb_inv @ b.T @ g / s  # (1/s)(B^T B)^-1 B^T g
            new_ga = proj_a
            new_gb = (g - b @ (btb_inv @ (b.T @ g))) @ a.T @ aat_inv / s
            if self.use_sylvester:
                x = solve_sym_sylvester(btb, aat, -proj_a @ a.T, self.delta)
                new_ga = new_ga + x @ a
                new_gb = new_gb - b @ x
            a.mul_(1 - lr * wd).sub_(lr * new_ga)
            b.mul_(1 - lr * wd).sub_(lr * new_gb)


@register_rule("lora_pro", label="LoRA-Pro", options=LoRAProOptions,
               summary="LoRA-Pro: full-size Adam on the equivalent gradient of the adjusted LoRA gradients "
               "(P_B G + (I - P_B) G P_A), projected back onto A and B by least squares (+ Sylvester-optimal split)",
               citation="Wang et al. 2025 (ICLR), arXiv 2407.18242; mrflogs/LoRA-Pro")
def _build_lora_pro(model, pairs, lr, o: LoRAProOptions) -> torch.optim.Optimizer:
    return LoRAPro(model, pairs, lr, o)
