"""Integrity of what medlora loads: corrupt adapter files, non-finite weights, and adapters on another base.

The corrupt files are built the way the reliability probe built them: the safetensors header is left
intact and only the data section is changed (NaN bytes; one exponent bit flipped every 64 bytes). The
file layout (8-byte little-endian header length, JSON header, data) is read here with numpy, independent
of medlora's reader.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from medlora.adapters import AdapterConfig, AdapterFileError, inject, iter_adapters, load_adapter, save_adapter
from medlora.adapters.merging import merge_adapters
from medlora.cli import main
from medlora.models.weights import WeightsError, load_weights

pytestmark = pytest.mark.usefixtures("one_thread")


class BnNet(nn.Module):
    """conv - BN - conv - conv head: the adapter goes on the two inner convs, the head is excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.mid = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(torch.relu(self.bn(self.conv(x))))))


CONFIG = AdapterConfig("lora", rank=2, targets=["conv", "mid"])


def trained(base: nn.Module, seed: int = 1) -> nn.Module:
    """``base`` with a LoRA whose factors moved away from their zero start (a stand-in for training)."""
    model = inject(copy.deepcopy(base), CONFIG)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, reparam in iter_adapters(model):
            for p in reparam.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def layout(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header) of a safetensors file, from the format's definition."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def float32_values(path: Path) -> dict[str, np.ndarray]:
    start, header = layout(path)
    raw = path.read_bytes()
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            assert info["dtype"] == "F32"
            lo, hi = info["data_offsets"]
            out[name] = np.frombuffer(raw[start + lo : start + hi], dtype="<f4")
    return out


def corrupt(path: Path, out: Path, how: str) -> Path:
    data = bytearray(path.read_bytes())
    start, _ = layout(path)
    if how == "nan":
        data[start:] = np.full((len(data) - start) // 4, np.nan, dtype="<f4").tobytes()
    else:
        # float32 little-endian: byte 3 holds the sign and the top 7 exponent bits, byte 2's high bit the lowest
        byte, bit = {"exponent": (3, 0x40), "finite": (2, 0x80)}[how]
        for offset in range(start, len(data) - 3, 64):
            data[offset + byte] ^= bit
    out.write_bytes(bytes(data))
    return out


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()])


def assert_untouched(model: nn.Module, before: tuple[dict[str, torch.Tensor], list[bool]]) -> None:
    state, grads = before
    assert list(iter_adapters(model)) == []
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == grads


@pytest.fixture
def saved(tmp_path) -> tuple[nn.Module, nn.Module, Path]:
    torch.manual_seed(0)
    base = BnNet().eval()
    model = trained(base)
    return base, model, save_adapter(model, tmp_path / "adapter.safetensors")


# --------------------------------------------------------------------------------- corrupt adapter files


