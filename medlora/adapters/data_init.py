"""Data-dependent initialisation: methods whose start point comes from the gradient of the frozen weights.

LoRA-GA (arXiv 2407.05000) and LoRA-SB (arXiv 2411.19557) build their factors from ``G = dL/dW0``, the gradient
of the training loss with respect to each adapted layer's frozen weight, averaged over a few batches. The flow::

    model = inject(model, AdapterConfig("lora_ga", rank=8, targets=[...]))
    initialise_from_data(model, loader, lambda m, batch: loss(m(batch["x"]), batch["y"]), max_batches=64)
    ...train...

``initialise_from_data`` evaluates the loss of the *base* model (every data-initialised adapter passes ``W0``
through while the gradient is estimated; other adapters act as usual, which at their own start point is
``W0`` too), accumulates ``dL/dW0`` per layer with ``torch.autograd.grad`` (no ``.grad`` is written and every
``requires_grad`` flag is restored afterwards) and hands the mean gradient, in canonical ``(O, I/groups, *k)``
layout, to each adapter's ``init_from_gradient``. It does nothing (and never calls ``loss_fn``) when no adapter of
the model needs data, so a pipeline may call it for every method.

An adapter that needs data holds NaN until it is initialised or loaded with
:func:`~medlora.adapters.load_adapter`; its first forward then raises a ``RuntimeError`` that says to call
``initialise_from_data``: there is no silent data-free fallback. (The one evaluation torch makes while
registering the parametrization, a shape check inside ``inject``, passes ``W0`` through.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .inject import iter_adapters


class DataInitReparam:
    """Mixin for a :class:`~medlora.adapters.base.Reparam` whose initial factors come from ``dL/dW0``.

    Subclasses implement ``init_from_gradient(grad, weight)`` (both canonical, no autograd) and fill the
    tensor returned by ``_uninitialised_marker`` with NaN at construction.
    """

    needs_data = True
    _probing = False     # True while initialise_from_data estimates the gradient: W_eff = W0
    _checked = False     # True once the marker was seen finite (after init or after loading)
    _registered = False  # torch evaluates a parametrization once when registering it (a shape check)

    def check_data_init(self) -> None:
        """Raise (one line) if an option the initialisation needs is missing; called before any gradient is taken."""

    def init_from_gradient(self, grad: torch.Tensor, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def _uninitialised_marker(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self._probing:
            return weight
        if not self._registered:
            self._registered = True
            return weight
        if not self._checked:
            if not bool(torch.isfinite(self._uninitialised_marker()).all()):
                raise RuntimeError(
                    f"{self.config.method} adapter used before its data-dependent initialisation: call "  # type: ignore[attr-defined]
                    "medlora.adapters.initialise_from_data(model, batches, loss_fn) after inject(), or load a "
                    "trained adapter with load_adapter()"
                )
            self._checked = True
        return super().forward(weight)  # type: ignore[misc]


def data_adapters(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, layer, adapter)`` for every adapter of ``model`` whose method needs data to initialise."""
    return [(n, m, r) for n, m, r in iter_adapters(model) if getattr(r, "needs_data", False)]


def initialise_from_data(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    max_batches: int | None = None,
) -> None:
    """Initialise every adapter of ``model`` that needs data from the mean gradient of ``loss_fn`` over ``batches``.

    ``loss_fn(model, batch)`` returns a scalar loss; the model's train/eval mode is left as the caller set it.
    Stops after ``max_batches`` batches when given. Raises ``ValueError`` when no batch was seen, or when an
    adapted layer received no gradient (it does not take part in the loss: exclude it from the targets).
    A no-op when no adapter needs data.
    """
    targets = data_adapters(model)
    if not targets:
        return
    for _, _, reparam in targets:  # before anything is computed or changed
        reparam.check_data_init()
    originals = [module.parametrizations["weight"].original for _, module, _ in targets]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    sums = [torch.zeros(o.shape, dtype=torch.promote_types(o.dtype, torch.float32), device=o.device)
            for o in originals]
    reached = [False] * len(targets)
    seen = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for o in originals:
            o.requires_grad_(True)
        for _, _, reparam in targets:
            reparam._probing = True
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                break
            with torch.enable_grad():  # also when called under torch.no_grad()
                loss = loss_fn(model, batch)
                grads = torch.autograd.grad(loss, originals, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    sums[i].add_(g.detach().to(sums[i].dtype))
                    reached[i] = True
            seen += 1
    finally:
        for _, _, reparam in targets:
            reparam._probing = False
        for p, flag in flags:
            p.requires_grad_(flag)
    if seen == 0:
        raise ValueError("initialise_from_data: `batches` yielded no batch")
    missing = [name for (name, _, _), ok in zip(targets, reached, strict=True) if not ok]
    if missing:
        raise ValueError(
            f"initialise_from_data: no gradient reached layer(s) {', '.join(missing[:10])} from loss_fn; "
            "exclude them from the adapter targets"
        )
    with torch.no_grad():
        for (_, _, reparam), total, original in zip(targets, sums, originals, strict=True):
            grad = reparam.layout.to_canonical(total / seen)
            reparam.init_from_gradient(grad, reparam.layout.to_canonical(original.detach()))
            reparam._checked = True


__all__ = ["DataInitReparam", "data_adapters", "initialise_from_data"]
