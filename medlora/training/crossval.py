"""k-fold cross-validated transfer studies: ``medlora crossval --config STUDY.yaml --out RUN_DIR``.

The protocol follows the seed paper (Minoccheri, Hodgman et al. 2025, arXiv 2508.01772): pretrain on
the source population (or take a given base checkpoint), then for every method (no fine-tuning, full
and module-wise fine-tuning, each adapter method at each rank) and every fold, restart from the base,
train on the fold's training cases and evaluate the final model on its held-out cases. Folds are
nnU-Net's (``KFold(k, shuffle=True, random_state=12345)`` over sorted case ids) unless a splits file is
given.

Every (method, rank, fold) is an independent job with its own folder under ``RUN_DIR/jobs``; a job is
done when its ``summary.json`` exists (written last, atomically). Running the command again skips done
jobs and restarts an interrupted one from scratch, so the numbers equal those of an uninterrupted run.
``--only`` selects jobs (``--list`` prints them) so that a scheduler can run them in parallel; the report
is built from the job folders alone (``medlora report RUN_DIR``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ..adapters import get_method
from ..assembly import ModelSpec, build_model
from ..data.dataset import load_splits, make_splits, read_dataset, validate_dataset, write_splits
from ..errors import MedloraError
from ..evaluation.report import build_report
from ..evaluation.summary import summarise_job, write_json_atomic
from ..fileio import atomic_save_safetensors
from .callbacks import run_callbacks
from .module import SegmentationModule
from .study_config import BASELINES, MethodEntry, StudyConfig, StudyConfigError, load_study_config

METHOD_LABELS = {
    "no_finetune": "no fine-tuning", "full": "full fine-tuning", "lora": "LoRA", "lora_c": "LoRA-C",
    "conv_lora": "convLoRA", "cp_lora": "CP-LoRA", "dora": "DoRA", "dora_c": "DoRA-C", "conv_dora": "convDoRA",
    "cp_dora": "CP-DoRA", "salt": "SALT", "svd": "S-SAM (SVD)",
}


@dataclass(frozen=True)
class Job:
    name: str          # e.g. cp_lora_r4, full, module_decoder
    method: str
    family: str        # none | full | module | adapter
    rank: int | None
    fold: int
    entry: MethodEntry

    @property
    def label(self) -> str:
        if self.method == "module":
            return f"module-wise ({self.entry.group})"
        base = METHOD_LABELS.get(self.method, self.method)
        label = base if self.rank is None else f"{base} r{self.rank}"
        return f"{label} + {self.entry.training_rule}" if self.entry.training_rule else label

    def matches(self, selector: dict[str, str]) -> bool:
        values = {"job": self.name, "method": self.method, "rank": str(self.rank), "fold": str(self.fold),
                  "family": self.family}
        return all(values.get(k) == v for k, v in selector.items())


def plan_jobs(config: StudyConfig) -> list[Job]:
    """All fine-tuning jobs of the study, fold by fold in the config's method order."""
    jobs = []
    for fold in range(config.folds):
        for entry in config.methods:
            family = {"no_finetune": "none", "full": "full", "module": "module"}.get(entry.name, "adapter")
            ranked = family == "adapter" and get_method(entry.name).uses_rank
            for rank in entry.ranks if ranked else [None]:
                jobs.append(Job(entry.job_name(rank), entry.name, family, rank, fold, entry))
    return jobs


def parse_only(text: str | None) -> dict[str, str] | None:
    """``"method=cp_lora,rank=4,fold=1"`` -> dict; ``"pretrain"`` selects only the pretraining step."""
    if not text:
        return None
    if text.strip() == "pretrain":
        return {"stage": "pretrain"}
    selector = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("job", "method", "rank", "fold", "family", "stage"):
            raise StudyConfigError(
                f"--only {text!r}: expected key=value pairs with keys job, method, rank, fold, family or stage"
            )
        selector[key.strip()] = value.strip()
    return selector


# ----------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Jobs print one line each; Lightning's banners and known harmless warnings would drown them."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|smaller than the logging"
                                                  "|adapter parameters >= the layer|Checkpoint directory"
                                                  "|unable to generate class balanced samples).*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


class _EpochProgress(pl.Callback):
    def __init__(self, report: Any) -> None:
        self.report = report

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report(trainer.current_epoch + 1, trainer.max_epochs)


