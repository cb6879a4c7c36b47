"""NOT (medlora.adapters.transplant): stages, donor files, transplanting, refusal of wrong recipients, and the
study method ``transplant`` in ``medlora crossval``."""

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from medlora.adapters.transplant import (
    DonorFileError,
    freeze_outside,
    hold_norms_outside,
    save_donor,
    stage_modules,
    stage_neighbours,
    transplant,
)
from medlora.cli import main
from medlora.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(seed: int, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("mv_unet", spatial_dims=2, level=2, width=width)


class _Blocks(nn.Module):
    """A ViT-like stack: an embedding, numbered blocks and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(5))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def test_stages_name_a_module_or_a_contiguous_range_of_blocks():
    vit = _Blocks()
    assert stage_modules(vit, "blocks.1:4") == ["blocks.1", "blocks.2", "blocks.3"]
    assert stage_neighbours(vit, "blocks.1:4") == {"before": "blocks.0", "after": "blocks.4"}
    assert stage_neighbours(vit, "blocks.0:5") == {"before": None, "after": None}
    unet = _unet(0)
    assert stage_modules(unet, "down_list.1") == ["down_list.1"]
    assert stage_neighbours(unet, "M2") == {"before": "down_list", "after": "up_list"}
    for bad, said in (("blocks.3:9", "no child '5'"), ("blocks.3:3", "empty range"), ("nope", "no module")):
        with pytest.raises(ValueError, match=said):
            stage_modules(vit, bad)


def _batches(n: int = 4):
    g = torch.Generator().manual_seed(3)
    return [(torch.rand(2, 1, 16, 16, generator=g), (torch.rand(2, 1, 16, 16, generator=g) > 0.7).float())
            for _ in range(n)]


def _in_place_reference(base: nn.Module, prefix: str) -> nn.Module:
    """Training one block alone, written out by hand: only parameters under ``prefix`` train, every norm layer
    elsewhere in evaluation mode."""
    model = copy.deepcopy(base)
    model.train()
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and not (name == prefix or name.startswith(prefix + ".")):
            m.eval()
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefix + "."))
        if p.requires_grad:
            params.append(p)
    torch.manual_seed(11)
    opt = torch.optim.Adam(params, lr=1e-2)
    for x, y in _batches():
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_extract_train_insert_equals_training_the_block_in_place_bitwise(tmp_path):
    base = _unet(0)
    reference = _in_place_reference(base, "down_list.1")
    host = copy.deepcopy(base)  # the donor's host: a copy of the recipient, the stage extracted in it
    host.train()
    params = freeze_outside(host, "down_list.1")
    torch.manual_seed(11)
    opt = torch.optim.Adam(params, lr=1e-2)
    for x, y in _batches():
        hold_norms_outside(host, "down_list.1")
        loss = nn.functional.binary_cross_entropy_with_logits(host(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_donor(host, "down_list.1", tmp_path / "donor.safetensors")
    donor = load_file(str(tmp_path / "donor.safetensors"))
    assert donor and all(k.startswith("down_list.1.") for k in donor)
    assert any(k.endswith("running_mean") for k in donor)  # the stage's own statistics travel with it
    recipient = transplant(copy.deepcopy(base), tmp_path / "donor.safetensors")
    expected = reference.state_dict()
    got = recipient.state_dict()
    assert expected.keys() == got.keys()
    changed = [k for k in expected if not torch.equal(expected[k], base.state_dict()[k])]
    assert changed and all(k.startswith("down_list.1.") for k in changed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_mismatched_recipient_is_refused_in_one_line_and_left_untouched(tmp_path):
    base = _unet(0)
    save_donor(base, "down_list.1", tmp_path / "donor.safetensors")
    other = _unet(1)  # the same architecture, another network around the stage
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(DonorFileError) as info:
        transplant(other, tmp_path / "donor.safetensors")
    message = str(info.value)
    assert "\n" not in message and "donor.safetensors" in message and "neighbouring block 'down_list.0'" in message
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(DonorFileError, match=r"is \(8,\) in the recipient, \(4,\) in the donor"):
        transplant(_unet(0, width=8), tmp_path / "donor.safetensors")
    # a deliberate transplant into another host checks names and shapes only
    transplant(other, tmp_path / "donor.safetensors", strict=False)
    assert torch.equal(other.state_dict()["down_list.1.M1.DoubleConv.0.weight"],
                       base.state_dict()["down_list.1.M1.DoubleConv.0.weight"])


def test_a_corrupt_donor_file_is_refused(tmp_path):
    path = tmp_path / "donor.safetensors"
    save_donor(_unet(0), "M2", path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DonorFileError, match="checksum|finite"):
        transplant(_unet(0), path)


def test_the_transplant_study_method_trains_its_stage_and_writes_a_donor_that_rebuilds_the_model(tmp_path, capsys):
    from medlora.data.phantoms import write_dataset

    torch.manual_seed(0)
    from safetensors.torch import save_file

    base_net = create_model("mv_unet", spatial_dims=3, level=1, width=4)
    save_file(base_net.state_dict(), str(tmp_path / "base.safetensors"))
    data = write_dataset(tmp_path / "sah", "sah", 4, seed=1, shape=(48, 48, 16), spacing=(4, 4, 10))
    config = {
        "name": "tiny", "seeds": [0], "folds": 2, "target": {"data_dir": str(data)},
        "model": {"backbone": "mv_unet", "backbone_args": {"level": 1, "width": 4},
                  "pretrained": str(tmp_path / "base.safetensors")},
        "data": {"spatial_dims": 3, "patch_size": [32, 32, 16], "batch_size": 1, "samples_per_volume": 1},
        "trainer": {"max_steps": 2},
        "methods": [{"name": "transplant", "stage": "down_list.0"}],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["crossval", "--config", str(tmp_path / "study.yaml"), "--out", str(run), "--only", "fold=0"]) == 0
    job = run / "jobs" / "transplant_down_list.0" / "seed_0" / "cases_all" / "fold_0"
    summary = json.loads((job / "summary.json").read_text(encoding="utf-8"))
    stage_params = sum(p.numel() for n, p in base_net.named_parameters() if n.startswith("down_list.0."))
    assert summary["medlora"]["trainable_params"] == stage_params
    trained = load_file(str(job / "model.safetensors"))
    rebuilt = transplant(copy.deepcopy(base_net), job / "donor.safetensors").state_dict()
    assert all(torch.equal(trained[k], rebuilt[k]) for k in trained)  # the host stayed the base, stats included
    assert not torch.equal(trained["down_list.0.M1.DoubleConv.0.weight"],
                           base_net.state_dict()["down_list.0.M1.DoubleConv.0.weight"])
    # a stage the network lacks is one line naming the method entry's key
    config["methods"] = [{"name": "transplant", "stage": "down_list.7"}]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    capsys.readouterr()
    assert main(["crossval", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "study.methods[0].stage" in err and "down_list.7" in err
