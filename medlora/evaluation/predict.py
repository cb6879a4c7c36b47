"""Whole-volume prediction with MONAI sliding windows, shared by validation and ``medlora infer``.

Kept free of Lightning so that inference starts without importing the training stack. The probability
threshold that turns a prediction into a label map is defined here once (:data:`DEFAULT_THRESHOLD`), for
the training module's hard metrics and for inference when a model records none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import SliceInferer, sliding_window_inference
from torch import nn

__all__ = ["DEFAULT_THRESHOLD", "predict_volume"]

# Sigmoid probability at or above which a voxel is labelled foreground (hard Dice, volumes, label maps).
DEFAULT_THRESHOLD: float = 0.5


def predict_volume(
    model: nn.Module,
    image: torch.Tensor,
    spatial_dims: int,
    roi_size: Sequence[int],
    sw_batch_size: int = 2,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Sigmoid probabilities for a (N, C, X, Y, Z) volume: sliding windows with Gaussian blending.

    A 2D network runs on axial slices (MONAI ``SliceInferer`` over the last axis).
    """
    if spatial_dims == 3:
        logits = sliding_window_inference(image, tuple(roi_size), sw_batch_size, model, overlap=overlap,
                                          mode="gaussian")
    else:
        inferer = SliceInferer(roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, spatial_dim=2,
                               overlap=overlap, mode="gaussian", progress=False)
        logits = inferer(image, model)
    return torch.sigmoid(torch.as_tensor(logits))
