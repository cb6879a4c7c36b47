"""Adapter files, PEFT interop, selection errors and a few optimisation steps for every method."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medlora.adapters import (
    AdapterConfig,
    AdapterFileError,
    adapters_of,
    export_peft,
    import_peft,
    inject,
    iter_adapters,
    load_adapter,
    parameter_report,
    read_adapter_file,
    save_adapter,
)

METHODS = ["lora", "lora_c", "conv_lora", "cp_lora", "dora", "dora_c", "conv_dora", "cp_dora", "salt", "svd"]


class TinyNet3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, (3, 3, 1), padding=(1, 1, 0))
        )
        self.up = nn.ConvTranspose3d(8, 8, 2, stride=2)
        self.head = nn.Conv3d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.up(nn.functional.max_pool3d(torch.relu(self.enc(x)), 2))))


class MixedNet(nn.Module):
    """Layers PEFT supports: Linear, Conv1d, Conv2d, Conv3d (including 1x1x1)."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(2, 6, 3, padding=1, stride=(1, 2, 1))
        self.c3_1 = nn.Conv3d(6, 4, 1)
        self.c2 = nn.Conv2d(4, 5, (3, 2))
        self.c1 = nn.Conv1d(5, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(3, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c3_1(torch.relu(self.c3(x))))   # (N, 4, D, H/2, W)
        y = self.c2(y.mean(dim=2))                            # (N, 5, H', W')
        y = self.c1(y.flatten(2))                             # (N, 3, L)
        return self.fc(y.transpose(1, 2))


def randomise_(model: nn.Module) -> None:
    with torch.no_grad():
        for _, _, reparam in iter_adapters(model):
            for name, p in reparam.named_parameters():
                if name.endswith(("scale", "magnitude")):
                    p.mul_(1 + 0.1 * torch.randn_like(p))
                else:
                    p.add_(0.1 * torch.randn_like(p))


# ---------------------------------------------------------------- selection and configuration errors


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown adapter method 'loraa'; available: .*conv_dora, conv_lora, cp_dora"):
        AdapterConfig("loraa")


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) rnak for adapter method 'salt'; valid: svd_fraction"):
        AdapterConfig("salt", options={"rnak": 3})


def test_no_matching_layer_lists_what_exists():
    with pytest.raises(ValueError, match=r"no layer matches targets=\['decoder\.\*'\].*enc\.0 \(Conv3d\).*head"):
        inject(TinyNet3d(), AdapterConfig("lora", targets=["decoder.*"]))


def test_target_patterns_glob_suffix_regex_types_and_exclude():
    def adapted(**kw):
        model = inject(TinyNet3d(), AdapterConfig("lora", rank=2, **kw))
        return [n for n, _, _ in iter_adapters(model)]

    assert adapted(targets=["enc.*"]) == ["enc.0", "enc.2"]
    assert adapted(targets=["2"]) == ["enc.2"]                      # PEFT-style suffix match
    assert adapted(targets="re:enc\\.[0-9]|head") == ["enc.0", "enc.2", "head"]
    assert adapted(target_types=["ConvTranspose3d"]) == ["up"]
    assert adapted(exclude=["head", "up"]) == ["enc.0", "enc.2"]


def test_inject_freezes_base_and_refuses_double_adaptation():
    model = inject(TinyNet3d(), AdapterConfig("lora", rank=2, targets=["enc.*"]))
    assert all(p.requires_grad == (".parametrizations.weight.0." in n) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="already adapted: enc.0"):
        inject(model, AdapterConfig("dora", rank=2, targets=["enc.0"]))
    inject(model, AdapterConfig("cp_dora", rank=2, targets=["head"]))  # other layers may get another method
    assert {n: r.config.method for n, _, r in iter_adapters(model)} == {"enc.0": "lora", "enc.2": "lora",
                                                                       "head": "cp_dora"}


