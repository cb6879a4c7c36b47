"""Packed study jobs (``medlora crossval --pack K``): K jobs on one base trained in one process, one forward and one
backward per step for all K.

LoRAFusion (Zhu et al., arXiv 2510.00206) schedules several independent fine-tuning jobs of one base together;
:class:`~medlora.adapters.multi.PackedJobs` computes K adapted models of one base as one mixed-adapter batch. This
module runs study jobs that way. Each job is prepared exactly as :meth:`Study.run_job` prepares it (its folder, its
network built under its own seed, its data module, its optimiser from ``configure_optimizers``, LoRA-GA/LoRA-SB
starts from its own batches), keeps its own data order, optimiser, learning rate, BatchNorm statistics and global
random state, and writes the same files into its own folder (``adapter.safetensors`` or ``model.safetensors``,
``logs/version_0/{metrics.csv,hparams.yaml}``, ``summary.json`` last). Only the forward and backward are shared.

The training loop is the part of Lightning's fit loop a study job uses, written out, because Lightning trains one
module per Trainer: per epoch ``on_train_epoch_start`` and a fresh iterator over the job's loader; per step
``zero_grad``, the job's loss of its share of the packed output (:meth:`SegmentationModule.training_loss`), one
backward of the summed losses, gradient clipping (``gradient_clip_val``/``_algorithm`` as Lightning's precision
plugin: over the optimiser's parameters), ``optimizer.step()``; ``max_epochs``/``max_steps`` as Lightning counts
them (neither given: 1000 epochs; ``max_steps`` alone: epochs without limit). The gradient of the summed loss with
respect to job k's parameters is job k's gradient alone, so a packed job equals the job run alone up to float
round-off (``tests/test_crossval_pack.py`` states the tolerance).

Not packed (they run one by one as before, and a line says why): jobs without training (``no_finetune``), studies
whose trainer section asks for what this loop does not repeat (``accumulate_grad_batches`` > 1, a precision other
than 32-bit, an accelerator other than cpu/gpu/cuda/auto), and packs the bank refuses (input-dependent adapters
such as FlyLoRA, promptable backbones whose forward takes per-sample boxes); the refusal is checked before any
step.

Resumability is per job: a job is done when its ``summary.json`` exists. A killed pack leaves its unfinished
jobs without one, and the next run packs and trains those again from scratch; jobs of the pack that had finished
(evaluation runs job by job after training) stay done. Every job of a pack holds its own lock for the whole pack.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..adapters.multi import MultiAdapterError, PackedJobs
from ..runs import ADAPTER_FILE, RunJob
from .callbacks import AdapterInitFromData, preprocessing_record, run_callbacks, write_adapter_file
from .checks import SettingError, input_window_problem

PACKABLE_FAMILIES = ("adapter", "full", "module")
_FLOAT32 = ("32", "32-true", "None")
_ACCELERATORS = ("auto", "cpu", "gpu", "cuda")

Outcome = Any  # a job's summary dict, a JobHeld, or None (finished by another process)


def trainer_problem(section: dict[str, Any]) -> str | None:
    """Why jobs with this ``trainer:`` section cannot be packed, or None."""
    accumulate = section.get("accumulate_grad_batches")
    if accumulate not in (None, 1):
        return f"trainer.accumulate_grad_batches is {accumulate}"
    if str(section.get("precision")) not in _FLOAT32:
        return f"trainer.precision is {section['precision']!r} (packed jobs train in 32-bit)"
    if str(section.get("accelerator", "auto")) not in _ACCELERATORS:
        return f"trainer.accelerator is {section['accelerator']!r}"
    return None


def plan_units(jobs: Sequence[RunJob], pack: int, trainer: dict[str, Any]) -> list[list[RunJob]]:
    """The jobs as units that run in one process: packs of up to ``pack`` trainable jobs on the same base (the
    backbone, patch size and data are the study's), in plan order; every other job alone."""
    if pack <= 1 or trainer_problem(trainer) is not None:
        return [[job] for job in jobs]
    units: list[list[RunJob]] = []
    open_packs: dict[int, list[RunJob]] = {}
    for job in jobs:
        if job.family not in PACKABLE_FAMILIES:
            units.append([job])
            continue
        unit = open_packs.get(job.pretrain_seed)
        if unit is None:
            unit = open_packs[job.pretrain_seed] = []
            units.append(unit)
        unit.append(job)
        if len(unit) == pack:
            del open_packs[job.pretrain_seed]
    return units


def run_unit(study: Any, jobs: Sequence[RunJob], progress: Callable[[int, int], None] | None = None,
             on_done: Callable[[RunJob, Outcome], None] | None = None, say: Callable[[str], None] = print,
             ) -> list[tuple[RunJob, Outcome]]:
    """Run one unit of :func:`plan_units` under its jobs' locks; ``on_done(job, outcome)`` as each job ends.

    A job another live process holds gets :class:`~medlora.training.crossval.JobHeld` as its outcome, one that
    another process finished meanwhile None; the others run (packed if more than one is left).
    """
    from .crossval import JobHeld

    outcomes: dict[int, Outcome] = {}

    def done(index: int, outcome: Outcome) -> None:
        outcomes[index] = outcome
        if on_done is not None:
            on_done(jobs[index], outcome)

    with contextlib.ExitStack() as locks:
        mine = []
        for i, job in enumerate(jobs):
            lock = study.job_lock(job)
            if not lock.acquire(wait=False):
                done(i, JobHeld(f"running in another process ({lock.holder()})"))
                continue
            locks.callback(lock.release)
            if study.job_done(job):
                done(i, None)
            else:
                mine.append(i)
        if len(mine) == 1:
            epochs = max(int(study.config.trainer.get("max_epochs") or 1), 1)
            done(mine[0], study.run_job(jobs[mine[0]], None if progress is None else
                                        lambda e, n: progress(e, epochs)))
        elif mine:
            train_packed(study, [jobs[i] for i in mine], lambda k, summary: done(mine[k], summary), progress, say)
    return [(job, outcomes[i]) for i, job in enumerate(jobs)]


def train_packed(study: Any, jobs: Sequence[RunJob], done: Callable[[int, dict[str, Any]], None],
                 progress: Callable[[int, int], None] | None = None, say: Callable[[str], None] = print) -> None:
    """Train ``jobs`` packed, then evaluate and write each, calling ``done(index, summary)`` as each summary is
    written. Jobs the bank cannot pack run one by one instead (one line says why)."""
    from .crossval import _quiet_lightning

    with _quiet_lightning():
        lanes = [_Lane(study, study.prepare_job(job)) for job in jobs]
        for lane in lanes:
            lane.setup()
        try:
            if any(getattr(lane.module.model, "prompt", None) == "box" for lane in lanes):
                raise MultiAdapterError("the backbone takes per-sample box prompts besides the image")
            packed = PackedJobs([lane.module.model for lane in lanes])
        except MultiAdapterError as exc:
            packed = None
            say(f"{len(jobs)} jobs ({', '.join(j.name for j in jobs)}) cannot be packed: {exc}; running them one "
                "by one")
        if packed is not None:
            start = time.perf_counter()
            _train(packed, lanes, progress)
            seconds = time.perf_counter() - start
            for lane in lanes:
                lane.finish_training()
    if packed is None:
        del lanes
        for i, job in enumerate(jobs):
            done(i, study.run_job(job))
        return
    for i, lane in enumerate(lanes):
        # the pack's training time shared equally: what one job cost while K trained together
        done(i, study.finish_job(lane.run, seconds / len(lanes), {"pack_size": len(lanes), "pack_seconds": seconds}))


def _train(packed: PackedJobs, lanes: list[_Lane], progress: Callable[[int, int], None] | None) -> None:
    total = sum(lane.planned_steps() for lane in lanes)
    steps = 0
    while True:
        batches = [lane.next_batch() for lane in lanes]
        if all(b is None for b in batches):
            break
        for lane, batch in zip(lanes, batches, strict=True):
            if batch is not None:
                lane.optimizer.zero_grad()
        inputs = [None if b is None else lane.module.model_inputs(b)[0] for lane, b in zip(lanes, batches,
                                                                                           strict=True)]
        outputs = packed(inputs)
        losses = []
        for lane, batch, output in zip(lanes, batches, outputs, strict=True):
            if batch is not None:
                losses.append(lane.loss(batch, output))
        torch.stack(losses).sum().backward()
        for lane, batch in zip(lanes, batches, strict=True):
            if batch is not None:
                lane.step()
                steps += 1
        if progress is not None:
            progress(steps, total)


@contextlib.contextmanager
def _own_random_state(holder: Any) -> Any:
    """Swap ``holder.rng`` in as the process's global random state (torch, CUDA, numpy, random) and back out."""
    outer = _random_state()
    _set_random_state(holder.rng)
    try:
        yield
    finally:
        holder.rng = _random_state()
        _set_random_state(outer)


def _random_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_random_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _device(section: dict[str, Any]) -> torch.device:
    """The device Lightning's Trainer picks for ``accelerator`` with ``devices=1``."""
    accelerator = str(section.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


class _Lane:
    """One job of a pack: its module, data, optimiser, step and epoch counters, log and global random state."""

    def __init__(self, study: Any, run: Any) -> None:
        self.run, self.module, self.dm = run, run.module, run.dm
        self.rng = _random_state()  # right after the job's seeded build, as the Trainer would find it
        section = study.config.trainer
        self.max_steps = int(section.get("max_steps") or -1)
        max_epochs = section.get("max_epochs")
        self.max_epochs = int(max_epochs) if max_epochs is not None else (1000 if self.max_steps == -1 else -1)
        self.clip_value = section.get("gradient_clip_val")
        self.clip_algorithm = section.get("gradient_clip_algorithm") or "norm"
        self.device = _device(section)
        self.trainer = SimpleNamespace(datamodule=self.dm)  # what the records read from a Trainer
        self.global_step, self.epoch, self.iterator, self.done = 0, 0, None, False
        self.epoch_terms: dict[str, list[tuple[float, int]]] = {}

    def setup(self) -> None:
        """What ``Trainer.fit`` does before the first step, in its order: data set-up, the module on its device,
        ``configure_optimizers``, the fit-start checks and data-driven adapter starts, the training loader."""
        from lightning.fabric.utilities.data import _auto_add_worker_init_fn
        from lightning.pytorch.loggers import CSVLogger

        # as Trainer(deterministic="warn"), which the unpacked jobs use
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        with _own_random_state(self):
            self.dm.setup("fit")
            self.module.to(self.device)
            self.optimizer = self.module.configure_optimizers()
            problem = input_window_problem(self.module.model,
                                           preprocessing_record(self.trainer, self.module)["hu_window"])
            if problem:
                raise SettingError("data.hu_window", problem)
            callbacks = run_callbacks(adapter_path=self.run.folder / ADAPTER_FILE)
            init = next(cb for cb in callbacks if isinstance(cb, AdapterInitFromData))
            from ..adapters.data_init import data_adapters

            if data_adapters(self.module.model):
                init._initialise(self.module, self.dm.train_dataloader())
            self.loader = self.dm.train_dataloader()
            _auto_add_worker_init_fn(self.loader, 0)
        self.logger = CSVLogger(str(self.run.folder), name="logs")
        self.logger.log_hyperparams({**self.module.hparams, **self.dm.hparams})

    def planned_steps(self) -> int:
        by_epochs = self.max_epochs * len(self.loader) if self.max_epochs != -1 else None
        candidates = [n for n in (by_epochs, self.max_steps if self.max_steps != -1 else None) if n is not None]
        return min(candidates)

    def next_batch(self) -> dict[str, Any] | None:
        """The job's next training batch on its device, or None once its budget is spent."""
        if self.done:
            return None
        with _own_random_state(self):
            while True:
                if self.iterator is None:
                    if self.max_epochs != -1 and self.epoch >= self.max_epochs:
                        self.done = True
                        return None
                    self.module.on_train_epoch_start()
                    self.iterator = iter(self.loader)
                batch = next(self.iterator, None)
                if batch is not None:
                    return self.module.transfer_batch_to_device(batch, self.device, 0)
                self._end_epoch()

    def loss(self, batch: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        with _own_random_state(self):
            loss, terms = self.module.training_loss(batch, output)
        self.batch_size = int(torch.as_tensor(batch["image"]).shape[0])
        self.step_terms = {"train/loss": loss.detach(), **terms}
        return loss

    def step(self) -> None:
        if self.clip_value:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            if self.clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, self.clip_value)
            else:
                torch.nn.utils.clip_grad_norm_(params, self.clip_value)
        self.optimizer.step()
        values = {name: float(value) for name, value in self.step_terms.items()}
        self.logger.log_metrics({**{f"{n}_step": v for n, v in values.items()}, "epoch": self.epoch},
                                step=self.global_step)
        for name, value in values.items():
            self.epoch_terms.setdefault(name, []).append((value, self.batch_size))
        self.global_step += 1
        if self.max_steps != -1 and self.global_step >= self.max_steps:
            self._end_epoch()
            self.done = True

    def _end_epoch(self) -> None:
        """Lightning's epoch-level log: each term's mean over the epoch's steps, weighted by batch size."""
        if self.epoch_terms:
            means = {f"{n}_epoch": sum(v * b for v, b in vs) / sum(b for _, b in vs) for n, vs in
                     self.epoch_terms.items()}
            self.logger.log_metrics({**means, "epoch": self.epoch}, step=self.global_step - 1)
        self.epoch_terms = {}
        self.iterator = None
        self.epoch += 1

    def finish_training(self) -> None:
        """What ``on_fit_end`` writes: the adapter file (adapter jobs), and the log."""
        self.logger.save()
        if self.module.is_adapter_run:
            write_adapter_file(self.trainer, self.module, self.run.folder / ADAPTER_FILE)
