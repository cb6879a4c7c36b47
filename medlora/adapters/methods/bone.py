"""Bone / MiSS: one shared block of weights tiled over the weight matrix.

Kang et al., "Bone: Block-Affine Adaptation of Large Language Models" (later renamed "MiSS: Matrix Shard
Sharing"), arXiv 2409.15371 (2024). Written for the ``O x F`` matricisation ``W_m`` of a weight
(``F = I * prod k``; for a convolution a column is one ``(input channel, kernel tap)`` pair):

- ``variant="bone"`` (the default, MiSS's "balance" form): a block ``D: r x O``, zeros at the start;
  ``dW[o, c] = D[c mod r, o]``. In activation space this is "sum the input in chunks of r, multiply by D".
- ``variant="mini"`` (MiSS "mini"): a smaller block ``D: r x mini_r`` tiled along the outputs too,
  ``dW[o, c] = D[c mod r, o mod mini_r]`` (``mini_r`` must divide O).
- ``variant="bat"`` (Block Affine Transformation, the weight-guided form): ``W_m`` is cut into ``r x r``
  blocks ``W_ij`` (block row i, block column j); ``D: (O/r) x r x r`` holds one block per block row and
  ``dW_ij = W_ij @ D_i + D_i``. Needs r | O and r | F.

Every variant starts at ``W0`` exactly (``D = 0``) and is a weight-space update, hence mergeable. The
methods have no alpha: ``alpha`` is ignored. Differences from PEFT's ``tuners/miss``: PEFT pads the input
when r does not divide F; the modulo indexing above is the same update without padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..base import AdditiveReparam
from ..config import option, register_method

VARIANTS = ("bone", "mini", "bat")


@dataclass
class BoneOptions:
    variant: str = option("bone", "bone (MiSS balance: D r x O, dW[o,c] = D[c mod r, o]), mini (D r x mini_r) or bat "
                          "(block affine, dW_ij = W_ij D_i + D_i)")
    mini_r: int = option(1, "output period of the tiled block in the mini variant (must divide O)")


@register_method(
    "bone",
    label="Bone",
    family="structure",
    options=BoneOptions,
    summary="Bone/MiSS: one shared r x O block tiled over the input axis of W (or block-affine 'bat'); "
            "trainable r*O (bat: O*r)",
    citation="Kang et al. 2024, arXiv 2409.15371",
    trains="bone_block (r x O; mini: r x mini_r; bat: O/r x r x r)",
)
class Bone(AdditiveReparam):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: BoneOptions) -> None:
        super().__init__(1.0)
        if options.variant not in VARIANTS:
            raise ValueError(f"bone: variant must be one of {VARIANTS}, got {options.variant!r}")
        out_channels, fan_in = w0.shape[0], math.prod(w0.shape[1:])
        if rank > fan_in:
            raise ValueError(f"bone: rank {rank} exceeds the {fan_in} columns of a weight of shape {tuple(w0.shape)}")
        self.variant, self.rank = options.variant, rank
        factory = {"dtype": w0.dtype, "device": w0.device}
        if options.variant == "bone":
            shape: tuple[int, ...] = (rank, out_channels)
        elif options.variant == "mini":
            if options.mini_r < 1 or out_channels % options.mini_r:
                raise ValueError(f"bone: mini_r {options.mini_r} must divide the {out_channels} output channels")
            shape = (rank, options.mini_r)
        else:
            if out_channels % rank or fan_in % rank:
                raise ValueError(f"bone: variant 'bat' needs rank {rank} to divide both O={out_channels} and "
                                 f"F={fan_in} (weight of shape {tuple(w0.shape)})")
            shape = (out_channels // rank, rank, rank)
        self.bone_block = nn.Parameter(torch.zeros(*shape, **factory))

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        out_channels, fan_in = w0.shape[0], math.prod(w0.shape[1:])
        r, block = self.rank, self.bone_block
        if self.variant == "bat":
            # (O/r, r, F/r, r) -> per block row i and block column j: W_ij @ D_i + D_i
            w = w0.reshape(out_channels // r, r, fan_in // r, r).permute(0, 2, 1, 3)
            d = block.unsqueeze(1)
            return (w @ d + d).permute(0, 2, 1, 3).reshape(w0.shape)
        if self.variant == "mini":
            block = block.repeat(1, out_channels // block.shape[1])
        # dW[o, c] = block[c mod r, o]: tile the r x O block along the columns, then cut to F.
        tiled = block.t().repeat(1, -(-fan_in // r))[:, :fan_in]
        return tiled.reshape(w0.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant!r}"
