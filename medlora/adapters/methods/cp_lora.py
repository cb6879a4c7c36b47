"""CP-LoRA: a rank-R CANDECOMP/PARAFAC update of the whole kernel tensor.

Minoccheri, Hodgman et al., "LoRA-based methods on Unet for transfer learning in Subarachnoid
Hematoma Segmentation", arXiv 2508.01772 (2025). The paper's equation could not be read; resolution
used here (see docs/adapter_methods.md):
``dW = s * [[1; U_O, U_I, U_1, ..., U_d]]`` (Kolda & Bader 2009, eq. 3.2), the sum of
R rank-one tensors ``U_O[:, i] o U_I[:, i] o U_1[:, i] o ...``, evaluated with tensorly's
``cp_to_tensor`` on the PyTorch backend. ``U_O`` starts at zero so that ``dW = 0``; the other factors are
Gaussian with a standard deviation chosen so that each rank-one component has the per-entry scale
of LoRA's A matrix (``1/sqrt(3 * fan_in)``). Trainable ``R (O + I + sum k)``.

In training (``medlora.adapters.factored``) the update is a LoRA of rank R whose A-kernel is the stack of the R
rank-one kernels and whose B is ``U_O``; the factors' gradients then reach the CP factors through that outer
product (weight-sized).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorly as tl
import torch
from tensorly.cp_tensor import cp_to_tensor
from torch import nn

from ..base import AdditiveReparam
from ..config import option, register_method
from ..factored import Factors


@dataclass
class CPLoRAOptions:
    init_std: float | None = option(
        None,
        "standard deviation of the non-output factors at initialisation; None: (3 * fan_in)^(-1/(2m)) "
        "with m the number of non-output factors, so rank-one components match LoRA's A scale",
    )


@register_method(
    "cp_lora",
    label="CP-LoRA",
    family="cp",
    options=CPLoRAOptions,
    summary="rank-R CP decomposition of dW over (O, I, k1..kd); trainable R(O + I + sum k)",
    citation="Minoccheri, Hodgman et al. 2025, arXiv 2508.01772; CP: Kolda & Bader 2009",
    trains="CP factors U_O (O x R), U_I (I x R), U_j (k_j x R)",
)
class CPLoRA(AdditiveReparam):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: CPLoRAOptions) -> None:
        super().__init__(scaling)
        dims = list(w0.shape)
        n_random = len(dims) - 1
        fan_in = math.prod(dims[1:])
        std = options.init_std if options.init_std is not None else (3.0 * fan_in) ** (-1.0 / (2 * n_random))
        factors = [torch.zeros(dims[0], rank, dtype=w0.dtype, device=w0.device)]
        for size in dims[1:]:
            factors.append(torch.randn(size, rank, dtype=w0.dtype, device=w0.device) * std)
        self.cp_factors = nn.ParameterList([nn.Parameter(f) for f in factors])
        self.register_buffer("cp_weights", torch.ones(rank, dtype=w0.dtype, device=w0.device), persistent=False)

    def factored(self, w0: torch.Tensor) -> Factors:
        # A: the R rank-one kernels U_I[:, R] o U_1[:, R] o ... o U_d[:, R]; B: U_O (times the CP weights and s).
        u_out, u_in, *u_kernel = self.cp_factors
        rank = u_out.shape[1]
        a = u_in.t()
        for u in u_kernel:
            a = a.unsqueeze(-1) * u.t().reshape(rank, *[1] * (a.dim() - 1), -1)
        b = (u_out * (self.cp_weights * self.scaling)).view(u_out.shape[0], rank, *[1] * len(u_kernel))
        return Factors(a=a, b=b)

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        with tl.backend_context("pytorch"):
            full = cp_to_tensor((self.cp_weights, list(self.cp_factors)))
        return full * self.scaling
