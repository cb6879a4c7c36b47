"""A thin LightningModule around a segmentation network, its adapters, loss and per-case metrics.

The network comes from the model registry (``backbone``), optionally with pretrained base weights;
then either adapters are attached (``adapter``, an :class:`~medlora.adapters.AdapterConfig`) or a
module group is unfrozen for (module-wise) fine-tuning (``finetune``). Validation runs MONAI
sliding-window inference on whole volumes (a 2D network runs slice by slice) and logs per-case Dice,
soft Dice, HD95 and volume error (see :mod:`medlora.evaluation.metrics`).

Checkpoints of adapter runs hold only what training changed (adapters, unfrozen parameters,
normalisation statistics) plus the base weights' path and fingerprint; the adapter file is written
at the end of ``fit`` beside the checkpoints.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from ..adapters import AdapterConfig, base_fingerprint, inject, iter_adapters, parameter_report, save_adapter
from ..data.transforms import DEFAULT_HU_WINDOW
from ..evaluation.metrics import case_metrics, nanmean_std
from ..evaluation.predict import predict_volume
from ..models import create_model, group_module_names, group_parameters, set_trainable
from ..models.weights import load_weights
from .checks import SettingError, input_window_problem, positive

LOGGED_METRICS = ("Dice", "soft_Dice", "HD95_mm", "volume_error_ml")


def expand_group_targets(model: nn.Module, targets: Sequence[str] | None) -> list[str] | None:
    """Replace ``group:<name>`` entries (shallow, deep, encoder, decoder, all) by that group's layer names."""
    if targets is None:
        return None
    out: list[str] = []
    for t in targets:
        if t.startswith("group:"):
            names = group_module_names(model, t[len("group:"):], types=(nn.Conv2d, nn.Conv3d, nn.Linear,
                                                                         nn.ConvTranspose2d, nn.ConvTranspose3d))
            out += [f"re:{re.escape(n)}" for n in names]
        else:
            out.append(t)
    return out


def spacing_of(image: torch.Tensor) -> tuple[float, ...]:
    """Voxel spacing in mm from a (batched) MetaTensor's affine."""
    affine = torch.as_tensor(image.affine)
    if affine.dim() == 3:
        affine = affine[0]
    n = affine.shape[0] - 1
    return tuple(float(v) for v in torch.linalg.norm(affine[:n, :n].double(), dim=0))


def prepare_network(model: nn.Module, adapter: AdapterConfig | dict[str, Any] | None, finetune: str | None) -> None:
    """Attach ``adapter`` (its ``targets`` may name groups as ``group:encoder``) and unfreeze ``finetune`` on top;
    without an adapter, train only the module group ``finetune`` (default ``all``). In place."""
    if adapter is None:
        set_trainable(model, finetune or "all")
        return
    if isinstance(adapter, dict):
        adapter = AdapterConfig.from_dict(adapter)
    targets = expand_group_targets(model, adapter.targets)
    inject(model, AdapterConfig.from_dict({**adapter.to_dict(), "targets": targets}))
    if finetune not in (None, "none"):
        for p in group_parameters(model, finetune):
            p.requires_grad_(True)


