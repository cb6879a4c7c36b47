"""``medlora infer``: geometry round trips, agreement with a direct MONAI computation, ensembles, DICOM,
crossval run folders, bad inputs, the no-overwrite rule and the volume table.

Tiny networks (MV-UNet level 1, width 4) on 24 x 20 x 12 phantoms keep the file well under a minute.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medlora.adapters import AdapterConfig, inject, save_adapter
from medlora.cli import main
from medlora.data.dataset import save_nifti
from medlora.data.transforms import compose, preprocessing
from medlora.inference import InputError, check_ct, find_inputs, load_models, run_inference
from medlora.inference.io import dicom_affine
from medlora.models import create_model
from medlora.training.module import predict_volume

SHAPE = (24, 20, 12)
ARCH = {"level": 1, "width": 4}
ROI3, ROI2 = [16, 16, 8], [16, 16]
NATIVE = {"hu_window": [0.0, 140.0], "target_spacing": None, "roi_size": ROI3, "threshold": 0.5}
RAS_AFFINE = np.array([[0.9, 0, 0, -10.0], [0, 0.8, 0, -8.0], [0, 0, 3.0, -15.0], [0, 0, 0, 1]])

pytestmark = pytest.mark.usefixtures("one_thread")


def phantom(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Air, a skull ring, brain and an off-centre bleed (asymmetric, so a wrong flip shows)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(x**2 + y**2 + (0.8 * z) ** 2)
    vol = np.full(shape, -1000.0)
    vol[r < 0.95] = 900.0
    vol[r < 0.8] = 35.0
    vol[((x - 0.35) ** 2 + (y + 0.25) ** 2 + (z - 0.2) ** 2) < 0.12] = 75.0
    return (vol + rng.normal(0.0, 8.0, shape)).astype(np.float32)


def adapter_meta(dims: int = 3, prep: dict | None = None) -> dict:
    return {"backbone": "mv_unet", "backbone_args": dict(ARCH), "spatial_dims": dims, "pretrained": None,
            "preprocessing": prep or {**NATIVE, "roi_size": ROI3 if dims == 3 else ROI2}}


def random_base(dims: int, seed: int) -> torch.nn.Module:
    """A random network whose output threshold splits the phantom (about a third positive)."""
    torch.manual_seed(seed)
    model = create_model("mv_unet", spatial_dims=dims, **ARCH).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        x = torch.as_tensor(np.clip(phantom() / 140.0, 0, 1))[None, None]
        logits = predict_volume(lambda t: model(t), x, dims, ROI3 if dims == 3 else ROI2)
        logits = torch.logit(logits.clamp(1e-6, 1 - 1e-6))
        model.M3.TripleOut[6].bias -= torch.quantile(logits.flatten(), 0.65)
    return model


def with_adapter(base: torch.nn.Module, method: str, seed: int, path: Path, meta: dict) -> Path:
    model = create_model("mv_unet", spatial_dims=meta["spatial_dims"], **ARCH)
    model.load_state_dict(base.state_dict())
    with pytest.warns(UserWarning):  # the 1x1 head is smaller than a rank-2 adapter: inject says so
        inject(model, AdapterConfig(method, rank=2, target_types=["Conv2d", "Conv3d"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return save_adapter(model, path, extra_metadata=meta)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out: dict[str, Path] = {}
    base = random_base(3, 0)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(root / "base.safetensors"))
    out["base"] = root / "base.safetensors"
    out["a1"] = with_adapter(base, "cp_dora", 1, root / "a1.safetensors", adapter_meta())
    out["a2"] = with_adapter(base, "lora", 2, root / "a2.safetensors", adapter_meta())
    resample = {**NATIVE, "target_spacing": [1.2, 1.2, 2.0]}
    out["a_resample"] = with_adapter(base, "lora", 3, root / "a_resample.safetensors", adapter_meta(prep=resample))
    other = random_base(3, 7)
    out["wrong"] = with_adapter(other, "lora", 4, root / "wrong.safetensors", adapter_meta())
    base2 = random_base(2, 5)
    save_file({k: v.contiguous() for k, v in base2.state_dict().items()}, str(root / "base2d.safetensors"))
    out["base2d"] = root / "base2d.safetensors"
    out["a2d"] = with_adapter(base2, "dora", 6, root / "a2d.safetensors", adapter_meta(dims=2))
    save_nifti(root / "ras.nii.gz", phantom(), RAS_AFFINE)
    out["ras"] = root / "ras.nii.gz"
    return out


def labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def reference_probability(model_files: list[Path], base: Path, image: Path, dims: int = 3,
                          target_spacing: list[float] | None = None) -> np.ndarray:
    """Training's own pipeline from the file (LoadImaged ...), predict_volume, MONAI Invertd back."""
    from monai.transforms import Invertd

    loaded = load_models(base, model_files)
    pre = compose(preprocessing(keys=("image",), target_spacing=target_spacing))
    d = pre({"image": str(image)})
    roi = ROI3 if dims == 3 else ROI2
    with torch.no_grad():
        probs = [predict_volume(m, d["image"][None], dims, roi, 2, 0.25)[0] for m in loaded.models]
    prob = torch.stack(probs).mean(0)
    from monai.data import MetaTensor

    d["pred"] = MetaTensor(prob, meta=dict(d["image"].meta), applied_operations=list(d["image"].applied_operations))
    d = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(d)
    return np.asarray(d["pred"][0])


