"""Rank tools: choose the deployment rank of nested-rank adapters, and compress trained LoRAs (LoRA-Squeeze).

Nested ranks (``dylora``, ``matryoshka``): :func:`set_active_rank` evaluates every such layer at rank r
(``None``: back to the training form); :func:`truncate_rank` replaces them, in place, by plain rank-r
``lora`` adapters with the same weights, which save, merge and export to PEFT like any LoRA.

LoRA-Squeeze (arXiv 2602.10993, 2026): train a LoRA at a high source rank, then compress
``dW = s B A`` to a lower rank with a randomized SVD, ``B' = U_k sqrt(S_k / s')``, ``A' = sqrt(S_k / s') V_k^T``
(``s'`` the scale at the new rank, so ``s' B' A'`` is the best rank-k approximation of ``dW``), on the layers
whose method hands out such factors (:meth:`medlora.adapters.base.Reparam.rank_factors`: ``lora`` and ``dora``).
:func:`squeeze` does this post hoc ("Post-Squeeze"; keep training afterwards for "Cont-Squeeze");
:class:`RankAnnealer` with a :class:`RankSchedule` lowers the rank step by step during training
("In-Squeeze"), from a plain loop (``annealer.step()`` after ``optimizer.step()``) or from Lightning
(``trainer.fit(..., callbacks=[annealer.lightning_callback()])``; Lightning is imported only there).

The SVD is taken of the factored ``B A`` without forming it (range finder with power iterations on
``B (A Omega)``, Halko et al. 2011), so its cost is ``O((O + F) r k)``; ``method="exact"`` uses QR of
both factors and an ``r x r`` SVD instead (exact up to round-off, also cheap). Squeezing makes new
factor parameters (an old one's autograd graph may still be alive, so resizing it in place is unsafe);
the optimisers handed to it get the new parameters in their param groups, with fresh state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._linalg import factored_svd
from .base import Reparam
from .config import get_method
from .inject import iter_adapters, layer_config
from .methods.dylora import NestedRankLoRA

# --- nested ranks -----------------------------------------------------------------------------------------


def set_active_rank(model: nn.Module, rank: int | None) -> int:
    """Use every ``dylora``/``matryoshka`` layer of ``model`` at ``rank`` (``None``: the training form).

    Returns how many layers were set. A rank above a layer's trained rank is a ``ValueError``.
    In training mode a fixed active rank trains that rank (no rank sampling).
    """
    layers = [r for _, _, r in iter_adapters(model) if isinstance(r, NestedRankLoRA)]
    if not layers:
        raise ValueError("the model has no nested-rank adapters (methods dylora, matryoshka)")
    for reparam in layers:
        reparam.set_active_rank(rank)
    return len(layers)


def _replace_adapter(module: nn.Module, new: Reparam) -> None:
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    parametrize.register_parametrization(module, "weight", new)


def truncate_rank(model: nn.Module, rank: int | None = None) -> nn.Module:
    """Replace every ``dylora``/``matryoshka`` adapter by a plain ``lora`` adapter of rank ``rank``, in place.

    The new adapter holds ``A[:rank]`` and ``B[:, :rank]`` with ``alpha = s_rank * rank``, i.e. the very
    weight that ``set_active_rank(model, rank)`` gives. ``rank=None``: each layer's active rank, or its
    full rank. Returns ``model``; the new adapter parameters are trainable.
    """
    lora = get_method("lora")
    for _, module, reparam in list(iter_adapters(model)):
        if not isinstance(reparam, NestedRankLoRA):
            continue
        r = rank if rank is not None else (reparam.active_rank or reparam.max_rank)
        reparam.set_active_rank(r)  # validates r
        scale = reparam.rank_scale(r)
        config = dataclasses.replace(reparam.config, method="lora", rank=r, alpha=scale * r, use_rslora=False,
                                     options={}, rank_pattern={}, alpha_pattern={}, options_pattern={})
        w0 = reparam.layout.to_canonical(parametrize_original(module))
        new = lora.build(w0, rank=r, scaling=config.scaling(), options=config.method_options())
        with torch.no_grad():
            new.lora_A.copy_(reparam.lora_A[:r])
            new.lora_B.copy_(reparam.lora_B[:, :r])
        new.layout, new.config = reparam.layout, config
        _replace_adapter(module, new)
    return model


def parametrize_original(module: nn.Module) -> torch.Tensor:
    return module.parametrizations["weight"].original.detach()


# --- LoRA-Squeeze ----------------------------------------------------------------------------------------


def squeeze(
    model: nn.Module,
    rank: int,
    *,
    method: str = "randomized",
    oversample: int = 8,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> dict[str, float]:
    """Compress every ``lora``/``dora`` adapter of ``model`` above ``rank`` to ``rank``, in place (LoRA-Squeeze).

    ``alpha`` is kept (so the scale becomes ``alpha / rank``; with ``alpha=None`` the method's alpha/r ratio
    is kept); the factors absorb the difference. DoRA's
    magnitude is unchanged. A layer with fewer outputs or inputs than ``rank`` (a segmentation head
    ``Conv3d(C, 2, 1)``) gets rank ``min(rank, O, I*prod k)``, all its update can have; its configuration records
    that rank, so the adapter file loads and exports like any other. Layers already at or below ``rank`` are left
    alone; other methods are a
    ``ValueError`` (nested-rank methods: use :func:`truncate_rank`). The factors become new parameter
    objects: each squeezed parameter in ``optimizers`` is replaced by its successor (with fresh optimiser
    state); other holders of the old objects (an EMA copy, a hand-made parameter list) must be rebuilt.
    Returns, per squeezed layer, the relative Frobenius error
    ``||dW - dW_k|| / ||dW||`` (0 when the update had rank <= ``rank``).
    """
    if rank < 1:
        raise ValueError(f"squeeze: rank must be positive, got {rank}")
    adapted = list(iter_adapters(model))
    unsupported = sorted({r.config.method for _, _, r in adapted if r.rank_factors() is None})
    if unsupported:
        raise ValueError(f"squeeze works on plain LoRA factors (methods lora, dora: Reparam.rank_factors); the model "
                         f"also holds {', '.join(unsupported)} (dylora/matryoshka: use truncate_rank)")
    optimizers = list(optimizers)
    errors: dict[str, float] = {}
    for name, _, reparam in adapted:
        lora = reparam.rank_factors()
        assert lora is not None
        if lora.lora_A.shape[0] <= rank:
            continue
        with torch.no_grad():
            a, b = lora.lora_A.double(), lora.lora_B.double() * lora.scaling
            u, s, vh = factored_svd(b, a, rank, method=method, oversample=oversample, n_iter=n_iter,
                                    generator=generator)
            total = torch.sqrt(torch.trace((b.t() @ b) @ (a @ a.t())).clamp_min(0))
            kept = torch.sqrt((total**2 - (s**2).sum()).clamp_min(0))
            errors[name] = float(kept / total) if total > 0 else 0.0
            config = dataclasses.replace(layer_config(reparam.config, name), rank=s.numel())
            new_scaling = config.scaling()
            root = torch.sqrt(s / new_scaling)
            new_b, new_a = u * root, root[:, None] * vh
        for attr, value in (("lora_A", new_a), ("lora_B", new_b)):
            old = getattr(lora, attr)
            new = nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=old.requires_grad)
            setattr(lora, attr, new)
            for optimizer in optimizers:
                optimizer.state.pop(old, None)
                for group in optimizer.param_groups:
                    group["params"] = [new if q is old else q for q in group["params"]]
        lora.scaling = new_scaling
        reparam.config = config
    return errors


@dataclass
class RankSchedule:
    """The rank at each training step: ``start_rank`` until ``start_step``, then down to ``end_rank`` at
    ``end_step`` (``shape`` linear or cosine), ``end_rank`` afterwards."""

    start_rank: int
    end_rank: int
    end_step: int
    start_step: int = 0
    shape: str = "linear"

    def __post_init__(self) -> None:
        if not 1 <= self.end_rank <= self.start_rank:
            raise ValueError(f"RankSchedule: need 1 <= end_rank <= start_rank, got {self.end_rank}, {self.start_rank}")
        if self.end_step < self.start_step or self.shape not in ("linear", "cosine"):
            raise ValueError("RankSchedule: end_step must be >= start_step and shape linear or cosine")

    def rank_at(self, step: int) -> int:
        if step <= self.start_step:
            return self.start_rank
        if step >= self.end_step:
            return self.end_rank
        t = (step - self.start_step) / (self.end_step - self.start_step)
        if self.shape == "cosine":
            t = 0.5 * (1 - math.cos(math.pi * t))
        return max(self.end_rank, round(self.start_rank - t * (self.start_rank - self.end_rank)))


class RankAnnealer:
    """In-Squeeze: lowers the adapters' rank along a :class:`RankSchedule` while training.

    Each rank change is a :func:`squeeze`, so a layer smaller than the scheduled rank (a 2-class head) holds
    ``min(rank, O, I*prod k)``.

    Plain loop::

        annealer = RankAnnealer(model, RankSchedule(16, 4, end_step=1000), optimizers=[opt])
        for step, batch in enumerate(loader):
            loss(model, batch).backward(); opt.step(); opt.zero_grad()
            annealer.step(step + 1)

    Lightning: ``callbacks=[annealer.lightning_callback()]`` (uses ``trainer.global_step`` and
    ``trainer.optimizers``).
    """

    def __init__(self, model: nn.Module, schedule: RankSchedule, optimizers: Iterable[Any] = (),
                 **squeeze_kwargs: Any) -> None:
        self.model, self.schedule = model, schedule
        self.optimizers = list(optimizers)
        self.squeeze_kwargs = squeeze_kwargs
        self.current_rank = schedule.start_rank
        self._steps = 0

    def step(self, step: int | None = None, optimizers: Iterable[Any] | None = None) -> int | None:
        """Squeeze if the schedule's rank at ``step`` (default: calls so far) is below the current one.

        Returns the new rank when it squeezed, else ``None``.
        """
        self._steps += 1
        target = self.schedule.rank_at(self._steps if step is None else step)
        if target >= self.current_rank:
            return None
        opts = self.optimizers if optimizers is None else list(optimizers)
        squeeze(self.model, target, optimizers=[getattr(o, "optimizer", o) for o in opts], **self.squeeze_kwargs)
        self.current_rank = target
        return target

    def lightning_callback(self) -> Any:
        """A ``lightning.pytorch.Callback`` that calls :meth:`step` after every training batch."""
        try:
            from lightning.pytorch import Callback
        except ImportError:  # the older package name
            from pytorch_lightning import Callback

        annealer = self

        class RankAnnealing(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ARG002
                annealer.step(trainer.global_step, optimizers=trainer.optimizers)

        return RankAnnealing()


__all__ = [
    "RankAnnealer",
    "RankSchedule",
    "factored_svd",
    "set_active_rank",
    "squeeze",
    "truncate_rank",
]
