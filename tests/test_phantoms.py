"""Tests for the synthetic head-CT phantom generator (medlora.data.phantoms)."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest

from medlora.data.dataset import validate_dataset
from medlora.data.phantoms import (
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    VOLUME_BINS_ML,
    case_id,
    generate_case,
    phantom_affine,
    target_volume_ml,
    write_dataset,
)

# Small grid with the same 192 x 192 x 160 mm field of view as the default, ~10x cheaper.
SHAPE = (48, 48, 16)
SPACING = (4.0, 4.0, 10.0)
VOX_ML = 4.0 * 4.0 * 10.0 / 1000.0


def _case(domain, index, seed=0, **kw):
    return generate_case(domain, seed, index, SHAPE, SPACING, **kw)


def _bin_of(ml: float) -> int:
    for i, (lo, hi) in enumerate(VOLUME_BINS_ML):
        if lo < ml <= hi:
            return i
    return -1


def test_generation_is_bitwise_deterministic():
    a = _case("sah", 2, seed=7)
    b = _case("sah", 2, seed=7)
    for x, y in zip(a[:3], b[:3], strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    info_a = {k: v for k, v in a[3].items() if k != "seconds"}
    info_b = {k: v for k, v in b[3].items() if k != "seconds"}
    assert info_a == info_b


def test_cases_differ_by_seed_index_and_domain():
    ref = _case("tbi", 1, seed=0)[0]
    assert not np.array_equal(ref, _case("tbi", 1, seed=1)[0])
    assert not np.array_equal(ref, _case("tbi", 2, seed=0)[0])
    assert not np.array_equal(ref, _case("sah", 1, seed=0)[0])


def test_written_cases_do_not_depend_on_n_cases(tmp_path):
    small = write_dataset(tmp_path / "a", "tbi", 2, seed=3, shape=SHAPE, spacing=SPACING)
    large = write_dataset(tmp_path / "b", "tbi", 4, seed=3, shape=SHAPE, spacing=SPACING)
    for cid in ("TBI_000", "TBI_001"):
        for rel in (f"imagesTr/{cid}_0000.nii.gz", f"labelsTr/{cid}.nii.gz"):
            # gzip without a timestamp: identical arrays give identical bytes.
            assert (small / rel).read_bytes() == (large / rel).read_bytes()
    image, label, _, _ = generate_case("tbi", 3, 1, SHAPE, SPACING)
    on_disk = nib.load(str(large / "imagesTr" / "TBI_001_0000.nii.gz"))
    assert np.array_equal(np.asarray(on_disk.dataobj), image.astype(np.int16))
    assert np.array_equal(np.asarray(nib.load(str(large / "labelsTr" / "TBI_001.nii.gz")).dataobj), label)


def test_hounsfield_ranges_by_tissue():
    image, label, _, info = _case("sah", 1, noise_sigma=0.0, tissue_maps=True)
    t = info["tissue"]
    assert image[0, 0, 0] == -1000.0 and image[-1, -1, -1] == -1000.0  # air outside the head
    assert (image > 300).sum() > 1000 and image.max() > 1000  # skull: diploe and cortical tables
    pure_brain = image[t["brain"] > 0.99]
    assert pure_brain.size > 1000 and pure_brain.min() >= 15 and pure_brain.max() <= 50
    pure_csf = image[t["csf"] > 0.99]
    assert pure_csf.size > 0 and pure_csf.min() >= 0 and pure_csf.max() <= 15
    blood = image[(t["blood"] > 0.9) & (t["bone"] < 0.02)]
    assert blood.size > 0 and blood.min() >= 40 and blood.max() <= 95
    assert np.all(np.isin(label, [0, 1]))
    assert image.dtype == np.float32 and np.array_equal(image, np.rint(image))


def test_label_is_blood_fraction_at_least_half_and_noise_level():
    image, label, _, info = _case("tbi", 1, tissue_maps=True)  # a subdural: blood against the inner table
    assert info["lesions"][0] == "subdural"
    assert np.array_equal(label, (info["tissue"]["blood"] >= 0.5).astype(np.uint8))
    # Intra-axial and subarachnoid blood reads as acute blood even with noise and partial volume.
    for domain, index in (("tbi", 0), ("sah", 1)):
        img, lab, _, _ = _case(domain, index)
        assert 50 <= float(np.median(img[lab > 0])) <= 90
    air = image[:6, :6, :]
    assert abs(float(air.mean()) + 1000) < 1.5
    assert abs(float(air.std()) - info["noise_sigma_hu"]) < 0.2 * info["noise_sigma_hu"]


def test_no_bleed_variant_has_the_same_anatomy():
    img, lab, _, info = _case("sah", 0, tissue_maps=True)
    img0, lab0, _, info0 = _case("sah", 0, tissue_maps=True, hemorrhage=False)
    assert lab.sum() > 0 and lab0.sum() == 0 and info0["hemorrhage_ml"] == 0
    untouched = info["tissue"]["blood"] == 0
    assert np.array_equal(img[untouched], img0[untouched])


def test_volume_ml_follows_label_and_spacing():
    for domain in ("tbi", "sah"):
        _, label, affine, info = _case(domain, 2)
        expected = int(label.sum()) * float(np.prod(SPACING)) / 1000.0
        assert info["hemorrhage_voxels"] == int(label.sum())
        assert info["hemorrhage_ml"] == pytest.approx(expected, abs=1e-9)
        # The bleed is grown to its scheduled volume.
        assert info["hemorrhage_ml"] == pytest.approx(info["target_ml"], rel=0.05)


def test_sah_volumes_span_the_seed_paper_bins():
    vols = [_case("sah", i)[3]["hemorrhage_ml"] for i in range(12)]
    hit = {_bin_of(v) for v in vols}
    assert len(hit - {-1}) >= 3, vols
    assert all(v > 0 for v in vols)


def test_tbi_has_empty_cases_and_all_lesion_kinds():
    scheduled = [target_volume_ml("tbi", 0, i)[0] for i in range(20)]
    assert 1 <= scheduled.count(0.0) <= 5
    assert all(target_volume_ml("sah", 0, i)[0] > 0 for i in range(20))
    kinds = set()
    empty_seen = False
    for i in range(12):
        _, label, _, info = _case("tbi", i)
        kinds.update(info["lesions"])
        if info["target_ml"] == 0:
            empty_seen = True
            assert label.sum() == 0 and info["hemorrhage_ml"] == 0
    assert empty_seen
    assert {"contusion", "subdural", "epidural"} <= kinds


def test_sah_blood_lies_in_csf_spaces_unlike_contusions():
    """SAH blood fills cisterns, fissures and sulci; a contusion sits in the parenchyma."""

    def csf_share(domain, index):
        _, label, _, info = _case(domain, index)
        _, _, _, base = _case(domain, index, hemorrhage=False, tissue_maps=True)
        csf = base["tissue"]["csf"][label > 0]  # CSF content of the same voxels in the bleed-free head
        return float((csf > 0.2).mean()), info["lesions"]

    for i in (0, 1, 2):
        share, lesions = csf_share("sah", i)
        assert lesions[0] == "subarachnoid"
        assert share > 0.75, (i, share)
    share, lesions = csf_share("tbi", 0)
    assert lesions == ["contusion"]
    assert share < 0.5


def test_affine_is_ras_with_centred_origin():
    aff = phantom_affine(SHAPE, SPACING)
    assert np.allclose(np.diag(aff)[:3], SPACING)
    centre = aff @ np.array([(n - 1) / 2 for n in SHAPE] + [1.0])
    assert np.allclose(centre[:3], 0.0)
    assert np.array_equal(_case("sah", 0)[2], aff)


def test_write_dataset_layout_json_and_nifti(tmp_path):
    root = write_dataset(tmp_path / "Dataset901_SAH", "sah", 3, seed=5, shape=SHAPE, spacing=SPACING)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "hemorrhage": 1}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    block = meta["medlora"]
    assert block["domain"] == "sah" and block["seed"] == 5
    assert block["shape"] == list(SHAPE) and block["spacing"] == list(SPACING)
    assert sorted(block["cases"]) == ["SAH_000", "SAH_001", "SAH_002"]
    for cid, rec in block["cases"].items():
        img = nib.load(str(root / "imagesTr" / f"{cid}_0000.nii.gz"))
        lab = nib.load(str(root / "labelsTr" / f"{cid}.nii.gz"))
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert img.shape == SHAPE and lab.shape == SHAPE
        assert np.allclose(img.affine, phantom_affine(SHAPE, SPACING))
        assert np.allclose(lab.affine, img.affine)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        assert np.allclose(img.header.get_zooms(), SPACING)
        n = int(np.asarray(lab.dataobj).sum())
        assert rec["hemorrhage_voxels"] == n
        ml = n * float(np.prod(img.header.get_zooms())) / 1000
        assert rec["hemorrhage_ml"] == pytest.approx(ml, abs=1e-3)
    assert not [p for p in root.rglob(".*")]  # no temporaries left behind
    validate_dataset(root)


def test_write_dataset_is_idempotent_and_refuses_to_clobber(tmp_path):
    root = write_dataset(tmp_path / "d", "tbi", 2, seed=1, shape=SHAPE, spacing=SPACING)
    stamp = (root / "dataset.json").stat().st_mtime_ns
    assert write_dataset(root, "tbi", 2, seed=1, shape=SHAPE, spacing=SPACING) == root
    assert (root / "dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="dataset.json"):
        write_dataset(root, "tbi", 2, seed=2, shape=SHAPE, spacing=SPACING)
    write_dataset(root, "sah", 2, seed=2, shape=SHAPE, spacing=SPACING, overwrite=True)
    assert json.loads((root / "dataset.json").read_text(encoding="utf-8"))["medlora"]["domain"] == "sah"


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown phantom domain"):
        generate_case("stroke", 0)
    with pytest.raises(ValueError, match="field of view"):
        generate_case("sah", 0, 0, (48, 48, 16), (2.0, 2.0, 5.0))
    assert case_id("sah", 7) == "SAH_007" and case_id("TBI", 12) == "TBI_012"


def test_default_grid_shape_and_speed():
    t0 = time.perf_counter()
    image, label, affine, info = generate_case("sah", 0, 3, tilt_deg=0.0)
    elapsed = time.perf_counter() - t0
    assert image.shape == DEFAULT_SHAPE and label.shape == DEFAULT_SHAPE
    assert np.allclose(np.diag(affine)[:3], DEFAULT_SPACING)
    assert info["tilt_deg"] == [0.0, 0.0, 0.0]
    assert elapsed < 5.0  # ~0.5 s on one core; generous for loaded CI machines
