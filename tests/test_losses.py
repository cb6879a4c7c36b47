"""The "Mask the Target" forgetting regulariser (medlora.training.losses) and its plumbing in SegmentationModule.

References are numpy loops over voxels (renormalised non-target distributions, Bernoulli KL by hand) and an
independently built base network; tiny networks (MV-UNet level 1, width 4) on 16 x 16 x 8 patches.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from medlora.adapters import AdapterConfig
from medlora.assembly import ModelSpec, build_model
from medlora.training import SegmentationModule, segmentation_module
from medlora.training.losses import forgetting_kl, masked_class_kl, masked_region_kl

ARCH = {"level": 1, "width": 4}
LORA = AdapterConfig("lora", rank=2, target_types=["Conv3d"], exclude=["M3.TripleOut.6"])

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*(does not have many workers|LeafSpec|val_dataloader|self.log)")]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def region_kl_by_hand(logits: np.ndarray, base: np.ndarray, label: np.ndarray) -> float:
    total, count = 0.0, 0
    for z, b, y in zip(logits.ravel(), base.ravel(), label.ravel(), strict=True):
        if y > 0.5:
            continue
        p, q = _sigmoid(z), _sigmoid(b)
        total += q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
        count += 1
    return total / count


def class_kl_by_hand(logits: np.ndarray, base: np.ndarray, target: np.ndarray) -> float:
    """Per voxel: drop the target class from both softmax distributions, renormalise, KL(base || adapted)."""
    n_classes = logits.shape[1]
    z = np.moveaxis(logits, 1, -1).reshape(-1, n_classes)
    b = np.moveaxis(base, 1, -1).reshape(-1, n_classes)
    total = 0.0
    for zv, bv, y in zip(z, b, target.ravel(), strict=True):
        p, q = np.exp(zv) / np.exp(zv).sum(), np.exp(bv) / np.exp(bv).sum()
        keep = [c for c in range(n_classes) if c != y]
        p_t, q_t = p[keep] / (1 - p[y]), q[keep] / (1 - q[y])
        total += float(np.sum(q_t * np.log(q_t / p_t)))
    return total / len(z)


def test_binary_region_form_against_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 4, 3, 2, generator=g, dtype=torch.float64) * 3
    base = torch.randn(2, 1, 4, 3, 2, generator=g, dtype=torch.float64) * 3
    label = (torch.rand(2, 1, 4, 3, 2, generator=g) > 0.6).double()
    value = masked_region_kl(logits, base, label)
    assert value.item() == pytest.approx(region_kl_by_hand(logits.numpy(), base.numpy(), label.numpy()), rel=1e-12)
    assert forgetting_kl(logits, base, label).item() == value.item()  # a single channel takes the region form
    # what happens on the target label is free: changing the adapted logits there changes nothing
    moved = torch.where(label > 0.5, logits + 5.0, logits)
    assert masked_region_kl(moved, base, label).item() == pytest.approx(value.item(), rel=1e-12)
    assert masked_region_kl(base, base, label).item() == pytest.approx(0.0, abs=1e-15)
    assert masked_region_kl(logits, base, torch.ones_like(label)).item() == 0.0


def test_multi_class_form_against_a_hand_loop_and_blind_to_the_target_logit():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 4, 3, 3, 2, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    base = torch.randn(2, 4, 3, 3, 2, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, 4, (2, 1, 3, 3, 2), generator=g)
    value = masked_class_kl(logits, base, target)
    assert value.item() == pytest.approx(class_kl_by_hand(logits.detach().numpy(), base.numpy(), target.numpy()),
                                         rel=1e-12)
    assert masked_class_kl(logits, base, target[:, 0]).item() == value.item()  # (N, *spatial) targets too
    assert forgetting_kl(logits, base, target).item() == value.item()
    value.backward()
    grad = logits.grad
    on_target = torch.gather(grad, 1, target)
    assert torch.count_nonzero(on_target) == 0  # the term cannot move the target class's logit: exactly 0
    off_target = grad.masked_select(torch.ones_like(grad, dtype=torch.bool).scatter(1, target, False))
    assert torch.count_nonzero(off_target) == off_target.numel()
    # the target's logit does not enter the value either
    bumped = logits.detach().scatter_add(1, target, torch.full(target.shape, 7.0, dtype=torch.float64))
    assert masked_class_kl(bumped, base, target).item() == pytest.approx(value.item(), rel=1e-12)


def test_two_class_softmax_head_is_refused():
    logits = torch.zeros(1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="identically zero"):
        masked_class_kl(logits, logits, torch.zeros(1, 1, 2, 2, 2, dtype=torch.long))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(2, 1, 16, 16, 8, generator=g),
            "label": (torch.rand(2, 1, 16, 16, 8, generator=g) > 0.8).float()}


@pytest.fixture
def base_file(tmp_path):
    torch.manual_seed(3)
    path = tmp_path / "base.safetensors"
    save_file(build_model(ModelSpec("mv_unet", dict(ARCH))).state_dict(), str(path))
    return path


def _module(base_file, weight: float) -> SegmentationModule:
    spec = ModelSpec("mv_unet", dict(ARCH), adapter=LORA, pretrained=str(base_file))
    return SegmentationModule(build_model(spec), spec, roi_size=[16, 16, 8], forgetting_weight=weight)


def test_zero_weight_is_the_plain_loss_bitwise(base_file):
    module = _module(base_file, 0.0)
    plain = _module(base_file, 0.0)
    batch = _batch()
    loss = module.training_step(batch, 0)
    assert torch.equal(loss, plain.loss_fn(plain.model(batch["image"]), batch["label"]))
    assert module.hparams.forgetting_weight == 0.0
    with pytest.raises(ValueError, match="forgetting_weight"):
        _module(base_file, -1.0)
    with pytest.raises(ValueError, match="forgetting_weight"):
        _module(base_file, float("nan"))


def test_positive_weight_adds_the_region_kl_against_the_untrained_base(base_file):
    weight = 0.5
    module = _module(base_file, weight)
    keys = set(_module(base_file, 0.0).state_dict())
    assert set(module.state_dict()) == keys  # the frozen base is not saved in checkpoints
    with torch.no_grad():  # move the adapters away from zero, as training would
        g = torch.Generator().manual_seed(4)
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    batch = _batch()
    loss = module.training_step(batch, 0)

    base = build_model(ModelSpec("mv_unet", dict(ARCH), pretrained=str(base_file))).eval()  # built independently
    with torch.no_grad():
        base_logits = base(batch["image"]).double().numpy()
        logits = module.model(batch["image"])  # training mode, as in the step
        plain = module.loss_fn(logits, batch["label"]).item()
    kl = region_kl_by_hand(logits.double().numpy(), base_logits, batch["label"].numpy())
    assert kl > 1e-4
    assert loss.item() == pytest.approx(plain + weight * kl, rel=1e-5)


def test_fit_with_the_regulariser_trains_the_adapter_and_keeps_the_base(base_file):
    module = segmentation_module(backbone_args=dict(ARCH), pretrained=str(base_file), adapter=LORA,
                                 roi_size=[16, 16, 8], lr=0.05, forgetting_weight=1.0)
    frozen = {k: v.clone() for k, v in module._frozen_base[0].state_dict().items()}
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", num_sanity_val_steps=0, logger=False, enable_checkpointing=False)
    samples = [{k: v[0] for k, v in _batch().items()} for _ in range(2)]
    trainer.fit(module, DataLoader(samples, batch_size=1))
    assert trainer.callback_metrics["train/forgetting_kl_epoch"] > 0
    assert all(torch.equal(v, frozen[k]) for k, v in module._frozen_base[0].state_dict().items())
    assert not module._frozen_base[0].training
