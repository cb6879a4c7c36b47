"""Training rules (kept importable here): the rules live in :mod:`medlora.adapters.rules`, one file per rule.

    >>> from medlora.adapters.optim import build_optimizer, list_rules, describe_rule
"""

from . import rules as _rules
from .rules import *  # noqa: F403  (the package's public names, listed in its __all__)

__all__ = list(_rules.__all__)