def infer(files: dict[str, Path], inputs: list[Path], out: Path, adapters: tuple[str, ...] = ("a1",),
          **kw) -> object:
    base = kw.pop("base", files["base"])
    return run_inference(base, inputs, out, adapters=[files[a] for a in adapters], progress=False, **kw)


# ------------------------------------------------------------------------------------------ geometry


def test_ras_input_equals_direct_computation(files, tmp_path):
    summary = infer(files, [files["ras"]], tmp_path, save_probabilities=True, overlay=True)
    assert summary.exit_code == 0 and len(summary.done) == 1
    src, out = nib.load(str(files["ras"])), nib.load(str(tmp_path / "ras.nii.gz"))
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    assert out.get_data_dtype() == np.uint8
    ref = reference_probability([files["a1"]], files["base"], files["ras"])
    prob = np.asarray(nib.load(str(tmp_path / "ras_prob.nii.gz")).dataobj)
    assert prob.dtype == np.float32 and np.allclose(prob, ref, atol=1e-6)
    lab = labels(tmp_path / "ras.nii.gz")
    assert np.array_equal(lab, (ref >= 0.5).astype(np.uint8))
    assert 0.05 < lab.mean() < 0.95  # a non-trivial split: flips below would show
    assert (tmp_path / "ras_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("resample", [False, True], ids=["native", "target_spacing"])
def test_lps_copy_gives_the_flipped_ras_output(files, tmp_path, resample):
    adapter = "a_resample" if resample else "a1"
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = SHAPE[0] - 1, SHAPE[1] - 1  # index i -> (n-1) - i: same world positions
    save_nifti(tmp_path / "lps.nii.gz", phantom()[::-1, ::-1, :], RAS_AFFINE @ flip)
    assert nib.aff2axcodes(nib.load(str(tmp_path / "lps.nii.gz")).affine) == ("L", "P", "S")
    infer(files, [files["ras"], tmp_path / "lps.nii.gz"], tmp_path / "out", adapters=(adapter,))
    ras, lps = labels(tmp_path / "out" / "ras.nii.gz"), labels(tmp_path / "out" / "lps.nii.gz")
    assert np.array_equal(lps, ras[::-1, ::-1, :])
    assert np.array_equal(nib.load(str(tmp_path / "out" / "lps.nii.gz")).affine,
                          nib.load(str(tmp_path / "lps.nii.gz")).affine)


def oblique_affine() -> np.ndarray:
    a, b = 0.3, 0.15
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1, 1, 1]) @ rz @ rx @ np.diag([0.7, 0.9, 4.0])
    aff[:3, 3] = [12.0, -20.0, 7.5]
    return aff


GEOMETRIES = {
    "oblique": (lambda v: v, oblique_affine()),
    "anisotropic_PIR": (lambda v: v.transpose(1, 2, 0)[::-1, ::-1, :],  # axes: P, I, R
                        np.array([[0, 0, 0.45, -5], [-1.1, 0, 0, 9], [0, -5.0, 0, 30], [0, 0, 0, 1.0]])),
}


@pytest.mark.parametrize("resample", [False, True], ids=["native", "target_spacing"])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_output_geometry_equals_input(files, tmp_path, geometry, resample):
    make, affine = GEOMETRIES[geometry]
    data = np.ascontiguousarray(make(phantom()))
    save_nifti(tmp_path / "case.nii.gz", data, affine)
    adapter = "a_resample" if resample else "a1"
    infer(files, [tmp_path / "case.nii.gz"], tmp_path / "out", adapters=(adapter,), save_probabilities=True,
          overlay=True)
    assert (tmp_path / "out" / "case_overlay.png").stat().st_size > 0
    src, out = nib.load(str(tmp_path / "case.nii.gz")), nib.load(str(tmp_path / "out" / "case.nii.gz"))
    assert out.shape == src.shape == data.shape
    assert np.array_equal(out.affine, src.affine)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)
    assert np.array_equal(out.header.get_zooms(), src.header.get_zooms())
    ref = reference_probability([files[adapter]], files["base"], tmp_path / "case.nii.gz",
                                target_spacing=[1.2, 1.2, 2.0] if resample else None)
    prob = np.asarray(nib.load(str(tmp_path / "out" / "case_prob.nii.gz")).dataobj)
    assert np.allclose(prob, ref, atol=1e-5)


