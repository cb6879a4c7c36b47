"""Trans-LoRA transfer (medlora.training.transfer, ``medlora transfer``): the distillation loss against a numpy
transcription, identity transfer, transfer across widths, the discriminator filter and the command's errors."""

import copy
import json

import numpy as np
import pytest
import torch

from medlora.adapters import AdapterConfig, inject, load_adapter, read_adapter_file, save_adapter
from medlora.cli import main
from medlora.fileio import atomic_save_safetensors
from medlora.models import create_model
from medlora.training.transfer import (
    SyntheticSpec,
    discriminator_filter,
    distill,
    distillation_loss,
    synthetic_samples,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = create_model("mv_unet", spatial_dims=2, level=1, width=width)
    net.eval()
    return net


def _adapted(width: int, seed: int) -> torch.nn.Module:
    """A tiny 2D network with a LoRA whose B is non-zero (a trained-looking adapter)."""
    net = _net(width, seed)
    inject(net, AdapterConfig("lora", rank=2, target_types=["Conv2d"]))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    return net


def _blobs(n: int, seed: int, size: int = 16, brightness: float = 0.0) -> torch.Tensor:
    """Images with a smooth background and one bright disc each: constructed 'scans'."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(n):
        cy, cx = torch.randint(3, size - 3, (2,), generator=g).tolist()
        r = 1.5 + 2 * torch.rand(1, generator=g).item()
        disc = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float()
        noise = 0.05 * torch.randn(size, size, generator=g)
        out.append(0.3 + brightness + 0.6 * disc + noise)
    return torch.stack(out).unsqueeze(1)


# ------------------------------------------------------------------------------------------ the loss


def _numpy_loss(zs, zt, t, w_lesion, beta):
    """The documented formula written out for a single-logit head with numpy (Bernoulli KL, batch soft Dice)."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    ps, pt = sig(zs / t), sig(zt / t)
    kl = pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))
    y = (sig(zt) >= 0.5).astype(np.float64)
    w = np.where(y > 0, w_lesion, 1.0)
    kl_term = t * t * (w * kl).sum() / w.sum()

    def dice(p):
        return 1 - (2 * (p * y).sum() + 1e-5) / (p.sum() + y.sum() + 1e-5)

    return kl_term + beta * (dice(sig(zs)) - dice(sig(zt)))


def test_distillation_loss_matches_a_numpy_transcription(float64_default):
    g = torch.Generator().manual_seed(1)
    zs, zt = 3 * torch.randn(2, 1, 5, 6, generator=g), 3 * torch.randn(2, 1, 5, 6, generator=g)
    loss, parts = distillation_loss(zs, zt, temperature=2.0, lesion_weight=5.0, dice_weight=0.7)
    ref = _numpy_loss(zs.numpy(), zt.numpy(), 2.0, 5.0, 0.7)
    assert float(loss) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert parts["kl"] > 0


def test_softmax_heads_use_the_same_kl_and_a_foreground_dice(float64_default):
    # a two-logit softmax head [0, z] is the single-logit head z: the loss must be the same number
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(1, 1, 4, 4, generator=g), torch.randn(1, 1, 4, 4, generator=g)
    single, _ = distillation_loss(zs, zt)
    two, _ = distillation_loss(torch.cat((torch.zeros_like(zs), zs), 1), torch.cat((torch.zeros_like(zt), zt), 1))
    assert float(two) == pytest.approx(float(single), rel=1e-10)


# ------------------------------------------------------------------------------------------ distillation


def test_identity_transfer_starts_at_zero_loss_and_reproduces_the_teacher():
    teacher = _adapted(4, seed=0)
    student = copy.deepcopy(teacher)  # the student starts as the teacher
    samples = _blobs(12, seed=3)
    with torch.no_grad():
        loss, parts = distillation_loss(student(samples), teacher(samples))
    assert float(loss) == 0.0 and parts == {"kl": 0.0, "dice": 0.0}
    # pure KL: zero gradients, so Adam leaves the student bitwise where it started
    history = distill(teacher, student, samples, steps=5, batch_size=4, dice_weight=0.0)
    assert history["losses"] == [0.0] * 5
    with torch.no_grad():
        assert torch.equal(student(samples), teacher(samples))
    # with the Dice term the student sharpens but keeps the teacher's labels
    history = distill(teacher, student, samples, steps=10, batch_size=4)
    assert history["first_loss"] == 0.0
    with torch.no_grad():
        assert torch.equal(student(samples) >= 0, teacher(samples) >= 0)


def test_transfer_across_widths_lowers_the_loss():
    teacher = _adapted(4, seed=0)
    student = _net(8, seed=5)  # another base, twice as wide: only outputs are matched
    inject(student, AdapterConfig("lora", rank=2, target_types=["Conv2d"]))
    samples = _blobs(24, seed=4)
    history = distill(teacher, student, samples, steps=40, batch_size=8, lr=1e-2)
    assert np.mean(history["losses"][-5:]) < 0.5 * history["first_loss"]


