"""Tests for the nnU-Net v2 dataset reader/validator and the k-fold splits (medlora.data.dataset)."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest

from medlora.data.dataset import (
    DatasetError,
    check_splits,
    ensure_splits,
    load_nifti,
    load_splits,
    make_splits,
    read_dataset,
    save_nifti,
    validate_dataset,
    write_splits,
)
from medlora.data.phantoms import write_dataset

SHAPE = (48, 48, 16)
SPACING = (4.0, 4.0, 10.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "Dataset900_Tiny"
    return write_dataset(root, "sah", 3, seed=1, shape=SHAPE, spacing=SPACING)


@pytest.fixture
def copy(tiny, tmp_path):
    dst = tmp_path / "Dataset900_Tiny"
    shutil.copytree(tiny, dst)
    return dst


def _raises(root, *fragments, check_voxels=True):
    """Validate and return the one-line error message, checking that it names every fragment."""
    with pytest.raises(DatasetError) as exc:
        validate_dataset(root, check_voxels=check_voxels)
    msg = str(exc.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


def _rewrite(path, data, affine=None, dtype=None):
    img = nib.load(str(path))
    save_nifti(path, data, img.affine if affine is None else affine, dtype)


# -------------------------------------------------------------------------------------------- reading


def test_read_dataset_lists_cases(tiny):
    index = read_dataset(tiny)
    assert index.case_ids == ["SAH_000", "SAH_001", "SAH_002"]
    assert index.num_channels == 1 and index.file_ending == ".nii.gz"
    assert index.label_values == {0, 1}
    rec = index.case("SAH_001")
    assert rec.images == (tiny / "imagesTr" / "SAH_001_0000.nii.gz",)
    assert rec.label == tiny / "labelsTr" / "SAH_001.nii.gz"
    assert rec.as_dict() == {"case_id": "SAH_001", "image": [str(rec.images[0])], "label": str(rec.label)}
    assert index.meta["medlora"]["domain"] == "sah"


def test_validate_accepts_generated_dataset(tiny):
    assert validate_dataset(tiny).case_ids == ["SAH_000", "SAH_001", "SAH_002"]


def test_hidden_temporaries_are_ignored(copy):
    (copy / "imagesTr" / ".SAH_003_0000.nii.gz.123.tmp").write_bytes(b"partial")
    (copy / "imagesTr" / ".SAH_004_0000.nii.gz").write_bytes(b"partial")
    assert validate_dataset(copy).case_ids == ["SAH_000", "SAH_001", "SAH_002"]


def test_explicit_dataset_listing_in_json(copy):
    meta = json.loads((copy / "dataset.json").read_text(encoding="utf-8"))
    shutil.move(copy / "imagesTr", copy / "scans")
    meta["dataset"] = {
        c: {"images": [f"scans/{c}_0000.nii.gz"], "label": f"labelsTr/{c}.nii.gz"}
        for c in ("SAH_000", "SAH_002")
    }
    meta["numTraining"] = 2
    (copy / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every file inside the dataset folder: no warning
        index = validate_dataset(copy)
    assert index.case_ids == ["SAH_000", "SAH_002"]
    assert index.cases[0].images == (copy / "scans" / "SAH_000_0000.nii.gz",)


def test_listing_outside_the_dataset_folder_warns_once(copy, tmp_path, monkeypatch):
    """nnU-Net v2 uses absolute, ``../`` and ``$VAR`` paths; we use them too, but say so (one warning)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(copy / "imagesTr" / "SAH_001_0000.nii.gz", elsewhere / "SAH_001_0000.nii.gz")
    shutil.move(copy / "labelsTr" / "SAH_002.nii.gz", elsewhere / "SAH_002.nii.gz")
    monkeypatch.setenv("MEDLORA_TEST_ELSEWHERE", str(elsewhere))
    meta = json.loads((copy / "dataset.json").read_text(encoding="utf-8"))
    meta["dataset"] = {
        "SAH_000": {"images": ["imagesTr/SAH_000_0000.nii.gz"], "label": "labelsTr/SAH_000.nii.gz"},
        "SAH_001": {"images": ["../elsewhere/SAH_001_0000.nii.gz"], "label": "labelsTr/SAH_001.nii.gz"},
        "SAH_002": {"images": ["imagesTr/SAH_002_0000.nii.gz"], "label": "$MEDLORA_TEST_ELSEWHERE/SAH_002.nii.gz"},
    }
    (copy / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.warns(UserWarning) as record:
        index = validate_dataset(copy)
    (warning,) = [str(w.message) for w in record if "outside" in str(w.message)]
    assert "\n" not in warning and warning.startswith(str(copy / "dataset.json"))
    assert "2 file(s)" in warning and "case SAH_001" in warning and str(elsewhere / "SAH_001_0000.nii.gz") in warning
    assert index.case("SAH_002").label == elsewhere / "SAH_002.nii.gz"


# ------------------------------------------------------------------------------------------ structure


def test_missing_dataset_json(copy):
    (copy / "dataset.json").unlink()
    _raises(copy, "dataset.json", "missing dataset.json")


def test_dataset_json_not_json(copy):
    (copy / "dataset.json").write_text("{not json", encoding="utf-8")
    _raises(copy, "dataset.json", "not valid JSON")


def test_dataset_json_missing_key(copy):
    meta = json.loads((copy / "dataset.json").read_text(encoding="utf-8"))
    del meta["labels"]
    (copy / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    _raises(copy, "dataset.json", "'labels'")


def test_missing_images_folder(copy):
    shutil.rmtree(copy / "imagesTr")
    _raises(copy, "imagesTr", "missing imagesTr folder")


def test_missing_label_file(copy):
    (copy / "labelsTr" / "SAH_001.nii.gz").unlink()
    _raises(copy, "SAH_001.nii.gz", "missing label file", "case SAH_001", check_voxels=False)


def test_image_removed_leaves_orphan_label(copy):
    (copy / "imagesTr" / "SAH_002_0000.nii.gz").unlink()
    _raises(copy, os.path.join("labelsTr", "SAH_002.nii.gz"), "has no image", check_voxels=False)


def test_image_in_a_subfolder_of_images_tr_is_named(copy):
    (copy / "imagesTr" / "batch2").mkdir()
    shutil.move(copy / "imagesTr" / "SAH_001_0000.nii.gz", copy / "imagesTr" / "batch2" / "SAH_001_0000.nii.gz")
    msg = _raises(copy, os.path.join("imagesTr", "batch2", "SAH_001_0000.nii.gz"), "case SAH_001",
                  "in a subfolder", check_voxels=False)
    assert "has no image" not in msg


def test_folder_named_like_an_image_is_named(copy):
    path = copy / "imagesTr" / "SAH_001_0000.nii.gz"
    path.unlink()
    path.mkdir()
    msg = _raises(copy, os.path.join("imagesTr", "SAH_001_0000.nii.gz"), "a folder, not a .nii.gz file",
                  check_voxels=False)
    assert "has no image" not in msg


def test_missing_channel_file(copy):
    meta = json.loads((copy / "dataset.json").read_text(encoding="utf-8"))
    meta["channel_names"] = {"0": "CT", "1": "CT_bone"}
    (copy / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    _raises(copy, "SAH_000_0001.nii.gz", "missing image file", "case SAH_000", check_voxels=False)


def test_bad_image_name(copy):
    shutil.copy(copy / "imagesTr" / "SAH_000_0000.nii.gz", copy / "imagesTr" / "SAH_009.nii.gz")
    _raises(copy, "SAH_009.nii.gz", "CASE_XXXX", check_voxels=False)


def test_num_training_mismatch(copy):
    meta = json.loads((copy / "dataset.json").read_text(encoding="utf-8"))
    meta["numTraining"] = 5
    (copy / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    _raises(copy, "dataset.json", "numTraining is 5", "3 case(s)", check_voxels=False)


# ------------------------------------------------------------------------------------------- voxels


def test_shape_mismatch(copy):
    path = copy / "labelsTr" / "SAH_001.nii.gz"
    _rewrite(path, np.asarray(nib.load(str(path)).dataobj)[:, :, :15])
    _raises(copy, "SAH_001.nii.gz", "case SAH_001", "shape (48, 48, 15)", "(48, 48, 16)")


def test_affine_mismatch(copy):
    path = copy / "labelsTr" / "SAH_002.nii.gz"
    img = nib.load(str(path))
    shifted = img.affine.copy()
    shifted[0, 3] += 2.0
    _rewrite(path, np.asarray(img.dataobj), affine=shifted)
    _raises(copy, os.path.join("labelsTr", "SAH_002.nii.gz"), "case SAH_002", "affine differs",
            "by up to 2 mm")


def test_affine_within_tolerance_is_accepted(copy):
    path = copy / "labelsTr" / "SAH_002.nii.gz"
    img = nib.load(str(path))
    nudged = img.affine.copy()
    nudged[0, 3] += 2e-4
    _rewrite(path, np.asarray(img.dataobj), affine=nudged)
    validate_dataset(copy)


def test_undeclared_label_value(copy):
    path = copy / "labelsTr" / "SAH_000.nii.gz"
    lab = np.asarray(nib.load(str(path)).dataobj).copy()
    lab[10, 10, 5] = 3
    _rewrite(path, lab)
    _raises(copy, os.path.join("labelsTr", "SAH_000.nii.gz"), "case SAH_000", "label value(s) [3]", "[0, 1]")


def test_nan_voxel_in_float_image(copy):
    path = copy / "imagesTr" / "SAH_001_0000.nii.gz"
    img = np.asarray(nib.load(str(path)).dataobj).astype(np.float32)
    img[3, 4, 5] = np.nan
    _rewrite(path, img)
    _raises(copy, os.path.join("imagesTr", "SAH_001_0000.nii.gz"), "case SAH_001", "non-finite", "1 NaN",
            "(3, 4, 5)")


@pytest.mark.parametrize("transform, problem", [
    (lambda hu: np.clip((hu + 1000.0) / 2000.0, 0.0, 1.0), "normalised or windowed"),
    (lambda hu: hu + 2000.0, "no voxel below 500 HU"),
], ids=["normalised", "shifted"])
def test_training_images_must_be_ct_in_hu(copy, transform, problem):
    """The plausibility test of ``medlora infer`` applies to the CT channel of training data too."""
    path = copy / "imagesTr" / "SAH_001_0000.nii.gz"
    hu = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    _rewrite(path, transform(hu), dtype=np.float32)
    _raises(copy, os.path.join("imagesTr", "SAH_001_0000.nii.gz"), "case SAH_001", problem)
    read_dataset(copy)  # structure only: no voxels read
    meta = json.loads((copy / "dataset.json").read_text(encoding="utf-8"))
    meta["channel_names"] = {"0": "MRI"}  # not CT: not in Hounsfield units, nothing to check
    (copy / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    validate_dataset(copy)


def test_two_dimensional_image(copy):
    path = copy / "imagesTr" / "SAH_000_0000.nii.gz"
    _rewrite(path, np.asarray(nib.load(str(path)).dataobj)[:, :, 8])
    _raises(copy, os.path.join("imagesTr", "SAH_000_0000.nii.gz"), "expected a 3D volume", "2D")


def test_trailing_singleton_axis_is_accepted(copy):
    path = copy / "imagesTr" / "SAH_000_0000.nii.gz"
    _rewrite(path, np.asarray(nib.load(str(path)).dataobj)[..., None])
    validate_dataset(copy)


def test_truncated_gzip(copy):
    path = copy / "imagesTr" / "SAH_002_0000.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _raises(copy, os.path.join("imagesTr", "SAH_002_0000.nii.gz"), "case SAH_002",
            "unreadable or truncated NIfTI")
    with pytest.raises(DatasetError, match="truncated"):
        load_nifti(path)


def test_not_a_nifti(copy):
    (copy / "labelsTr" / "SAH_000.nii.gz").write_bytes(b"hello, not an image")
    _raises(copy, os.path.join("labelsTr", "SAH_000.nii.gz"), "unreadable or truncated NIfTI")


def test_save_nifti_is_byte_deterministic(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    a = save_nifti(tmp_path / "a.nii.gz", data, np.diag([2.0, 2.0, 5.0, 1.0]))
    b = save_nifti(tmp_path / "b.nii.gz", data, np.diag([2.0, 2.0, 5.0, 1.0]))
    assert a.read_bytes() == b.read_bytes()
    back, aff = load_nifti(a)
    assert back.dtype == np.int16 and np.array_equal(back, data) and np.allclose(np.diag(aff), [2, 2, 5, 1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nii.gz"]


# ------------------------------------------------------------------------------------------- splits

# nnU-Net's default split (sklearn KFold(5, shuffle=True, random_state=12345) over sorted ids), computed
# with scikit-learn 1.9.1 and nnunetv2's generate_crossval_split logic.
EXPECTED_10 = [
    {"train": ["case_01", "case_02", "case_03", "case_04", "case_05", "case_06", "case_08", "case_09"],
     "val": ["case_00", "case_07"]},
    {"train": ["case_00", "case_01", "case_02", "case_04", "case_05", "case_06", "case_07", "case_08"],
     "val": ["case_03", "case_09"]},
    {"train": ["case_00", "case_01", "case_02", "case_03", "case_05", "case_07", "case_08", "case_09"],
     "val": ["case_04", "case_06"]},
    {"train": ["case_00", "case_02", "case_03", "case_04", "case_05", "case_06", "case_07", "case_09"],
     "val": ["case_01", "case_08"]},
    {"train": ["case_00", "case_01", "case_03", "case_04", "case_06", "case_07", "case_08", "case_09"],
     "val": ["case_02", "case_05"]},
]
EXPECTED_7_K3 = [
    {"train": ["SAH_000", "SAH_001", "SAH_002", "SAH_005"], "val": ["SAH_003", "SAH_004", "SAH_006"]},
    {"train": ["SAH_002", "SAH_003", "SAH_004", "SAH_005", "SAH_006"], "val": ["SAH_000", "SAH_001"]},
    {"train": ["SAH_000", "SAH_001", "SAH_003", "SAH_004", "SAH_006"], "val": ["SAH_002", "SAH_005"]},
]


def test_make_splits_matches_nnunet_default():
    ids = [f"case_{i:02d}" for i in range(10)]
    assert make_splits(ids) == EXPECTED_10
    assert make_splits(reversed(ids)) == EXPECTED_10  # ids are sorted first, as nnU-Net does
    assert make_splits([f"SAH_{i:03d}" for i in range(7)], k=3) == EXPECTED_7_K3


def test_make_splits_partitions_cases():
    ids = [f"c{i}" for i in range(23)]
    splits = make_splits(ids, k=5)
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == sorted(ids)
    assert [len(s["val"]) for s in splits] == [5, 5, 5, 4, 4]
    for s in splits:
        assert sorted(s["train"] + s["val"]) == sorted(ids) and s["train"] == sorted(s["train"])


def test_make_splits_matches_sklearn():
    model_selection = pytest.importorskip("sklearn.model_selection")
    for n in (5, 6, 11, 30, 124):
        for k in (2, 3, 5):
            ids = [f"P{i:04d}" for i in range(n)]
            keys = np.array(sorted(ids))
            expected = [
                {"train": [str(x) for x in keys[tr]], "val": [str(x) for x in keys[te]]}
                for tr, te in model_selection.KFold(n_splits=k, shuffle=True, random_state=12345).split(keys)
            ]
            assert make_splits(ids, k=k) == expected, (n, k)


def test_make_splits_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cannot make 5 folds from 3"):
        make_splits(["a", "b", "c"])
    with pytest.raises(ValueError, match="k must be"):
        make_splits(["a", "b", "c"], k=1)
    with pytest.raises(ValueError, match="unique"):
        make_splits(["a", "a", "b"], k=2)


def test_splits_roundtrip_and_ensure(copy):
    assert not (copy / "splits_final.json").exists()
    splits = ensure_splits(copy, k=3)
    assert splits == make_splits(["SAH_000", "SAH_001", "SAH_002"], k=3)
    assert load_splits(copy) == splits
    assert json.loads((copy / "splits_final.json").read_text(encoding="utf-8")) == splits
    custom = [{"train": ["SAH_000", "SAH_001"], "val": ["SAH_002"]}]
    write_splits(copy, custom)
    assert ensure_splits(copy, k=3) == custom  # a user-provided file wins


def test_bad_splits_files(copy, tmp_path):
    path = tmp_path / "splits_final.json"
    with pytest.raises(DatasetError, match="splits file not found"):
        load_splits(path)
    path.write_text(json.dumps([{"train": ["a"]}]), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"split 0 must be"):
        load_splits(path)
    path.write_text(json.dumps([{"train": ["a", "b"], "val": ["b"]}]), encoding="utf-8")
    with pytest.raises(DatasetError, match="case b in both train and val"):
        load_splits(path)
    with pytest.raises(DatasetError, match="names case SAH_999"):
        check_splits([{"train": ["SAH_000"], "val": ["SAH_999"]}], ["SAH_000", "SAH_001"])
    write_splits(copy, [{"train": ["SAH_000"], "val": ["SAH_999"]}])
    with pytest.raises(DatasetError, match="SAH_999 which is not in the dataset"):
        ensure_splits(copy)
