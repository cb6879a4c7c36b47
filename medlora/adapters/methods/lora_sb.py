"""LoRA-SB: LoRA-XS's frozen-A/B, trainable r x r architecture, started at the approximated first update.

Ponkshe, Singhal et al., "Initialization Using Update Approximation is a Silver Bullet for Extremely Efficient
Low-Rank Fine-Tuning", arXiv 2411.19557; official code RaghavSinghal10/lora-sb. ``dW = s B R A`` with
``A: r x I*prod k`` and ``B: O x r`` frozen and only ``R: r x r`` trained (LoRA-XS, Balazy et al., arXiv
2405.17604). Initialisation ("update approximation"): the first AdamW step of full fine-tuning,
``G_hat = -eta * sign(G)`` with ``G`` the mean ``dL/dW0`` (:func:`medlora.adapters.initialise_from_data`) and
``eta = lr / warmup_steps``, the first step of a linear warm-up (the reference's ``lr / (warmup_ratio *
total_steps)``, lr 1e-4, warmup ratio 0.02-0.06). ``warmup_steps`` has no default: it depends on the run's schedule
and sets the size of the start (a default of 1 would make it 20-100x the reference's), so
:func:`~medlora.adapters.initialise_from_data` refuses to start without it; give it, e.g.
``options=schedule_options(lr, total_steps)`` (:func:`schedule_options`). (A trained adapter loads without it: the
option only shapes the start.) Its rank-r SVD
``G_hat ~ U_r diag(S_r) V_r^T`` (``svd_lowrank``, niter 10) gives ``B = U_r``, ``A = V_r^T``, ``R = diag(S_r) / s``.
The model starts at ``W0 + G_hat_r`` (not at ``W0``; the paper keeps the base weight), trainable r^2 per layer.

Differences from the reference: it sets ``alpha = r`` (s = 1) and ``R = diag(S_r)``; here ``R`` absorbs ``1/s`` so
any alpha gives the same start (identical at the default alpha = r). The reference takes the SVD of ``G_hat^T``
and transposes back; that is the same factorisation. Applies to conv layers through the matricised weight (the
reference is Linear-only; for a conv R is a 1x1 map between the frozen k-conv A and 1x1 conv B).

No data-free fallback: until :func:`~medlora.adapters.initialise_from_data` runs (or a trained adapter is loaded)
the factors hold NaN and the first forward raises a ``RuntimeError`` saying so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .._linalg import top_svd
from ..base import AdditiveReparam, check_rank, frozen
from ..config import AdapterConfigError, option, register_method
from ..data_init import DataInitReparam


@dataclass
class LoRASBOptions:
    lr: float = option(1e-4, "learning rate of the approximated first AdamW step (reference: 1e-4)")
    warmup_steps: float | None = option(
        None, "required: eta = lr / warmup_steps, the first step of the run's linear warm-up (reference: "
        "warmup_ratio * total steps, warmup_ratio 0.02)"
    )
    niter: int | None = option(10, "svd_lowrank subspace iterations (reference: 10); None: exact SVD")


def schedule_options(lr: float, total_steps: int, warmup_ratio: float = 0.02) -> dict[str, float]:
    """LoRA-SB's ``lr`` and ``warmup_steps`` from a run's schedule, as the reference derives its step size:
    ``eta = lr / (warmup_ratio * total_steps)`` (``warmup_ratio`` 0.02 as its ``train_arithmetic.py``). A warm-up
    shorter than one step is no warm-up: ``eta = lr``."""
    return {"lr": float(lr), "warmup_steps": max(1.0, warmup_ratio * total_steps)}


@register_method(
    "lora_sb",
    label="LoRA-SB",
    family="initialisation",
    options=LoRASBOptions,
    summary="LoRA-SB: frozen A, B and trainable r x r R (LoRA-XS) initialised to the first full-FT update "
            "(needs initialise_from_data)",
    citation="Ponkshe, Singhal et al. 2024, arXiv 2411.19557",
    starts_at_base=False,
    trains="lora_R (r x r); lora_A, lora_B frozen",
    schedule_options=schedule_options,
)
class LoRASB(DataInitReparam, AdditiveReparam):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: LoRASBOptions) -> None:
        super().__init__(scaling)
        out_channels, fan_in = w0.shape[0], math.prod(w0.shape[1:])
        check_rank("lora_sb", rank, min(out_channels, fan_in), w0)
        self.lora_A = frozen(rank, fan_in, like=w0)
        self.lora_B = frozen(out_channels, rank, like=w0)
        self.lora_R = nn.Parameter(torch.full((rank, rank), float("nan"), dtype=w0.dtype, device=w0.device))
        self.rank = rank
        self.options = options

    def _uninitialised_marker(self) -> torch.Tensor:
        return self.lora_R

    def check_data_init(self) -> None:
        warmup = self.options.warmup_steps
        if warmup is None or isinstance(warmup, bool) or not warmup > 0:
            raise AdapterConfigError(
                f"lora_sb: options.warmup_steps must be given as a positive number, got {warmup!r}: the warm-up steps "
                "of the training schedule (the reference: warmup_ratio 0.02 * total steps; schedule_options(lr, "
                "total_steps) derives it); the start is the approximated first update with eta = lr / warmup_steps"
            )

    def init_from_gradient(self, grad: torch.Tensor, weight: torch.Tensor) -> None:
        eta = self.options.lr / self.options.warmup_steps
        update = -eta * torch.sign(grad.flatten(1))
        u, s, vh = top_svd(update, self.rank, self.options.niter)
        self.lora_A.copy_(vh)
        self.lora_B.copy_(u)
        self.lora_R.copy_(torch.diag(s) / self.scaling)

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        return (self.lora_B @ self.lora_R @ self.lora_A * self.scaling).view(w0.shape)
