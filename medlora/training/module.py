"""The LightningModule of the toolkit: loss, training/validation/test steps, per-case metrics and the optimiser.

It receives a built network (:func:`medlora.assembly.build_model`; the way Lightning's own examples pass a
``backbone`` in) and that network's record (:class:`~medlora.assembly.ModelSpec`), which goes into the
hyper-parameters so that every checkpoint says what to build. What a run writes besides the weights (adapter
file, pruned checkpoints of adapter runs, preprocessing records) and the data-driven start of LoRA-GA/LoRA-SB
adapters are callbacks (:mod:`medlora.training.callbacks`).

Validation runs MONAI sliding-window inference on whole volumes (a 2D network runs slice by slice) and logs
per-case Dice, soft Dice, HD95 and volume error (see :mod:`medlora.evaluation.metrics`); under DDP the per-case
rows of all ranks are gathered and de-duplicated.

``segmentation_module`` is the ``model:`` section of ``medlora fit`` configs: the record's keys and the
module's settings in one flat list, built through :func:`~medlora.assembly.build_model`.
"""

# No `from __future__ import annotations` here: LightningCLI reads the factory's return annotation as a class.
import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from ..adapters import AdapterConfig, iter_adapters
from ..adapters.transplant import hold_norms_outside
from ..assembly import ModelSpec, build_model
from ..evaluation.metrics import case_metrics
from ..evaluation.predict import DEFAULT_SW_BATCH_SIZE, DEFAULT_SW_OVERLAP, DEFAULT_THRESHOLD, predict_volume
from ..evaluation.statistics import nanmean_std
from ..runs import STAGE_PREFIX
from .checks import SettingError, input_window_problem, positive
from .losses import forgetting_kl

LOGGED_METRICS = ("Dice", "soft_Dice", "HD95_mm", "volume_error_ml")


def spacing_of(image: torch.Tensor) -> tuple[float, ...]:
    """Voxel spacing in mm from a (batched) MetaTensor's affine."""
    affine = torch.as_tensor(image.affine)
    if affine.dim() == 3:
        affine = affine[0]
    n = affine.shape[0] - 1
    return tuple(float(v) for v in torch.linalg.norm(affine[:n, :n].double(), dim=0))


