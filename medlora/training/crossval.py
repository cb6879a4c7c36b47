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

Several processes may share one run folder (scheduler-array tasks, or the same command started twice):
file locks under ``RUN_DIR/locks`` (:mod:`medlora.training.locks`) let one process at a time prepare the
data, pretrain, or run a given job. A process that finds a job held by another live process says so in
one line and goes on with the next job; one that finds pretraining held waits for it, because every job
needs the base. A lock of a process that died is released by the operating system and taken over.

The whole study is checked (value ranges, datasets, every job's network built on the meta device) before
the run folder is claimed; a folder that holds another study is refused unless nothing of that study has
completed and no process runs it (a study that failed while preparing), which is then replaced. Ctrl-C
ends with one line saying how many jobs are done and exit code 130; the same command resumes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import signal
import threading
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
from .locks import FileLock
from .module import SegmentationModule
from .study_config import (
    BASELINES,
    MethodEntry,
    StudyConfig,
    StudyConfigError,
    check_study_inputs,
    load_study_config,
)

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


def fit_or_interrupt(trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any) -> None:
    """``trainer.fit``, with Ctrl-C raised as ``KeyboardInterrupt``.

    Lightning catches ``KeyboardInterrupt`` itself, tears down, sets SIGINT to "ignore" and calls
    ``sys.exit(1)``; the caller could not tell an interrupt from a failure, so it is raised again here and
    the previous SIGINT handler restored.
    """
    handler = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, datamodule)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


class JobHeld(MedloraError):
    """Another live process runs this job (its lock is held)."""


@contextlib.contextmanager
def _waiting(lock: FileLock, what: str, say: Any = print) -> Iterator[None]:
    """Hold ``lock``, first saying in one line whom we wait for if another process holds it."""
    if not lock.acquire(wait=False):
        say(f"{what} is running in another process ({lock.holder()}); waiting for it")
        lock.acquire(wait=True)
    try:
        yield
    finally:
        lock.release()


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

    def check_inputs(self) -> None:
        """Datasets, splits, base weights and every job's network (meta device): see ``check_study_inputs``."""
        check_study_inputs(self.config, self.config_path)

    def lock(self, name: str, shared: bool = False) -> FileLock:
        return FileLock(self.out / "locks" / f"{name}.lock", shared=shared)

    def job_lock(self, job: Job) -> FileLock:
        return self.lock(f"job_{job.name}_fold_{job.fold}")

    def completed(self) -> list[Path]:
        """The ``summary.json`` of every finished step (pretraining, jobs) in the run folder."""
        return sorted([*self.out.glob("pretrain/summary.json"), *self.out.glob("jobs/*/fold_*/summary.json")])

    def claim_run_dir(self) -> None:
        """Record the config in the run folder (``study.json``); refuse a folder that holds a different study.

        A different study whose ``study.json`` is all there is of it (nothing completed, no process running
        it: a study that failed while preparing) is replaced, together with the data, folds and unfinished
        folders it generated, so that the corrected study starts clean. Callers sharing the folder with
        other processes hold the ``prepare`` lock.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        record = self.out / "study.json"
        current = json.loads(json.dumps(asdict(self.config)))
        if record.exists():
            try:
                previous = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                previous = None
            if previous == current:
                return
            busy = self.lock("study")
            if self.completed() or not busy.acquire(wait=False):
                raise StudyConfigError(
                    f"{self.out}: this run folder holds a different study (see {record}); use another --out"
                )
            busy.release()
            for generated in ("data/target", "data/source", "pretrain", "jobs"):
                shutil.rmtree(self.out / generated, ignore_errors=True)
            (self.out / "splits_final.json").unlink(missing_ok=True)
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
            fit_or_interrupt(_trainer(spec.epochs, folder, progress), module, dm)
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
                fit_or_interrupt(_trainer(c.finetune.epochs, folder, progress,
                                          run_callbacks(adapter_path=folder / "adapter.safetensors")), module, dm)
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

    def run_job_if_free(self, job: Job, progress: Any | None = None) -> dict[str, Any] | None:
        """:meth:`run_job` under the job's lock; None if another process finished the job meanwhile.

        Raises :class:`JobHeld` at once if another live process holds the job.
        """
        lock = self.job_lock(job)
        if not lock.acquire(wait=False):
            raise JobHeld(f"running in another process ({lock.holder()})")
        try:
            return None if self.job_done(job) else self.run_job(job, progress)
        finally:
            lock.release()

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


def _run_in_worker(index: int) -> tuple[int, dict[str, Any] | None]:
    assert _WORKER_STUDY is not None
    return index, _WORKER_STUDY.run_job_if_free(_WORKER_STUDY.jobs[index])


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
    of floating-point sums). Ctrl-C raises ``KeyboardInterrupt`` whose message says how far the study got.
    """
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
    if selector is not None and selector.get("stage") != "pretrain" and not any(j.matches(selector)
                                                                                  for j in study.jobs):
        raise StudyConfigError(f"--only {only!r} matches no job (see --list)")
    study.check_inputs()
    try:
        _run_study(study, selector, workers)
    except KeyboardInterrupt:
        done = sum(study.job_done(j) for j in study.jobs)
        raise KeyboardInterrupt(f"run the same command again to resume: {done} of {len(study.jobs)} jobs done") \
            from None
    return 0