# ------------------------------------------------------------------------------------------ the filter


def test_the_filter_keeps_the_real_like_synthetic_samples():
    network = _net(4, seed=7)
    real = _blobs(16, seed=10)
    like = _blobs(20, seed=11)                   # same kind as the real samples, other draws
    off = _blobs(20, seed=12, brightness=0.35)   # off-distribution: a miscalibrated scanner
    keep, p_real = discriminator_filter(network, real, torch.cat((like, off)))
    assert keep[:20].float().mean() >= 0.8
    assert keep[20:].float().mean() <= 0.1
    assert p_real[:20].mean() > p_real[20:].mean()


# ------------------------------------------------------------------------------------------ the command


@pytest.fixture
def files(tmp_path):
    """An old base (width 4) with a LoRA adapter file as training writes it, and a new base of width 8."""
    record = {"backbone": "mv_unet", "backbone_args": {"level": 1, "width": 4}, "spatial_dims": 2,
              "pretrained": "old.safetensors", "finetune": None, "training_rule": None, "training_rule_options": {},
              "preprocessing": {"hu_window": [0.0, 140.0], "target_spacing": None, "roi_size": [48, 48],
                                "threshold": 0.5}}
    old = _net(4, seed=0)
    atomic_save_safetensors(old.state_dict(), tmp_path / "old.safetensors")
    inject(old, AdapterConfig("lora", rank=2, target_types=["Conv2d"]))
    with torch.no_grad():
        for p in old.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    save_adapter(old, tmp_path / "old_adapter.safetensors", extra_metadata=record)
    atomic_save_safetensors(_net(8, seed=1).state_dict(), tmp_path / "new.safetensors")
    return tmp_path


def _transfer_args(d, out="new_adapter.safetensors", teacher_model="old.safetensors"):
    return ["transfer", "--teacher-model", str(d / teacher_model), "--teacher-adapter",
            str(d / "old_adapter.safetensors"), "--model", str(d / "new.safetensors"), "--backbone-args",
            '{"level": 1, "width": 8}', "--method", "dora", "--rank", "2", "--out", str(d / out), "--steps", "2",
            "--batch-size", "2", "--synthetic-volumes", "1", "--synthetic-shape", "48", "48", "16",
            "--synthetic-spacing", "4", "4", "10"]