class SegmentationModule(pl.LightningModule):
    """Binary hemorrhage segmentation of a built network (with or without adapters).

    Args:
        network: the network to train, from :func:`medlora.assembly.build_model` (``requires_grad`` already says
            what trains); kept as ``self.model``, so checkpoint keys are ``model.<parameter>``.
        spec: the network's record (a :class:`~medlora.assembly.ModelSpec` or its ``to_dict()``), stored in the
            hyper-parameters; its training rule shapes the optimiser.
        loss: ``dice_ce`` (MONAI DiceCELoss) or ``soft_dice`` (the seed authors' batch soft Dice).
        lr, weight_decay: Adam(W) settings (the authors: Adam, 1e-3); ``lr`` is a training rule's rate too.
        norm_stats: ``update`` (BatchNorm statistics follow the target domain while training, as the
            seed authors' code; they are saved with the adapter) or ``freeze``.
        roi_size: sliding-window size for validation (default: the data module's patch size).
        sw_batch_size, sw_overlap: sliding-window batch and overlap.
        threshold: probability threshold for hard metrics.
        forgetting_weight: λ of the "Mask the Target" forgetting regulariser (:mod:`medlora.training.losses`):
            the loss becomes ``loss + λ · KL(base ‖ adapted)`` outside the target label. The base predictions
            come from a frozen copy of ``network`` taken here, before any training step (its adapters, still at
            their start, add nothing; evaluation mode; kept out of the state dict and checkpoints): one extra
            forward pass per step and one copy of the weights, but it serves every fine-tuning family alike
            (adapters, module-wise, full) and is exact where an adapter's start rewrites the frozen weight
            (PiSSA-style residuals), which switching the adapters off would not be. 0 (default) computes nothing
            and leaves the loss bitwise as it was.
    """

    def __init__(
        self,
        network: nn.Module,
        spec: ModelSpec | Mapping[str, Any],
        *,
        loss: str = "dice_ce",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        norm_stats: str = "update",
        roi_size: Sequence[int] | None = None,
        sw_batch_size: int = DEFAULT_SW_BATCH_SIZE,
        sw_overlap: float = DEFAULT_SW_OVERLAP,
        threshold: float = DEFAULT_THRESHOLD,
        forgetting_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(forgetting_weight) and forgetting_weight >= 0):
            raise ValueError(f"forgetting_weight must be a finite number >= 0, got {forgetting_weight!r}")
        if norm_stats not in ("update", "freeze"):
            raise ValueError(f"norm_stats must be 'update' or 'freeze', got {norm_stats!r}")
        if loss not in ("dice_ce", "soft_dice"):
            raise ValueError(f"loss must be 'dice_ce' or 'soft_dice', got {loss!r}")
        positive("lr", lr)
        self.model = network
        self.model_spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
        # The record's keys at the top level: `medlora infer` reads backbone, backbone_args, spatial_dims,
        # adapter, pretrained and threshold from a checkpoint's hyper_parameters.
        self.save_hyperparameters({
            **self.model_spec.to_dict(), "norm_stats": norm_stats, "loss": loss, "lr": lr,
            "weight_decay": weight_decay, "roi_size": None if roi_size is None else list(roi_size),
            "sw_batch_size": sw_batch_size, "sw_overlap": sw_overlap, "threshold": threshold,
            "forgetting_weight": forgetting_weight,
        })
        # a plain list keeps the frozen base out of submodules: no state-dict keys, no optimiser, no .train()
        self._frozen_base: list[nn.Module] = [self._freeze_copy(network)] if forgetting_weight > 0 else []
        if loss == "dice_ce":
            self.loss_fn: nn.Module = DiceCELoss(sigmoid=True)
        else:
            self.loss_fn = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self._val_rows: list[torch.Tensor] = []
        self.test_results: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------ training

    @property
    def is_adapter_run(self) -> bool:
        return next(iter_adapters(self.model), None) is not None

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_epoch_start(self) -> None:
        if self.hparams.norm_stats == "freeze":
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        finetune = self.model_spec.finetune or ""
        if finetune.startswith(STAGE_PREFIX) and "+" not in finetune and self.model_spec.adapter is None:
            # a NOT stage trains inside a frozen host: the host's normalisation statistics must not move either,
            # or the donor would not reproduce this network when inserted into the base
            hold_norms_outside(self.model, finetune[len(STAGE_PREFIX):])

    def model_inputs(self, batch: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        """The network's positional and keyword arguments for a training batch: the image, and for promptable
        backbones (SAM) boxes drawn from the labels."""
        image = torch.as_tensor(batch["image"])
        if getattr(self.model, "prompt", None) == "box":
            return (image,), {"boxes": self.model.training_boxes(torch.as_tensor(batch["label"]))}
        return (image,), {}

    def batch_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The task loss of one batch (no forgetting term)."""
        args, kwargs = self.model_inputs(batch)
        return self.loss_fn(self.model(*args, **kwargs), torch.as_tensor(batch["label"]))

    @staticmethod
    def _freeze_copy(network: nn.Module) -> nn.Module:
        # Adapters stay attached (merging the copy would strip the parametrisation class it shares with the
        # original, and input-dependent adapters cannot be merged); frozen at their start they add nothing.
        base = copy.deepcopy(network)
        base.eval()
        for p in base.parameters():
            p.requires_grad_(False)
        return base

    def training_loss(self, batch: dict[str, Any],
                      logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of ``logits``, the network's output on ``batch`` (``model_inputs``), and the terms to
        log besides it: with ``forgetting_weight`` > 0 the task loss + λ · the forgetting regulariser against the
        frozen base (its forward runs here). Split from the forward so that packed study jobs
        (:mod:`medlora.training.packing`), whose forward runs for several jobs at once, compute the same loss."""
        label = torch.as_tensor(batch["label"])
        if not self._frozen_base:
            return self.loss_fn(logits, label), {}
        args, kwargs = self.model_inputs(batch)
        base = self._frozen_base[0].to(args[0].device)
        with torch.no_grad():
            base_logits = base(*args, **kwargs)
        kl = forgetting_kl(logits, base_logits.to(logits.dtype), label)
        return self.loss_fn(logits, label) + self.hparams.forgetting_weight * kl, {"train/forgetting_kl": kl.detach()}

    def loss_with_forgetting(self, batch: dict[str, Any]) -> torch.Tensor:
        """Task loss + λ · the forgetting regulariser against the frozen base (``forgetting_weight`` > 0)."""
        args, kwargs = self.model_inputs(batch)
        loss, terms = self.training_loss(batch, self.model(*args, **kwargs))
        for name, value in terms.items():
            self.log(name, value, on_step=True, on_epoch=True, batch_size=args[0].shape[0])
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss_with_forgetting(batch)
        # sync_dist: under DDP the logged loss is the mean over ranks, not rank 0's share of the batch
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch["image"].shape[0],
                 sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: no parameter requires grad (finetune: none and no adapter)")
        rule = self.model_spec.training_rule
        if rule:
            from ..adapters.optim import build_optimizer

            return build_optimizer(self.model, rule=rule, lr=self.hparams.lr, **self.model_spec.training_rule_options)
        if self.hparams.weight_decay:
            return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return torch.optim.Adam(params, lr=self.hparams.lr)

    def on_fit_start(self) -> None:
        self.check_input_window()

    def check_input_window(self) -> None:
        """A backbone that maps intensities back to HU (SAM's CT windows) must see the data's HU window."""
        from .callbacks import preprocessing_record

        problem = input_window_problem(self.model, preprocessing_record(self._trainer, self)["hu_window"])
        if problem:
            raise SettingError("data.hu_window", problem)

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

    def _evaluate(self, batch: dict[str, Any], prob: torch.Tensor | None = None) -> dict[str, Any]:
        """The metric row of one validation case; ``prob``: its probability map if the caller has it already."""
        prob = self.predict_case(batch["image"]) if prob is None else prob
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


def segmentation_module(
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
    sw_batch_size: int = DEFAULT_SW_BATCH_SIZE,
    sw_overlap: float = DEFAULT_SW_OVERLAP,
    threshold: float = DEFAULT_THRESHOLD,
    training_rule: str | None = None,
    training_rule_options: dict[str, Any] | None = None,
    forgetting_weight: float = 0.0,
) -> SegmentationModule:
    """A :class:`SegmentationModule` around ``build_model(ModelSpec(...))``: the ``model:`` section of fit configs.

    Args:
        backbone: registered model name (``medlora.models.list_models()``).
        backbone_args: keyword arguments of the backbone (``spatial_dims`` defaults to this section's).
        spatial_dims: 3 for volumetric networks, 2 for slice networks.
        pretrained: base weights to load before adapters are attached (Lightning ``.ckpt``,
            ``.safetensors`` or a state-dict ``.pt``).
        adapter: adapter configuration; ``targets`` may name module groups as ``group:encoder``.
        finetune: without adapters, the module group to train (``all``, ``none``, ``shallow``,
            ``deep``, ``encoder``, ``decoder``; ``a+b`` for several); with adapters, a group to train as well
            (default none).
        norm_stats: ``update`` (BatchNorm statistics follow the target domain) or ``freeze``.
        loss: ``dice_ce`` (MONAI DiceCELoss) or ``soft_dice`` (the seed authors' batch soft Dice).
        lr, weight_decay: Adam(W) settings (the authors: Adam, 1e-3).
        roi_size: sliding-window size for validation (default: the training patch size).
        sw_batch_size, sw_overlap: sliding-window batch and overlap.
        threshold: probability threshold for hard metrics.
        training_rule: an adapter training rule of :mod:`medlora.adapters.optim` (``ffa``, ``stable_lora``,
            ``allora``, ``lora_pro``, ``altlora``, ...) instead of Adam(W); ``training_rule_options`` are its
            options (``medlora adapters --rules`` lists them), ``lr`` its learning rate.
        forgetting_weight: λ of the "Mask the Target" forgetting regulariser (0: off; see
            :class:`SegmentationModule`).
    """
    spec = ModelSpec(backbone=backbone, backbone_args=dict(backbone_args or {}), spatial_dims=spatial_dims,
                     pretrained=pretrained, adapter=adapter, finetune=finetune, training_rule=training_rule,
                     training_rule_options=dict(training_rule_options or {}))
    return SegmentationModule(build_model(spec), spec, loss=loss, lr=lr, weight_decay=weight_decay,
                              norm_stats=norm_stats, roi_size=roi_size, sw_batch_size=sw_batch_size,
                              sw_overlap=sw_overlap, threshold=threshold, forgetting_weight=forgetting_weight)
