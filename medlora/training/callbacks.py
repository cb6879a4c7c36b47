"""Lightning callbacks of a medlora run: records in checkpoints, the adapter file, data-driven adapter starts.

They work on a LightningModule that exposes its network as ``.model`` and its record
(:class:`~medlora.assembly.ModelSpec`) as ``.model_spec``, as :class:`~medlora.training.SegmentationModule` does;
``medlora fit`` adds them all (:func:`run_callbacks`), ``medlora crossval`` too.

* :class:`CheckpointRecords`: every checkpoint carries the preprocessing inference must repeat
  (``medlora_preprocessing``). A checkpoint of an adapter run keeps only what training changed (adapters,
  unfrozen parameters, normalisation statistics) plus the base weights' path and fingerprint
  (``checkpoint["medlora"]``); resuming from it checks that fingerprint against the base it is loaded onto.
* :class:`AdapterFileWriter`: at the end of ``fit`` the adapters are written to ``adapter.safetensors``
  (the adapter file format of :func:`medlora.adapters.save_adapter`) with the model record and preprocessing
  in its metadata.
* :class:`AdapterInitFromData`: LoRA-GA (arXiv 2407.05000) and LoRA-SB (arXiv 2411.19557) adapters get their
  start from the gradients of a few training batches before anything else runs.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..adapters import AdapterFileError, base_fingerprint, iter_adapters, parameter_report, save_adapter
from ..data.transforms import DEFAULT_HU_WINDOW

__all__ = [
    "InterruptBetweenSteps",
    "ADAPTER_FILE",
    "AdapterFileWriter",
    "AdapterInitFromData",
    "CheckpointRecords",
    "extra_state_names",
    "preprocessing_record",
    "run_callbacks",
    "write_adapter_file",
]

ADAPTER_FILE = "adapter.safetensors"


def _has_adapters(network: nn.Module) -> bool:
    return next(iter_adapters(network), None) is not None


def extra_state_names(network: nn.Module, norm_stats: str = "update") -> list[str]:
    """State entries besides adapters that training changed: unfrozen parameters and, when normalisation
    statistics follow the target data (``norm_stats="update"``), BatchNorm running statistics."""
    adapter_ids = {id(p) for _, _, r in iter_adapters(network) for p in r.parameters()}
    names = [n for n, p in network.named_parameters() if p.requires_grad and id(p) not in adapter_ids]
    if norm_stats == "update":
        for mname, m in network.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                names += [f"{mname}.running_mean", f"{mname}.running_var", f"{mname}.num_batches_tracked"]
    return names


def preprocessing_record(trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> dict[str, Any]:
    """What inference must repeat: HU window and resampling (from the data module), sliding-window size and
    threshold (from the module; the window defaults to the training patch size)."""
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    hp = dict(dm.hparams) if dm is not None and hasattr(dm, "hparams") else {}
    roi = pl_module.hparams.get("roi_size") or hp.get("patch_size")
    return {"hu_window": list(hp.get("hu_window", DEFAULT_HU_WINDOW)),
            "target_spacing": None if hp.get("target_spacing") is None else list(hp["target_spacing"]),
            "roi_size": None if roi is None else list(roi), "threshold": pl_module.hparams.get("threshold")}


def write_adapter_file(trainer: pl.Trainer | None, pl_module: pl.LightningModule, path: str | Path) -> Path:
    """Write the adapters of ``pl_module.model`` to ``path`` with the model record (backbone, base weights,
    what else trained) and the preprocessing in the file's metadata (``extra``), as inference reads them."""
    record = pl_module.model_spec.to_dict()
    record.pop("adapter")  # the file holds the adapter's own config
    meta = {**record, "preprocessing": preprocessing_record(trainer, pl_module)}
    for callback in getattr(trainer, "callbacks", ()):  # e.g. LoRAPrune's importance and masks
        meta.update(getattr(callback, "adapter_file_records", lambda: {})())
    norm_stats = pl_module.hparams.get("norm_stats", "update")
    return save_adapter(pl_module.model, path, extra_metadata=meta,
                        extra_tensors=extra_state_names(pl_module.model, norm_stats))


