"""Per-case metrics for binary hemorrhage segmentation, with nnU-Net's conventions.

Dice is NaN when both prediction and reference are empty (nnU-Net's ``compute_metrics``: such cases
carry no information about overlap and are left out of nan-aware means). Soft Dice is computed on
probabilities as the seed paper's authors did (Minoccheri et al. 2025). HD95 is MONAI's 95th-percentile
symmetric Hausdorff distance in millimetres (NaN if either mask is empty). Volumes in mL are voxel
counts times the voxel volume; the soft volume sums probabilities, as the authors' volume analysis.
Volume bins follow the seed paper: (0, 25], (25, 50], (50, 100], (100, 225] mL.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

VOLUME_BINS_ML: tuple[float, ...] = (0.0, 25.0, 50.0, 100.0, 225.0)


def volume_bin(volume_ml: float, edges: Sequence[float] = VOLUME_BINS_ML) -> str:
    """The seed paper's bin label for a true volume, e.g. ``"25-50"``; ``"0"`` for no bleed, ``">225"`` above."""
    if volume_ml <= edges[0]:
        return "0"
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if lo < volume_ml <= hi:
            return f"{lo:g}-{hi:g}"
    return f">{edges[-1]:g}"


def case_metrics(
    probability: torch.Tensor | np.ndarray,
    reference: torch.Tensor | np.ndarray,
    spacing: Sequence[float],
    threshold: float = 0.5,
) -> dict[str, float]:
    """Metrics of one case. ``probability`` and ``reference`` have the same spatial shape (no channel).

    Returns Dice, IoU, soft Dice, HD95 (mm), TP/FP/FN/TN, n_pred/n_ref (voxels), true, predicted and soft
    volumes and the volume error (mL).
    """
    prob = torch.as_tensor(probability, dtype=torch.float32)
    ref = torch.as_tensor(reference) > 0.5
    if prob.shape != ref.shape:
        raise ValueError(f"prediction shape {tuple(prob.shape)} != reference shape {tuple(ref.shape)}")
    if len(spacing) != prob.dim():
        raise ValueError(f"spacing {tuple(spacing)} does not match a {prob.dim()}D case")
    pred = prob >= threshold
    tp = int((pred & ref).sum())
    fp = int((pred & ~ref).sum())
    fn = int((~pred & ref).sum())
    tn = int(pred.numel() - tp - fp - fn)
    n_pred, n_ref = tp + fp, tp + fn
    nan = float("nan")
    dice = 2 * tp / (2 * tp + fp + fn) if n_pred + n_ref else nan
    iou = tp / (tp + fp + fn) if n_pred + n_ref else nan
    prob_sum = float(prob.sum())
    soft_denominator = prob_sum + n_ref
    soft_dice = 2 * float((prob * ref).sum()) / soft_denominator if soft_denominator > 0 else nan
    if n_pred and n_ref:
        with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
            warnings.simplefilter("ignore", FutureWarning)
            hd95 = float(
                compute_hausdorff_distance(
                    pred[None, None].float(), ref[None, None].float(), include_background=True,
                    percentile=95, spacing=[float(s) for s in spacing],
                ).item()
            )
    else:
        hd95 = nan
    voxel_ml = math.prod(float(s) for s in spacing) / 1000.0
    return {
        "Dice": dice,
        "IoU": iou,
        "soft_Dice": soft_dice,
        "HD95_mm": hd95,
        "TP": tp,
        "FP": fp,
        "FN": fn,
        "TN": tn,
        "n_pred": n_pred,
        "n_ref": n_ref,
        "volume_true_ml": n_ref * voxel_ml,
        "volume_pred_ml": n_pred * voxel_ml,
        "volume_soft_ml": prob_sum * voxel_ml,
        "volume_error_ml": (n_pred - n_ref) * voxel_ml,
    }