class SegmentationModule(pl.LightningModule):
    """Binary hemorrhage segmentation with optional adapters.

    Args:
        backbone: registered model name (``medlora.models.list_models()``).
        backbone_args: keyword arguments of the backbone (``spatial_dims`` defaults to this module's).
        spatial_dims: 3 for volumetric networks, 2 for slice networks.
        pretrained: base weights to load before adapters are attached (Lightning ``.ckpt``,
            ``.safetensors`` or a state-dict ``.pt``).
        adapter: adapter configuration; ``targets`` may name module groups as ``group:encoder``.
        finetune: without adapters, the module group to train (``all``, ``none``, ``shallow``,
            ``deep``, ``encoder``, ``decoder``); with adapters, a group to unfreeze as well (default none).
        norm_stats: ``update`` (BatchNorm statistics follow the target domain while training, as the
            seed authors' code; they are saved with the adapter) or ``freeze``.
        loss: ``dice_ce`` (MONAI DiceCELoss) or ``soft_dice`` (the seed authors' batch soft Dice).
        lr, weight_decay: Adam(W) settings (the authors: Adam, 1e-3).
        roi_size: sliding-window size for validation (default: the training patch size).
        sw_batch_size, sw_overlap: sliding-window batch and overlap.
        threshold: probability threshold for hard metrics.
        adapter_path: where to write the adapter file at the end of fit (default: ``adapter.safetensors``
            in the checkpoint folder).
        training_rule: an adapter training rule of :mod:`medlora.adapters.optim` (``ffa``, ``stable_lora``,
            ``allora``, ``lora_pro``, ``altlora``, ...) instead of Adam(W); ``training_rule_options`` are its
            options (``medlora adapters --rules`` lists them), ``lr`` its learning rate.
    """

    def __init__(
        self,
        backbone: str = "mv_unet",
        backbone_args: dict[str, Any] | None = None,
        spatial_dims: int = 3,
        pretrained: str | None = None,
        adapter: AdapterConfig | None = None,
        finetune: str | None = None,
        norm_stats: str = "update",
        loss: str = "dice_ce",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        roi_size: Sequence[int] | None = None,
        sw_batch_size: int = 2,
        sw_overlap: float = 0.25,
        threshold: float = 0.5,
        adapter_path: str | None = None,
        training_rule: str | None = None,
        training_rule_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if norm_stats not in ("update", "freeze"):
            raise ValueError(f"norm_stats must be 'update' or 'freeze', got {norm_stats!r}")
        if loss not in ("dice_ce", "soft_dice"):
            raise ValueError(f"loss must be 'dice_ce' or 'soft_dice', got {loss!r}")
        self.save_hyperparameters()
        if isinstance(adapter, AdapterConfig):
            # plain data in the checkpoint, so that it loads with torch.load(weights_only=True)
            self.hparams["adapter"] = adapter.to_dict()
        positive("lr", lr)
        args = {"spatial_dims": spatial_dims, **(backbone_args or {})}
        self.model = create_model(backbone, **args)
        if pretrained:
            load_weights(self.model, pretrained)
        prepare_network(self.model, adapter, finetune)
        if adapter is not None:
            self.strict_loading = False  # checkpoints hold the trained part only; the base comes from `pretrained`
        if loss == "dice_ce":
            self.loss_fn: nn.Module = DiceCELoss(sigmoid=True)
        else:
            self.loss_fn = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self._val_rows: list[torch.Tensor] = []
        self.test_results: list[dict[str, Any]] = []
        self._fit_start = 0.0
        self.fit_seconds = 0.0

    # ------------------------------------------------------------------------------------ training

    @property
    def is_adapter_run(self) -> bool:
        return self.hparams.adapter is not None

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_epoch_start(self) -> None:
        if self.hparams.norm_stats == "freeze":
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image, label = torch.as_tensor(batch["image"]), torch.as_tensor(batch["label"])
        if getattr(self.model, "prompt", None) == "box":  # promptable backbones (SAM): boxes from the labels
            logits = self.model(image, boxes=self.model.training_boxes(label))
        else:
            logits = self.model(image)
        loss = self.loss_fn(logits, label)
        # sync_dist: under DDP the logged loss is the mean over ranks, not rank 0's share of the batch
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=image.shape[0],
                 sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: no parameter requires grad (finetune: none and no adapter)")
        if self.hparams.training_rule:
            from ..adapters.optim import build_optimizer

            return build_optimizer(self.model, rule=self.hparams.training_rule, lr=self.hparams.lr,
                                   **dict(self.hparams.training_rule_options or {}))
        if self.hparams.weight_decay:
            return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return torch.optim.Adam(params, lr=self.hparams.lr)

    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter()
        self.check_input_window()
        self.initialise_adapters_from_data()
        if self.trainer.is_global_zero and self.is_adapter_run:
            report = parameter_report(self.model)
            rank_zero_info(f"adapters: {len(report.layers)} layers, {report.total_trainable_params:,} trainable of "
                           f"{report.total_base_params:,} parameters ({report.percent:.2f}%)")

    def initialise_adapters_from_data(self) -> None:
        """Adapters initialised from gradients (LoRA-GA, LoRA-SB) see a few training batches before anything else
        (sanity validation included); not when resuming (global_step > 0: the checkpoint holds them)."""
        from ..adapters.data_init import data_adapters, initialise_from_data

        if not self.is_adapter_run or not data_adapters(self.model) or self.trainer.global_step > 0:
            return
        dm = self.trainer.datamodule
        loader = dm.train_dataloader() if dm is not None else self.trainer.fit_loop._data_source.dataloader()

        def loss_of(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            return self.loss_fn(model(torch.as_tensor(batch["image"])), torch.as_tensor(batch["label"]))

        initialise_from_data(self.model, loader, loss_of, max_batches=self.data_init_batches)
        rank_zero_info(f"adapters initialised from the gradients of up to {self.data_init_batches} training batches")

    data_init_batches = 8

    def on_fit_end(self) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_start
        if self.is_adapter_run and self.trainer.is_global_zero:
            self.write_adapter(self.adapter_file())

    def check_input_window(self) -> None:
        """A backbone that maps intensities back to HU (SAM's CT windows) must see the data's HU window."""
        problem = input_window_problem(self.model, self.preprocessing()["hu_window"])
        if problem:
            raise SettingError("data.hu_window", problem)

    # ------------------------------------------------------------------------------------ adapter files

    def adapter_file(self) -> Path:
        if self.hparams.adapter_path:
            return Path(self.hparams.adapter_path)
        cb = getattr(self.trainer, "checkpoint_callback", None)
        if cb is not None and cb.dirpath:
            return Path(cb.dirpath) / "adapter.safetensors"
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "adapter.safetensors"

    def extra_state_names(self) -> list[str]:
        """State entries besides adapters that training changed: unfrozen parameters, BN statistics."""
        adapter_ids = {id(p) for _, _, r in iter_adapters(self.model) for p in r.parameters()}
        names = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in adapter_ids]
        if self.hparams.norm_stats == "update":
            for mname, m in self.model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    names += [f"{mname}.running_mean", f"{mname}.running_var", f"{mname}.num_batches_tracked"]
        return names

    def preprocessing(self) -> dict[str, Any]:
        """What inference must repeat: HU window, resampling, sliding-window size (from the data module)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        hp = dict(dm.hparams) if dm is not None and hasattr(dm, "hparams") else {}
        roi = self.hparams.roi_size or hp.get("patch_size")
        return {"hu_window": list(hp.get("hu_window", DEFAULT_HU_WINDOW)),
                "target_spacing": None if hp.get("target_spacing") is None else list(hp["target_spacing"]),
                "roi_size": None if roi is None else list(roi), "threshold": self.hparams.threshold}

    def write_adapter(self, path: str | Path) -> Path:
        meta = {"backbone": self.hparams.backbone, "backbone_args": dict(self.hparams.backbone_args or {}),
                "spatial_dims": self.hparams.spatial_dims, "pretrained": self.hparams.pretrained,
                "preprocessing": self.preprocessing()}
        return save_adapter(self.model, path, extra_metadata=meta, extra_tensors=self.extra_state_names())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medlora_preprocessing"] = self.preprocessing()  # inference repeats it from the checkpoint
        if not self.is_adapter_run:
            return
        keep = {f"model.{n}" for n in self.extra_state_names()}
        keep |= {f"model.{layer}.parametrizations.weight.0.{p}" for layer, _, r in iter_adapters(self.model)
                 for p, _ in r.named_parameters()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["medlora"] = {"pretrained": self.hparams.pretrained,
                                 "base_fingerprint": base_fingerprint(self.model)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("medlora")
        if info and self.is_adapter_run and info["base_fingerprint"] != base_fingerprint(self.model):
            raise ValueError(
                f"checkpoint was trained on other base weights than {self.hparams.pretrained!r}: "
                "the base fingerprint differs"
            )

    # ------------------------------------------------------------------------------------ evaluation

    def _roi(self) -> Sequence[int]:
        if self.hparams.roi_size is not None:
            return self.hparams.roi_size
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "hparams") and "patch_size" in dm.hparams:
            return dm.hparams.patch_size
        raise ValueError("roi_size is not set and no datamodule provides patch_size")

    def predict_case(self, image: torch.Tensor) -> torch.Tensor:
        return predict_volume(self.model, image, self.hparams.spatial_dims, self._roi(),
                              self.hparams.sw_batch_size, self.hparams.sw_overlap)

    def _evaluate(self, batch: dict[str, Any]) -> dict[str, Any]:
        prob = self.predict_case(batch["image"])
        spacing = spacing_of(batch["image"])
        metrics = case_metrics(prob[0, 0].float().cpu(), torch.as_tensor(batch["label"])[0, 0].cpu(), spacing,
                               self.hparams.threshold)
        case_index = batch.get("case_index")
        idx = int(case_index[0]) if case_index is not None else -1
        case_id = batch["case_id"][0] if "case_id" in batch else str(idx)
        return {"case_id": case_id, "case_index": idx, "spacing": list(spacing), **metrics}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        row = self._evaluate(batch)
        self._val_rows.append(torch.tensor([row["case_index"]] + [row[m] for m in LOGGED_METRICS],
                                           dtype=torch.float64, device=self.device))

    def on_validation_epoch_end(self) -> None:
        if not self._val_rows:
            return
        rows = torch.stack(self._val_rows)
        self._val_rows.clear()
        gathered = self.all_gather(rows)  # (world, n, m) under DDP, (n, m) otherwise
        rows = gathered.reshape(-1, rows.shape[-1]).cpu()
        unique: dict[int, torch.Tensor] = {}
        for r in rows:  # the distributed sampler repeats cases to even out ranks
            unique.setdefault(int(r[0]), r)
        table = torch.stack(list(unique.values()))
        for j, name in enumerate(LOGGED_METRICS, start=1):
            values = table[:, j].tolist()
            if name == "volume_error_ml":
                values = [abs(v) for v in values]
                name = "abs_volume_error_ml"
            mean, _, _ = nanmean_std(values)
            self.log(f"val/{name}", mean if not math.isnan(mean) else float("nan"), prog_bar=name == "Dice",
                     sync_dist=False, rank_zero_only=False)
        self.log("val/cases", float(len(unique)))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.test_results.append(self._evaluate(batch))

    def on_test_epoch_end(self) -> None:
        for name in LOGGED_METRICS:
            mean, _, _ = nanmean_std([r[name] for r in self.test_results])
            self.log(f"test/{name}", mean)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {"case_id": batch.get("case_id", [str(batch_idx)])[0], "probability": self.predict_case(batch["image"])}
