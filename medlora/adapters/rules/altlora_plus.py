"""Training rule ``altlora_plus``: AltLoRA+, AltLoRA with the authors' second moment.

AltLoRA+ (same paper), as the authors' ``altlora_plus`` optimiser (``optimizer_new.py``): the
step is ``lr / (1 - beta1^t) * (beta1 P m + (1 - beta1) g') / (sqrt(v) + eps)`` with ``v`` the second moment of
``g_A'`` / ``g_B'`` (not transported, not bias-corrected) and ``eps = 1e-6``, and the momentum kept for the next
step is the untransported ``beta1 m + (1 - beta1) g'``; AdamW-like ``lr``. With ``beta2 = 0.98`` the uncorrected
``v`` makes the first steps up to ~7x larger than a bias-corrected Adam would. ``corrected_adam=True`` selects a
textbook Adam instead (bias-corrected ``v``, the transported momentum kept): not the authors' arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ._registry import register_rule
from .altlora import AltLoRA, AltLoRAOptions


@dataclass
class AltLoRAPlusOptions(AltLoRAOptions):
    second_moment: bool = option(True, "AltLoRA+: divide by the root of a second moment, as the authors' code")
    corrected_adam: bool = option(False, "a textbook Adam instead of the authors' altlora_plus arithmetic: "
                                  "bias-corrected second moment, transported momentum kept as state")


@register_rule("altlora_plus", label="AltLoRA+", options=AltLoRAPlusOptions,
               summary="AltLoRA+: AltLoRA with an Adam-style second moment of the preconditioned gradients "
               "(the authors' altlora_plus arithmetic)",
               citation="Yu et al. 2025, arXiv 2505.12455; LucasXinYu/AltLoRA")
def _build_altlora_plus(model, pairs, lr, o: AltLoRAPlusOptions) -> torch.optim.Optimizer:
    return AltLoRA(model, pairs, lr, o)
