"""k-fold cross-validated transfer studies: ``medlora crossval --config STUDY.yaml --out RUN_DIR``.

The protocol follows the seed paper (Minoccheri, Hodgman et al. 2025, arXiv 2508.01772): pretrain on
the source population (or take the base the study's ``model.pretrained`` names), then for every method (no
fine-tuning, full and module-wise fine-tuning, each adapter method at each rank) and every fold, restart from
the base, train on the fold's training cases and evaluate the final model on its held-out cases. Folds are
nnU-Net's (``KFold(k, shuffle=True, random_state=12345)`` over sorted case ids) unless a splits file is
given. Beyond the paper, the grid repeats every job per fine-tuning seed (``seeds``; the pretraining too with
``pretrain_seeds``), per training-set size (``train_cases``: nested subsets of each fold's training cases,
drawn with the job's seed) and evaluates every model on held-out source-domain cases as well
(``source_eval``, split over the folds like the target cases), to measure forgetting.

Every job is built the way ``medlora fit`` builds a run: its ``model:`` section goes to the fit factory
:func:`~medlora.training.module.segmentation_module` (hence :func:`medlora.assembly.build_model`), its ``data:``
section to :class:`~medlora.data.datamodule.CTSegDataModule`, its ``trainer:`` section to Lightning's Trainer
(:mod:`medlora.training.study_config` makes the sections of one job). The run folder's layout, file names, job
names and labels are those of :mod:`medlora.runs`, which inference and the report read.

Every (method, rank, seed, training-set size, fold) is an independent job with its own folder; a job is done
when its ``summary.json`` exists (written last, atomically). Running the command again skips done jobs and
restarts an interrupted one from scratch, so the numbers equal those of an uninterrupted run. ``--only``
selects jobs (``--list`` prints them) so that a scheduler can run them in parallel; the report is built from
the job folders alone (``medlora report RUN_DIR``).

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
import dataclasses
import functools
import json
import logging
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from ..adapters import read_adapter_file
from ..adapters.transplant import save_donor
from ..data.dataset import load_splits, make_splits, read_dataset, validate_dataset, write_splits
from ..errors import MedloraError
from ..evaluation.calibration import calibration_histogram, empty_histogram
from ..evaluation.report import build_report
from ..evaluation.statistics import nanmean
from ..evaluation.summary import summarise_job, write_json_atomic, write_summary
from ..fileio import atomic_save_safetensors
from ..runs import (
    ADAPTER_FILE,
    ALL_CASES,
    BASE_FILE,
    DATA_DIR,
    DONOR_FILE,
    JOBS_DIR,
    LOCKS_DIR,
    MODEL_FILE,
    PRETRAIN_DIR,
    SOURCE_EVAL_SPLITS,
    SOURCE_SUMMARY_FILE,
    SPLITS_DIR,
    SPLITS_FILE,
    STAGE_PREFIX,
    STUDY_FILE,
    SUMMARY_FILE,
    RunJob,
    pretrain_relpath,
    subset_splits_name,
)
from ..runs import plan_jobs as plan_record_jobs
from .callbacks import InterruptBetweenSteps, run_callbacks
from .locks import FileLock
from .module import SegmentationModule, segmentation_module
from .packing import plan_units, run_unit, trainer_problem
from .study_config import BASELINES, StudyConfig, StudyConfigError, check_study_inputs, load_study_config

LAUNCHERS = ("local", "ray")
ONLY_KEYS = ("job", "method", "rank", "fold", "family", "seed", "train_cases", "stage")


def plan_jobs(config: StudyConfig) -> list[RunJob]:
    """All fine-tuning jobs of the study in run order (:func:`medlora.runs.plan_jobs` of its record)."""
    return plan_record_jobs(config.to_record())


def parse_only(text: str | None) -> dict[str, str] | None:
    """``"method=cp_lora,rank=4,fold=1"`` -> dict; ``"pretrain"`` selects only the pretraining step(s)
    (``stage=pretrain,seed=1`` one pretraining of several ``pretrain_seeds``)."""
    if not text:
        return None
    if text.strip() == "pretrain":
        return {"stage": "pretrain"}
    selector = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ONLY_KEYS:
            raise StudyConfigError(f"--only {text!r}: expected key=value pairs with keys {', '.join(ONLY_KEYS[:-1])} "
                                   f"or {ONLY_KEYS[-1]}")
        selector[key.strip()] = value.strip()
    if "stage" in selector and (selector["stage"] != "pretrain" or set(selector) - {"stage", "seed"}):
        raise StudyConfigError(f"--only {text!r}: stage=pretrain combines only with seed=<pretraining seed>")
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
        # a step budget ends training before the epoch budget does, so progress counts in the budget that binds
        if trainer.max_steps and trainer.max_steps > 0:
            self.report(trainer.global_step, trainer.max_steps)
        else:
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


@dataclasses.dataclass
class JobRun:
    """A job being run: its folder, module, data module, ``model:`` section, base file, seed and parameter count."""

    job: RunJob
    folder: Path
    module: SegmentationModule
    dm: Any
    model: dict[str, Any]
    base: Path
    run_seed: int
    total: int


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


def _trainer(section: dict[str, Any], log_dir: Path, progress: Any | None,
             callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """The Trainer of one study step: the study's ``trainer`` section (``max_epochs``, ...) with the study's own
    logging, no checkpoints and no validation loop (jobs are evaluated once, at the end)."""
    settings = {"accelerator": "auto", **section}
    return pl.Trainer(
        devices=1, logger=pl.loggers.CSVLogger(str(log_dir), name="logs"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, deterministic="warn",
        callbacks=[*callbacks, *([_EpochProgress(progress)] if progress else []), InterruptBetweenSteps()],
        log_every_n_steps=1, **settings,
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
        """Datasets, splits, base weights and pretraining's sections: see ``check_study_inputs``."""
        check_study_inputs(self.config, self.config_path)

    def lock(self, name: str, shared: bool = False) -> FileLock:
        return FileLock(self.out / LOCKS_DIR / f"{name}.lock", shared=shared)

    def job_lock(self, job: RunJob) -> FileLock:
        return self.lock("_".join(job.relpath.parts))

    def completed(self) -> list[Path]:
        """The ``summary.json`` of every finished step (pretraining, jobs) in the run folder."""
        return sorted([*(self.out / PRETRAIN_DIR).glob(f"**/{SUMMARY_FILE}"),
                       *(self.out / JOBS_DIR).glob(f"*/seed_*/cases_*/fold_*/{SUMMARY_FILE}")])

    def claim_run_dir(self) -> None:
        """Record the config in the run folder (``study.json``); refuse a folder that holds a different study.

        A different study whose ``study.json`` is all there is of it (nothing completed, no process running
        it: a study that failed while preparing) is replaced, together with the data, folds and unfinished
        folders it generated, so that the corrected study starts clean. Callers sharing the folder with
        other processes hold the ``prepare`` lock.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        record = self.out / STUDY_FILE
        current = self.config.to_record()
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
            for generated in (DATA_DIR, PRETRAIN_DIR, JOBS_DIR, SPLITS_DIR):
                shutil.rmtree(self.out / generated, ignore_errors=True)
            (self.out / SPLITS_FILE).unlink(missing_ok=True)
        write_json_atomic(current, record)

    def _dataset(self, spec: Any, name: str) -> Path:
        if spec.data_dir is not None:
            return Path(spec.data_dir)
        from ..data.phantoms import write_dataset

        target = self.out / DATA_DIR / name
        if not (target / "dataset.json").exists():
            print(f"generating {spec.phantoms.cases} {spec.phantoms.domain} phantoms in {target} ...", flush=True)
        ph = spec.phantoms
        grid = {k: v for k, v in (("shape", ph.shape), ("spacing", ph.spacing)) if v is not None}
        return write_dataset(target, ph.domain, ph.cases, seed=ph.seed, **grid)

    def prepare_data(self) -> None:
        """Phantoms if the study asks for them, dataset checks, the folds (``splits_final.json``), the folds cut to
        each training-set size, and the held-out source cases split over the folds."""
        c = self.config
        self.target_dir = self._dataset(c.target, "target")
        self.source_dir = self._dataset(c.source, "source") if c.source else None
        self.source_eval_dir = self._dataset(c.source_eval, "source_eval") if c.source_eval else None
        for d in filter(None, (self.target_dir, self.source_dir, self.source_eval_dir)):
            validate_dataset(d)
        splits_path = self.out / SPLITS_FILE
        if not splits_path.exists():
            ids = read_dataset(self.target_dir).case_ids
            splits = load_splits(c.splits_file) if c.splits_file else make_splits(ids, k=c.folds)
            if len(splits) != c.folds:
                raise StudyConfigError(f"{c.splits_file}: has {len(splits)} folds, study.folds is {c.folds}")
            write_splits(splits_path, splits)
        self.splits_path = splits_path
        splits = load_splits(splits_path)
        for seed in c.seeds:
            for cases in c.train_cases:
                path = self.subset_splits_path(seed, cases)
                if cases != ALL_CASES and not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_splits(path, subset_splits(splits, int(cases), seed))
        if self.source_eval_dir is not None:
            path = self.out / SPLITS_DIR / SOURCE_EVAL_SPLITS
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                write_splits(path, make_splits(read_dataset(self.source_eval_dir).case_ids, k=c.folds))

    def subset_splits_path(self, seed: int, cases: int | str) -> Path:
        if cases == ALL_CASES:
            return self.out / SPLITS_FILE
        return self.out / SPLITS_DIR / subset_splits_name(seed, cases)

    def _roi(self) -> list[int]:
        """The sliding-window size of every evaluation: ``model.roi_size``, else the training patch (as fit)."""
        from .study_config import data_parameters

        roi = self.config.model.get("roi_size")
        patch = self.config.data.get("patch_size", data_parameters()["patch_size"].default)
        return list(roi if roi is not None else patch)

    def _module(self, model: dict[str, Any]) -> SegmentationModule:
        """A job's module from its ``model:`` section, through the fit factory (``medlora.assembly.build_model``)."""
        return segmentation_module(**{"roi_size": self._roi(), **{k: v for k, v in model.items() if v is not None
                                                                     or k != "roi_size"}})

    def _datamodule(self, data_dir: Path, fold: int | str, seed: int, splits_file: Path | None = None,
                    data: dict[str, Any] | None = None):
        from ..data.datamodule import CTSegDataModule

        section = self.config.data if data is None else data
        return CTSegDataModule(str(data_dir), fold=fold, splits_file=None if splits_file is None else str(splits_file),
                               validate=False, seed=seed, **section)

    # ---- pretraining

    @property
    def pretrain_seeds(self) -> list[int]:
        return list(self.config.pretrain_seeds or self.config.seeds[:1])

    def pretrain_dir(self, seed: int) -> Path:
        return self.out / pretrain_relpath(seed, len(self.pretrain_seeds))

    def base_path(self, pretrain_seed: int | None = None) -> Path:
        """The base a job starts from: the study's ``model.pretrained``, else the one pretrained here with
        ``pretrain_seed`` (default: the first)."""
        if self.config.base_given:
            return Path(self.config.base_given)
        return self.pretrain_dir(self.pretrain_seeds[0] if pretrain_seed is None else pretrain_seed) / BASE_FILE

    def pretrain_done(self, seed: int | None = None) -> bool:
        if self.config.base_given is not None:
            return True
        seeds = self.pretrain_seeds if seed is None else [seed]
        return all((self.pretrain_dir(s) / SUMMARY_FILE).exists() for s in seeds)

    def pretrain_lock(self, seed: int) -> FileLock:
        return self.lock("pretrain" if len(self.pretrain_seeds) == 1 else f"pretrain_seed_{seed}")

    def run_pretraining(self, seed: int | None = None, progress: Any | None = None) -> dict[str, Any]:
        seed = self.pretrain_seeds[0] if seed is None else seed
        folder = self.pretrain_dir(seed)
        if (folder / SUMMARY_FILE).exists():
            raise MedloraError(f"{folder}: pretraining is done already")
        if folder.exists():
            shutil.rmtree(folder)  # an interrupted pretraining restarts from scratch
        folder.mkdir(parents=True)
        c = self.config
        pl.seed_everything(seed, workers=True, verbose=False)
        module = self._module(c.pretrain_model())
        dm = self._datamodule(self.source_dir, "all", seed, data=c.pretrain_data())
        trainer = c.pretrain_trainer()
        start = time.perf_counter()
        with _quiet_lightning():
            fit_or_interrupt(_trainer(trainer, folder, progress), module, dm)
        seconds = time.perf_counter() - start
        atomic_save_safetensors(module.model.state_dict(), folder / BASE_FILE)
        rows, _ = self._evaluate(module, dm)
        summary = {"epochs": trainer.get("max_epochs"), "seed": seed, "train_seconds": seconds,
                   "source": str(self.source_dir), "source_mean_Dice": nanmean(r["Dice"] for r in rows),
                   "cases": len(rows)}
        write_json_atomic(summary, folder / SUMMARY_FILE)
        return summary

    # ---- fine-tuning jobs

    def job_dir(self, job: RunJob) -> Path:
        return self.out / job.relpath

    def job_done(self, job: RunJob) -> bool:
        return (self.job_dir(job) / SUMMARY_FILE).exists()

    def _evaluate(self, module: SegmentationModule, dm: Any) -> tuple[list[dict[str, Any]], Any]:
        """Per-case metric rows of the data module's validation cases, and their pooled calibration histogram."""
        dm.setup("validate")
        module.eval()
        device = next(module.parameters()).device
        rows, histogram = [], empty_histogram()
        with torch.no_grad():
            for batch in dm.val_dataloader():
                batch["image"] = batch["image"].to(device)
                prob = module.predict_case(batch["image"])
                rows.append(module._evaluate(batch, prob))
                histogram = histogram + calibration_histogram(prob[0, 0].float().cpu(),
                                                              torch.as_tensor(batch["label"])[0, 0])
        return rows, histogram

    def _summary(self, rows: list[dict[str, Any]], data_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
        dataset = read_dataset(data_dir)
        for r in rows:
            r.pop("spacing", None)
            r.pop("case_index", None)
            r["reference_file"] = str(dataset.case(r["case_id"]).label)
        return summarise_job(rows, info)

    def prepare_job(self, job: RunJob) -> JobRun:
        """A job's fresh folder, its module (built under the job's seed) and data module, before training."""
        folder = self.job_dir(job)
        if folder.exists():
            shutil.rmtree(folder)  # leftovers of an interrupted attempt
        folder.mkdir(parents=True)
        c = self.config
        entry = c.methods[job.entry]
        run_seed = job.seed + job.fold
        pl.seed_everything(run_seed, workers=True, verbose=False)
        base = self.base_path(job.pretrain_seed)
        model = c.job_model(entry, job.rank, str(base))
        with _quiet_lightning():
            module = self._module(model)
        dm = self._datamodule(self.target_dir, job.fold, run_seed, self.subset_splits_path(job.seed, job.train_cases))
        total = sum(p.numel() for n, p in module.model.named_parameters() if ".parametrizations.weight.0." not in n)
        return JobRun(job, folder, module, dm, model, base, run_seed, total)

    def run_job(self, job: RunJob, progress: Any | None = None) -> dict[str, Any]:
        run = self.prepare_job(job)
        train_seconds = 0.0
        if job.family != "none":
            start = time.perf_counter()
            with _quiet_lightning():
                # the adapter file is written at the end of fit
                callbacks = run_callbacks(adapter_path=run.folder / ADAPTER_FILE)
                if job.family == "loraprune":  # before the adapter file writer, which stores its record
                    from ..pruning.lightning import LoRAPruneCallback

                    callbacks.insert(0, LoRAPruneCallback(self.config.methods[job.entry].sparsity))
                fit_or_interrupt(_trainer(self.config.trainer, run.folder, progress, callbacks), run.module, run.dm)
            train_seconds = time.perf_counter() - start
        return self.finish_job(run, train_seconds)

    def finish_job(self, run: JobRun, train_seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Evaluate a trained job, write its model (full, module-wise) and its summaries (``summary.json`` last)."""
        job, folder, module, dm, c = run.job, run.folder, run.module, run.dm, self.config
        # counted after training: a training rule may freeze parameters when the optimiser is built (FFA)
        trainable = 0 if job.family == "none" else module.trainable_parameter_count()
        if job.family == "loraprune":
            extra = {**(extra or {}), "loraprune": self._prune_job(run)}
        start = time.perf_counter()
        rows, histogram = self._evaluate(module, dm)
        eval_seconds = time.perf_counter() - start
        if job.family in ("full", "module", "transplant"):  # (a loraprune job's pruned network is written already)
            atomic_save_safetensors(module.model.state_dict(), folder / MODEL_FILE)
        if job.family == "transplant":  # the trained stage alone, with where it fits (NOT)
            save_donor(module.model, run.model["finetune"][len(STAGE_PREFIX):], folder / DONOR_FILE,
                       extra_metadata={"job": job.name, "fold": job.fold, "base": str(run.base)})
        info = {"job": job.name, "method": job.method, "label": job.label, "rank": job.rank, "fold": job.fold,
                "family": job.family, "seed": job.seed, "train_cases": job.train_cases,
                "n_train_cases": len(dm.train_ids), "domain": "target", "trainable_params": trainable,
                "total_params": run.total, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                "epochs": c.trainer.get("max_epochs"), "run_seed": run.run_seed, "pretrain_seed": job.pretrain_seed,
                "base": str(run.base), "forgetting_weight": float(run.model.get("forgetting_weight") or 0.0),
                "calibration": histogram.to_dict(), **(extra or {})}
        if self.source_eval_dir is not None:
            source = self._datamodule(self.source_eval_dir, job.fold, run.run_seed, self.out / SPLITS_DIR /
                                      SOURCE_EVAL_SPLITS)
            source_rows, source_histogram = self._evaluate(module, source)
            write_summary(self._summary(source_rows, self.source_eval_dir, {
                **info, "domain": "source", "calibration": source_histogram.to_dict()}), folder / SOURCE_SUMMARY_FILE)
        summary = self._summary(rows, self.target_dir, info)
        write_summary(summary, folder / SUMMARY_FILE)  # last: the job is done
        return summary

    def _prune_job(self, run: JobRun) -> dict[str, Any]:
        """LoRAPrune's last step for a trained ``loraprune`` job: the base with the adapter merged, its masked units
        removed (``medlora prune`` on the job's adapter file, written as the job's ``model.safetensors``), replaces
        the job's network, so that the job is evaluated as the smaller network it deploys. ``total_params`` stays
        the full base's (the report's share of trainable parameters is of the network the adapter trained on);
        the pruned network's count is in the returned record."""
        from ..assembly import build_model
        from ..pruning.files import pruned_spec, run_prune

        summary = run_prune(run.base, run.folder / ADAPTER_FILE, run.folder / MODEL_FILE, overwrite=True)
        device = next(run.module.parameters()).device
        run.module.model = build_model(pruned_spec(run.folder / MODEL_FILE)).to(device)
        record = read_adapter_file(run.folder / ADAPTER_FILE)[0]["extra"]["loraprune"]
        return {"sparsity": record["sparsity"], "reached": record["reached"],
                "parameters_full": summary["parameters_before"], "parameters_pruned": summary["parameters_after"]}

    def study_info(self) -> dict[str, Any]:
        """The report's header and selections (``findings``, ``comparisons``), saved as ``study_info.json``."""
        c = self.config
        model = {k: v for k, v in c.model.items() if k in ("backbone", "backbone_args", "loss", "lr")}
        info = {
            "name": c.name, "config": str(self.config_path), "target": str(self.target_dir),
            "source": str(self.source_dir) if self.source_dir else None,
            "source_eval": str(self.source_eval_dir) if self.source_eval_dir else None,
            "base": str(self.base_path()), "folds": c.folds, "seeds": list(c.seeds),
            "pretrain_seeds": self.pretrain_seeds if c.base_given is None else None,
            "train_cases": list(c.train_cases), "spatial_dims": c.spatial_dims, **model,
            "patch_size": self._datamodule_defaults()["patch_size"],
            "pretrain_trainer": None if c.base_given else c.pretrain_trainer(),
            "finetune_trainer": dict(c.trainer), "expected_jobs": len(self.jobs),
            "job_names": list(dict.fromkeys(j.name for j in self.jobs)),
        }
        if c.findings is not None:
            info["findings"] = list(c.findings)
        if c.comparisons is not None:
            info["comparisons"] = [list(p) for p in c.comparisons]
        return info

    def _datamodule_defaults(self) -> dict[str, Any]:
        from .study_config import data_parameters

        return {**{k: p.default for k, p in data_parameters().items()}, **self.config.data}


def subset_splits(splits: list[dict[str, list[str]]], cases: int, seed: int) -> list[dict[str, list[str]]]:
    """``splits`` with every fold's training cases cut to ``cases`` of them, drawn with ``seed``; the held-out
    cases stay. The draw is one permutation per (seed, fold) of the fold's sorted training cases, and a size
    takes its first ``cases`` entries, so the subsets of one seed are nested (the 4 cases are among the 8)."""
    out = []
    for k, fold in enumerate(splits):
        train = sorted(fold["train"])
        if cases > len(train):
            raise StudyConfigError(f"study.train_cases: {cases} cases, but fold {k} has only {len(train)} training "
                                   "cases")
        order = np.random.default_rng([seed, k]).permutation(len(train))
        out.append({"train": sorted(train[i] for i in order[:cases]), "val": list(fold["val"])})
    return out


_WORKER_STUDY: Study | None = None


def _init_worker(config_path: str, out_dir: str, threads: int) -> None:
    global _WORKER_STUDY
    torch.set_num_threads(threads)
    _WORKER_STUDY = Study(config_path, out_dir)
    _WORKER_STUDY.prepare_data()


def _run_in_worker(indices: list[int]) -> list[tuple[int, dict[str, Any] | JobHeld | None]]:
    """One unit (a job, or a pack) of the study in a worker process: ``(job index, outcome)`` per job."""
    assert _WORKER_STUDY is not None
    jobs = [_WORKER_STUDY.jobs[i] for i in indices]
    return [(i, outcome) for i, (_, outcome) in zip(indices, run_unit(_WORKER_STUDY, jobs), strict=True)]


def _job_title(study: Study, job: RunJob) -> str:
    """``<label>  fold k`` plus the seed and training-set size where the study varies them."""
    extra = (f" seed {job.seed}" if len(study.config.seeds) > 1 else "") + (
        f" n={job.train_cases}" if job.train_cases != ALL_CASES else "")
    return f"{job.label:<24} fold {job.fold}{extra}"


def _job_line(title: str, summary: dict[str, Any]) -> str:
    mean, info = summary["mean"]["1"], summary["medlora"]
    return (f"{title}: Dice {mean['Dice']:.3f}  soft Dice {mean['soft_Dice']:.3f}  "
            f"trainable {info['trainable_params']:,}  ({info['train_seconds']:.0f} s)")


def list_lines(study: Study) -> list[str]:
    """What ``--list`` prints: the pretraining step(s), then one ``--only`` selector per job."""
    lines = []
    if study.config.base_given is None:
        seeds = study.pretrain_seeds
        lines += ["pretrain"] if len(seeds) == 1 else [f"stage=pretrain,seed={s}" for s in seeds]
    return lines + [f"job={j.name},seed={j.seed},train_cases={j.train_cases},fold={j.fold}" for j in study.jobs]


def run_crossval(
    config_path: str, out_dir: str, only: str | None = None, list_jobs: bool = False, workers: int = 1,
    pack: int = 1, launcher: str = "local", ray_address: str | None = None,
) -> int:
    """The ``medlora crossval`` command. Returns the process exit code.

    ``workers > 1`` runs that many jobs (or packs) at once in separate processes, sharing the CPU threads; the
    numbers then equal those of another run with the same ``workers`` (thread counts change the order
    of floating-point sums). ``pack > 1`` trains up to that many jobs of one base in one process with one
    forward and backward per step (:mod:`medlora.training.packing`). ``launcher="ray"`` runs every job (or
    pack) as a Ray task, on a local Ray started with ``workers`` CPUs or on the cluster at ``ray_address``
    (:mod:`medlora.training.launchers`). Ctrl-C raises ``KeyboardInterrupt`` whose message says how far the
    study got.
    """
    study = Study(config_path, out_dir)
    selector = parse_only(only)
    if list_jobs:
        print("\n".join(list_lines(study)))
        return 0
    if workers < 1:
        raise StudyConfigError(f"--workers must be at least 1, got {workers}")
    if pack < 1:
        raise StudyConfigError(f"--pack must be at least 1, got {pack}")
    if launcher not in LAUNCHERS:
        raise StudyConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if ray_address is not None and launcher != "ray":
        raise StudyConfigError("--ray-address needs --launcher ray")
    if selector is not None and selector.get("stage") == "pretrain":
        if study.config.base_given is not None:
            raise StudyConfigError(f"--only {only!r}: the study starts from model.pretrained; nothing to pretrain")
        if "seed" in selector and selector["seed"] not in map(str, study.pretrain_seeds):
            raise StudyConfigError(f"--only {only!r}: no pretraining seed {selector['seed']} (pretrain seeds: "
                                   f"{', '.join(map(str, study.pretrain_seeds))})")
    elif selector is not None and not any(j.matches(selector) for j in study.jobs):
        raise StudyConfigError(f"--only {only!r} matches no job (see --list)")
    study.check_inputs()
    try:
        _run_study(study, selector, workers, pack, launcher, ray_address)
    except KeyboardInterrupt:
        done = sum(study.job_done(j) for j in study.jobs)
        raise KeyboardInterrupt(f"run the same command again to resume: {done} of {len(study.jobs)} jobs done") \
            from None
    return 0


def _run_study(study: Study, selector: dict[str, str] | None, workers: int, pack: int = 1, launcher: str = "local",
               ray_address: str | None = None) -> None:
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
        if only_pretrain:
            needed = [int(selector["seed"])] if "seed" in selector else study.pretrain_seeds
        else:
            needed = list(dict.fromkeys(j.pretrain_seed for j in todo)) if selector else study.pretrain_seeds
        done_before = sum(study.job_done(j) for j in study.jobs)
        print(f"study {study.config.name!r}: {len(study.jobs)} jobs ({done_before} already done), "
              f"{study.config.folds} folds, run folder {study.out}", flush=True)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        # no auto-refresh thread: a Ctrl-C that lands inside rich's locked update would leave that thread blocked
        # on the lock and the exit waiting for the thread; updates below refresh the display themselves instead
        with Progress(*columns, transient=False, auto_refresh=False) as bar:
            say = functools.partial(bar.console.print, soft_wrap=True)  # a log line stays one line (grep-able)
            for seed in needed:
                _pretrain(study, seed, may_pretrain, bar, say)
            overall = bar.add_task("cross-validation jobs", total=len(todo))

            def finished(job: RunJob, outcome: dict[str, Any] | JobHeld | None) -> None:
                bar.advance(overall)
                bar.refresh()
                say(_outcome_line(study, job, outcome))

            units = plan_units(todo, pack, study.config.trainer)
            if pack > 1 and trainer_problem(study.config.trainer):
                say(f"--pack {pack}: jobs run one by one: {trainer_problem(study.config.trainer)}")
            if launcher == "ray":
                from .launchers import run_on_ray

                run_on_ray(study, units, workers, ray_address, finished)
            elif workers == 1 or len(units) <= 1:
                for unit in units:
                    title = _job_title(study, unit[0]).strip() if len(unit) == 1 else f"pack of {len(unit)} jobs"
                    task = bar.add_task(f"  {title}", total=None)
                    run_unit(study, unit, lambda done, total, t=task: bar.update(t, completed=done, total=total,
                                                                                   refresh=True),
                             finished, say)
                    bar.remove_task(task)
            else:
                _run_in_pool(study, units, workers, finished)
        if selector is None:
            _report(study)
    finally:
        running.release()


def _progress_budget(trainer_section: dict[str, Any]) -> int:
    """What a training run's progress counts to: its steps when ``max_steps`` is set (it binds first), else epochs."""
    steps = trainer_section.get("max_steps")
    if steps and steps > 0:
        return int(steps)
    return int(trainer_section.get("max_epochs") or 1000)  # Lightning's default when neither is set


def _pretrain(study: Study, seed: int, may_pretrain: bool, bar: Any, say: Any) -> None:
    """Pretraining with ``seed`` unless done; waits for another process that runs it."""
    if study.pretrain_done(seed):
        return
    with _waiting(study.pretrain_lock(seed), "pretraining", say):
        if study.pretrain_done(seed):
            return
        base = study.base_path(seed)
        if not may_pretrain:
            raise MedloraError(f"{base}: the pretrained base does not exist yet; run `medlora crossval --config "
                               f"{study.config_path} --out {study.out} --only pretrain` first")
        budget = _progress_budget(study.config.pretrain_trainer())
        task = bar.add_task("pretraining on the source domain", total=budget)
        summary = study.run_pretraining(seed, lambda done, total: bar.update(task, completed=done, total=total,
                                                                              refresh=True))
        say(f"pretrained base: Dice {summary['source_mean_Dice']:.3f} on its source training cases "
            f"({summary['train_seconds']:.0f} s) -> {base}")


def _outcome_line(study: Study, job: RunJob, outcome: dict[str, Any] | JobHeld | None) -> str:
    if isinstance(outcome, dict):
        return _job_line(_job_title(study, job), outcome)
    state = "finished by another process" if outcome is None else f"{outcome}; skipped"
    return f"{_job_title(study, job)}: {state}"


def _run_in_pool(study: Study, units: list[list[RunJob]], workers: int, finished: Any) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")
    init_args = (str(study.config_path), str(study.out), threads)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=init_args) as pool:
        try:
            futures = [pool.submit(_run_in_worker, [study.jobs.index(j) for j in unit]) for unit in units]
            for future in as_completed(futures):
                for index, outcome in future.result():
                    finished(study.jobs[index], outcome)
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


__all__ = ["BASELINES", "JobHeld", "RunJob", "Study", "list_lines", "parse_only", "plan_jobs", "run_crossval",
           "subset_splits"]
