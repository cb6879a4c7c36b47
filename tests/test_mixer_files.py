"""Mixer files: a token-level mixer (tiny SAM, two LoRA experts, random gates) saved as a composition file of
selection ``mixer``, loaded back onto the base, and run by ``medlora infer --composition`` on a tiny volume,
against the in-memory mixer run slice by slice by hand; a wrong base or expert refused in one line."""

from __future__ import annotations

import copy
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medlora.adapters import AdapterConfig, inject, iter_adapters, save_adapter
from medlora.adapters.multi import attach_mixer
from medlora.adapters.multi.files import CompositionFileError, read_composition, save_composition, save_mixer
from medlora.adapters.multi.mixer import mixer_layers
from medlora.cli import main
from medlora.models.sam import SamSegmenter

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*adapter parameters >= the layer")]

SIZE = 32
ARCH = {"backbone": "sam", "backbone_args": {"variant": "tiny", "image_size": SIZE}, "spatial_dims": 2}
HU = (0.0, 140.0)
TARGETS = ["attn.qkv", "attn.proj"]
NAMES = ["subarachnoid", "intraventricular"]


def _base(seed):
    torch.manual_seed(seed)
    return SamSegmenter("tiny", image_size=SIZE).eval()


def _expert(base, seed):
    m = inject(copy.deepcopy(base), AdapterConfig("lora", rank=2, alpha=4.0, targets=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, reparam in iter_adapters(m):  # B = 0 at init would make every expert the base
            reparam.lora_B.copy_(torch.randn(reparam.lora_B.shape, generator=g) * 0.5)
    return m.eval()


def _mixer(base, experts, routing="soft", k=1):
    model = attach_mixer(copy.deepcopy(base), experts, targets=TARGETS, names=NAMES, routing=routing, k=k)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # gates far from uniform, so that a gate not restored shows in the output
        for _, layer in mixer_layers(model):
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))
            layer.router.bias.copy_(torch.randn(layer.router.bias.shape, generator=g))
    return model.eval()


@pytest.fixture
def setup(tmp_path):
    base = _base(0)
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    (tmp_path / "experts").mkdir()
    experts = [_expert(base, 10 + i) for i in range(2)]
    files = [save_adapter(e, tmp_path / "experts" / f"{n}.safetensors") for e, n in zip(experts, NAMES, strict=True)]
    return base, experts, files


def _prep():
    return {"hu_window": list(HU), "target_spacing": None, "roi_size": [SIZE, SIZE], "threshold": 0.5}


@pytest.mark.parametrize("routing", ["soft", "topk_equal"])
def test_round_trip_gives_the_in_memory_mixers_outputs(tmp_path, setup, routing):
    base, experts, files = setup
    model = _mixer(base, experts, routing, k=1)
    path = save_mixer(tmp_path / "mixer.safetensors", model, base, files, [4, 3], architecture=ARCH,
                      preprocessing=_prep())
    spec, meta = read_composition(path)
    assert spec.select == "mixer" and spec.names == NAMES and meta["adapters"][1]["file"] == \
        "experts/intraventricular.safetensors"
    assert (spec.mixer.routing, spec.mixer.k, len(spec.mixer.layers)) == (routing, 1, 8)  # 4 blocks x qkv, proj
    loaded = spec.mixer.attach(copy.deepcopy(base), files, spec.names).eval()
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), loaded(x)
        fresh = attach_mixer(copy.deepcopy(base), experts, targets=TARGETS, routing=routing, k=1).eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (fresh - want).abs().max() > 1e-3  # the stored gates, not any gates, reproduce the model
    gates = [layer.last_gates for _, layer in mixer_layers(loaded)]
    assert all(torch.equal(a, b.last_gates) for a, (_, b) in zip(gates, mixer_layers(model), strict=True))


def test_save_refuses_experts_that_differ_from_the_files(tmp_path, setup):
    base, experts, files = setup
    model = _mixer(base, experts)
    with torch.no_grad():  # an expert trained together with the routers no longer equals its file
        mixer_layers(model)[3][1].lora_B[1].add_(0.1)
    with pytest.raises(CompositionFileError, match="intraventricular.safetensors: expert 'intraventricular' differs"):
        save_mixer(tmp_path / "m.safetensors", model, base, files, [4, 3])
    with pytest.raises(CompositionFileError, match="not the given base"):
        save_mixer(tmp_path / "m.safetensors", _mixer(base, experts), _base(5), files, [4, 3])
    with pytest.raises(CompositionFileError, match="random draws"):  # would label a case differently each run
        save_mixer(tmp_path / "m.safetensors", _mixer(base, experts, "sample_equal", k=1), base, files, [4, 3])
    assert not (tmp_path / "m.safetensors").exists()


