"""Multi-class phantoms (the ``ich`` domain: labels by hemorrhage type) and the binary view of their labels."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medlora.cli import main
from medlora.data.dataset import DatasetError, foreground_values, read_dataset, validate_dataset
from medlora.data.phantoms import HEMORRHAGE_TYPES, TYPE_LABELS, generate_case, parse_types, write_dataset
from medlora.data.transforms import compose, preprocessing

SHAPE = (48, 48, 16)
SPACING = (4.0, 4.0, 10.0)
VOX_ML = 4.0 * 4.0 * 10.0 / 1000.0
MIX = ["sah", "ivh", "iph", "sdh", "edh", "sah+ivh", "iph+sdh"]


def _case(index, seed=0, types=MIX, **kw):
    return generate_case("ich", seed, index, SHAPE, SPACING, types=types, **kw)


def test_parse_types_groups_aliases_and_errors():
    assert parse_types(["ivh+SAH", "contusion", ("subdural", "sdh")]) == (
        ("intraventricular", "subarachnoid"), ("intraparenchymal",), ("subdural",))
    assert parse_types(None) == tuple((t,) for t in HEMORRHAGE_TYPES)
    with pytest.raises(ValueError, match="unknown hemorrhage type 'blood'"):
        parse_types(["sah+blood"])
    with pytest.raises(ValueError, match="only the multi-class 'ich' domain"):
        generate_case("sah", 0, 0, SHAPE, SPACING, types=["sah"])


@pytest.mark.parametrize("index", range(7))
def test_labels_are_the_case_types_with_their_volumes(index):
    image, label, _, info = _case(index)
    want = parse_types(MIX)[index % len(MIX)]
    assert info["lesions"] == list(want)
    values = set(np.unique(label).tolist()) - {0}
    assert values == {TYPE_LABELS[t] for t in want}
    for t in want:  # per-class volume: counted here from the label map, and close to the type's own target
        n = int(np.count_nonzero(label == TYPE_LABELS[t]))
        assert info["class_voxels"][t] == n and info["class_ml"][t] == pytest.approx(n * VOX_ML)
        target = info["types"][t]["target_ml"]
        assert abs(n * VOX_ML - target) <= max(0.25 * target, 3 * VOX_ML), (t, n * VOX_ML, target)
    assert info["hemorrhage_voxels"] == int(np.count_nonzero(label))


def test_types_sit_where_their_anatomy_is():
    """Extra-axial blood lies against the skull, intraventricular blood deep inside the brain."""
    depth = {}
    for index, t in ((1, "intraventricular"), (3, "subdural"), (4, "epidural")):
        image, label, _, _ = _case(index)
        head = image > -300  # scalp and everything inside it
        dist = ndimage.distance_transform_edt(head, sampling=SPACING)
        depth[t] = float(dist[label == TYPE_LABELS[t]].mean())
    assert depth["intraventricular"] > 1.8 * max(depth["subdural"], depth["epidural"])


def test_binary_view_is_the_blood_fraction_rule():
    """label > 0 is exactly where the painted blood fraction (all types together) is at least one half."""
    for index in (5, 6):
        _, label, _, info = _case(index, tissue_maps=True)
        assert np.array_equal(label > 0, info["tissue"]["blood"] >= 0.5)
        assert len(set(np.unique(label).tolist()) - {0}) == 2


def test_multiclass_generation_is_deterministic_and_independent_of_cohort_size(tmp_path):
    a, b = _case(5, seed=4), _case(5, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], _case(5, seed=5)[1])
    small = write_dataset(tmp_path / "a", "ich", 2, seed=3, shape=SHAPE, spacing=SPACING, types=MIX)
    large = write_dataset(tmp_path / "b", "ich", 3, seed=3, shape=SHAPE, spacing=SPACING, types=MIX)
    for cid in ("ICH_000", "ICH_001"):
        x = nib.load(small / "labelsTr" / f"{cid}.nii.gz").get_fdata()
        y = nib.load(large / "labelsTr" / f"{cid}.nii.gz").get_fdata()
        assert np.array_equal(x, y)


# Hashes of image + label bytes taken with the generator before multi-class labels existed: the binary domains must
# keep giving the same voxels for the same seed.
_BINARY_HASHES = {("tbi", 1): "9481a5f778279eac", ("tbi", 2): "7243d4f4a466adf8", ("tbi", 6): "8cf8ce55d70879df",
                  ("sah", 3): "06acda88424c10b0", ("sah", 7): "0e1eb5c1663de8ec"}


@pytest.mark.parametrize("domain,index", sorted(_BINARY_HASHES))
def test_binary_domains_are_unchanged(domain, index):
    image, label, _, _ = generate_case(domain, 3, index, SHAPE, SPACING)
    assert hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest()[:16] == _BINARY_HASHES[domain, index]


def test_dataset_json_and_the_foreground_view(tmp_path):
    root = write_dataset(tmp_path / "ich", "ich", 7, seed=1, shape=SHAPE, spacing=SPACING, types=MIX)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "epidural": 1, "intraparenchymal": 2, "intraventricular": 3,
                              "subarachnoid": 4, "subdural": 5}
    assert meta["medlora"]["types"][5] == ["intraventricular", "subarachnoid"]
    assert set(meta["medlora"]["cases"]["ICH_005"]["class_ml"]) == {"intraventricular", "subarachnoid"}
    index = validate_dataset(root)
    assert foreground_values(index) == [1, 2, 3, 4, 5]
    assert foreground_values(index, ["subarachnoid", 3]) == [3, 4]
    with pytest.raises(DatasetError, match="dataset.json: foreground class 'sah' is not one of its labels"):
        foreground_values(index, ["sah"])
    case = index.case("ICH_005")
    raw = np.asarray(nib.load(case.label).dataobj)
    for fg, want in ((None, raw > 0), (["subarachnoid"], raw == 4), (["intraventricular"], raw == 3)):
        pipe = compose(preprocessing(foreground=foreground_values(index, fg)))
        out = pipe({"image": str(case.images[0]), "label": str(case.label)})["label"]
        assert torch.equal(torch.as_tensor(out)[0], torch.as_tensor(want.astype(np.float32)))  # RAS already
    binary = write_dataset(tmp_path / "sah", "sah", 1, seed=1, shape=SHAPE, spacing=SPACING)
    assert foreground_values(read_dataset(binary)) is None  # a binary dataset's pipeline is unchanged


def test_cli_writes_ich_and_refuses_types_elsewhere(tmp_path, capsys):
    out = tmp_path / "ich"
    assert main(["data", "phantoms", "--out", str(out), "--domain", "ich", "--cases", "2", "--types", "sah+ivh",
                 "edh"]) == 0
    assert json.loads((out / "dataset.json").read_text())["medlora"]["types"] == [
        ["intraventricular", "subarachnoid"], ["epidural"]]
    assert main(["data", "phantoms", "--out", str(tmp_path / "x"), "--domain", "sah", "--types", "ivh"]) == 2
    assert "--types: only --domain ich" in capsys.readouterr().err
    assert main(["data", "phantoms", "--out", str(tmp_path / "y"), "--domain", "ich", "--types", "blood"]) == 2
    assert not (tmp_path / "y" / "dataset.json").exists()