def _run_study(study: Study, selector: dict[str, str] | None, workers: int) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    running = study.lock("study", shared=True)  # while held, no other process may replace the study
    with _waiting(study.lock("prepare"), "data preparation"):
        study.claim_run_dir()
        study.prepare_data()
        running.acquire()
    try:
        only_pretrain = selector is not None and selector.get("stage") == "pretrain"
        may_pretrain = selector is None or only_pretrain
        todo = [] if only_pretrain else [j for j in study.jobs if (selector is None or j.matches(selector))
                                         and not study.job_done(j)]
        done_before = sum(study.job_done(j) for j in study.jobs)
        print(f"study {study.config.name!r}: {len(study.jobs)} jobs ({done_before} already done), "
              f"{study.config.folds} folds, run folder {study.out}", flush=True)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=False) as bar:
            say = functools.partial(bar.console.print, soft_wrap=True)  # a log line stays one line (grep-able)
            if (todo or may_pretrain) and not study.pretrain_done():
                with _waiting(study.lock("pretrain"), "pretraining", say):
                    if not study.pretrain_done():
                        if not may_pretrain:
                            raise MedloraError(
                                f"{study.base_path}: the pretrained base does not exist yet; run `medlora crossval "
                                f"--config {study.config_path} --out {study.out} --only pretrain` first")
                        task = bar.add_task("pretraining on the source domain", total=study.config.pretrain.epochs)
                        summary = study.run_pretraining(lambda e, n: bar.update(task, completed=e))
                        say(f"pretrained base: Dice {summary['source_mean_Dice']:.3f} on its source "
                            f"training cases ({summary['train_seconds']:.0f} s) -> {study.base_path}")
            overall = bar.add_task("cross-validation jobs", total=len(todo))

            def finished(job: Job, outcome: dict[str, Any] | JobHeld | None) -> None:
                bar.advance(overall)
                say(_outcome_line(job, outcome))

            if workers == 1 or len(todo) <= 1:
                for job in todo:
                    task = bar.add_task(f"  {job.label}, fold {job.fold}", total=max(study.config.finetune.epochs, 1))
                    try:
                        outcome = study.run_job_if_free(job, lambda e, n, t=task: bar.update(t, completed=e))
                    except JobHeld as exc:
                        outcome = exc
                    bar.remove_task(task)
                    finished(job, outcome)
            else:
                _run_in_pool(study, todo, workers, finished)
        if selector is None:
            _report(study)
    finally:
        running.release()


def _outcome_line(job: Job, outcome: dict[str, Any] | JobHeld | None) -> str:
    if isinstance(outcome, dict):
        return _job_line(job, outcome)
    state = "finished by another process" if outcome is None else f"{outcome}; skipped"
    return f"{job.label:<24} fold {job.fold}: {state}"


def _run_in_pool(study: Study, todo: list[Job], workers: int, finished: Any) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")
    init_args = (str(study.config_path), str(study.out), threads)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=init_args) as pool:
        try:
            futures = {pool.submit(_run_in_worker, study.jobs.index(j)): j for j in todo}
            for future in as_completed(futures):
                try:
                    outcome: dict[str, Any] | JobHeld | None = future.result()[1]
                except JobHeld as exc:
                    outcome = exc
                finished(futures[future], outcome)
        except KeyboardInterrupt:
            # stop the workers now rather than wait for their jobs (Ctrl-C in a terminal reaches them too)
            pool.shutdown(wait=False, cancel_futures=True)
            for process in multiprocessing.active_children():
                process.terminate()
            raise


def _report(study: Study) -> None:
    missing = [j for j in study.jobs if not study.job_done(j)]
    if missing:
        print(f"report not built: {len(missing)} of {len(study.jobs)} jobs are not done (running in other "
              f"processes); `medlora report {study.out}` builds it later")
        return
    with study.lock("report"):  # processes finishing together write it one after the other
        report = build_report(study.out, study.study_info())
    print(f"report: {report}")


__all__ = ["BASELINES", "Job", "Study", "plan_jobs", "run_crossval"]