def _volume(tmp_path, shape=(SIZE, SIZE, 4)):
    rng = np.random.default_rng(0)
    hu = rng.uniform(-50, 200, shape).astype(np.float32)
    hu[0, 0, :], hu[-1, -1, :] = -1000.0, 1200.0
    nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 5.0, 1.0])), str(tmp_path / "case.nii.gz"))
    return hu


def test_infer_runs_the_mixed_model_as_by_hand(tmp_path, setup):
    base, experts, files = setup
    hu = _volume(tmp_path)
    model = _mixer(base, experts)
    comp = save_mixer(tmp_path / "mixer.safetensors", model, base, files, [4, 3], outputs=[(0, 7)],
                      architecture=ARCH, preprocessing=_prep())
    out = tmp_path / "out"
    assert main(["infer", str(tmp_path / "case.nii.gz"), "--model", str(tmp_path / "base.safetensors"),
                 "--composition", str(comp), "--out", str(out)]) == 0
    written = nib.load(str(out / "case.nii.gz"))
    got = np.asarray(written.dataobj)
    assert got.dtype == np.uint8 and got.shape == hu.shape
    np.testing.assert_array_equal(written.affine, np.diag([2.0, 2.0, 5.0, 1.0]))
    # by hand: the windowed volume's axial slices through the in-memory mixer, label 7 where p >= 0.5
    x = torch.from_numpy(np.clip((hu - HU[0]) / (HU[1] - HU[0]), 0, 1)).permute(2, 0, 1)[:, None].float()
    with torch.no_grad():
        prob = torch.sigmoid(model(x))[:, 0].permute(1, 2, 0).numpy()
        plain = torch.sigmoid(base(x))[:, 0].permute(1, 2, 0).numpy()
    want = np.where(prob >= 0.5, 7, 0)
    sure = np.abs(prob - 0.5) > 1e-4  # one Gaussian-weighted window reproduces a plain pass up to rounding
    assert sure.mean() > 0.99 and 0.05 < (want == 7).mean() < 0.95
    np.testing.assert_array_equal(got[sure], want[sure])
    assert ((prob >= 0.5) != (plain >= 0.5)).any()  # the experts change the labels: not the base's map
    row = json.loads((out / "volumes.json").read_text())[0]
    assert row["adapters"] == NAMES and row["voxels"] == int(np.count_nonzero(got))
    run = json.loads((out / "provenance.json").read_text())["runs"][-1]
    assert [m["role"] for m in run["models"]] == ["base", "composition", "adapter", "adapter"]
    assert run["composition"]["select"] == "mixer" and run["composition"]["mixer"]["outputs"] == [[0, 7]]


def test_wrong_base_or_expert_is_refused_in_one_line(tmp_path, setup, capsys):
    base, experts, files = setup
    _volume(tmp_path)
    comp = save_mixer(tmp_path / "mixer.safetensors", _mixer(base, experts), base, files, [4, 3],
                      architecture=ARCH, preprocessing=_prep())
    save_file(_base(5).state_dict(), str(tmp_path / "other.safetensors"))

    def refused(*extra):
        capsys.readouterr()
        code = main(["infer", str(tmp_path / "case.nii.gz"), "--composition", str(comp), "--out",
                     str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
        return err

    assert "base model differs" in refused("--model", str(tmp_path / "other.safetensors"))
    stranger = save_adapter(_expert(base, 99), tmp_path / "stranger.safetensors")
    assert "stranger.safetensors: not one of the adapters" in refused(
        "--model", str(tmp_path / "base.safetensors"), "--adapter", str(stranger))
    assert "no --adapter file given for adapter(s) intraventricular" in refused(
        "--model", str(tmp_path / "base.safetensors"), "--adapter", str(files[0]))
    spec, _ = read_composition(comp)  # gates of the wrong width for the routed layers: one line, not a traceback
    spec.mixer.gates = {k: v[..., :3] if k.endswith("weight") else v for k, v in spec.mixer.gates.items()}
    bad = save_composition(tmp_path / "bad.safetensors", spec, base, files, architecture=ARCH, preprocessing=_prep())
    assert "the layer needs (2, 64)" in refused("--model", str(tmp_path / "base.safetensors"), "--composition",
                                                str(bad))
    files[1].unlink()
    assert "'intraventricular' not found" in refused("--model", str(tmp_path / "base.safetensors"))
