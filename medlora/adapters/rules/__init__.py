"""Training rules: optimisers that know which tensors of an adapter are a LoRA pair ``A``, ``B``.

Some LoRA variants change no parameterisation at all, only how ``A`` and ``B`` are updated. They apply to every
method that declares a plain LoRA pair, ``A`` (``r x n``) and ``B`` (``m x r``) with ``dW = s * unfold(B @ A)``
(:meth:`medlora.adapters.base.Reparam.rule_pairs`, registered with ``lora_pair=True``): ``lora``, ``lora_c``,
``conv_lora``, ``pissa``, ``lora_ga`` and the DoRA wrappers around the first three, on Linear and convolution
layers alike (the rules only see the two matrices and the scale ``s``). Nested-rank (``dylora``, ``matryoshka``),
three-factor (``slora``, ``nlora``, ``inttune``, ``lora_sb``) and every other method declare none, and a rule
other than ``adamw`` refuses a model that holds one, in one line naming the method and the rule: their update is
not ``s B A`` in two trainable factors, so the rules' algebra would be wrong for them. Parameters outside the
adapters' pairs (a DoRA magnitude, an unfrozen head) get plain AdamW inside the same optimiser.

    >>> from medlora.adapters.rules import build_optimizer, list_rules   # or medlora.adapters.optim
    >>> opt = build_optimizer(model, rule="lora_pro", lr=1e-3)          # after inject(model, ...)
    >>> loss.backward(); opt.step(); opt.zero_grad()

Rules are registered and laid out like the methods: one file per rule in this package (``adamw.py``, ``ffa.py``,
``stable_lora.py``, ``allora.py``, ``lora_pro.py``, ``altlora.py``, ``altlora_plus.py``), each with its paper, the
official code it follows and its deviations; ``_registry.py`` holds the registry, the pair discovery and
``build_optimizer``; ``_pair_optimizer.py`` the base of the rules that update the pairs themselves. Importing the
package registers every file in it, so a new rule is added by dropping a file here (``register_rule``).
``describe_rule(name)`` lists a rule's options with the papers' defaults.
"""

import importlib
import pkgutil

from ._registry import (
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

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

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
