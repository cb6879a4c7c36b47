"""Plausibility of CT intensities: the one test that training data and inference inputs both pass.

The networks expect Hounsfield units; a scan in other units (normalised to [0, 1], windowed, shifted)
trains or predicts without complaint and gives garbage. :func:`ct_problem` accepts a volume when

* it is 3D, non-empty, and every voxel is finite (no NaN or Inf);
* its values lie within [-32768, 32767]: CT stores HU as 16-bit integers. We deliberately accept far
  more than the physical [-1024, 3071]: scanners pad outside the field of view with -2048, -3024 or
  -32768, and extended-HU reconstructions of metal reach tens of thousands;
* some voxel is above -500 HU (else the scan holds only air, or is not in HU);
* some voxel is below +500 HU (a head CT always contains air, fat or soft tissue);
* its spread (max - min) is at least 500 HU: a normalised or windowed image is not raw HU.

A scan stored without its rescale intercept (air near 0, water near 1024) passes these checks; it
cannot be told from a real HU volume by its range alone.
"""

from __future__ import annotations

import numpy as np

__all__ = ["HU_LIMITS", "MIN_HU_SPREAD", "SOFT_TISSUE_HU", "ct_problem"]

HU_LIMITS: tuple[float, float] = (-32768.0, 32767.0)
SOFT_TISSUE_HU: float = 500.0
MIN_HU_SPREAD: float = 500.0


def ct_problem(data: np.ndarray) -> str | None:
    """What makes ``data`` implausible as a CT volume in HU (a phrase for a one-line error), or None."""
    if data.ndim != 3:
        return f"expected a 3D volume, got a {data.ndim}D array of shape {tuple(data.shape)}"
    if data.size == 0:
        return f"empty volume of shape {tuple(data.shape)}"
    finite = np.isfinite(data)
    if not finite.all():
        bad = ~finite
        n_nan = int(np.isnan(data).sum())
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        return (f"{int(bad.sum())} non-finite voxel(s) ({n_nan} NaN, {int(bad.sum()) - n_nan} Inf), first at "
                f"index {first}")
    lo, hi = float(data.min()), float(data.max())
    span = f"intensities [{lo:g}, {hi:g}]"
    if lo < HU_LIMITS[0] or hi > HU_LIMITS[1]:
        return f"{span} outside [{HU_LIMITS[0]:g}, {HU_LIMITS[1]:g}]: not a CT in Hounsfield units"
    if hi < -SOFT_TISSUE_HU:
        return f"{span}: no voxel above {-SOFT_TISSUE_HU:g} HU (only air, or not in Hounsfield units)"
    if lo > SOFT_TISSUE_HU:
        return f"{span}: no voxel below {SOFT_TISSUE_HU:g} HU (no air or soft tissue): not a CT in Hounsfield units"
    if hi - lo < MIN_HU_SPREAD:
        return (f"{span} span less than {MIN_HU_SPREAD:g} HU: a normalised or windowed image, not a CT in "
                "Hounsfield units")
    return None
