"""Simulated hospitals: the phantom generator's site parameters, and existing outputs left bitwise as they were."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from medlora.data.phantoms import VOLUME_BINS_ML, generate_case, target_volume_ml, write_dataset

SHAPE, SPACING = (48, 48, 16), (4.0, 4.0, 10.0)


def _digest(*arrays) -> str:
    d = hashlib.sha256()
    for a in arrays:
        d.update(a.tobytes())
    return d.hexdigest()[:16]


# sha256 prefixes of (image, label, affine) written by the generator before the site parameters existed
BEFORE = [
    (("sah", 0, {}), "44151783a9543c5a"),
    (("sah", 3, {"noise_sigma": 2.0}), "66bf4fc5440619e0"),
    (("tbi", 6, {}), "eceaa602a91e6392"),
    (("tbi", 1, {"tilt_deg": 0.0}), "92dcac6f08d9051f"),
]


@pytest.mark.parametrize(("case", "digest"), BEFORE)
def test_existing_parameters_give_bitwise_the_same_cases(case, digest):
    domain, index, kw = case
    image, label, affine, _ = generate_case(domain, 4, index, SHAPE, SPACING, **kw)
    assert _digest(image, label, affine) == digest
    # the new parameters at their defaults change nothing either
    same = generate_case(domain, 4, index, SHAPE, SPACING, hu_offset=0.0, head_scale=1.0, volume_bins=None, **kw)
    assert _digest(*same[:3]) == digest


def test_existing_dataset_json_is_bitwise_unchanged(tmp_path):
    out = write_dataset(tmp_path / "d", "sah", 2, seed=5, shape=SHAPE, spacing=SPACING)
    assert hashlib.sha256((out / "dataset.json").read_bytes()).hexdigest()[:16] == "c5696a6aa6644c21"
    # and a dataset written with site parameters is another dataset, refused unless overwritten
    with pytest.raises(FileExistsError, match="a different dataset"):
        write_dataset(tmp_path / "d", "sah", 2, seed=5, shape=SHAPE, spacing=SPACING, hu_offset=12.0)
    shifted = write_dataset(tmp_path / "e", "sah", 2, seed=5, shape=SHAPE, spacing=SPACING, hu_offset=12.0)
    with pytest.raises(FileExistsError, match="a different dataset"):
        write_dataset(shifted, "sah", 2, seed=5, shape=SHAPE, spacing=SPACING)
    assert write_dataset(shifted, "sah", 2, seed=5, shape=SHAPE, spacing=SPACING, hu_offset=12.0) == shifted


def test_hu_offset_shifts_every_unclipped_voxel():
    plain, label, _, _ = generate_case("sah", 1, 2, SHAPE, SPACING)
    shifted, label2, _, _ = generate_case("sah", 1, 2, SHAPE, SPACING, hu_offset=15.0)
    inside = (plain > -1024 + 20) & (plain < 3071 - 20)
    np.testing.assert_array_equal(shifted[inside] - plain[inside], 15.0)
    np.testing.assert_array_equal(label, label2)


def test_head_scale_changes_the_head_size():
    small = generate_case("sah", 1, 0, SHAPE, SPACING, head_scale=0.9, hemorrhage=False)
    large = generate_case("sah", 1, 0, SHAPE, SPACING, head_scale=1.1, hemorrhage=False)
    width = [info["head_size_mm"][0] for *_, info in (small, large)]
    assert width[1] / width[0] == pytest.approx(1.1 / 0.9, rel=1e-3)
    assert (large[0] > 0).sum() > 1.3 * (small[0] > 0).sum()  # more tissue voxels


def test_volume_bins_set_the_lesion_volume_mix():
    for index in range(6):
        ml, b = target_volume_ml("sah", 3, index, volume_bins=[2, 3])
        assert b == [2, 3][index % 2] and VOLUME_BINS_ML[b][0] < ml <= VOLUME_BINS_ML[b][1]
    # the value drawn inside the bin is the one the default schedule draws for that case
    assert target_volume_ml("sah", 3, 1, volume_bins=[1]) == target_volume_ml("sah", 3, 1)
    with pytest.raises(ValueError, match="volume_bins must list bin indices 0-3"):
        target_volume_ml("sah", 3, 0, volume_bins=[4])
    with pytest.raises(ValueError, match="head_scale must lie in"):
        generate_case("sah", 1, 0, SHAPE, SPACING, head_scale=1.5)