@pytest.mark.parametrize("how", ["nan", "exponent", "finite"])
def test_corrupt_adapter_data_is_refused_naming_the_file(saved, tmp_path, how):
    base, model, path = saved
    bad = corrupt(path, tmp_path / f"{how}.safetensors", how)
    original, damaged = float32_values(path), float32_values(bad)
    assert all(not np.array_equal(original[k], damaged[k]) for k in original if original[k].size >= 16)
    if how == "finite":  # the checksum, not the finiteness check, must catch this one
        assert all(np.isfinite(v).all() for v in damaged.values())
    target = copy.deepcopy(base)
    before = snapshot(target)
    with pytest.raises(AdapterFileError) as info:
        load_adapter(target, bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: ") and "\n" not in message
    if how == "nan":
        assert "non-finite" in message and any(f"'{name}'" in message for name in original)
    if how == "finite":
        assert "checksum" in message
    assert_untouched(target, before)
    x = torch.randn(1, 1, 6, 6, 4)
    assert torch.equal(load_adapter(copy.deepcopy(base), path)(x), model(x))  # the intact file still loads


def test_checksum_is_sha256_of_names_dtypes_shapes_and_bytes_in_name_order(saved):
    import hashlib

    _, _, path = saved
    start, header = layout(path)
    raw = path.read_bytes()
    digest = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        lo, hi = header[name]["data_offsets"]
        digest.update(json.dumps([name, "float32", header[name]["shape"], hi - lo]).encode())
        digest.update(b"\n" + raw[start + lo : start + hi])
    assert json.loads(header["__metadata__"]["medlora"])["tensors_sha256"] == digest.hexdigest()


# ---------------------------------------------------------------------------------- the whole base


def changed(base: nn.Module, name: str) -> nn.Module:
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.state_dict()[name].add_(0.01)
    return other


@pytest.mark.parametrize("name", ["head.weight", "head.bias", "conv.bias", "bn.running_mean", "bn.weight",
                                  "mid.weight"])
def test_a_base_differing_anywhere_is_refused_naming_the_tensor(saved, name):
    base, _, path = saved
    other = changed(base, name)
    before = snapshot(other)
    with pytest.raises(AdapterFileError) as info:
        load_adapter(other, path)
    message = str(info.value)
    assert message.startswith(f"{path}: base weights differ") and f"first at tensor '{name}'" in message
    assert "check_base" not in message and "\n" not in message  # no remedy that exists in Python only
    assert_untouched(other, before)
    load_adapter(other, path, check_base=False)  # the Python override stays
    assert len(list(iter_adapters(other))) == 2


def test_a_base_with_another_architecture_is_refused(saved):
    base, _, path = saved
    bigger = copy.deepcopy(base)
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(AdapterFileError, match=r"first at tensor 'extra\.weight', which that base did not have"):
        load_adapter(bigger, path)
    smaller = copy.deepcopy(base)
    smaller.head = nn.Conv3d(4, 1, 1, bias=False)
    smaller.head.weight.data.copy_(base.head.weight)
    with pytest.raises(AdapterFileError, match=r"first at tensor 'head\.bias', which this model does not have"):
        load_adapter(smaller, path)


def test_a_base_differing_only_in_what_the_adapter_carries_is_accepted(tmp_path):
    torch.manual_seed(0)
    base = BnNet()
    model = trained(base)
    model.train()
    model(torch.randn(2, 1, 6, 6, 4))  # new BatchNorm statistics, carried with the adapter
    with torch.no_grad():
        model.head.bias.add_(0.5)  # an unfrozen layer, carried too
    carried = ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "head.bias"]
    path = save_adapter(model, tmp_path / "a.safetensors", extra_tensors=carried)
    _, header = layout(path)
    record = json.loads(header["__metadata__"]["medlora"])["base"]["tensors"]
    # everything of the base but what the file carries (and BatchNorm's step counter, which no forward reads)
    assert set(record) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "mid.weight", "mid.bias",
                           "head.weight"}
    other = changed(changed(base, "bn.running_var"), "head.bias")
    loaded = load_adapter(other, path).eval()
    x = torch.randn(1, 1, 6, 6, 4)
    assert torch.equal(loaded(x), model.eval()(x))


def test_fingerprints_do_not_depend_on_dtype_device_or_memory_layout():
    from medlora.adapters.io import base_record, tensors_checksum

    torch.manual_seed(0)
    model = trained(BnNet())
    record = base_record(model)
    assert set(record["tensors"]) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                      "bn.running_var", "mid.weight", "mid.bias", "head.weight", "head.bias"}
    assert base_record(copy.deepcopy(model).double()) == record
    assert base_record(copy.deepcopy(model).to(memory_format=torch.channels_last_3d)) == record
    plain = copy.deepcopy(model)
    from medlora.adapters import remove

    assert base_record(remove(plain)) == record  # the adapted model's W0 under the plain layer's key
    t = torch.randn(3, 4)
    assert tensors_checksum({"a": t.t().contiguous().t()}) == tensors_checksum({"a": t.clone()})
    assert tensors_checksum({"a": t}) != tensors_checksum({"b": t})
    assert tensors_checksum({"a": t}) != tensors_checksum({"a": t.reshape(4, 3)})


# -------------------------------------------------------------------------------- files of older versions


