"""DP-SGD on a site, per patient: Poisson sampling of cases, per-case gradient clipping, Gaussian noise, and
Opacus's RDP accountant for the site's (epsilon, delta) over every round it trained.

DP-SGD (Abadi et al. 2016, arXiv 1607.00133): each step samples every case independently with probability
``q = batch_size / cases``, clips each case's gradient to norm ``C``, adds ``N(0, sigma^2 C^2)`` to the sum and
divides by the expected batch size ``q * cases``. The privacy unit is the case: a case contributes exactly
one patch per visit (``data.samples_per_volume: 1`` is required), so the guarantee is per patient when a
patient has one scan. A loss that couples the samples of a batch (the batch soft Dice, BatchNorm statistics
updated in training) would break the per-case bound and is refused by the config check.

Deviation from Opacus's ``PrivacyEngine``: its per-sample gradient hooks attach to the modules that own
trainable parameters, and medlora's adapters are ``torch.nn.utils.parametrize`` modules whose input is the
layer's weight, not the batch, so the hooks do not apply. The per-case gradients are instead computed
exactly, one backward pass per sampled case (cheap for the few cases a site batch holds); Opacus supplies the
accountant (:class:`opacus.accountants.RDPAccountant`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def poisson_batch(n: int, rate: float, generator: torch.Generator) -> list[int]:
    """Indices of the cases drawn for one step, each with probability ``rate`` (may be empty)."""
    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten().tolist()


def dp_step(params: Sequence[nn.Parameter], losses: Sequence[Callable[[], torch.Tensor]], max_grad_norm: float,
            noise_multiplier: float, expected_batch: float, generator: torch.Generator) -> list[float]:
    """Set ``p.grad`` to the DP-SGD gradient from one loss closure per sampled case; returns the case losses.

    Each closure computes one case's loss; its gradient is clipped to ``max_grad_norm`` before summing.
    """
    total = [torch.zeros_like(p) for p in params]
    values = []
    for loss_fn in losses:
        loss = loss_fn()
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        factor = min(1.0, max_grad_norm / (norm + 1e-12))
        for t, g in zip(total, grads, strict=True):
            t.add_(g, alpha=factor)
        values.append(float(loss.detach()))
    for p, t in zip(params, total, strict=True):
        noise = torch.randn(t.shape, generator=generator, dtype=t.dtype) * (noise_multiplier * max_grad_norm)
        p.grad = (t + noise.to(t.device)) / expected_batch
    return values


def epsilon(steps: int, noise_multiplier: float, sample_rate: float, delta: float) -> float:
    """The (epsilon, delta) guarantee of ``steps`` DP-SGD steps (Opacus's RDP accountant); 0 before any step."""
    if steps <= 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(accountant.get_epsilon(delta))


def case_losses(module: Any, dataset: Any, indices: Sequence[int]) -> list[Callable[[], torch.Tensor]]:
    """One loss closure per case (its single training patch, through the data module's collation)."""
    from monai.data import list_data_collate

    def closure(i: int) -> Callable[[], torch.Tensor]:
        item = dataset[i]
        return lambda: module.batch_loss(list_data_collate(item if isinstance(item, list) else [item]))

    return [closure(i) for i in indices]
