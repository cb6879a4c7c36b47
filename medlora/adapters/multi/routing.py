"""Which adapter each row of a mixed batch uses, and how that carries through the layers of a network.

A mixed forward names one adapter (or ``None``, the base) per sample. Every routed layer sees its input's rows in
the same order as the samples; a layer whose leading dimension is ``m * N`` (a ViT's window attention folds
``m`` windows of each image into the batch) holds each sample's ``m`` rows contiguously, so the row routing is
the sample routing repeated ``m`` times. Samples of one adapter that form equal contiguous blocks in adapter
order (a packed training batch) are the *blocked* layout, which the operators use without any gather.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from ...errors import MedloraError


class MultiAdapterError(MedloraError, ValueError):
    """A mixed-adapter batch or adapter bank that cannot be computed as asked (one line naming the problem)."""


@dataclass
class Routing:
    """The slot (position in ``slots``) of every row, with the blocked layout recognised.

    ``slots`` are the distinct adapters present, in order of first appearance; ``index[i]`` is the slot of row i;
    ``block`` is the rows per slot when slot s holds exactly rows ``s*block .. (s+1)*block - 1`` (else None).
    """

    slots: tuple[Hashable, ...]
    index: torch.Tensor
    block: int | None
    _segments: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, names: Sequence[Hashable]) -> Routing:
        order: dict[Hashable, int] = {}
        index = torch.tensor([order.setdefault(n, len(order)) for n in names], dtype=torch.long)
        slots, rows = tuple(order), len(names)
        block = None
        if rows and rows % len(slots) == 0:
            b = rows // len(slots)
            if torch.equal(index, torch.arange(len(slots)).repeat_interleave(b)):
                block = b
        return cls(slots, index, block)

    @property
    def rows(self) -> int:
        return int(self.index.numel())

    def scaled(self, rows: int, where: str) -> Routing:
        """The routing of a layer input with ``rows`` leading rows (a multiple of the samples)."""
        n = self.rows
        if rows == n:
            return self
        if n == 0 or rows % n:
            raise MultiAdapterError(
                f"{where}: input has {rows} rows along dimension 0 for a batch of {n} samples; a mixed-adapter "
                "batch needs the batch axis first at every adapted layer (or a whole multiple of it, each sample's "
                "rows contiguous)")
        m = rows // n
        return Routing(self.slots, self.index.repeat_interleave(m), None if self.block is None else self.block * m)

    def index_on(self, device: torch.device) -> torch.Tensor:
        if self.index.device == device:
            return self.index
        key = ("index", str(device))
        if key not in self._segments:
            self._segments[key] = self.index.to(device)
        return self._segments[key]

    def segments(self, device: torch.device) -> list[torch.Tensor]:
        """Row indices of each slot, in slot order."""
        key = str(device)
        if key not in self._segments:
            index = self.index_on(device)
            self._segments[key] = [torch.nonzero(index == s).flatten() for s in range(len(self.slots))]
        return self._segments[key]

    def gather_order(self, device: torch.device) -> torch.Tensor | None:
        """The permutation that puts rows back in batch order after concatenating the per-slot segments
        (None in the blocked layout, where concatenation already is batch order)."""
        if self.block is not None:
            return None
        return torch.argsort(torch.cat(self.segments(device)))
