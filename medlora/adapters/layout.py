"""Where the output-channel axis of a layer's weight lives, handled once for every method.

Every method works on the *canonical* view of a weight: ``(O, I_per_group, *kernel)`` with the output
axis first. ``nn.Linear`` and ``nn.ConvNd`` weights already have that shape. Transposed convolutions
store ``(I, O / groups, *kernel)``; a grouped transposed weight is regrouped so that canonical row
``g * O/groups + j`` is output channel ``j`` of group ``g``, which makes "per output channel" mean the
same thing (DoRA's magnitude, SVD rows) for every layer type. Hugging Face's GPT-style ``Conv1D``
stores ``(I, O)`` and is a transposed layout with one group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_STANDARD_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

SUPPORTED_LAYER_TYPES: tuple[str, ...] = tuple(
    t.__name__ for t in _STANDARD_TYPES + _TRANSPOSED_TYPES
) + ("Conv1D (transformers)",)


@dataclass(frozen=True)
class WeightLayout:
    """How to move between a layer's stored weight and the canonical ``(O, I/groups, *k)`` view."""

    transposed: bool = False
    groups: int = 1

    def to_canonical(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return weight
        g = self.groups
        in_total, out_per_group, *kernel = weight.shape
        w = weight.reshape(g, in_total // g, out_per_group, *kernel).transpose(1, 2)
        return w.reshape(g * out_per_group, in_total // g, *kernel)

    def from_canonical(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return weight
        g = self.groups
        out_total, in_per_group, *kernel = weight.shape
        w = weight.reshape(g, out_total // g, in_per_group, *kernel).transpose(1, 2)
        return w.reshape(g * in_per_group, out_total // g, *kernel)

    def canonical_shape(self, weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        if not self.transposed:
            return tuple(weight_shape)
        in_total, out_per_group, *kernel = weight_shape
        return (out_per_group * self.groups, in_total // self.groups, *kernel)


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D (weight stored as in x out); matched by name so that the core
    # never imports transformers.
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def layout_of(module: nn.Module) -> WeightLayout | None:
    """The weight layout of a supported layer, or ``None`` if the layer type is not supported."""
    if isinstance(module, _TRANSPOSED_TYPES):
        return WeightLayout(transposed=True, groups=module.groups)
    if isinstance(module, _STANDARD_TYPES):
        return WeightLayout(transposed=False, groups=getattr(module, "groups", 1))
    if _is_hf_conv1d(module):
        return WeightLayout(transposed=True, groups=1)
    return None
