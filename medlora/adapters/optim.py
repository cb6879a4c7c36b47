"""Training rules for LoRA-shaped adapters: optimisers that know which tensors are ``A`` and ``B``.

Some LoRA variants change no parameterisation at all, only how ``A`` and ``B`` are updated. They apply to every
method that declares a plain LoRA pair, ``A`` (``r x n``) and ``B`` (``m x r``) with ``dW = s * unfold(B @ A)``
(:meth:`medlora.adapters.base.Reparam.rule_pairs`, registered with ``lora_pair=True``): ``lora``, ``lora_c``,
``conv_lora``, ``pissa``, ``lora_ga`` and the DoRA wrappers around the first three, on Linear and convolution
layers alike (the rules only see the two matrices and the scale ``s``). Nested-rank (``dylora``, ``matryoshka``),
three-factor (``slora``, ``nlora``, ``inttune``, ``lora_sb``) and every other method declare none, and a rule
other than ``adamw`` refuses a model that holds one, in one line naming the method and the rule: their update is
not ``s B A`` in two trainable factors, so the rules' algebra would be wrong for them. Parameters outside the
adapters' pairs (a DoRA magnitude, an unfrozen head) get plain AdamW inside the same optimiser.

    >>> from medlora.adapters.optim import build_optimizer, list_rules
    >>> opt = build_optimizer(model, rule="lora_pro", lr=1e-3)          # after inject(model, ...)
    >>> loss.backward(); opt.step(); opt.zero_grad()

Rules (``describe_rule(name)`` lists each rule's options and the papers' defaults):

- ``adamw``: plain AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101) on everything trainable.
- ``ffa``: FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): ``A`` stays at its random initialisation
  (``requires_grad`` is switched off), only ``B`` trains.
- ``stable_lora``: Stable-LoRA (Yize-Wu/Stable-LoRA): AdamW, and before every update each ``A`` is multiplied by
  ``1 - shrink_ratio`` while ``||A|| >= (numel A / numel B) * ||B||``; once that fails the pair never shrinks again.
- ``allora``: ALLoRA (Huang & Balestriero 2024, arXiv 2410.09692): the update of each row of ``A`` and ``B`` gets
  its own learning rate ``lr * c_i`` with ``c_i = 1 / sqrt(||row_i||^2 + 1 / eta^2)``, so rows near zero (``B`` at
  start) move fast; the paper also drops dropout (our methods have none) and the ``alpha / r`` scale (a warning
  is given when ``s != 1``; create the adapter with ``alpha = rank``). The exact coefficient could not be read
  from the paper; this one is our resolution of "inversely proportional to the row's l2 norm, regularised at 0"
  and is applied to the AdamW direction.
- ``lora_pro``: LoRA-Pro (Wang et al., ICLR 2025, OpenReview gTwRMU3lJ5, arXiv 2407.18242), as the official
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
- ``altlora``: AltLoRA (Yu et al. 2025, arXiv 2505.12455; LucasXinYu/AltLoRA): per pair, ``A`` then ``B``
  (``B``'s preconditioner uses the new ``A``): ``g_A' = (B^T B + lam I)^-1 g_A``, momentum carried into the new
  subspace ``m_A <- beta1 P_A m_A + (1 - beta1) g_A'`` with ``P_A = (B^T B + lam I)^-1 B^T B_prev``,
  ``A -= lr m_A / (1 - beta1^t)``; symmetrically ``g_B' = g_B (A A^T + lam I)^-1``,
  ``P_B = A_prev A^T (A A^T + lam I)^-1``, ``m_B <- beta1 m_B P_B + (1 - beta1) g_B'``. Decoupled weight decay
  after the update, as the authors' code. The step is a preconditioned gradient (no Adam normalisation), so it
  wants a larger ``lr`` than AdamW.
- ``altlora_plus``: AltLoRA+ (same paper), as the authors' ``altlora_plus`` optimiser (``optimizer_new.py``): the
  step is ``lr / (1 - beta1^t) * (beta1 P m + (1 - beta1) g') / (sqrt(v) + eps)`` with ``v`` the second moment of
  ``g_A'`` / ``g_B'`` (not transported, not bias-corrected) and ``eps = 1e-6``, and the momentum kept for the next
  step is the untransported ``beta1 m + (1 - beta1) g'``; AdamW-like ``lr``. With ``beta2 = 0.98`` the uncorrected
  ``v`` makes the first steps up to ~7x larger than a bias-corrected Adam would. ``corrected_adam=True`` selects a
  textbook Adam instead (bias-corrected ``v``, the transported momentum kept): not the authors' arithmetic.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import MedloraError
from .config import describe_entry, get_method, option
from .inject import iter_adapters

__all__ = [
    "LoRAPair",
    "RuleSpec",
    "TrainingRuleError",
    "build_optimizer",
    "check_rule_method",
    "describe_rule",
    "get_rule",
    "list_rules",
    "lora_pairs",
    "register_rule",
]


# --------------------------------------------------------------------------------------------------- pairs


@dataclass
class LoRAPair:
    """One adapted layer's low-rank factors: ``dW = scaling * unfold(B @ A)``."""

    name: str
    A: nn.Parameter
    B: nn.Parameter
    scaling: float


