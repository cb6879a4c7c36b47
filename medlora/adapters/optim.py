"""Training rules (kept importable here): the rules live in :mod:`medlora.adapters.rules`, one file per rule.

    >>> from medlora.adapters.optim import build_optimizer, list_rules, describe_rule
"""

from .rules import (
    LoRAPair,
    RuleSpec,
    TrainingRuleError,
    build_optimizer,
    check_rule_method,
    describe_rule,
    get_rule,
    list_rules,
    lora_pairs,
    register_rule,
)

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