def _trainer(epochs: int, log_dir: Path, progress: Any | None, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, logger=pl.loggers.CSVLogger(str(log_dir), name="logs"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, deterministic="warn",
        callbacks=[*callbacks, *([_EpochProgress(progress)] if progress else [])], log_every_n_steps=1,
    )


# ----------------------------------------------------------------------------------------- the study


class Study:
    """A study run folder: data preparation, pretraining, the jobs and their summaries."""

    def __init__(self, config_path: str | Path, out_dir: str | Path) -> None:
        self.config_path = Path(config_path)
        self.config: StudyConfig = load_study_config(config_path)
        self.out = Path(out_dir)
        self.jobs = plan_jobs(self.config)

    # ---- set-up

    def claim_run_dir(self) -> None:
        """Record the config in the run folder; refuse a folder that holds a different study."""
        self.out.mkdir(parents=True, exist_ok=True)
        record = self.out / "study.json"
        current = asdict(self.config)
        if record.exists():
            previous = json.loads(record.read_text(encoding="utf-8"))
            if previous != json.loads(json.dumps(current)):
                raise StudyConfigError(
                    f"{self.out}: this run folder holds a different study (see {record}); use another --out"
                )
        else:
            write_json_atomic(current, record)

    def _dataset(self, spec: Any, name: str) -> Path:
        if spec.data_dir is not None:
            return Path(spec.data_dir)
        from ..data.phantoms import write_dataset

        target = self.out / "data" / name
        if not (target / "dataset.json").exists():
            print(f"generating {spec.phantoms.cases} {spec.phantoms.domain} phantoms in {target} ...", flush=True)
        ph = spec.phantoms
        grid = {k: v for k, v in (("shape", ph.shape), ("spacing", ph.spacing)) if v is not None}
        return write_dataset(target, ph.domain, ph.cases, seed=ph.seed, **grid)

    def prepare_data(self) -> None:
        """Phantoms if the study asks for them, dataset checks, and the folds (``splits_final.json``)."""
        self.target_dir = self._dataset(self.config.target, "target")
        self.source_dir = self._dataset(self.config.source, "source") if self.config.source else None
        for d in filter(None, (self.target_dir, self.source_dir)):
            validate_dataset(d)
        splits_path = self.out / "splits_final.json"
        if not splits_path.exists():
            ids = read_dataset(self.target_dir).case_ids
            splits = load_splits(self.config.splits_file) if self.config.splits_file else make_splits(
                ids, k=self.config.folds)
            if len(splits) != self.config.folds:
                raise StudyConfigError(f"{self.config.splits_file}: has {len(splits)} folds, study.folds is "
                                       f"{self.config.folds}")
            write_splits(splits_path, splits)
        self.splits_path = splits_path

    def _module(self, model: dict[str, Any], **kwargs: Any) -> SegmentationModule:
        """The study's network with the ``model`` record fields of one job (``medlora.assembly.build_model``)."""
        c = self.config
        spec = ModelSpec(backbone=c.model.backbone, backbone_args=dict(c.model.backbone_args),
                         spatial_dims=c.model.spatial_dims, **model)
        return SegmentationModule(build_model(spec), spec, roi_size=list(c.data.inference_roi or c.data.patch_size),
                                  **kwargs)

    def _datamodule(self, data_dir: Path, fold: int | str, seed: int):
        from ..data.datamodule import CTSegDataModule

        d = self.config.data
        return CTSegDataModule(
            str(data_dir), fold=fold, splits_file=str(self.splits_path) if fold != "all" else None,
            spatial_dims=self.config.model.spatial_dims, patch_size=list(d.patch_size), batch_size=d.batch_size,
            samples_per_volume=d.samples_per_volume, pos_fraction=d.pos_fraction, hu_window=list(d.hu_window),
            target_spacing=d.target_spacing, validate=False, seed=seed,
        )

    # ---- pretraining

    @property
    def base_path(self) -> Path:
        if self.config.base_checkpoint:
            return Path(self.config.base_checkpoint)
        return self.out / "pretrain" / "base.safetensors"

    def pretrain_done(self) -> bool:
        return self.config.base_checkpoint is not None or (self.out / "pretrain" / "summary.json").exists()

    def run_pretraining(self, progress: Any | None = None) -> dict[str, Any]:
        folder = self.out / "pretrain"
        if folder.exists():
            shutil.rmtree(folder)  # an interrupted pretraining restarts from scratch
        folder.mkdir(parents=True)
        spec = self.config.pretrain
        pl.seed_everything(self.config.seed, workers=True, verbose=False)
        module = self._module({}, loss=spec.loss, lr=spec.lr, norm_stats=spec.norm_stats)
        dm = self._datamodule(self.source_dir, "all", self.config.seed)
        start = time.perf_counter()
        with _quiet_lightning():
            _trainer(spec.epochs, folder, progress).fit(module, dm)
        seconds = time.perf_counter() - start
        atomic_save_safetensors(module.model.state_dict(), self.base_path)
        rows = self._evaluate(module, dm)
        summary = {"epochs": spec.epochs, "train_seconds": seconds, "source": str(self.source_dir),
                   "source_mean_Dice": _nanmean([r["Dice"] for r in rows]), "cases": len(rows)}
        write_json_atomic(summary, folder / "summary.json")
        return summary

    # ---- fine-tuning jobs

    def job_dir(self, job: Job) -> Path:
        return self.out / "jobs" / job.name / f"fold_{job.fold}"

    def job_done(self, job: Job) -> bool:
        return (self.job_dir(job) / "summary.json").exists()

    def _evaluate(self, module: SegmentationModule, dm: Any) -> list[dict[str, Any]]:
        dm.setup("validate")
        module.eval()
        device = next(module.parameters()).device
        rows = []
        with torch.no_grad():
            for batch in dm.val_dataloader():
                batch["image"] = batch["image"].to(device)
                rows.append(module._evaluate(batch))
        return rows

    def run_job(self, job: Job, progress: Any | None = None) -> dict[str, Any]:
        folder = self.job_dir(job)
        if folder.exists():
            shutil.rmtree(folder)  # leftovers of an interrupted attempt
        folder.mkdir(parents=True)
        c = self.config
        seed = c.seed + job.fold
        pl.seed_everything(seed, workers=True, verbose=False)
        model: dict[str, Any] = {"pretrained": str(self.base_path)}
        kwargs: dict[str, Any] = {"loss": c.finetune.loss, "norm_stats": c.finetune.norm_stats}
        if job.family == "adapter":
            model.update(adapter=c.adapter_config(job.entry, job.rank), finetune=job.entry.finetune or "none",
                         training_rule=job.entry.training_rule,
                         training_rule_options=dict(job.entry.training_rule_options))
            kwargs.update(lr=job.entry.lr or c.finetune.adapter_lr)
        elif job.family == "module":
            model.update(finetune=job.entry.group)
            kwargs.update(lr=job.entry.lr or c.finetune.lr)
        else:
            model.update(finetune="all")
            kwargs.update(lr=job.entry.lr or c.finetune.lr)
        with _quiet_lightning():
            module = self._module(model, **kwargs)
        dm = self._datamodule(self.target_dir, job.fold, seed)
        total = sum(p.numel() for n, p in module.model.named_parameters() if ".parametrizations.weight.0." not in n)
        train_seconds = 0.0
        if job.family != "none":
            start = time.perf_counter()
            with _quiet_lightning():
                # the adapter file is written at the end of fit
                _trainer(c.finetune.epochs, folder, progress,
                         run_callbacks(adapter_path=folder / "adapter.safetensors")).fit(module, dm)
            train_seconds = time.perf_counter() - start
        # counted after training: a training rule may freeze parameters when the optimiser is built (FFA)
        trainable = 0 if job.family == "none" else module.trainable_parameter_count()
        start = time.perf_counter()
        rows = self._evaluate(module, dm)
        eval_seconds = time.perf_counter() - start
        if job.family in ("full", "module"):
            atomic_save_safetensors(module.model.state_dict(), folder / "model.safetensors")
        dataset = read_dataset(self.target_dir)
        for r in rows:
            r.pop("spacing", None)
            r.pop("case_index", None)
            r["reference_file"] = str(dataset.case(r["case_id"]).label)
        info = {"job": job.name, "method": job.method, "label": job.label, "rank": job.rank, "fold": job.fold,
                "family": job.family, "trainable_params": trainable, "total_params": total,
                "train_seconds": train_seconds, "eval_seconds": eval_seconds, "epochs": c.finetune.epochs,
                "seed": seed, "base": str(self.base_path)}
        summary = summarise_job(rows, info)
        write_json_atomic(summary, folder / "summary.json")
        return summary

    def study_info(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": c.name, "config": str(self.config_path), "target": str(self.target_dir),
            "source": str(self.source_dir) if self.source_dir else None, "base": str(self.base_path),
            "folds": c.folds, "seed": c.seed, "backbone": c.model.backbone, "spatial_dims": c.model.spatial_dims,
            "patch_size": list(c.data.patch_size), "pretrain_epochs": None if c.base_checkpoint else c.pretrain.epochs,
            "finetune_epochs": c.finetune.epochs, "expected_jobs": len(self.jobs),
            "job_names": list(dict.fromkeys(j.name for j in self.jobs)),
        }


def _nanmean(values: list[float]) -> float:
    import math

    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


_WORKER_STUDY: Study | None = None


def _init_worker(config_path: str, out_dir: str, threads: int) -> None:
    global _WORKER_STUDY
    torch.set_num_threads(threads)
    _WORKER_STUDY = Study(config_path, out_dir)
    _WORKER_STUDY.prepare_data()


def _run_in_worker(index: int) -> tuple[int, dict[str, Any]]:
    assert _WORKER_STUDY is not None
    return index, _WORKER_STUDY.run_job(_WORKER_STUDY.jobs[index])


def _job_line(job: Job, summary: dict[str, Any]) -> str:
    mean, info = summary["mean"]["1"], summary["medlora"]
    return (f"{job.label:<24} fold {job.fold}: Dice {mean['Dice']:.3f}  soft Dice {mean['soft_Dice']:.3f}  "
            f"trainable {info['trainable_params']:,}  ({info['train_seconds']:.0f} s)")


def run_crossval(
    config_path: str, out_dir: str, only: str | None = None, list_jobs: bool = False, workers: int = 1
) -> int:
    """The ``medlora crossval`` command. Returns the process exit code.

    ``workers > 1`` runs that many jobs at once in separate processes, sharing the CPU threads; the
    numbers then equal those of another run with the same ``workers`` (thread counts change the order
    of floating-point sums).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    study = Study(config_path, out_dir)
    selector = parse_only(only)
    if list_jobs:
        if study.config.base_checkpoint is None:
            print("pretrain")
        for job in study.jobs:
            print(f"job={job.name},fold={job.fold}")
        return 0
    if workers < 1:
        raise StudyConfigError(f"--workers must be at least 1, got {workers}")
    study.claim_run_dir()
    study.prepare_data()
    run_pretrain = not study.pretrain_done() and (selector is None or selector.get("stage") == "pretrain")
    if selector and selector.get("stage") == "pretrain":
        todo: list[Job] = []
    else:
        todo = [j for j in study.jobs if (selector is None or j.matches(selector)) and not study.job_done(j)]
        if selector is not None and not [j for j in study.jobs if j.matches(selector)]:
            raise StudyConfigError(f"--only {only!r} matches no job (see --list)")
    if todo and not study.pretrain_done() and not run_pretrain:
        raise MedloraError(f"{study.base_path}: the pretrained base does not exist yet; run "
                           f"`medlora crossval --config {config_path} --out {out_dir} --only pretrain` first")
    done_before = sum(study.job_done(j) for j in study.jobs)
    print(f"study {study.config.name!r}: {len(study.jobs)} jobs ({done_before} already done), "
          f"{study.config.folds} folds, run folder {study.out}", flush=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        if run_pretrain:
            task = bar.add_task("pretraining on the source domain", total=study.config.pretrain.epochs)
            summary = study.run_pretraining(lambda e, n: bar.update(task, completed=e))
            bar.console.print(f"pretrained base: Dice {summary['source_mean_Dice']:.3f} on its source training cases "
                              f"({summary['train_seconds']:.0f} s) -> {study.base_path}")
        overall = bar.add_task("cross-validation jobs", total=len(todo))
        if workers == 1 or len(todo) <= 1:
            for job in todo:
                task = bar.add_task(f"  {job.label}, fold {job.fold}", total=max(study.config.finetune.epochs, 1))
                summary = study.run_job(job, lambda e, n, t=task: bar.update(t, completed=e))
                bar.remove_task(task)
                bar.advance(overall)
                bar.console.print(_job_line(job, summary))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            threads = max(1, torch.get_num_threads() // workers)
            indices = [study.jobs.index(j) for j in todo]
            context = multiprocessing.get_context("spawn")
            init_args = (str(config_path), str(out_dir), threads)
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=init_args) as pool:
                futures = [pool.submit(_run_in_worker, i) for i in indices]
                for future in as_completed(futures):
                    index, summary = future.result()
                    bar.advance(overall)
                    bar.console.print(_job_line(study.jobs[index], summary))
    if selector is None:
        report = build_report(study.out, study.study_info())
        print(f"report: {report}")
    return 0


__all__ = ["BASELINES", "Job", "Study", "plan_jobs", "run_crossval"]
