"""Singular-value methods: SALT and S-SAM's scale/shift of the spectrum.

SALT: Elsayed, Hashmi et al., "SALT: Singular Value Adaptation with Low-Rank Transformation",
arXiv 2503.16055 (2025). Thin SVD of the ``O x (I*prod k)`` matricisation ``W0 = U diag(S) V^T`` (k values).
The top ``r_s`` values become ``a * S + b`` (a = 1, b = 0); the remaining ``k - r_s`` form a block
``diag(S_res) + X @ Y`` with ``X: (k - r_s) x r`` (kaiming-uniform, as the authors' SAM2 code) and
``Y: r x (k - r_s)`` zeros; ``W = U relu(S') V^T`` with the ReLU taken elementwise over the whole k x k
matrix, as the paper; singular pairs take a fixed sign convention (see ``_linalg.sign_canonical``) since
that ReLU depends on it. Trainable ``2 r_s + 2 r (k - r_s)``.

S-SAM (``svd``, in ``svd.py``, on the same cached SVD): Paranjape et al., MICCAI 2024, arXiv 2408.06447: every
singular value is scaled and shifted, ``W = U diag(relu(a * S + b)) V^T``; trainable ``2k``.

Both are evaluated as ``W0 + U (relu(S') - diag(S)) V^T``, equal to the definitions because ``S >= 0``
(so ``relu(diag(S)) = diag(S)``); this starts at ``W0`` exactly rather than at its SVD round-off. The SVD is
taken lazily from the weight the layer holds at its first forward (and again whenever that weight is
replaced, e.g. by loading a pretrained state dict), so adapters can be attached before loading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .._linalg import compute_dtype, sign_canonical
from ..base import Reparam
from ..config import option, register_method


class SpectralReparam(Reparam):
    """Caches the SVD of the frozen weight, recomputed when that weight changes."""

    def __init__(self, w0: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("svd_U", torch.empty(0, dtype=w0.dtype, device=w0.device), persistent=False)
        self.register_buffer("svd_S", torch.empty(0, dtype=w0.dtype, device=w0.device), persistent=False)
        self.register_buffer("svd_Vh", torch.empty(0, dtype=w0.dtype, device=w0.device), persistent=False)
        self._svd_of: tuple | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype, tuple(weight.shape))
        if key != self._svd_of or self.svd_S.numel() == 0:
            with torch.no_grad():
                matrix = self.layout.to_canonical(weight).flatten(1)
                u, s, vh = torch.linalg.svd(matrix.to(compute_dtype(matrix)), full_matrices=False)
                u, vh = sign_canonical(u, vh)
            self.svd_U, self.svd_S, self.svd_Vh = (t.to(weight.dtype) for t in (u, s, vh))
            self._svd_of = key
        return super().forward(weight)

    @staticmethod
    def n_singular_values(w0: torch.Tensor) -> int:
        return min(w0.shape[0], math.prod(w0.shape[1:]))


@dataclass
class SALTOptions:
    svd_rank: int | None = option(
        None, "number r_s of top singular values that get a trainable scale and shift; None: svd_fraction"
    )
    svd_fraction: float = option(
        0.1, "r_s = max(1, int(svd_fraction * k)) when svd_rank is None (the authors' SAM2 default ratio 0.1)"
    )


@register_method(
    "salt",
    label="SALT",
    family="spectral",
    options=SALTOptions,
    summary="SALT: scale/shift top r_s singular values + rank-r LoRA on the residual spectrum block",
    citation="Elsayed, Hashmi et al. 2025, arXiv 2503.16055",
    trains="scale a, shift b of the top r_s singular values; residual factors X, Y",
)
class SALT(SpectralReparam):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: SALTOptions) -> None:
        super().__init__(w0)
        k = self.n_singular_values(w0)
        r_s = options.svd_rank if options.svd_rank is not None else max(1, int(options.svd_fraction * k))
        if not 0 < r_s <= k:
            raise ValueError(f"salt: svd_rank must be in 1..{k} for a weight of shape {tuple(w0.shape)}, got {r_s}")
        self.svd_rank = r_s
        factory = {"dtype": w0.dtype, "device": w0.device}
        self.salt_scale = nn.Parameter(torch.ones(r_s, **factory))
        self.salt_shift = nn.Parameter(torch.zeros(r_s, **factory))
        residual = k - r_s
        if residual:
            x = torch.empty(residual, rank, **factory)
            nn.init.kaiming_uniform_(x, a=math.sqrt(20), mode="fan_in", nonlinearity="relu")
            self.salt_X = nn.Parameter(x)
            self.salt_Y = nn.Parameter(torch.zeros(rank, residual, **factory))
        else:  # every singular value is scaled and shifted: nothing left for the low-rank part
            self.salt_X = self.salt_Y = None

    def effective(self, w0: torch.Tensor) -> torch.Tensor:
        r_s = self.svd_rank
        u, s, vh = self.svd_U, self.svd_S, self.svd_Vh
        top = torch.relu(self.salt_scale * s[:r_s] + self.salt_shift) - s[:r_s]
        delta = (u[:, :r_s] * top) @ vh[:r_s]
        if self.salt_X is not None:
            s_res = s[r_s:]
            block = torch.relu(torch.diag(s_res) + self.salt_X @ self.salt_Y) - torch.diag(s_res)
            delta = delta + u[:, r_s:] @ block @ vh[r_s:]
        return w0 + delta.view(w0.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, svd_rank={self.svd_rank}"
