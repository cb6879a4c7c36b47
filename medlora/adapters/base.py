"""The one idea behind every method: a reparameterised frozen weight, ``W_eff = f(W0; theta)``.

A method is a small ``nn.Module`` ``f`` attached to a layer's ``weight`` with
``torch.nn.utils.parametrize``; the layer's own forward then runs once with ``W_eff`` (for a
convolution: one convolution, no extra activation branch). ``f`` works on the canonical
``(O, I/groups, *k)`` view; :class:`~medlora.adapters.layout.WeightLayout` converts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import AdapterConfig
from .layout import WeightLayout

if TYPE_CHECKING:
    from .factored import Factors


class Reparam(nn.Module):
    """Base class of all methods: maps the stored frozen weight to the effective weight."""

    layout: WeightLayout
    config: AdapterConfig
    # This layer's backward path: None follows medlora.adapters.set_backward; "auto", "dense" or "factored".
    backward_path: str | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w0 = self.layout.to_canonical(weight)
        return self.layout.from_canonical(self.effective(w0))

    def effective(self, w0: torch.Tensor) -> torch.Tensor:
        """The effective weight in canonical layout."""
        raise NotImplementedError

    def attach(self, module: nn.Module) -> None:
        """Called by ``inject`` once this reparameterisation is on ``module.weight`` (e.g. to add a forward hook
        for an input-dependent branch); the default does nothing."""

    def detach(self, module: nn.Module) -> None:
        """Called by ``merge``/``remove`` before this reparameterisation leaves ``module``; undoes ``attach``."""

    def rule_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        """The factors a training rule (:mod:`medlora.adapters.optim`) may treat as plain LoRA pairs.

        Each ``(A, B, s)`` promises that this layer's update is ``s * unfold(B @ A)`` plus terms that do not depend
        on ``A`` or ``B``, with ``unfold`` a fixed rearrangement of entries (``A: r x n``, ``B: m x r``). A method
        declares its pairs by overriding this; the default is none, and the pair rules refuse a method without
        any (a nested-rank, three-factor or frozen-factor method is not a plain pair, whatever its tensors are
        called). Registering with ``lora_pair=True`` says the same for the method table and for checks made before
        a model is built.
        """
        return []

    def factored(self, w0: torch.Tensor) -> Factors | None:
        """The update as two kernels ``dW = B ⊛ A`` (:class:`medlora.adapters.factored.Factors`) from which
        training computes the factors' gradients in rank space; None (the default): autograd through ``W_eff``."""
        return None

    def rank_factors(self) -> Reparam | None:
        """The module holding plain LoRA factors that post-hoc rank tools may replace by factors of another rank.

        The returned module has ``lora_A`` (``r x F``), ``lora_B`` (``O x r``) and ``scaling``, with this layer's
        update ``scaling * (B @ A).view(W.shape)`` and nothing else tied to r, so that :func:`medlora.adapters.squeeze`
        can swap in rank-k factors and record rank k in ``config``. Default: none (``squeeze`` refuses the method).
        """
        return None

    def extra_repr(self) -> str:
        return f"method={self.config.method!r}, rank={self.config.rank}"


class AdditiveReparam(Reparam):
    """A method of the form ``W_eff = W0 + dW(theta)``; DoRA wraps these."""

    def __init__(self, scaling: float) -> None:
        super().__init__()
        self.scaling = scaling

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        """``dW`` in canonical layout (same shape as ``w0``)."""
        raise NotImplementedError

    def effective(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self.delta(w0)


def kaiming_uniform_like_lora(rows: int, cols: int, *, like: torch.Tensor) -> nn.Parameter:
    """LoRA's A-matrix initialisation: kaiming-uniform with ``a = sqrt(5)`` over ``cols`` fan-in.

    This is ``nn.Linear``'s default and PEFT's default for ``lora_A`` (bound ``1/sqrt(fan_in)``).
    """
    a = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(a)


def zeros_param(*shape: int, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=like.dtype, device=like.device))


def frozen(*shape: int, like: torch.Tensor, fill: float = float("nan")) -> nn.Parameter:
    """A tensor that belongs to an adapter (saved with it) but never trains."""
    return nn.Parameter(torch.full(shape, fill, dtype=like.dtype, device=like.device), requires_grad=False)


def check_rank(method: str, rank: int, limit: int, w0: torch.Tensor, what: str = "min(O, I*prod k)") -> None:
    """A one-line ``ValueError`` when a method's rank exceeds what the weight allows."""
    if rank > limit:
        raise ValueError(
            f"{method}: rank {rank} is too large for a weight of shape {tuple(w0.shape)} (at most {what} = {limit}); "
            "lower the rank or exclude the layer"
        )
