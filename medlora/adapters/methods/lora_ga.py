"""LoRA-GA: LoRA initialised from the singular vectors of the estimated full fine-tuning gradient.

Wang, Yu & Li, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", NeurIPS 2024, arXiv 2407.05000;
official code Outsider565/LoRA-GA. ``G`` = mean ``dL/dW0`` over a few batches on the ``O x (I*prod k)``
matricisation (:func:`medlora.adapters.initialise_from_data`); ``U, S, V = svd_lowrank(G, q=min(4r, min(G.shape)),
niter=4)``. Direction ``ArB2r`` (default): ``B = U[:, r:2r]``, ``A = V^T[:r]``; ``A2rBr``: ``B = U[:, :r]``,
``A = V^T[r:2r]``; ``ArBr``: ``B = U[:, 0:2r:2]``, ``A = V^T[1:2r:2]``; ``random``: a random split of the first 2r.
Scale ``stable`` (default, gamma = 16): ``A, B *= O^(1/4) / sqrt(gamma)``; ``gd``: ``A, B /= s``; ``unit``: as is;
``weightS``: ``A, B *= mean(sqrt(S_W[:r] / s))`` with ``S_W`` the leading singular values of ``W0``.
``W_eff = W0 + s (B A - B0 A0)`` with ``s = alpha / r`` (default alpha = 2r: the reference's alpha 16 at its
r = 8): the model starts at ``W0`` exactly; A and B train.

As the reference code (and unlike PEFT's port, which folds ``S`` into B and scales only B). Differences: the
reference subtracts ``s B0 A0`` from the stored base weight; here that offset is a frozen part of the adapter
(saved with it), so the base weights and their fingerprint stay untouched. Singular pairs take a fixed sign
(``_linalg.sign_canonical``), which the reference leaves to the SVD backend. Conv layers (the reference and PEFT
are Linear-only; PEFT silently falls back to plain LoRA on conv) use the same SVD of the matricised gradient.

No data-free fallback: until :func:`~medlora.adapters.initialise_from_data` runs (or a trained adapter is loaded)
the factors hold NaN and the first forward raises a ``RuntimeError`` saying so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._linalg import top_svd
from ..base import check_rank
from ..config import option, register_method
from ..data_init import DataInitReparam
from .pissa import OffsetLoRA

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit", "weightS")


@dataclass
class LoRAGAOptions:
    direction: str = option("ArB2r", "which singular vectors of G go to A and B: ArB2r, A2rBr, ArBr or random")
    scale: str = option("stable", "factor scaling: stable (O^(1/4)/sqrt(gamma)), gd (1/s), unit, weightS")
    stable_gamma: float = option(16.0, "gamma of the 'stable' scale")
    niter: int | None = option(4, "svd_lowrank subspace iterations (reference: 4); None: exact SVD")


@register_method(
    "lora_ga",
    label="LoRA-GA",
    family="initialisation",
    options=LoRAGAOptions,
    summary="LoRA-GA: LoRA initialised from the SVD of the estimated gradient dL/dW0 (needs initialise_from_data)",
    citation="Wang, Yu & Li 2024, arXiv 2407.05000",
    alpha_over_rank=2.0,
    trains="lora_A (r x I*prod k), lora_B (O x r); frozen offset B0 A0",
    lora_pair=True,
)
class LoRAGA(DataInitReparam, OffsetLoRA):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: LoRAGAOptions) -> None:
        super().__init__(w0, rank=rank, scaling=scaling)
        if options.direction not in DIRECTIONS:
            raise ValueError(f"lora_ga: direction must be one of {', '.join(DIRECTIONS)}, got {options.direction!r}")
        if options.scale not in SCALES:
            raise ValueError(f"lora_ga: scale must be one of {', '.join(SCALES)}, got {options.scale!r}")
        check_rank("lora_ga", 2 * rank, min(w0.shape[0], w0[0].numel()), w0, what="2r <= min(O, I*prod k)")
        self.rank = rank
        self.options = options

    def _uninitialised_marker(self) -> torch.Tensor:
        return self.lora_A

    def init_from_gradient(self, grad: torch.Tensor, weight: torch.Tensor) -> None:
        r, opts = self.rank, self.options
        g = grad.flatten(1)
        u, _, vh = top_svd(g, min(4 * r, min(g.shape)), opts.niter)
        if opts.direction == "ArB2r":
            b, a = u[:, r:2 * r], vh[:r]
        elif opts.direction == "A2rBr":
            b, a = u[:, :r], vh[r:2 * r]
        elif opts.direction == "ArBr":
            b, a = u[:, 0:2 * r:2], vh[1:2 * r:2]
        else:
            order = torch.randperm(2 * r).tolist()  # the reference draws it with Python's random.sample
            a, b = vh[order[:r]], u[:, order[r:]]
        if opts.scale == "gd":
            a, b = a / self.scaling, b / self.scaling
        elif opts.scale == "stable":
            factor = g.shape[0] ** 0.25 / opts.stable_gamma ** 0.5
            a, b = a * factor, b * factor
        elif opts.scale == "weightS":
            _, s_w, _ = top_svd(weight.flatten(1), min(4 * r, min(g.shape)), opts.niter)
            factor = torch.sqrt(s_w[:r] / self.scaling).mean()
            a, b = a * factor, b * factor
        self.set_factors(a.to(self.lora_A.dtype), b.to(self.lora_B.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, direction={self.options.direction!r}, scale={self.options.scale!r}"
