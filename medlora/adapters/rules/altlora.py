"""Training rule ``altlora``: AltLoRA, alternating preconditioned A and B steps.

AltLoRA (Yu et al. 2025, arXiv 2505.12455; LucasXinYu/AltLoRA): per pair, ``A`` then ``B``
(``B``'s preconditioner uses the new ``A``): ``g_A' = (B^T B + lam I)^-1 g_A``, momentum carried into the new
subspace ``m_A <- beta1 P_A m_A + (1 - beta1) g_A'`` with ``P_A = (B^T B + lam I)^-1 B^T B_prev``,
``A -= lr m_A / (1 - beta1^t)``; symmetrically ``g_B' = g_B (A A^T + lam I)^-1``,
``P_B = A_prev A^T (A A^T + lam I)^-1``, ``m_B <- beta1 m_B P_B + (1 - beta1) g_B'``. Decoupled weight decay
after the update, as the authors' code. The step is a preconditioned gradient (no Adam normalisation), so it
wants a larger ``lr`` than AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ._pair_optimizer import PairOptimizer
from ._registry import register_rule


@dataclass
class AltLoRAOptions:
    betas: tuple[float, float] = option((0.999, 0.98), "beta1: momentum (authors' default); beta2: second moment, "
                                        "used only with second_moment=True")
    eps: float = option(1e-6, "denominator epsilon (second_moment=True; the authors' 1e-6)")
    weight_decay: float = option(1e-5, "decoupled weight decay, applied after the update")
    reg: float = option(1e-3, "ridge lambda in (B^T B + lambda I)^-1 and (A A^T + lambda I)^-1")
    second_moment: bool = option(False, "AltLoRA+: divide by the root of a second moment, as the authors' code")


class AltLoRA(PairOptimizer):
    def __init__(self, model, pairs, lr, o: AltLoRAOptions):
        super().__init__(model, pairs, lr, o.betas, o.eps, o.weight_decay)
        self.reg = o.reg
        self.second_moment = o.second_moment
        self.corrected_adam = bool(getattr(o, "corrected_adam", False))

    def _update(self, p: torch.Tensor, g: torch.Tensor, transported: torch.Tensor, state: dict, group: dict) -> None:
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        t = int(state["step"])  # (a float tensor after load_state_dict)
        momentum = beta1 * transported + (1 - beta1) * g
        step = momentum / (1 - beta1**t)
        if self.second_moment:
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if self.corrected_adam:
                step = step / ((state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps)
            else:  # the authors' altlora_plus: uncorrected v, and the untransported momentum carried on
                step = step / (state["exp_avg_sq"].sqrt() + eps)
                momentum = beta1 * state["exp_avg"] + (1 - beta1) * g
        state["exp_avg"] = momentum
        p.sub_(lr * step)
        p.mul_(1 - lr * wd)

    def _pair_step(self) -> None:
        group = self.param_groups[1]
        for pair in self.pairs:
            a, b = pair.A, pair.B
            r = a.shape[0]
            eye = torch.eye(r, dtype=a.dtype, device=a.device)
            if a.grad is not None:
                state = self.state[a]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(a), exp_avg_sq=torch.zeros_like(a),
                                 previous=torch.zeros_like(b))
                state["step"] += 1
                precondition = torch.linalg.inv(b.T @ b + self.reg * eye)
                transport = precondition @ b.T @ state["previous"]
                self._update(a, precondition @ a.grad, transport @ state["exp_avg"], state, group)
                state["previous"] = b.detach().clone()
            if b.grad is not None:
                state = self.state[b]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(b), exp_avg_sq=torch.zeros_like(b),
                                 previous=torch.zeros_like(a))
                state["step"] += 1
                precondition = torch.linalg.inv(a @ a.T + self.reg * eye)  # with the A just updated
                transport = state["previous"] @ a.T @ precondition
                self._update(b, b.grad @ precondition, state["exp_avg"] @ transport, state, group)
                state["previous"] = a.detach().clone()


@register_rule("altlora", label="AltLoRA", options=AltLoRAOptions,
               summary="AltLoRA: alternating A/B steps preconditioned by (B^T B + lam I)^-1 / (A A^T + lam I)^-1, "
               "momentum transported between subspaces",
               citation="Yu et al. 2025, arXiv 2505.12455; LucasXinYu/AltLoRA")
def _build_altlora(model, pairs, lr, o: AltLoRAOptions) -> torch.optim.Optimizer:
    return AltLoRA(model, pairs, lr, o)
