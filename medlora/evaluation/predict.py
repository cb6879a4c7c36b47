"""Whole-volume prediction with MONAI sliding windows, shared by validation and ``medlora infer``.

Kept free of Lightning so that inference starts without importing the training stack. The probability
threshold that turns a prediction into a label map is defined here once (:data:`DEFAULT_THRESHOLD`), for
the training module's hard metrics and for inference when a model records none, and so are the sliding-window
defaults.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import SliceInferer, sliding_window_inference
from torch import nn

__all__ = ["DEFAULT_SW_BATCH_SIZE", "DEFAULT_SW_OVERLAP", "DEFAULT_THRESHOLD", "predict_volume"]

# Sigmoid probability at or above which a voxel is labelled foreground (hard Dice, volumes, label maps).
DEFAULT_THRESHOLD: float = 0.5
# Sliding windows per network call and their overlap: validation (model.sw_batch_size / model.sw_overlap) and
# `medlora infer` (--sw-batch-size / --sw-overlap) share these defaults.
DEFAULT_SW_BATCH_SIZE: int = 2
DEFAULT_SW_OVERLAP: float = 0.25


def predict_volume(
    model: nn.Module,
    image: torch.Tensor,
    spatial_dims: int,
    roi_size: Sequence[int],
    sw_batch_size: int = DEFAULT_SW_BATCH_SIZE,
    overlap: float = DEFAULT_SW_OVERLAP,
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
