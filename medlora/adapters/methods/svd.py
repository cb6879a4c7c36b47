"""S-SAM: scale and shift every singular value of the frozen weight.

Paranjape et al., "S-SAM: SVD-based Fine-Tuning of Segment Anything Model for Medical Image Segmentation", MICCAI
2024, arXiv 2408.06447: ``W = U diag(relu(a * S + b)) V^T`` with the thin SVD of the ``O x (I*prod k)``
matricisation, ``a = 1`` and ``b = 0`` at the start; trainable ``2k`` (k singular values). Evaluated as
``W0 + U (relu(a S + b) - diag(S)) V^T`` on the SVD cached by ``salt.SpectralReparam`` (taken lazily from the
weight the layer holds, sign-canonical), which starts at ``W0`` exactly. The rank is not used.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import register_method
from .salt import SpectralReparam


@register_method(
    "svd",
    label="S-SAM (SVD)",
    family="spectral",
    summary="S-SAM: scale and shift every singular value, W = U diag(relu(a S + b)) V^T; trainable 2k",
    citation="Paranjape et al. 2024 (MICCAI), arXiv 2408.06447",
    uses_rank=False,
    trains="scale a, shift b of every singular value (2k)",
)
class SingularValueShift(SpectralReparam):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: object) -> None:
        super().__init__(w0)
        k = self.n_singular_values(w0)
        self.svd_scale = nn.Parameter(torch.ones(k, dtype=w0.dtype, device=w0.device))
        self.svd_shift = nn.Parameter(torch.zeros(k, dtype=w0.dtype, device=w0.device))

    def effective(self, w0: torch.Tensor) -> torch.Tensor:
        s = self.svd_S
        change = torch.relu(self.svd_scale * s + self.svd_shift) - s
        return w0 + ((self.svd_U * change) @ self.svd_Vh).view(w0.shape)