class CheckpointRecords(pl.Callback):
    """Preprocessing record in every checkpoint; adapter runs keep only their trained part and the base identity.

    With adapters, the module loads checkpoints non-strictly (they lack the frozen base, which comes from the
    record's ``pretrained``), and a checkpoint made on another base is refused when resuming.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if _has_adapters(pl_module.model):
            pl_module.strict_loading = False

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["medlora_preprocessing"] = preprocessing_record(trainer, pl_module)
        network = pl_module.model
        if not _has_adapters(network):
            return
        norm_stats = pl_module.hparams.get("norm_stats", "update")
        keep = {f"model.{n}" for n in extra_state_names(network, norm_stats)}
        keep |= {f"model.{layer}.parametrizations.weight.0.{p}" for layer, _, r in iter_adapters(network)
                 for p, _ in r.named_parameters()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["medlora"] = {"pretrained": pl_module.model_spec.pretrained,
                                 "base_fingerprint": base_fingerprint(network)}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("medlora")
        network = pl_module.model
        if info and _has_adapters(network) and info["base_fingerprint"] != base_fingerprint(network):
            raise AdapterFileError(
                f"{trainer.ckpt_path}: checkpoint was trained on other base weights than "
                f"{pl_module.model_spec.pretrained!r}: the base fingerprint differs"
            )


class AdapterFileWriter(pl.Callback):
    """Writes the adapter file at the end of ``fit`` (rank zero only; a run without adapters writes nothing).

    Args:
        path: where to write it. Default: ``adapter.safetensors`` in the checkpoint folder, or, without
            checkpointing, in the trainer's log folder (``default_root_dir`` without a logger); when that is the
            current folder itself, in its ``lightning_logs`` subfolder. Never a path relative to wherever the
            process happens to run.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.destination: Path | None = None

    def resolve(self, trainer: pl.Trainer) -> Path:
        if self.path:
            return Path(self.path).absolute()
        cb = trainer.checkpoint_callback
        if cb is not None and getattr(cb, "dirpath", None):
            return Path(cb.dirpath).absolute() / ADAPTER_FILE
        folder = Path(trainer.log_dir or trainer.default_root_dir).absolute()
        if folder.resolve() == Path.cwd().resolve():
            folder = folder / "lightning_logs"
        return folder / ADAPTER_FILE

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _has_adapters(pl_module.model):
            return
        # resolved here on every rank: trainer.log_dir is a collective call under DDP, on_fit_end runs on rank 0
        self.destination = self.resolve(trainer)
        if trainer.is_global_zero:
            report = parameter_report(pl_module.model)
            rank_zero_info(f"adapters: {len(report.layers)} layers, {report.total_trainable_params:,} trainable of "
                           f"{report.total_base_params:,} parameters ({report.percent:.2f}%)")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.destination is not None and trainer.is_global_zero:
            write_adapter_file(trainer, pl_module, self.destination)


class AdapterInitFromData(pl.Callback):
    """Initialises LoRA-GA / LoRA-SB adapters from the mean gradient of up to ``max_batches`` training batches
    (:func:`medlora.adapters.initialise_from_data`), never when resuming (the checkpoint holds them).

    With a data module this happens at the start of ``fit``, before the sanity validation; with dataloaders
    passed to ``fit`` directly, at the start of training (Lightning hands those over only then), so set
    ``num_sanity_val_steps=0`` there: an adapter without its start point refuses to run.

    Args:
        max_batches: training batches whose loss gradients are averaged.
    """

    def __init__(self, max_batches: int = 8) -> None:
        if max_batches < 1:
            raise ValueError(f"max_batches must be at least 1, got {max_batches}")
        self.max_batches = max_batches
        self._pending = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from ..adapters.data_init import data_adapters

        self._pending = False
        # At on_fit_start a resumed run has its weights restored but not yet its step count: ckpt_path tells.
        if not data_adapters(pl_module.model) or trainer.ckpt_path is not None or trainer.global_step > 0:
            return
        if trainer.datamodule is not None:
            self._initialise(pl_module, trainer.datamodule.train_dataloader())
        else:
            self._pending = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending:
            self._pending = False
            self._initialise(pl_module, trainer.train_dataloader)

    def _initialise(self, pl_module: pl.LightningModule, loader: Any) -> None:
        from ..adapters.data_init import initialise_from_data

        def loss_of(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            return pl_module.batch_loss(pl_module.transfer_batch_to_device(batch, pl_module.device, 0))

        initialise_from_data(pl_module.model, loader, loss_of, max_batches=self.max_batches)
        rank_zero_info(f"adapters initialised from the gradients of up to {self.max_batches} training batches")


def run_callbacks(adapter_path: str | Path | None = None, data_init_batches: int = 8) -> list[pl.Callback]:
    """The callbacks every medlora training run uses (what ``medlora fit`` adds; ``crossval`` passes its job's
    ``adapter_path``)."""
    return [AdapterInitFromData(data_init_batches), CheckpointRecords(),
            AdapterFileWriter(None if adapter_path is None else str(adapter_path))]


class InterruptBetweenSteps(pl.Callback):
    """Ctrl-C during ``fit`` takes effect at the next training or validation step boundary.

    Python raises ``KeyboardInterrupt`` wherever the main thread is when the signal arrives. Inside a library's
    ``with lock:`` the lock can stay held: rich's progress display (Lightning's default bar, the study's bar) then
    has a refresh thread waiting on that lock for ever and an exit that waits for the thread, so the process hangs
    instead of stopping. This callback notes the first Ctrl-C and raises it between steps, where Lightning's own
    interrupt handling runs as usual; a second Ctrl-C raises at once. The previous handler is restored when
    fitting ends.
    """

    def __init__(self) -> None:
        self._pending = False
        self._previous: Any = None

    def _note(self, signum: int, frame: Any) -> None:
        if self._pending:
            self._restore()
            raise KeyboardInterrupt
        self._pending = True

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _raise_if_pending(self, *_: Any) -> None:
        if self._pending:
            self._pending = False
            self._restore()
            raise KeyboardInterrupt

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._pending = False
            self._previous = signal.signal(signal.SIGINT, self._note)

    on_train_batch_start = on_train_batch_end = on_validation_batch_end = on_train_end = _raise_if_pending

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
