"""The training-rule registry and the LoRA pairs the rules work on (shared by every rule file).

A rule is registered by name with an options dataclass, as adapter methods are; ``build_optimizer`` checks the
options and the model's adapters, then calls the rule's builder with the model's declared, trainable LoRA pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import MedloraError
from ..config import describe_entry, get_method, list_methods
from ..inject import iter_adapters


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
    """A training rule asked to train adapters it cannot train (the CLI reports it in one line)."""


@dataclass
class RuleSpec:
    name: str
    build: Callable[..., torch.optim.Optimizer]
    options_cls: type
    summary: str
    citation: str
    # False for a rule that treats every parameter alike (adamw): it accepts any method.
    needs_pairs: bool = True
    # Display name (the paper's spelling, e.g. "LoRA-Pro"); default: the registered name.
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.name


_RULES: dict[str, RuleSpec] = {}


def register_rule(name: str, *, options: type, summary: str, citation: str, label: str | None = None,
                  needs_pairs: bool = True) -> Callable:
    """Register a training rule; the decorated callable is ``build(model, pairs, lr, options) -> Optimizer``.

    ``needs_pairs`` (default): the rule updates the adapters' declared LoRA pairs and refuses methods without any.
    ``label``: the display name (default ``name``).
    """

    def decorator(build: Callable[..., torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
        if name in _RULES:
            raise ValueError(f"training rule {name!r} is already registered")
        _RULES[name] = RuleSpec(name, build, options, summary, citation, needs_pairs, label or name)
        return build

    return decorator


def _ensure_builtin_rules() -> None:
    from .. import rules  # noqa: F401  (importing the package registers every rule file in it)


def list_rules() -> list[str]:
    """Names of the registered training rules."""
    _ensure_builtin_rules()
    return sorted(_RULES)


def get_rule(name: str) -> RuleSpec:
    _ensure_builtin_rules()
    try:
        return _RULES[name]
    except KeyError:
        raise ValueError(f"unknown training rule {name!r}; available: {', '.join(list_rules())}") from None


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
        raise ValueError(
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
    pair_methods = ", ".join(m for m in list_methods() if get_method(m).lora_pair)
    return (f"training rule {rule!r} cannot train {method!r} adapters ({why}): the rule updates plain LoRA pairs "
            f"dW = s B A; use rule 'adamw', or one of the methods {pair_methods}")


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that requires a gradient."""
    return [p for p in model.parameters() if p.requires_grad]