# ---------------------------------------------------------------- safetensors adapter files


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_bitwise(method, tmp_path):
    base = TinyNet3d()
    model = inject(copy.deepcopy(base), AdapterConfig(method, rank=2, targets=["enc.*", "up"]))
    randomise_(model)
    path = save_adapter(model, tmp_path / "adapter.safetensors")

    fresh = load_adapter(copy.deepcopy(base), path)  # attaches the adapters itself
    x = torch.randn(1, 1, 8, 8, 4)
    assert torch.equal(fresh(x), model(x))
    for (n1, _, r1), (n2, _, r2) in zip(iter_adapters(model), iter_adapters(fresh), strict=True):
        assert n1 == n2 and r1.config == r2.config
        for (k1, p1), (k2, p2) in zip(r1.named_parameters(), r2.named_parameters(), strict=True):
            assert k1 == k2 and torch.equal(p1, p2)
            assert p2.requires_grad
    # the file holds adapter tensors only: no base weight travels with it
    tensors = load_file(path)
    adapter_numel = sum(p.numel() for _, _, r in iter_adapters(model) for p in r.parameters())
    assert sum(t.numel() for t in tensors.values()) == adapter_numel
    meta, _ = read_adapter_file(path)
    assert meta["configs"][0]["method"] == method
    assert meta["layers"]["up"]["layer_type"] == "ConvTranspose3d"
    assert meta["layers"]["up"]["weight_shape"] == [8, 8, 2, 2, 2]


def test_extra_tensors_travel_with_the_adapter(tmp_path):
    base = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.Conv3d(4, 1, 1))
    model = inject(copy.deepcopy(base), AdapterConfig("lora", rank=2, targets=["0"]))
    randomise_(model)
    model.train()
    model(torch.randn(2, 1, 5, 5, 5))  # updates the BatchNorm running statistics
    extras = ["1.running_mean", "1.running_var", "2.bias"]
    path = save_adapter(model, tmp_path / "a.safetensors", extra_tensors=extras)
    fresh = load_adapter(copy.deepcopy(base), path).eval()
    model.eval()
    x = torch.randn(1, 1, 5, 5, 5)
    assert torch.equal(fresh(x), model(x))
    assert read_adapter_file(path)[0]["extra_tensors"] == sorted(extras)
    with pytest.raises(ValueError, match="extra_tensors not in the model's state_dict: 9.weight"):
        save_adapter(model, tmp_path / "b.safetensors", extra_tensors=["9.weight"])


def test_loading_into_an_already_adapted_model(tmp_path):
    base = TinyNet3d()
    cfg = AdapterConfig("conv_dora", rank=2, targets=["enc.*"])
    trained = inject(copy.deepcopy(base), cfg)
    randomise_(trained)
    path = save_adapter(trained, tmp_path / "a.safetensors")
    other = inject(copy.deepcopy(base), cfg)
    load_adapter(other, path)
    x = torch.randn(1, 1, 8, 8, 4)
    assert torch.equal(other(x), trained(x))
    mismatch = inject(copy.deepcopy(base), AdapterConfig("conv_dora", rank=3, targets=["enc.*"]))
    with pytest.raises(AdapterFileError, match="configured differently"):
        load_adapter(mismatch, path)


def test_loading_on_a_different_base_fails_and_leaves_the_model_untouched(tmp_path):
    base = TinyNet3d()
    model = inject(copy.deepcopy(base), AdapterConfig("lora", rank=2))
    path = save_adapter(model, tmp_path / "a.safetensors")
    other = TinyNet3d()  # same architecture, other weights
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(AdapterFileError, match=r"a\.safetensors: base weights differ .*at tensor 'enc\.0\.weight'"):
        load_adapter(other, path)
    assert list(iter_adapters(other)) == []
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert all(p.requires_grad for p in other.parameters())
    load_adapter(other, path, check_base=False)  # the explicit override
    assert len(list(iter_adapters(other))) == 4

    wrong_shape = nn.Module()
    wrong_shape.enc = nn.Sequential(nn.Conv3d(1, 4, 3))
    with pytest.raises(AdapterFileError, match="layer 'enc.0' has weight shape"):
        load_adapter(wrong_shape, path)


