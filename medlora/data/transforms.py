"""MONAI preprocessing pipelines for CT segmentation, shared by training, evaluation and inference.

Orientation to RAS, optional resampling to a target spacing, and a Hounsfield window mapped to [0, 1]
(default [0, 140] HU, the window of the seed paper's authors; kayvanlabs/Transfer-Learning-SAH-Seg
``random_contrast.py``). The authors mapped to [0, 255]; [0, 1] is the usual MONAI convention and only
rescales the first layer's input.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

DEFAULT_HU_WINDOW: tuple[float, float] = (0.0, 140.0)


class ForegroundView:
    """A binary view of a multi-class label map: 1 where the label is one of ``values``, else 0 (same type)."""

    def __init__(self, values: Sequence[int]) -> None:
        self.values = tuple(int(v) for v in values)

    def __call__(self, label):
        hit = label == self.values[0]
        for v in self.values[1:]:
            hit = hit | (label == v)
        return hit.to(label.dtype)


def preprocessing(
    keys: Sequence[str] = ("image", "label"),
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    target_spacing: Sequence[float] | None = None,
    foreground: Sequence[int] | None = None,
) -> list:
    """The deterministic part: load, channel first, RAS, optional resampling, HU window to [0, 1]; with
    ``foreground`` (label values) the label becomes the binary view of those classes (after resampling)."""
    keys = list(keys)
    steps: list = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if target_spacing is not None:
        modes = ["bilinear" if k == "image" else "nearest" for k in keys]
        steps.append(Spacingd(keys=keys, pixdim=tuple(target_spacing), mode=modes))
    steps += [
        ScaleIntensityRanged(keys=["image"], a_min=hu_window[0], a_max=hu_window[1], b_min=0.0, b_max=1.0,
                             clip=True),
        EnsureTyped(keys=keys, track_meta=True),
    ]
    if foreground is not None and "label" in keys:
        steps.append(Lambdad(keys=["label"], func=ForegroundView(foreground)))
    return steps


def training_augmentation(
    patch_size: Sequence[int],
    samples_per_volume: int = 2,
    pos_fraction: float = 0.5,
    flip: bool = True,
) -> list:
    """Random part for 3D patches: positive/negative-balanced crops and a left-right flip.

    ``pos_fraction`` is the probability that a patch is centred on hemorrhage (MONAI's
    ``RandCropByPosNegLabeld`` with ``pos = pos_fraction``, ``neg = 1 - pos_fraction``); a volume without
    hemorrhage gives negative patches only.
    """
    steps: list = [
        SpatialPadd(keys=["image", "label"], spatial_size=tuple(patch_size)),
        RandCropByPosNegLabeld(
            keys=["image", "label"], label_key="label", spatial_size=tuple(patch_size),
            pos=pos_fraction, neg=1.0 - pos_fraction, num_samples=samples_per_volume, allow_smaller=False,
        ),
    ]
    if flip:
        # axis 0 is left-right after RAS orientation; the authors flipped slices horizontally
        steps.append(RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0))
    return steps


def compose(*parts: list) -> Compose:
    return Compose([step for part in parts for step in part])