def test_2d_slice_model_on_a_volume(files, tmp_path):
    infer(files, [files["ras"]], tmp_path, adapters=("a2d",), base=files["base2d"], save_probabilities=True)
    out = nib.load(str(tmp_path / "ras.nii.gz"))
    assert out.shape == SHAPE
    ref = reference_probability([files["a2d"]], files["base2d"], files["ras"], dims=2)
    assert np.allclose(np.asarray(nib.load(str(tmp_path / "ras_prob.nii.gz")).dataobj), ref, atol=1e-6)


def test_lightning_checkpoint_of_a_full_model(tmp_path):
    import lightning.pytorch as pl

    from medlora.assembly import ModelSpec, build_model
    from medlora.training import SegmentationModule, run_callbacks

    spec = ModelSpec("mv_unet", dict(ARCH))
    module = SegmentationModule(build_model(spec), spec, roi_size=ROI3, threshold=0.4)
    batch = {"image": torch.rand(1, 1, 16, 16, 8), "label": (torch.rand(1, 1, 16, 16, 8) > 0.7).float()}
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         callbacks=run_callbacks())
    trainer.fit(module, torch.utils.data.DataLoader([{k: v[0] for k, v in batch.items()}], batch_size=1))
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    save_nifti(tmp_path / "img.nii.gz", phantom(), RAS_AFFINE)
    summary = run_inference(tmp_path / "full.ckpt", [tmp_path / "img.nii.gz"], tmp_path / "out", progress=False,
                            save_probabilities=True)
    assert summary.exit_code == 0
    module.eval()
    x = compose(preprocessing(keys=("image",)))({"image": str(tmp_path / "img.nii.gz")})["image"][None]
    with torch.no_grad():
        ref = predict_volume(module.model, x, 3, ROI3)[0, 0].numpy()
    prob = np.asarray(nib.load(str(tmp_path / "out" / "img_prob.nii.gz")).dataobj)
    assert np.allclose(prob, ref, atol=1e-6)
    assert np.array_equal(labels(tmp_path / "out" / "img.nii.gz"), (ref >= 0.4).astype(np.uint8))  # recorded