def test_bad_adapter_files_give_one_clear_error(tmp_path):
    model = inject(TinyNet3d(), AdapterConfig("lora", rank=2))
    good = save_adapter(model, tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(AdapterFileError, match="truncated.safetensors: not a readable safetensors"):
        load_adapter(TinyNet3d(), truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(AdapterFileError, match="foreign.safetensors: safetensors file without medlora"):
        load_adapter(TinyNet3d(), foreign)
    pickled = tmp_path / "adapter.pt"
    torch.save({"x": 1}, pickled)
    with pytest.raises(AdapterFileError, match="adapter.pt: not a readable safetensors"):
        load_adapter(TinyNet3d(), pickled)
    with pytest.raises(AdapterFileError, match="missing.safetensors: adapter file not found"):
        load_adapter(TinyNet3d(), tmp_path / "missing.safetensors")


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    model = inject(TinyNet3d(), AdapterConfig("cp_lora", rank=2))
    save_adapter(model, tmp_path / "a.safetensors")
    save_adapter(model, tmp_path / "a.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


# ---------------------------------------------------------------- PEFT interop

peft = pytest.importorskip("peft")


def _peft_targets() -> list[str]:
    return ["c3", "c3_1", "c2", "c1", "fc"]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_loads_in_peft_with_the_same_outputs(method, tmp_path):
    base = MixedNet().eval()
    ours = inject(copy.deepcopy(base), AdapterConfig(method, rank=2, alpha=4, targets=_peft_targets()))
    randomise_(ours)
    export_peft(ours, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text(encoding="utf-8"))
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == (method == "dora")

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    x = torch.randn(2, 2, 3, 6, 5)
    expected = ours(x)
    torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(base(x), expected, atol=1e-4)  # the adapter really changes the output


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_trained_adapter_imports_with_peft_outputs(use_dora, tmp_path):
    base = MixedNet().eval()
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=_peft_targets(), use_dora=use_dora,
                             rank_pattern={"c2": 2}, alpha_pattern={"fc": 1.5})
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # stand-in for training: every adapter tensor moves away from its init
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    theirs.eval()

    ours = import_peft(copy.deepcopy(base), tmp_path / "peft")
    x = torch.randn(2, 2, 3, 6, 5)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    ranks = {n: r.config.rank for n, _, r in iter_adapters(ours)}
    assert ranks == {"c3": 3, "c3_1": 3, "c2": 2, "c1": 3, "fc": 3}
    assert adapters_of(ours.fc).config.alpha == 1.5


def test_export_refuses_what_peft_cannot_represent(tmp_path):
    model = inject(TinyNet3d(), AdapterConfig("lora", rank=2))
    with pytest.raises(ValueError, match="up: PEFT has no LoRA for ConvTranspose3d"):
        export_peft(model, tmp_path / "x")
    dilated = nn.Sequential(nn.Conv2d(2, 2, 3, dilation=2))
    inject(dilated, AdapterConfig("lora", rank=1))
    with pytest.raises(ValueError, match="0: dilated convolution"):
        export_peft(dilated, tmp_path / "y")
    cp = inject(MixedNet(), AdapterConfig("cp_lora", rank=2))
    with pytest.raises(ValueError, match=r"PEFT export supports one of \['dora', 'lora'\]"):
        export_peft(cp, tmp_path / "z")
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_import_refuses_pickled_peft_weights(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}), encoding="utf-8")
    torch.save({}, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="only a pickled adapter_model.bin, which medlora never loads"):
        import_peft(MixedNet(), tmp_path)


# ---------------------------------------------------------------- training works for every method


@pytest.mark.parametrize("method", METHODS)
def test_a_few_optimisation_steps_reduce_the_loss(method):
    torch.manual_seed(1)
    teacher = TinyNet3d()
    model = copy.deepcopy(teacher)
    with torch.no_grad():  # the target is the base network with perturbed weights: a small domain shift
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    inject(model, AdapterConfig(method, rank=2, exclude=["head"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=3e-2)
    x = torch.randn(4, 1, 8, 8, 4)
    target = teacher(x).detach()
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert parameter_report(model).total_trainable_params == sum(p.numel() for p in params)
