"""LoLDU: LDU decomposition of the frozen weight; only the diagonal trains.

Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
Fine-Tuning", arXiv 2410.13618; official code SKDDJ/LoLDU (``minloldu/loldu.py``). ``W0 = P L U`` by LU with
partial pivoting (``torch.linalg.lu``) of the ``O x (I*prod k)`` matricisation, ``D = diag(U)``, ``U <- D^-1 U``
(unit diagonal), so ``W0 = P L D U``. With the first r columns of L, rows of U and entries of D,
``W_eff = W_res + s P L_r diag(z) U_r``, ``W_res = W0 - s P L_r diag(D_r) U_r``, ``z`` initialised to ``D_r``
(``init_method="lu"``), ``s = alpha / r`` with the reference's ``lora_alpha = 1`` as the default at every rank
(s = 1/r; the reference's default rank is 4).
Trainable: ``z`` only (r per layer).

Evaluated as ``W0 + s (P L_r) diag(z - D_r) U_r``, equal in exact arithmetic and ``W0`` exactly at the start; the
reference writes ``W_res`` into the base weight instead (here the base and its fingerprint stay untouched).
``P L_r`` is stored as one frozen ``O x r`` factor ``lora_B``, ``U_r`` as ``lora_A`` (r x I*prod k), ``D_r`` as
``loldu_d``. A zero pivot leaves its U row unscaled with ``D = 0``. The reference's other ``init_method`` values
are offered where they are data-free (``ones``, ``zeros``, ``constant`` = mean of ``D_r``); they do not start
at ``W0``. Conv layers (reference applicability: MAYBE — the top-r LU factors follow pivoting order, not a
principal subspace) use the matricised kernel; the LU is taken at ``inject`` time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .._linalg import compute_dtype
from ..base import AdditiveReparam, check_rank, frozen
from ..config import option, register_method

INIT_METHODS = ("lu", "ones", "zeros", "constant")


@dataclass
class LoLDUOptions:
    init_method: str = option("lu", "initial z: lu (= D_r, starts at W0), ones, zeros or constant (mean of D_r)")


def ldu(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P L, D, U)`` with ``matrix = (P L) diag(D) U``, L unit-lower, U unit-upper (rows with D = 0 unscaled)."""
    p, lower, upper = torch.linalg.lu(matrix.to(compute_dtype(matrix)))
    d = torch.diagonal(upper)
    upper = upper / torch.where(d == 0, torch.ones_like(d), d)[:, None]
    return p @ lower, d, upper


@register_method(
    "loldu",
    label="LoLDU",
    family="initialisation",
    options=LoLDUOptions,
    summary="LoLDU: W0 = P L D U; train only the r leading diagonal entries of D (r parameters per layer)",
    citation="Shi et al. 2024, arXiv 2410.13618",
    default_alpha=1.0,
    trains="loldu_z (r diagonal entries); P L_r, U_r, D_r frozen",
)
class LoLDU(AdditiveReparam):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: LoLDUOptions) -> None:
        super().__init__(scaling)
        if options.init_method not in INIT_METHODS:
            raise ValueError(
                f"loldu: init_method must be one of {', '.join(INIT_METHODS)}, got {options.init_method!r}"
            )
        out_channels, fan_in = w0.shape[0], math.prod(w0.shape[1:])
        check_rank("loldu", rank, min(out_channels, fan_in), w0)
        pl, d, u = ldu(w0.detach().flatten(1))
        self.lora_B = frozen(out_channels, rank, like=w0)
        self.lora_A = frozen(rank, fan_in, like=w0)
        self.loldu_d = frozen(rank, like=w0)
        with torch.no_grad():
            self.lora_B.copy_(pl[:, :rank])
            self.lora_A.copy_(u[:rank])
            self.loldu_d.copy_(d[:rank])
        z = {"lu": self.loldu_d.detach().clone(), "ones": torch.ones_like(self.loldu_d),
             "zeros": torch.zeros_like(self.loldu_d),
             "constant": torch.full_like(self.loldu_d, float(self.loldu_d.mean()))}[options.init_method]
        self.loldu_z = nn.Parameter(z)

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        return ((self.lora_B * (self.loldu_z - self.loldu_d)) @ self.lora_A * self.scaling).view(w0.shape)