def test_adapter_run_checkpoint_is_refused_with_advice(files, tmp_path, capsys):
    import lightning.pytorch as pl

    from medlora.assembly import ModelSpec, build_model
    from medlora.training import SegmentationModule, run_callbacks

    spec = ModelSpec(backbone_args=dict(ARCH), pretrained=str(files["base"]),
                     adapter=AdapterConfig("lora", rank=2, target_types=["Conv3d"]))
    with pytest.warns(UserWarning):
        module = SegmentationModule(build_model(spec), spec, roi_size=ROI3)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         callbacks=run_callbacks(adapter_path=tmp_path / "adapter.safetensors"))
    sample = {"image": torch.rand(1, 16, 16, 8), "label": (torch.rand(1, 16, 16, 8) > 0.7).float()}
    trainer.fit(module, torch.utils.data.DataLoader([sample], batch_size=1))
    trainer.save_checkpoint(tmp_path / "adapter_run.ckpt")
    capsys.readouterr()
    assert main(["infer", "--model", str(tmp_path / "adapter_run.ckpt"), "--out", str(tmp_path / "out"),
                 str(files["ras"])]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "checkpoint of an adapter run" in line and "--adapter" in line
    # what the message advises works: its base plus the adapter file written at the end of fit
    assert main(["infer", "--model", str(files["base"]), "--adapter", str(tmp_path / "adapter.safetensors"),
                 "--out", str(tmp_path / "out"), str(files["ras"])]) == 0


# -------------------------------------------------------------------------------------------- DICOM


def write_dicom_series(image, folder: Path, shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
    """One file per slice with the geometry tags SimpleITK's DicomSeriesFromArray example sets; slice k's
    ImagePositionPatient moves by ``k * shift_mm`` (a sheared stack, as a tilted gantry writes)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    common = [("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
              ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.2"), ("0008|0021", "20250101"),
              ("0020|0037", "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
              ("0028|1052", "0"), ("0028|1053", "1"), ("0018|0050", str(image.GetSpacing()[2]))]
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        for tag, value in common:
            sl.SetMetaData(tag, value)
        position = np.add(image.TransformIndexToPhysicalPoint((0, 0, k)), np.multiply(k, shift_mm))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.10f}" for v in position))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.2.{k + 1}")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_lands_on_the_dicom_geometry(files, tmp_path):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.round(phantom()).astype(np.int16).transpose(2, 1, 0))
    image.SetSpacing((0.9, 0.8, 3.0))
    image.SetOrigin((5.0, -7.0, 11.0))
    write_dicom_series(image, tmp_path / "patient" / "CT1")
    read = sitk.ReadImage(sorted(str(p) for p in (tmp_path / "patient" / "CT1").glob("*.dcm")))
    expected = dicom_affine(read.GetDirection(), read.GetSpacing(), read.GetOrigin())
    sitk.WriteImage(read, str(tmp_path / "itk.nii.gz"))  # ITK's own LPS -> RAS conversion, for comparison
    assert np.allclose(nib.load(str(tmp_path / "itk.nii.gz")).affine, expected, atol=1e-4)
    cases = find_inputs([tmp_path / "patient"])  # a folder of series folders
    assert [(c.case_id, c.kind) for c in cases] == [("CT1", "dicom")]
    infer(files, [tmp_path / "patient"], tmp_path / "out")
    out = nib.load(str(tmp_path / "out" / "CT1.nii.gz"))
    assert out.shape == tuple(read.GetSize()) and np.allclose(out.affine, expected, atol=1e-5)
    # what a DICOM input's outputs are (inference.io docstring): NIfTI-1, qform = sform = code 1, pixdim = spacing
    assert type(out) is nib.Nifti1Image and out.get_qform(coded=True)[1] == out.get_sform(coded=True)[1] == 1
    assert np.array_equal(out.affine, expected.astype(np.float32))
    assert np.array_equal(out.header.get_zooms(), np.float32(read.GetSpacing()))
    # the same voxels as a NIfTI file with that geometry give the same labels
    save_nifti(tmp_path / "same.nii.gz", sitk.GetArrayFromImage(read).transpose(2, 1, 0), expected)
    infer(files, [tmp_path / "same.nii.gz"], tmp_path / "out")
    assert np.array_equal(labels(tmp_path / "out" / "CT1.nii.gz"), labels(tmp_path / "out" / "same.nii.gz"))


# --------------------------------------------------------------------------------------- ensembles


def test_ensemble_is_the_mean_of_the_members(files, tmp_path):
    for name, adapters in (("one", ("a1",)), ("two", ("a2",)), ("both", ("a1", "a2"))):
        infer(files, [files["ras"]], tmp_path / name, adapters=adapters, save_probabilities=True)
    p = {n: np.asarray(nib.load(str(tmp_path / n / "ras_prob.nii.gz")).dataobj) for n in ("one", "two", "both")}
    assert not np.allclose(p["one"], p["two"])
    assert np.allclose(p["both"], (p["one"] + p["two"]) / 2, atol=1e-6)


def test_adapter_on_the_wrong_base_fails_before_any_output(files, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["infer", "--model", str(files["base"]), "--adapter", str(files["a1"]), "--adapter",
                 str(files["wrong"]), "--out", str(out), str(files["ras"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("medlora: error: ") and str(files["wrong"]) in err[0] and "base weights differ" in err[0]
    assert not out.exists()


def make_run_dir(files: dict[str, Path], root: Path, finished: int = 2) -> Path:
    """A crossval run folder as medlora crossval leaves it (study.json, pretrain/base, job folds)."""
    from medlora.training.study_config import DatasetSpec, MethodEntry, StudyConfig

    config = StudyConfig(target=DatasetSpec(data_dir=str(root / "data")), folds=2,
                         source=DatasetSpec(data_dir=str(root / "src")),
                         model={"backbone_args": dict(ARCH), "roi_size": ROI3}, data={"patch_size": [8, 8, 4]},
                         methods=[MethodEntry("no_finetune"), MethodEntry("cp_dora", ranks=[4])])
    (root / "pretrain").mkdir(parents=True)
    (root / "study.json").write_text(json.dumps(config.to_record()), encoding="utf-8")
    (root / "pretrain" / "base.safetensors").write_bytes(files["base"].read_bytes())
    for fold, adapter in enumerate(("a1", "a2")):
        for job in ("no_finetune", "cp_dora_r4"):
            folder = root / "jobs" / job / "seed_0" / "cases_all" / f"fold_{fold}"
            folder.mkdir(parents=True)
            if job == "cp_dora_r4":
                (folder / "adapter.safetensors").write_bytes(files[adapter].read_bytes())
            if fold < finished:
                (folder / "summary.json").write_text("{}", encoding="utf-8")
    return root


def test_crossval_run_folder_ensembles_the_fold_models(files, tmp_path, capsys):
    run = make_run_dir(files, tmp_path / "run")
    assert main(["infer", "--model", str(run), "--method", "cp_dora_r4", "--out", str(tmp_path / "cv"),
                 "--save-probabilities", str(files["ras"])]) == 0
    infer(files, [files["ras"]], tmp_path / "direct", adapters=("a1", "a2"), save_probabilities=True)
    a, b = (np.asarray(nib.load(str(tmp_path / d / "ras_prob.nii.gz")).dataobj) for d in ("cv", "direct"))
    assert np.array_equal(a, b)
    no_finetune = load_models(run, method="no_finetune")
    assert len(no_finetune.models) == 1 and no_finetune.preprocessing.roi_size == tuple(ROI3)  # model.roi_size
    capsys.readouterr()
    assert main(["infer", "--model", str(run), "--method", "lora_r8", "--out", str(tmp_path / "x"),
                 str(files["ras"])]) == 2
    assert "no job 'lora_r8'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    unfinished = make_run_dir(files, tmp_path / "run2", finished=1)
    assert main(["infer", "--model", str(unfinished), "--method", "cp_dora_r4", "--out", str(tmp_path / "y"),
                 str(files["ras"])]) == 2
    err = capsys.readouterr().err
    assert "fold_1" in err and "not finished" in err and not (tmp_path / "y").exists()
    assert "--config" in err  # the hint must be a command that runs


# --------------------------------------------------------------------------------------- bad inputs


def test_each_bad_input_gets_one_line_and_the_others_run(files, tmp_path, capsys):
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    save_nifti(folder / "good_0000.nii.gz", phantom(), RAS_AFFINE)
    raw = gzip.compress(nib.Nifti1Image(phantom(), RAS_AFFINE).to_bytes())
    (folder / "truncated_0000.nii.gz").write_bytes(raw[: len(raw) // 2])
    save_nifti(folder / "flat_0000.nii.gz", phantom()[:, :, 5], RAS_AFFINE)
    nan = phantom()
    nan[3, 4, 5] = np.nan
    save_nifti(folder / "nan_0000.nii.gz", nan, RAS_AFFINE)
    save_nifti(folder / "shifted_0000.nii.gz", phantom() + 2000.0, RAS_AFFINE)  # no voxel below 500 HU
    save_nifti(folder / "normalised_0000.nii.gz", np.clip(phantom() / 140.0, 0, 1), RAS_AFFINE)
    code = main(["infer", "--model", str(files["base"]), "--adapter", str(files["a1"]), "--out",
                 str(tmp_path / "out"), str(folder)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2
    expected = {"truncated": "truncated", "flat": "3D", "nan": "NaN", "shifted": "below 500 HU",
                "normalised": "normalised"}
    assert len(err) == len(expected)
    for name, problem in expected.items():
        (line,) = [ln for ln in err if f"{name}_0000.nii.gz" in ln]
        assert line.startswith("medlora: error: ") and problem in line
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["good.nii.gz"]  # nnU-Net id
    assert "1 case(s) done, 5 failed" in captured.out
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("values, problem", [
    (np.full(SHAPE, -1000.0), "no voxel above -500 HU"),
    (np.linspace(-1e6, 100, np.prod(SHAPE)).reshape(SHAPE), "outside [-32768, 32767]"),
    (np.inf, "Inf"),
])
def test_ct_plausibility_rules(values, problem):
    data = phantom() if np.isscalar(values) else np.asarray(values, dtype=np.float32)
    if np.isscalar(values):
        data[0, 0, 0] = values
    with pytest.raises(InputError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        check_ct(data, "x.nii.gz")
    check_ct(np.where(phantom() < -900, -3024.0, phantom()), "padded.nii.gz")  # scanner padding is fine


# ------------------------------------------------------------------------------- outputs and tables


def test_existing_outputs_are_not_overwritten_without_the_flag(files, tmp_path, capsys):
    args = ["infer", "--model", str(files["base"]), "--adapter", str(files["a1"]), "--out", str(tmp_path)]
    assert main([*args, str(files["ras"])]) == 0
    label = tmp_path / "ras.nii.gz"
    label.write_bytes(b"sentinel")
    capsys.readouterr()
    assert main([*args, str(files["ras"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; not overwritten (use --overwrite)" in err[0]
    assert label.read_bytes() == b"sentinel"
    assert main([*args, "--overwrite", str(files["ras"])]) == 0
    assert labels(label).shape == SHAPE


def test_volume_table_is_voxels_times_voxel_volume(files, tmp_path):
    affine = oblique_affine()
    save_nifti(tmp_path / "obl.nii.gz", phantom(), affine)
    infer(files, [files["ras"], tmp_path / "obl.nii.gz"], tmp_path / "out")
    with open(tmp_path / "out" / "volumes.csv", newline="") as fh:
        rows = {r["case_id"]: r for r in csv.DictReader(fh)}
    table = {r["case_id"]: r for r in json.loads((tmp_path / "out" / "volumes.json").read_text(encoding="utf-8"))}
    assert sorted(rows) == sorted(table) == ["obl", "ras"]
    for case, src in (("ras", files["ras"]), ("obl", tmp_path / "obl.nii.gz")):
        voxels = int(labels(tmp_path / "out" / f"{case}.nii.gz").sum())
        voxel_mm3 = abs(np.linalg.det(nib.load(str(src)).affine[:3, :3]))
        assert int(rows[case]["voxels"]) == table[case]["voxels"] == voxels > 0
        assert float(rows[case]["volume_ml"]) == pytest.approx(voxels * voxel_mm3 / 1000.0, rel=1e-9)
        assert rows[case]["input"] == str(src)
    assert np.prod([0.7, 0.9, 4.0]) == pytest.approx(float(rows["obl"]["voxel_volume_mm3"]), rel=1e-6)
    # a later run into the same folder keeps the other cases' rows
    infer(files, [files["ras"]], tmp_path / "out", overwrite=True)
    table = json.loads((tmp_path / "out" / "volumes.json").read_text(encoding="utf-8"))
    assert [r["case_id"] for r in table] == ["obl", "ras"]


# ------------------------------------------------------------------- issue 12: DICOM slice positions


def dicom_image(spacing_z: float = 3.0):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.round(phantom()).astype(np.int16).transpose(2, 1, 0))
    image.SetSpacing((0.9, 0.8, spacing_z))
    image.SetOrigin((5.0, -7.0, 11.0))
    return image


@pytest.mark.parametrize("defect", ["missing_slice", "gantry_tilt"])
def test_dicom_series_with_wrong_slice_positions_is_refused(files, tmp_path, capfd, defect):
    """SimpleITK spreads the slices evenly (a missing slice) or stacks them straight (a tilt): both refused."""
    write_dicom_series(dicom_image(), tmp_path / "in" / "good")
    bad = tmp_path / "in" / "bad"
    write_dicom_series(dicom_image(), bad, shift_mm=(0.0, 0.5, 0.0) if defect == "gantry_tilt" else (0, 0, 0))
    if defect == "missing_slice":
        (bad / "slice005.dcm").unlink()  # slices at 11, 14, ..., 26, 32, ... mm: one 6 mm step
    out = tmp_path / "out"
    out.mkdir()
    (out / "bad.nii.gz").write_bytes(b"sentinel")  # an earlier result: --overwrite must not replace it
    capfd.readouterr()
    code = main(["infer", "--model", str(files["base"]), "--adapter", str(files["a1"]), "--out", str(out),
                 "--overwrite", str(tmp_path / "in" / "good"), str(bad), str(files["ras"])])
    captured = capfd.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1, err  # ITK's own multi-line warning is not printed either
    assert err[0].startswith(f"medlora: error: {bad}")
    if defect == "missing_slice":
        assert "not evenly spaced" in err[0] and "slices 5 and 6 of 11 are 6 mm apart" in err[0]
        assert "3 mm x9, 6 mm x1" in err[0]
    else:
        assert "shifted within the slice plane by up to 5.5 mm" in err[0] and "dcm2niix" in err[0]
    assert (out / "bad.nii.gz").read_bytes() == b"sentinel"
    assert labels(out / "good.nii.gz").shape == SHAPE and labels(out / "ras.nii.gz").shape == SHAPE
    assert "2 case(s) done, 1 failed" in captured.out


def test_slice_position_tolerance():
    """An even grid within 1% of the spacing (decimal-string rounding) passes; 0.1 mm off at 5 mm does not."""
    from medlora.inference.io import check_slice_positions

    iop = np.array([1.0, 0, 0, 0, 1.0, 0])
    z = np.arange(20) * 5.0
    positions = np.stack([np.zeros(20), np.zeros(20), z], axis=1)
    assert check_slice_positions(positions, iop, "x") == 5.0
    jitter = positions + np.random.default_rng(0).uniform(-0.02, 0.02, positions.shape) * [0, 0, 1]
    assert check_slice_positions(jitter, iop, "x") == pytest.approx(5.0, abs=0.01)
    moved = positions.copy()
    moved[7, 2] += 0.1
    with pytest.raises(InputError, match=r"slices 7 and 8 of 20 are 5\.1 mm apart .*tolerance 0\.05 mm\)"):
        check_slice_positions(moved, iop, "x")
    with pytest.raises(InputError, match="5 mm x18, 0 mm x1"):  # a slice written twice
        check_slice_positions(np.concatenate([positions[:10], positions[9:-1]]), iop, "x")
    descending = positions[::-1]  # stacked head to feet: fine as long as it is even
    assert check_slice_positions(descending, iop, "x") == 5.0
    rotation = oblique_affine()[:3, :3] / np.linalg.norm(oblique_affine()[:3, :3], axis=0)
    oblique_iop = np.concatenate([rotation[:, 0], rotation[:, 1]])  # slices along the rotated normal
    normal = np.cross(rotation[:, 0], rotation[:, 1])
    assert check_slice_positions(np.outer(z, normal) + [3.0, -2.0, 1.0], oblique_iop, "x") == pytest.approx(5.0)
    with pytest.raises(InputError, match="shifted within the slice plane"):  # straight up is a shear here
        check_slice_positions(positions, oblique_iop, "x")


def test_dicom_folder_given_through_dotdot_gets_its_name(tmp_path):
    write_dicom_series(dicom_image(), tmp_path / "CT1")
    (tmp_path / "CT1" / "sub").mkdir()
    cases = find_inputs([tmp_path / "CT1" / "sub" / ".."])
    assert [(c.case_id, c.kind) for c in cases] == [("CT1", "dicom")]


# --------------------------------------------------------------- issue 12: non-finite probabilities


class NaNAboveWindow(torch.nn.Module):
    """1x1x1 conv logits, NaN where the windowed input exceeds 0.9: a stand-in for weights that overflow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0.9, torch.full_like(x, float("nan")), self.conv(x))


def test_non_finite_probabilities_fail_the_case(tmp_path, capsys):
    from medlora.inference.infer import Architecture, InferenceModels, Preprocessing

    models = InferenceModels([NaNAboveWindow().eval()], ["nan-model"], Architecture("mv_unet", {}, 3),
                             Preprocessing((-1000.0, 3000.0), None, tuple(ROI3), 0.5))
    metal = phantom()
    metal[10:13, 8:11, 5:7] = 2900.0  # windowed: 0.975 -> NaN
    save_nifti(tmp_path / "plain.nii.gz", phantom(), RAS_AFFINE)
    save_nifti(tmp_path / "metal.nii.gz", metal, RAS_AFFINE)
    summary = run_inference(models, [tmp_path / "metal.nii.gz", tmp_path / "plain.nii.gz"], tmp_path / "out",
                            save_probabilities=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert summary.exit_code == 2 and [c for c, _ in summary.failed] == ["metal"]
    assert [r["case_id"] for r in summary.done] == ["plain"]
    (line,) = err
    assert line.startswith(f"medlora: error: {tmp_path / 'metal.nii.gz'}: ") and "not finite" in line
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["plain.nii.gz", "plain_prob.nii.gz"]
    assert np.isfinite(np.asarray(nib.load(str(tmp_path / "out" / "plain_prob.nii.gz")).dataobj)).all()


# ------------------------------------------------------------------ issue 12: output header geometry


def header_case(kind: str, path: Path) -> None:
    """Inputs whose geometry a NIfTI-1 file with qform = sform = code 1 cannot reproduce (and LAS)."""
    data = phantom()
    if kind == "nifti2_float64":  # float64 sform: values a float32 cannot hold
        affine = oblique_affine()
        affine[:3, 3] += [1e-9, -3e-9, 2e-9]
        img = nib.Nifti2Image(data, affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
    elif kind == "sform2_qform1":
        img = nib.Nifti1Image(data, RAS_AFFINE)
        img.set_sform(RAS_AFFINE, code=2)  # aligned to another scan
        qform = RAS_AFFINE.copy()
        qform[:3, 3] += [0.5, 0.0, -1.0]
        img.set_qform(qform, code=1)
    elif kind == "qform_only_oblique":  # the affine comes from the quaternion (float64 arithmetic)
        img = nib.Nifti1Image(data, oblique_affine())
        img.set_qform(oblique_affine(), code=1)
        img.set_sform(None, code=0)
    else:  # LAS, NIfTI-1, sform code 4 (MNI) and qform code 0
        las = RAS_AFFINE @ np.diag([-1.0, 1.0, 1.0, 1.0])
        img = nib.Nifti1Image(data[::-1], las)
        img.set_sform(las, code=4)
        img.set_qform(None, code=0)
    nib.save(img, str(path))


@pytest.mark.parametrize("kind", ["nifti2_float64", "sform2_qform1", "qform_only_oblique", "las_sform4"])
def test_outputs_keep_the_input_header_geometry(files, tmp_path, kind):
    header_case(kind, tmp_path / "case.nii.gz")
    infer(files, [tmp_path / "case.nii.gz"], tmp_path / "out", save_probabilities=True)
    src = nib.load(str(tmp_path / "case.nii.gz"))
    for name in ("case.nii.gz", "case_prob.nii.gz"):
        out = nib.load(str(tmp_path / "out" / name))
        assert type(out) is type(src)
        assert np.array_equal(out.affine, src.affine)
        for form in ("qform", "sform"):
            (a, code_a), (b, code_b) = getattr(out, f"get_{form}")(coded=True), getattr(src, f"get_{form}")(coded=True)
            assert code_a == code_b and (a is None and b is None or np.array_equal(a, b))
        assert np.array_equal(out.header.get_zooms()[:3], src.header.get_zooms()[:3])
        assert out.header.get_xyzt_units() == src.header.get_xyzt_units()
    if kind == "nifti2_float64":
        assert not np.array_equal(src.affine, src.affine.astype(np.float32))  # a NIfTI-1 could not hold it


# ------------------------------------------------------------------------- issue 12: messages, --out


def test_missing_model_with_method_says_not_found(files, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    assert main(["infer", "--model", str(missing), "--method", "lora_r4", "--out", str(tmp_path / "out"),
                 str(files["ras"])]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"medlora: error: {missing}: ") and "not found" in line
    assert not (tmp_path / "out").exists()


def test_no_output_folder_is_left_when_every_case_fails(files, tmp_path, capsys):
    bad = tmp_path / "flat.nii.gz"
    save_nifti(bad, phantom()[:, :, 5], RAS_AFFINE)
    args = ["infer", "--model", str(files["base"]), "--adapter", str(files["a1"]), str(bad), "--out"]
    assert main([*args, str(tmp_path / "new" / "out")]) == 2
    assert not (tmp_path / "new").exists()  # neither the folder nor the parent it created
    mine = tmp_path / "mine"  # a folder of the user's, empty or not, stays as it was
    mine.mkdir()
    assert main([*args, str(mine)]) == 2 and mine.is_dir() and not list(mine.iterdir())
    (mine / "notes.txt").write_text("keep", encoding="utf-8")
    assert main([*args, str(mine)]) == 2 and (mine / "notes.txt").read_text(encoding="utf-8") == "keep"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------- issue 13: provenance, imports


def test_provenance_file_records_the_run(files, tmp_path, monkeypatch):
    import datetime
    import hashlib

    import medlora

    out = tmp_path / "out"
    argv = ["medlora", "infer", "--model", str(files["base"]), "--adapter", str(files["a1"]), "--adapter",
            str(files["a2"]), "--threshold", "0.4", "--out", str(out), str(files["ras"])]
    monkeypatch.setattr("sys.argv", argv)
    assert main(argv[1:]) == 0
    record = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    (run,) = record["runs"]
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (files["base"], files["a1"], files["a2"])}
    assert [(m["role"], m["path"], m["sha256"], m["bytes"]) for m in run["models"]] == [
        (role, str(p.resolve()), sha[p], p.stat().st_size)
        for role, p in (("base", files["base"]), ("adapter", files["a1"]), ("adapter", files["a2"]))]
    assert run["preprocessing"] == {**NATIVE, "target_spacing": None}  # as written into the adapters
    assert run["threshold"] == 0.4 and run["sliding_window"]["roi_size"] == ROI3
    assert run["architecture"] == {"backbone": "mv_unet", "backbone_args": ARCH, "spatial_dims": 3}
    assert run["versions"]["medlora"] == medlora.__version__ and run["versions"]["torch"] == torch.__version__
    assert run["command_line"] == argv and run["arguments"]["adapters"] == [str(files["a1"]), str(files["a2"])]
    assert run["cases"] == ["ras"]
    started = datetime.datetime.fromisoformat(run["started"])
    assert started.tzinfo is not None and abs(datetime.datetime.now(datetime.timezone.utc) - started).seconds < 600
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # written atomically: no temporaries
    # a second run into the folder is appended; the crossval form lists the base and every fold's adapter
    run_dir = make_run_dir(files, tmp_path / "run")
    assert main(["infer", "--model", str(run_dir), "--method", "cp_dora_r4", "--out", str(out), "--overwrite",
                 str(files["ras"])]) == 0
    runs = json.loads((out / "provenance.json").read_text(encoding="utf-8"))["runs"]
    assert len(runs) == 2 and runs[0] == run
    assert [(m["role"], m["sha256"]) for m in runs[1]["models"]] == [
        ("base", sha[files["base"]]), ("adapter", sha[files["a1"]]), ("adapter", sha[files["a2"]])]
    assert runs[1]["threshold"] == 0.5 and runs[1]["arguments"]["method"] == "cp_dora_r4"


def test_inference_does_not_import_training(files, tmp_path, monkeypatch):
    """Issue 13: `grep -rE "medlora\\.training|from \\.\\.training" medlora/inference` finds nothing, and
    inference from a crossval run folder runs with the training package unimportable."""
    import re
    import sys

    import medlora.inference

    package = Path(medlora.inference.__file__).parent
    pattern = re.compile(r"medlora\.training|from \.\.training")
    assert [p.name for p in sorted(package.rglob("*.py")) if pattern.search(p.read_text(encoding="utf-8"))] == []
    run_dir = make_run_dir(files, tmp_path / "run")
    for name in [n for n in sys.modules if n == "medlora.training" or n.startswith("medlora.training.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import` of a None entry raises ImportError
    monkeypatch.setitem(sys.modules, "medlora.training", None)
    for method in ("cp_dora_r4", "no_finetune"):
        summary = run_inference(run_dir, [files["ras"]], tmp_path / method, method=method, progress=False)
        assert summary.exit_code == 0 and (tmp_path / method / "ras.nii.gz").is_file()