def lora_pairs(model: nn.Module) -> list[LoRAPair]:
    """The LoRA pairs the model's adapters declare (:meth:`~medlora.adapters.base.Reparam.rule_pairs`, DoRA's
    inner method included) whose two factors both train; a pair with a frozen factor (``A`` after ``ffa``) is
    left to AdamW."""
    return [LoRAPair(name, a, b, float(s))
            for name, _, reparam in iter_adapters(model)
            for a, b, s in reparam.rule_pairs()
            if a.requires_grad and b.requires_grad]


class TrainingRuleError(MedloraError, ValueError):
    """A training rule asked for adapters it cannot train (or with options it does not have)."""


# ------------------------------------------------------------------------------------------------ registry


@dataclass
class RuleSpec:
    name: str
    build: Callable[..., torch.optim.Optimizer]
    options_cls: type
    summary: str
    citation: str
    # False for a rule that treats every parameter alike (adamw): it accepts any method.
    needs_pairs: bool = True


_RULES: dict[str, RuleSpec] = {}


def register_rule(name: str, *, options: type, summary: str, citation: str, needs_pairs: bool = True) -> Callable:
    """Register a training rule; the decorated callable is ``build(model, pairs, lr, options) -> Optimizer``.

    ``needs_pairs`` (default): the rule updates the adapters' declared LoRA pairs and refuses methods without any.
    """

    def decorator(build: Callable[..., torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
        if name in _RULES:
            raise ValueError(f"training rule {name!r} is already registered")
        _RULES[name] = RuleSpec(name, build, options, summary, citation, needs_pairs)
        return build

    return decorator


def list_rules() -> list[str]:
    """Names of the registered training rules."""
    return sorted(_RULES)


def get_rule(name: str) -> RuleSpec:
    try:
        return _RULES[name]
    except KeyError:
        raise TrainingRuleError(f"unknown training rule {name!r}; available: {', '.join(list_rules())}") from None


def describe_rule(name: str) -> str:
    """A rule's summary, paper and options with their defaults and help text."""
    spec = get_rule(name)
    return describe_entry(spec.name, spec.summary, spec.citation, spec.options_cls)


def build_optimizer(model: nn.Module, rule: str = "adamw", lr: float = 1e-3, **options: Any) -> torch.optim.Optimizer:
    """A ``torch.optim.Optimizer`` for the trainable parameters of ``model`` following ``rule``.

    ``options`` are the rule's options (``describe_rule(rule)``); a misspelt one is an error. Rules other than
    ``adamw`` train declared LoRA pairs: every adapter of ``model`` must declare one (else a
    :class:`TrainingRuleError` names the method and the rule) and at least one pair must have both factors trainable.
    """
    spec = get_rule(rule)
    known = {f.name for f in dataclasses.fields(spec.options_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TrainingRuleError(
            f"unknown option(s) {', '.join(unknown)} for training rule {rule!r}; valid: {', '.join(sorted(known))}"
        )
    if spec.needs_pairs:
        for name, _, reparam in iter_adapters(model):
            if not reparam.rule_pairs():
                why = f"layer {name} declares no plain LoRA pair"
                raise TrainingRuleError(_refusal(rule, reparam.config.method, why))
    pairs = lora_pairs(model)
    if spec.needs_pairs and not pairs:
        raise TrainingRuleError(
            f"training rule {rule!r} needs trainable LoRA pairs (adapters of a method such as 'lora', 'lora_c', "
            "'conv_lora', 'pissa' or 'dora' with both factors trainable); none found in the model"
        )
    return spec.build(model, pairs, lr, spec.options_cls(**options))


def check_rule_method(rule: str, method: str) -> None:
    """Raise :class:`TrainingRuleError` (one line) unless training rule ``rule`` can train ``method``'s adapters.

    For checks made before a model is built (a study's grid); ``build_optimizer`` checks every adapted layer.
    """
    if get_rule(rule).needs_pairs and not get_method(method).lora_pair:
        raise TrainingRuleError(_refusal(rule, method, "the method declares no plain LoRA pair"))


def _refusal(rule: str, method: str, why: str) -> str:
    from .config import list_methods

    pair_methods = ", ".join(m for m in list_methods() if get_method(m).lora_pair)
    return (f"training rule {rule!r} cannot train {method!r} adapters ({why}): the rule updates plain LoRA pairs "
            f"dW = s B A; use rule 'adamw', or one of the methods {pair_methods}")


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------ AdamW options


@dataclass
class AdamWOptions:
    betas: tuple[float, float] = option((0.9, 0.999), "Adam moment decay rates")
    eps: float = option(1e-8, "Adam denominator epsilon")
    weight_decay: float = option(0.01, "decoupled weight decay (torch AdamW default)")


@register_rule("adamw", options=AdamWOptions, summary="plain AdamW on every trainable parameter",
               citation="Loshchilov & Hutter 2019, arXiv 1711.05101", needs_pairs=False)
def _build_adamw(model: nn.Module, pairs: list[LoRAPair], lr: float, o: AdamWOptions) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_trainable(model), lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


@register_rule("ffa", options=AdamWOptions, summary="FFA-LoRA: A frozen at its random init, only B (and non-LoRA "
               "parameters) train with AdamW", citation="Sun et al. 2024 (ICLR), arXiv 2403.12313")
def _build_ffa(model: nn.Module, pairs: list[LoRAPair], lr: float, o: AdamWOptions) -> torch.optim.Optimizer:
    for pair in pairs:
        pair.A.requires_grad_(False)
    return _build_adamw(model, pairs, lr, o)


class _PairOptimizer(torch.optim.AdamW):
    """AdamW for the non-pair parameters; subclasses update the ``(A, B)`` pairs themselves in ``_pair_step``.

    Param groups: 0 = other trainable parameters, 1 = every ``A``, 2 = every ``B`` (same order), so a learning-rate
    scheduler and ``state_dict`` work as for any optimiser.
    """

    def __init__(self, model: nn.Module, pairs: list[LoRAPair], lr: float, betas, eps: float, weight_decay: float):
        self.pairs = [p for p in pairs if p.A.requires_grad or p.B.requires_grad]
        in_pairs = {id(t) for p in self.pairs for t in (p.A, p.B)}
        others = [p for p in _trainable(model) if id(p) not in in_pairs]
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


# ------------------------------------------------------------------------------------------- Stable-LoRA


@dataclass
class StableLoRAOptions:
    shrink_ratio: float = option(5e-4, "each step A <- (1 - shrink_ratio) A while ||A|| >= (|A|/|B|) ||B||")
    betas: tuple[float, float] = option((0.9, 0.999), "Adam moment decay rates")
    eps: float = option(1e-8, "Adam denominator epsilon")
    weight_decay: float = option(0.01, "decoupled weight decay")


class StableLoRA(_PairOptimizer):
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


@register_rule("stable_lora", options=StableLoRAOptions,
               summary="Stable-LoRA: AdamW plus shrinking A until ||A|| < (|A|/|B|) ||B||, then never again",
               citation="Yize-Wu/Stable-LoRA (stable_lora.py)")
def _build_stable(model, pairs, lr, o: StableLoRAOptions) -> torch.optim.Optimizer:
    return StableLoRA(model, pairs, lr, o)


# ------------------------------------------------------------------------------------------------ ALLoRA


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


class ALLoRA(_PairOptimizer):
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


@register_rule("allora", options=ALLoRAOptions,
               summary="ALLoRA: per-row learning rate lr / sqrt(||row||^2 + 1/eta^2) for A and B; no alpha/r scale",
               citation="Huang & Balestriero 2024, arXiv 2410.09692 [coefficient unverified]")
def _build_allora(model, pairs, lr, o: ALLoRAOptions) -> torch.optim.Optimizer:
    return ALLoRA(model, pairs, lr, o)


# ----------------------------------------------------------------------------------------------- LoRA-Pro


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


class LoRAPro(_PairOptimizer):
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


@register_rule("lora_pro", options=LoRAProOptions,
               summary="LoRA-Pro: full-size Adam on the equivalent gradient of the adjusted LoRA gradients "
               "(P_B G + (I - P_B) G P_A), projected back onto A and B by least squares (+ Sylvester-optimal split)",
               citation="Wang et al. 2025 (ICLR), arXiv 2407.18242; mrflogs/LoRA-Pro")
def _build_lora_pro(model, pairs, lr, o: LoRAProOptions) -> torch.optim.Optimizer:
    return LoRAPro(model, pairs, lr, o)


# ------------------------------------------------------------------------------------------------ AltLoRA


@dataclass
class AltLoRAOptions:
    betas: tuple[float, float] = option((0.999, 0.98), "beta1: momentum (authors' default); beta2: second moment, "
                                        "used only with second_moment=True")
    eps: float = option(1e-6, "denominator epsilon (second_moment=True; the authors' 1e-6)")
    weight_decay: float = option(1e-5, "decoupled weight decay, applied after the update")
    reg: float = option(1e-3, "ridge lambda in (B^T B + lambda I)^-1 and (A A^T + lambda I)^-1")
    second_moment: bool = option(False, "AltLoRA+: divide by the root of a second moment, as the authors' code")


class AltLoRA(_PairOptimizer):
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


@register_rule("altlora", options=AltLoRAOptions,
               summary="AltLoRA: alternating A/B steps preconditioned by (B^T B + lam I)^-1 / (A A^T + lam I)^-1, "
               "momentum transported between subspaces",
               citation="Yu et al. 2025, arXiv 2505.12455; LucasXinYu/AltLoRA")
def _build_altlora(model, pairs, lr, o: AltLoRAOptions) -> torch.optim.Optimizer:
    return AltLoRA(model, pairs, lr, o)


@dataclass
class AltLoRAPlusOptions(AltLoRAOptions):
    second_moment: bool = option(True, "AltLoRA+: divide by the root of a second moment, as the authors' code")
    corrected_adam: bool = option(False, "a textbook Adam instead of the authors' altlora_plus arithmetic: "
                                  "bias-corrected second moment, transported momentum kept as state")


@register_rule("altlora_plus", options=AltLoRAPlusOptions,
               summary="AltLoRA+: AltLoRA with an Adam-style second moment of the preconditioned gradients "
               "(the authors' altlora_plus arithmetic)",
               citation="Yu et al. 2025, arXiv 2505.12455; LucasXinYu/AltLoRA")
def _build_altlora_plus(model, pairs, lr, o: AltLoRAPlusOptions) -> torch.optim.Optimizer:
    return AltLoRA(model, pairs, lr, o)

