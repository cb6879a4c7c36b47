"""Linear-algebra helpers shared by several methods and post-hoc tools (private: no stable API).

SVDs of matricised weights and gradients (PiSSA, LoRA-GA, LoRA-SB, SALT, S-SAM), the dtype LAPACK needs, and
the SVD of a product of LoRA factors without forming it (LoRA-Squeeze, the linear merge).
"""

from __future__ import annotations

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """LAPACK/cuSOLVER have no half-precision SVD or LU: float32 at least."""
    return torch.promote_types(t.dtype, torch.float32)


def sign_canonical(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the sign of each singular pair so that the largest-magnitude entry of ``u[:, j]`` is positive.

    SVD is unique only up to the sign of each ``(u_j, v_j)`` pair, and SALT's elementwise ReLU on the
    non-diagonal residual block is not invariant to those signs; a fixed convention (the one of
    scikit-learn's ``svd_flip``) makes the adapted weight the same on every LAPACK/cuSOLVER backend.
    """
    rows = u.abs().argmax(dim=0)
    signs = torch.sign(u[rows, torch.arange(u.shape[1], device=u.device)])
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


def top_svd(matrix: torch.Tensor, q: int, niter: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``q`` singular triplets ``(U, S, V^T)``, sign-canonical (see :func:`sign_canonical`).

    ``niter=None``: exact thin SVD (``torch.linalg.svd``); otherwise ``torch.svd_lowrank(q=q, niter=niter)``.
    """
    m = matrix.to(compute_dtype(matrix))
    if niter is None:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, vh = u[:, :q], s[:q], vh[:q]
    else:
        u, s, v = torch.svd_lowrank(m, q=q, niter=niter)
        vh = v.mT
        if not (torch.isfinite(u).all() and torch.isfinite(vh).all()):  # e.g. an all-zero matrix
            return top_svd(matrix, q, None)
    u, vh = sign_canonical(u, vh)
    return u, s, vh


def factored_svd(
    b: torch.Tensor,
    a: torch.Tensor,
    rank: int,
    *,
    method: str = "randomized",
    oversample: int = 8,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD ``U, S, Vh`` of ``b @ a`` (``b: m x r``, ``a: r x n``) without forming the product.

    ``exact``: QR of both factors and an ``r x r`` SVD; ``randomized``: a range finder with power iterations on
    ``b (a Omega)`` (Halko et al. 2011), cost ``O((m + n) r k)``. Returns ``min(rank, m, n, r)`` triplets
    (``exact``) or ``min(rank, m, n)`` (``randomized``): a product of an ``m x n`` layer has no more, e.g. a
    2-class segmentation head (``m = 2``) asked for rank 4 gives 2.
    """
    if method == "exact":
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.t())
        u, s, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False)
        return (qb @ u)[:, :rank], s[:rank], (vh @ qa.t())[:rank]
    if method != "randomized":
        raise ValueError(f"factored_svd: method must be 'randomized' or 'exact', got {method!r}")
    width = min(rank + oversample, a.shape[1], b.shape[0])
    omega = torch.randn(a.shape[1], width, dtype=a.dtype, device=a.device, generator=generator)
    q = torch.linalg.qr(b @ (a @ omega)).Q
    for _ in range(n_iter):  # power iterations sharpen the range when the spectrum decays slowly
        q = torch.linalg.qr(a.t() @ (b.t() @ q)).Q
        q = torch.linalg.qr(b @ (a @ q)).Q
    u, s, vh = torch.linalg.svd((q.t() @ b) @ a, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vh[:rank]