def test_transfer_command_writes_an_adapter_for_the_new_base_and_never_overwrites(files, capsys):
    assert main(_transfer_args(files)) == 0
    meta, _ = read_adapter_file(files / "new_adapter.safetensors")
    assert meta["configs"][0]["method"] == "dora" and meta["extra"]["backbone_args"] == {"level": 1, "width": 8}
    assert meta["extra"]["transfer"]["synthetic"]["samples"] == 16  # every axial slice of one 16-slice phantom
    new = create_model("mv_unet", spatial_dims=2, level=1, width=8)
    new.load_state_dict(_net(8, seed=1).state_dict())
    load_adapter(new, files / "new_adapter.safetensors")  # fits the new base (fingerprint checked)
    before = (files / "new_adapter.safetensors").read_bytes()
    capsys.readouterr()
    assert main(_transfer_args(files)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "exists; pass --overwrite" in err
    assert (files / "new_adapter.safetensors").read_bytes() == before


def test_transfer_command_refuses_a_teacher_adapter_on_another_base(files, capsys):
    atomic_save_safetensors(_net(4, seed=9).state_dict(), files / "other.safetensors")
    assert main(_transfer_args(files, teacher_model="other.safetensors")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "old_adapter.safetensors" in err and "base weights differ" in err
    assert not (files / "new_adapter.safetensors").exists()
    args = _transfer_args(files)
    args[args.index("--synthetic-shape") + 1:args.index("--synthetic-shape") + 4] = ["8", "8", "8"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--synthetic-shape" in err and "field of view" in err


# ------------------------------------------------------------------------------------------ SAM -> another SAM

SAM_OLD = {"variant": "tiny", "image_size": 32, "prompt": "none"}
# another SAM-style config: narrower (48), shallower (2 blocks), box-prompted (the whole slice as the box)
SAM_NEW = {"variant": "tiny", "image_size": 32, "embed_dim": 48, "depth": 2, "global_attn_indexes": [1],
           "prompt": "box"}
SAMED = {"fused_outputs": 3, "adapt_outputs": [0, 2]}  # LoRA on the q and v blocks of qkv (SAMed)


def _sam(args: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("sam", **args).eval()


@pytest.fixture
def sam_files(tmp_path):
    """A SAMed-style teacher: a tiny SAM, LoRA on q/v of every qkv and a retrained mask decoder (its
    ``finetune`` group, stored as extra tensors), as fit writes it; and a narrower, shallower box-prompted base."""
    old = _sam(SAM_OLD, seed=0)
    atomic_save_safetensors(old.state_dict(), tmp_path / "old.safetensors")
    inject(old, AdapterConfig("lora", rank=2, targets=["image_encoder.blocks.*.attn.qkv"], options=SAMED))
    decoder = [f"mask_decoder.{n}" for n, _ in old.mask_decoder.named_parameters()]
    with torch.no_grad():
        for p in old.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
        for p in old.mask_decoder.parameters():
            p.mul_(1.5)  # the "trained" head: logits spread over both classes
    record = {"backbone": "sam", "backbone_args": SAM_OLD, "spatial_dims": 2, "pretrained": "old.safetensors",
              "finetune": "mask_decoder", "preprocessing": {"hu_window": [-1024.0, 3071.0], "target_spacing": None,
                                                            "roi_size": [32, 32], "threshold": 0.5}}
    save_adapter(old, tmp_path / "old_adapter.safetensors", extra_metadata=record, extra_tensors=decoder)
    atomic_save_safetensors(_sam(SAM_NEW, seed=1).state_dict(), tmp_path / "new.safetensors")
    return tmp_path


def _sam_args(d, new_args, *extra):
    return ["transfer", "--teacher-model", str(d / "old.safetensors"), "--teacher-adapter",
            str(d / "old_adapter.safetensors"), "--model", str(d / "new.safetensors"), "--backbone-args",
            json.dumps(new_args), "--method", "lora", "--rank", "2", "--out", str(d / "new_adapter.safetensors"),
            "--batch-size", "4", "--synthetic-volumes", "1", "--synthetic-shape", "48", "48", "16",
            "--synthetic-spacing", "4", "4", "10", *extra]


def test_transfer_from_one_sam_config_to_another(sam_files):
    assert main(_sam_args(sam_files, SAM_NEW, "--steps", "40", "--lr", "0.01")) == 0
    meta, _ = read_adapter_file(sam_files / "new_adapter.safetensors")
    assert meta["extra"]["backbone_args"] == SAM_NEW and meta["extra"]["finetune"] == "mask_decoder"
    assert meta["configs"][0]["options"] == SAMED  # the teacher's LoRA layout (q and v only) carried over
    assert any(n.startswith("mask_decoder.") for n in meta["extra_tensors"])
    # the file loads on the new base (fingerprint checked); on the synthetic slices it is closer to the teacher
    # than the new base alone
    teacher = _sam(SAM_OLD, seed=0)
    load_adapter(teacher, sam_files / "old_adapter.safetensors")
    base, transferred = _sam(SAM_NEW, seed=1), _sam(SAM_NEW, seed=1)
    load_adapter(transferred, sam_files / "new_adapter.safetensors")
    x = synthetic_samples(SyntheticSpec(volumes=1, shape=(48, 48, 16), spacing=(4, 4, 10)), 2, [32, 32],
                          [-1024.0, 3071.0])
    with torch.no_grad():
        z_t = teacher(x)
        z_base, z_new = base(x), transferred(x)
        before, _ = distillation_loss(z_base, z_t)
        after, _ = distillation_loss(z_new, z_t)
        agree_before = ((z_base >= 0) == (z_t >= 0)).float().mean()
        agree_after = ((z_new >= 0) == (z_t >= 0)).float().mean()
    assert float(after) < float(before) - 0.05  # measured 0.098 -> -0.047 (a sharper student: Dice term < 0)
    assert float(agree_after) > float(agree_before) + 0.15  # the teacher's labels: measured 58% -> 88% of pixels


def test_sam_identity_transfer_starts_from_the_teacher(sam_files):
    assert main(_sam_args(sam_files, SAM_OLD, "--model", str(sam_files / "old.safetensors"), "--steps", "1")) == 0
    record = read_adapter_file(sam_files / "new_adapter.safetensors")[0]["extra"]["transfer"]
    # 0 up to rounding: the teacher runs merged (W0 + BA), the student with the adapter unmerged
    assert record["started_from_teacher"] and abs(record["first_loss"]) < 1e-6


def test_transfer_refuses_a_sam_student_with_other_classes_or_window(sam_files, capsys):
    assert main(_sam_args(sam_files, {**SAM_NEW, "prompt": "none", "num_classes": 2}, "--steps", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "new.safetensors" in err and "2 channel(s)" in err and "classes" in err
    assert not (sam_files / "new_adapter.safetensors").exists()
    # SAM reads its [0, 1] input as HU over input_window: another window than the teacher's samples is refused
    assert main(_sam_args(sam_files, {**SAM_NEW, "input_window": [0, 140]}, "--steps", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "new.safetensors" in err and "input_window" in err
    assert not (sam_files / "new_adapter.safetensors").exists()
