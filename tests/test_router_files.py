"""Composition files: save/load round trip of a routed composition, ``medlora infer --composition`` on a tiny
volume against running each adapter by hand and fusing in numpy, and refusal of a wrong base or adapter."""

from __future__ import annotations

import copy
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medlora.adapters import AdapterBank, AdapterConfig, inject, iter_adapters, save_adapter
from medlora.adapters.multi import CaseRouter
from medlora.adapters.multi.files import CompositionFileError, CompositionSpec, read_composition, save_composition
from medlora.assembly import load_adapter_onto
from medlora.cli import main
from medlora.models.mv_unet import MultiViewUNet

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*adapter parameters >= the layer")]

ARGS = {"in_channels": 1, "out_channels": 1, "width": 4, "norm": "instance"}
ARCH = {"backbone": "mv_unet", "backbone_args": ARGS, "spatial_dims": 2}
HU = (0.0, 140.0)
NAMES, VALUES = ["intraparenchymal", "intraventricular", "subarachnoid"], [2, 3, 4]


def _base(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MultiViewUNet(spatial_dims=2, **ARGS).eval()


def _adapter(base, seed):
    m = inject(copy.deepcopy(base), AdapterConfig("lora", rank=2, alpha=4.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, reparam in iter_adapters(m):  # B = 0 at init would make every adapter the base
            reparam.lora_B.copy_(torch.randn(reparam.lora_B.shape, generator=g) * 0.5)
    return m.eval()


@pytest.fixture
def setup(tmp_path):
    base = _base(0)
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    (tmp_path / "adapters").mkdir()
    adapted, files = {}, []
    for i, n in enumerate(NAMES):
        adapted[n] = _adapter(base, 10 + i)
        files.append(save_adapter(adapted[n], tmp_path / "adapters" / f"{n}.safetensors"))
    torch.manual_seed(1)
    router = CaseRouter(8, 3, NAMES)
    with torch.no_grad():
        router.head.weight.normal_()
        router.mean.copy_(torch.randn(8) * 0.1)
        router.std.copy_(torch.rand(8) + 0.5)
    return base, adapted, files, router


def _prep(roi):
    return {"hu_window": list(HU), "target_spacing": None, "roi_size": list(roi), "threshold": 0.5}


def test_round_trip_gives_the_in_memory_routers_choice_and_labels(tmp_path, setup):
    base, adapted, files, router = setup
    spec = CompositionSpec(NAMES, VALUES, select="top-k", k=2, router=router, pooled_layer="M2", rule="priority",
                           priority=[1, 0, 2])
    path = save_composition(tmp_path / "router.safetensors", spec, base, files, architecture=ARCH,
                            preprocessing=_prep((16, 16)))
    got, meta = read_composition(path)
    assert (got.names, got.values, got.select, got.k, got.rule, got.priority) == (NAMES, VALUES, "top-k", 2,
                                                                                  "priority", [1, 0, 2])
    assert meta["adapters"][0]["file"] == "adapters/intraparenchymal.safetensors"
    bank = AdapterBank(base)
    for n in NAMES:
        bank.add(n, adapted[n])
    g = torch.Generator().manual_seed(3)
    xs = [torch.rand(5, 1, 16, 16, generator=g) * torch.rand(1, generator=g) for _ in range(8)]
    feats = torch.cat([spec.case_features(base, x) for x in xs])
    with torch.no_grad():  # standardised on these cases, so that the scores differ between them
        router.mean.copy_(feats.mean(0))
        router.std.copy_(feats.std(0))
    got, meta = read_composition(save_composition(path, spec, base, files))
    seen = set()
    for x in xs:
        torch.testing.assert_close(got.router(got.case_features(base, x)), router(spec.case_features(base, x)),
                                   rtol=0, atol=0)
        a, chosen_a = spec.segment(bank, base, x)
        b, chosen_b = got.segment(bank, base, x)
        assert chosen_a == chosen_b and len(chosen_a) == 2 and torch.equal(a, b)
        seen.add(tuple(chosen_a))
    assert len(seen) > 1  # the router really decides: a constant choice would not test the stored head

    output = CompositionSpec(NAMES, VALUES)  # fixed output composition: no router tensors at all
    got, meta = read_composition(save_composition(tmp_path / "all.safetensors", output, base, files))
    assert got.router is None and got.choose(None) == [[0, 1, 2]] and meta["router"] is None


def _volume(tmp_path, shape=(16, 16, 6)):
    rng = np.random.default_rng(0)
    hu = rng.uniform(-50, 200, shape).astype(np.float32)
    hu[0, 0, :], hu[-1, -1, :] = -1000.0, 1200.0  # air and bone: a CT's range in Hounsfield units
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "case.nii.gz"))
    return hu


def _by_hand(base, files, hu, chosen):
    """Each chosen adapter merged into the base, run slice by slice on the windowed volume; numpy fusion: a voxel
    is the value of the chosen adapter with the highest probability where that reaches 0.5."""
    x = torch.from_numpy(np.clip((hu - HU[0]) / (HU[1] - HU[0]), 0, 1)).permute(2, 0, 1)[:, None].float()
    probs = []
    for i in chosen:
        with torch.no_grad():
            p = torch.sigmoid(load_adapter_onto(base, files[i]).eval()(x))[:, 0]
        probs.append(p.permute(1, 2, 0).numpy())
    probs = np.stack(probs)
    best = probs.max(0)
    label = np.where(best >= 0.5, np.array([VALUES[i] for i in chosen])[probs.argmax(0)], 0)
    margin = np.minimum(np.abs(best - 0.5), best - np.sort(probs, 0)[-2] if len(chosen) > 1 else np.inf)
    return label, margin, x


def _hand_features(base, x, foreground):
    got = []
    hook = base.M2.register_forward_hook(lambda m, i, o: got.append(o))
    with torch.no_grad():
        prob = torch.sigmoid(base(x)).numpy()[:, 0]
    hook.remove()
    f = got[0].numpy()
    if foreground:  # the base's probability, block-averaged onto the layer's grid, weights the features
        s, h, w = prob.shape[0], f.shape[2], f.shape[3]
        weight = prob.reshape(s, h, prob.shape[1] // h, w, prob.shape[2] // w).mean(axis=(2, 4))
        f = torch.from_numpy((f * weight[:, None]).sum(axis=(0, 2, 3)) / weight.sum())
    else:
        f = torch.from_numpy(f.mean(axis=(2, 3)).mean(0))  # per-slice global average, then over the slices
    return f


def _hand_choice(base, router, x, k, foreground=False):
    f = _hand_features(base, x, foreground)
    w, b = router.head.weight.detach(), router.head.bias.detach()
    s = ((f - router.mean) / router.std) @ w.T + b
    return sorted(np.argsort(-s.numpy(), kind="stable")[:k].tolist())


@pytest.mark.parametrize("select", ["all", "top-k", "foreground"])
def test_infer_equals_running_the_adapters_and_fusing_by_hand(tmp_path, setup, select):
    base, _, files, router = setup
    hu = _volume(tmp_path)
    spec = CompositionSpec(NAMES, VALUES, select="all" if select == "all" else "top-k", k=None if select == "all"
                           else 1 if select == "top-k" else 2, router=None if select == "all" else router,
                           pooled_layer="M2", pooling="foreground" if select == "foreground" else "mean")
    comp = save_composition(tmp_path / "comp.safetensors", spec, base, files, architecture=ARCH,
                            preprocessing=_prep((16, 16)))
    out = tmp_path / "out"
    assert main(["infer", str(tmp_path / "case.nii.gz"), "--model", str(tmp_path / "base.safetensors"),
                 "--composition", str(comp), "--out", str(out)]) == 0
    written = nib.load(str(out / "case.nii.gz"))
    got = np.asarray(written.dataobj)
    assert got.dtype == np.uint8 and got.shape == hu.shape
    np.testing.assert_array_equal(written.affine, np.diag([2.0, 2.0, 5.0, 1.0]))
    x = torch.from_numpy(np.clip((hu - HU[0]) / (HU[1] - HU[0]), 0, 1)).permute(2, 0, 1)[:, None].float()
    chosen = [0, 1, 2] if select == "all" else _hand_choice(base, router, x, spec.k, select == "foreground")
    want, margin, _ = _by_hand(base, files, hu, chosen)
    sure = margin > 1e-4  # one Gaussian-weighted window reproduces a plain pass up to rounding
    assert sure.mean() > 0.99
    np.testing.assert_array_equal(got[sure], want[sure])
    assert set(np.unique(want)) - {0} == {VALUES[i] for i in chosen}  # every chosen class really appears
    row = json.loads((out / "volumes.json").read_text())[0]
    assert row["adapters"] == [NAMES[i] for i in chosen] and row["voxels"] == int(np.count_nonzero(got))
    run = json.loads((out / "provenance.json").read_text())["runs"][-1]
    assert [m["role"] for m in run["models"]] == ["base", "composition", "adapter", "adapter", "adapter"]
    assert run["composition"]["select"] == spec.select


def test_wrong_base_or_adapter_is_refused_in_one_line(tmp_path, setup, capsys):
    base, _, files, router = setup
    _volume(tmp_path)
    spec = CompositionSpec(NAMES, VALUES, select="top-k", k=2, router=router, pooled_layer="M2")
    comp = save_composition(tmp_path / "comp.safetensors", spec, base, files, architecture=ARCH,
                            preprocessing=_prep((16, 16)))
    save_file(_base(5).state_dict(), str(tmp_path / "other.safetensors"))
    case = str(tmp_path / "case.nii.gz")

    def refused(*extra):
        capsys.readouterr()
        code = main(["infer", case, "--composition", str(comp), "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
        return err

    assert "base model differs" in refused("--model", str(tmp_path / "other.safetensors"))
    stranger = save_adapter(_adapter(base, 99), tmp_path / "stranger.safetensors")
    err = refused("--model", str(tmp_path / "base.safetensors"), "--router", str(comp), "--adapter", str(stranger))
    assert "stranger.safetensors: not one of the adapters" in err
    err = refused("--model", str(tmp_path / "base.safetensors"), "--adapter", str(files[0]))
    assert "no --adapter file given for adapter(s) intraventricular, subarachnoid" in err
    save_adapter(_adapter(base, 98), files[1])  # the file beside the composition was replaced
    assert "intraventricular' differs from the one composition" in refused("--model",
                                                                           str(tmp_path / "base.safetensors"))
    with pytest.raises(CompositionFileError, match="trained on another base"):
        save_composition(tmp_path / "x.safetensors", spec, _base(5), files)


def test_foreground_pooling_weights_the_features_by_the_bases_probability(tmp_path, setup):
    base, _, files, router = setup
    spec = CompositionSpec(NAMES, VALUES, select="top-k", k=1, router=router, pooled_layer="M2", pooling="foreground")
    got, _ = read_composition(save_composition(tmp_path / "fg.safetensors", spec, base, files))
    assert got.pooling == "foreground"
    x = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(4))  # 40 slices: two chunks of 32
    want = _hand_features(base, x, True)
    torch.testing.assert_close(got.case_features(base, x)[0], want.float(), rtol=1e-5, atol=1e-6)
    plain = _hand_features(base, x, False)
    torch.testing.assert_close(CompositionSpec(NAMES, VALUES, pooled_layer="M2").case_features(base, x)[0],
                               plain.float(), rtol=1e-5, atol=1e-6)
    assert (want - plain).abs().max() > 1e-3  # the weighting changes the features
