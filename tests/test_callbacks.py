"""The training callbacks: where the adapter file goes (never the current folder), what an adapter run's checkpoint
holds, and data-driven adapter starts (with and without a data module, and not redone when resuming).

Tiny networks (MV-UNet level 1, width 4) on 16 x 16 x 8 random patches keep each fit to a few steps.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from medlora.adapters import AdapterConfig, AdapterFileError, iter_adapters, read_adapter_file
from medlora.assembly import ModelSpec, build_model
from medlora.training import SegmentationModule, run_callbacks, segmentation_module

ARCH = {"level": 1, "width": 4}
CONVS = {"target_types": ["Conv3d"], "exclude": ["M3.TripleOut.6"]}

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*(does not have many workers|LeafSpec|val_dataloader)")]


def samples(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(1, 16, 16, 8, generator=g), "label": (torch.rand(1, 16, 16, 8, generator=g) > 0.7)
             .float()} for _ in range(n)]


class TinyData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(samples(), batch_size=1)


def module(adapter: AdapterConfig, pretrained: Path | None = None) -> SegmentationModule:
    spec = ModelSpec("mv_unet", dict(ARCH), adapter=adapter, pretrained=pretrained)
    return SegmentationModule(build_model(spec), spec, roi_size=[16, 16, 8], lr=0.05)


def fit(mod: SegmentationModule, data: pl.LightningDataModule | DataLoader, ckpt_path: str | None = None,
        callbacks: tuple = (), **trainer_kw) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", num_sanity_val_steps=0, callbacks=[*run_callbacks(), *callbacks],
                         **{"logger": False, **trainer_kw})
    if isinstance(data, DataLoader):
        trainer.fit(mod, data, ckpt_path=ckpt_path)
    else:
        trainer.fit(mod, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_adapter_file_goes_to_the_checkpoint_folder_and_never_to_the_current_folder(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    loader = DataLoader(samples(), batch_size=1)

    # with checkpointing: beside the checkpoints
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    fit(module(AdapterConfig("lora", rank=1, **CONVS)), loader, callbacks=(ck,))
    assert (tmp_path / "ck" / "adapter.safetensors").is_file()
    # the checkpoint holds the trained part only, plus the base identity and the preprocessing record
    last = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert last["state_dict"] and all(".parametrizations.weight.0." in k or ".running_" in k or "num_batches" in k
                                      for k in last["state_dict"])
    assert set(last["medlora"]) == {"pretrained", "base_fingerprint"}
    assert last["medlora_preprocessing"]["roi_size"] == [16, 16, 8]
    hp = last["hyper_parameters"]
    assert hp["backbone_args"] == ARCH and hp["adapter"]["method"] == "lora" and hp["threshold"] == 0.5
    # LightningCLI parses a --ckpt_path file's hyper-parameters back as the `model:` section
    assert set(hp) == set(inspect.signature(segmentation_module).parameters)

    # no checkpoints, no logger: the trainer's default_root_dir
    fit(module(AdapterConfig("lora", rank=1, **CONVS)), loader, enable_checkpointing=False,
        default_root_dir=str(tmp_path / "root"))
    assert (tmp_path / "root" / "adapter.safetensors").is_file()

    # nothing set at all (default_root_dir is then the current folder): a subfolder, never the folder itself
    fit(module(AdapterConfig("lora", rank=1, **CONVS)), loader, enable_checkpointing=False)
    assert sorted(os.listdir(cwd)) == ["lightning_logs"]
    meta, _ = read_adapter_file(cwd / "lightning_logs" / "adapter.safetensors")
    assert meta["extra"]["backbone"] == "mv_unet" and meta["extra"]["preprocessing"]["roi_size"] == [16, 16, 8]


def lora_ga_file_factors(path: Path) -> dict[str, torch.Tensor]:
    _, tensors = read_adapter_file(path)
    return {k: v for k, v in tensors.items() if k.endswith(".lora_A")}


def test_data_initialised_adapters_start_from_the_data_and_a_resumed_run_keeps_its_factors(tmp_path):
    ga = AdapterConfig("lora_ga", rank=1, **CONVS)
    base = tmp_path / "base.safetensors"
    save_file(build_model(ModelSpec("mv_unet", dict(ARCH))).state_dict(), str(base))
    # without a data module the start comes from trainer.train_dataloader at on_train_start
    plain = module(ga)
    fit(plain, DataLoader(samples(), batch_size=1), enable_checkpointing=False, default_root_dir=str(tmp_path / "a"))
    started = lora_ga_file_factors(tmp_path / "a" / "adapter.safetensors")
    assert started and all(torch.isfinite(v).all() for v in started.values())

    # with a data module, before anything else; the trained factors are in last.ckpt
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    first = module(ga, base)
    fit(first, TinyData(), callbacks=(ck,))
    trained = {f"model.{n}.parametrizations.weight.0.lora_A": r.lora_A.detach().clone()
               for n, _, r in iter_adapters(first.model)}
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in trained.items())

    # resuming (nothing left to train: max_epochs is reached) must not draw a new start from the data
    resumed = module(ga, base)
    fit(resumed, TinyData(), ckpt_path=str(tmp_path / "ck" / "last.ckpt"),
        callbacks=(ModelCheckpoint(dirpath=tmp_path / "ck2", save_last=True),))
    again = {f"model.{n}.parametrizations.weight.0.lora_A": r.lora_A.detach()
             for n, _, r in iter_adapters(resumed.model)}
    assert all(torch.equal(again[k], v) for k, v in trained.items())
    written = lora_ga_file_factors(tmp_path / "ck2" / "adapter.safetensors")
    assert all(torch.equal(written[k[len("model."):].replace(".parametrizations.weight.0", "")], v)
               for k, v in trained.items())

    # a checkpoint made on another base is refused when resuming
    other = tmp_path / "other.safetensors"
    save_file(build_model(ModelSpec("mv_unet", dict(ARCH))).state_dict(), str(other))
    with pytest.raises(AdapterFileError, match="last.ckpt: checkpoint was trained on other base weights than"):
        fit(module(ga, other), TinyData(), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