def old_format(path: Path, out: Path) -> Path:
    """The same file as medlora wrote it before checksums and whole-base fingerprints."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["medlora"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("tensors_sha256", "base"):
        meta.pop(key)
    save_file(tensors, str(out), metadata={"format": "pt", "medlora": json.dumps(meta)})
    return out


def test_old_format_files_load_with_a_warning_and_keep_their_per_layer_check(saved, tmp_path):
    base, model, path = saved
    old = old_format(path, tmp_path / "old.safetensors")
    with pytest.warns(UserWarning, match=r"old\.safetensors: adapter file without a checksum"):
        loaded = load_adapter(copy.deepcopy(base), old)
    x = torch.randn(1, 1, 6, 6, 4)
    assert torch.equal(loaded(x), model(x))
    with pytest.warns(UserWarning, match="without a checksum"):
        load_adapter(changed(base, "head.weight"), old)  # what the old fingerprint did not cover
    with pytest.warns(UserWarning, match="without a checksum"), \
            pytest.raises(AdapterFileError, match=r"old\.safetensors: base weights differ .*first at layer 'mid'"):
        load_adapter(changed(base, "mid.weight"), old)


# --------------------------------------------------------------------------------------------- merging


@pytest.mark.filterwarnings("ignore:.*adapter parameters >= the layer")
def test_merged_adapters_keep_the_whole_base_fingerprint(tmp_path):
    torch.manual_seed(0)
    base = BnNet().eval()
    one = save_adapter(trained(base, 1), tmp_path / "one.safetensors")
    two = save_adapter(trained(base, 2), tmp_path / "two.safetensors")
    merged = merge_adapters([one, two], out=tmp_path / "merged.safetensors")
    load_adapter(copy.deepcopy(base), merged)
    with pytest.raises(AdapterFileError, match=r"merged\.safetensors: base weights differ .*'head\.bias'"):
        load_adapter(changed(base, "head.bias"), merged)
    three = save_adapter(trained(changed(base, "head.bias"), 3), tmp_path / "three.safetensors")
    with pytest.raises(ValueError, match=r"were trained on different base models \(first at tensor 'head\.bias'\)"):
        merge_adapters([one, three])
    bad = corrupt(merged, tmp_path / "bad.safetensors", "finite")
    with pytest.raises(AdapterFileError, match=r"bad\.safetensors: .*checksum"):
        load_adapter(copy.deepcopy(base), bad)


# ------------------------------------------------------------------------------------------ base weights


@pytest.mark.parametrize("kind", ["safetensors", "state_dict", "lightning"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_base_weights_are_refused_naming_file_and_tensor(tmp_path, kind, value):
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in BnNet().state_dict().items()}
    state["mid.bias"][1] = value
    path = tmp_path / {"safetensors": "w.safetensors", "state_dict": "w.pt", "lightning": "w.ckpt"}[kind]
    if kind == "safetensors":
        save_file(state, str(path))
    elif kind == "state_dict":
        torch.save(state, path)
    else:
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "hyper_parameters": {}}, path)
    target = BnNet()
    before = snapshot(target)
    with pytest.raises(WeightsError) as info:
        load_weights(target, path)
    stored = "model.mid.bias" if kind == "lightning" else "mid.bias"
    assert str(info.value).startswith(f"{path}: tensor '{stored}' holds non-finite values")
    assert_untouched(target, before)
    from medlora.fileio import read_checkpoint

    unchecked = read_checkpoint(path, finite=False)  # read once elsewhere, without the check: loading still checks
    with pytest.raises(WeightsError, match=r"tensor 'mid\.bias' holds non-finite values"):
        load_weights(target, unchecked)
    assert_untouched(target, before)


def test_checkpoint_reader_sniffs_every_kind(tmp_path):
    from medlora.fileio import TensorFileError, read_checkpoint

    state = {"a.weight": torch.ones(2, 2), "a.bias": torch.zeros(2)}
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "hyper_parameters": {"lr": 0.1},
                "medlora_preprocessing": {"threshold": 0.5}}, tmp_path / "l.ckpt")
    torch.save({"model": state}, tmp_path / "sam.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    save_file(state, str(tmp_path / "s.safetensors"), metadata={"k": "v"})
    lightning = read_checkpoint(tmp_path / "l.ckpt")
    assert lightning.is_lightning and lightning.hyper_parameters == {"lr": 0.1}
    assert lightning.records["medlora_preprocessing"] == {"threshold": 0.5}
    for name in ("l.ckpt", "sam.pth", "ddp.pt", "s.safetensors"):
        got = read_checkpoint(tmp_path / name).state_dict
        assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items())
    assert read_checkpoint(tmp_path / "s.safetensors").records == {"k": "v"}
    assert not read_checkpoint(tmp_path / "ddp.pt").is_lightning

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(TensorFileError, match=r"evil\.pt: holds a pickled print object") as info:
        read_checkpoint(tmp_path / "evil.pt")
    assert info.value.refused_global == "print"
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes((tmp_path / "s.safetensors").read_bytes()[:-5])
    with pytest.raises(TensorFileError, match=r"t\.safetensors: not a readable safetensors file \(\w+"):
        read_checkpoint(truncated)


# ------------------------------------------------------------------------------------------------- CLI

ARCH = {"level": 1, "width": 4}
SHAPE = (24, 20, 12)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory) -> dict[str, Path]:
    from medlora.data.dataset import save_nifti
    from medlora.models import create_model

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    base = create_model("mv_unet", spatial_dims=3, **ARCH).eval()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(root / "base.safetensors"))
    other = changed(base, "M3.TripleOut.6.weight")  # the output layer, excluded from adaptation
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(root / "other_head.safetensors"))
    model = inject(copy.deepcopy(base), AdapterConfig("lora", rank=2, target_types=["Conv3d"],
                                                      exclude=["M3.TripleOut.6"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    meta = {"backbone": "mv_unet", "backbone_args": dict(ARCH), "spatial_dims": 3, "pretrained": None,
            "preprocessing": {"hu_window": [0.0, 140.0], "target_spacing": None, "roi_size": [16, 16, 8],
                              "threshold": 0.5}}
    adapter = save_adapter(model, root / "adapter.safetensors", extra_metadata=meta)
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    r = np.sqrt(x**2 + y**2 + (0.8 * z) ** 2)
    vol = np.where(r < 0.8, 35.0, np.where(r < 0.95, 900.0, -1000.0)) + rng.normal(0.0, 8.0, SHAPE)
    save_nifti(root / "case.nii.gz", vol.astype(np.float32), np.diag([0.9, 0.8, 3.0, 1.0]))
    return {"base": root / "base.safetensors", "other_head": root / "other_head.safetensors", "adapter": adapter,
            "nan": corrupt(adapter, root / "nan.safetensors", "nan"),
            "flipped": corrupt(adapter, root / "flipped.safetensors", "exponent"), "case": root / "case.nii.gz"}


@pytest.mark.parametrize(("model", "adapter", "expected"), [
    ("base", "nan", "non-finite"), ("base", "flipped", ""), ("other_head", "adapter", "'M3.TripleOut.6.weight'")])
def test_infer_refuses_a_corrupt_adapter_or_another_base_in_one_line(cli_files, tmp_path, capsys, model, adapter,
                                                                     expected):
    out = tmp_path / "out"
    code = main(["infer", "--model", str(cli_files[model]), "--adapter", str(cli_files[adapter]), "--out", str(out),
                 str(cli_files["case"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, err
    assert err[0].startswith(f"medlora: error: {cli_files[adapter]}: ") and expected in err[0]
    assert "check_base" not in err[0]
    assert not out.exists()


def test_a_peft_adapter_with_a_nan_tensor_is_refused_naming_file_and_tensor(tmp_path):
    from safetensors.torch import load_file

    from medlora.adapters import export_peft, import_peft

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    inject(model, AdapterConfig("lora", rank=2, target_types=["Linear"]))
    export_peft(model, tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(weights))
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(AdapterFileError, match=f"{weights}.*{key}"):
        import_peft(base, tmp_path / "peft")


def test_an_adapter_with_non_finite_tensors_is_not_written(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    inject(model, AdapterConfig("lora", rank=2, target_types=["Linear"]))
    target = tmp_path / "adapter.safetensors"
    save_adapter(model, target)
    before = target.read_bytes()
    _, _, reparam = next(iter_adapters(model))
    with torch.no_grad():
        reparam.lora_B[0, 0] = float("inf")
    with pytest.raises(AdapterFileError, match="not written.*lora_B.*non-finite"):
        save_adapter(model, target)
    assert target.read_bytes() == before  # the earlier file is left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]
