"""The files of a ``medlora crossval`` run folder, and a reader of them that needs no training code.

A run folder (the ``--out`` of ``medlora crossval``) holds::

    study.json                           the study config as run (StudyConfig as a dict); claims the folder
    splits_final.json                    the folds, nnU-Net format
    data/target, data/source             phantom datasets, when the study generates them
    pretrain/base.safetensors            the pretrained base (unless study.json names a base_checkpoint)
    pretrain/summary.json                pretraining finished (written last)
    jobs/<job>/fold_<k>/summary.json     a job finished (written last, nnU-Net summary shape)
    jobs/<job>/fold_<k>/adapter.safetensors   adapter jobs: the trained adapter
    jobs/<job>/fold_<k>/model.safetensors     full and module-wise jobs: the fine-tuned network

A job is one (method, rank, fold): its name is ``<method>[_<training rule>][_r<rank>]`` for adapter methods
that take a rank, ``module_<group>`` for module-wise fine-tuning, and the method's name otherwise
(``no_finetune``, ``full``). Jobs are planned fold by fold in the order of the study's ``methods``.

The names and rules here are those ``medlora.training.crossval`` writes; they are defined once here so that
inference (and any later reader: serving, transfer) never imports the training stack.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MedloraError

__all__ = [
    "ADAPTER_FILE",
    "BASE_FILE",
    "DATA_DIR",
    "FAMILIES",
    "JOBS_DIR",
    "MODEL_FILE",
    "PRETRAIN_DIR",
    "SPLITS_FILE",
    "STUDY_FILE",
    "SUMMARY_FILE",
    "RunFolder",
    "RunFolderError",
    "RunJob",
    "fold_dir_name",
    "job_name",
    "method_family",
]

STUDY_FILE = "study.json"
SPLITS_FILE = "splits_final.json"
SUMMARY_FILE = "summary.json"
DATA_DIR = "data"
PRETRAIN_DIR = "pretrain"
BASE_FILE = "base.safetensors"
JOBS_DIR = "jobs"
ADAPTER_FILE = "adapter.safetensors"
MODEL_FILE = "model.safetensors"

# Baseline method names and their family; every other method name is an adapter method.
FAMILIES: dict[str, str] = {"no_finetune": "none", "full": "full", "module": "module"}


class RunFolderError(MedloraError, ValueError):
    """A run folder (or its study.json) that cannot be read; the message names the file."""


def method_family(method: str) -> str:
    """``none`` (no fine-tuning), ``full``, ``module`` (module-wise fine-tuning) or ``adapter``."""
    return FAMILIES.get(method, "adapter")


def job_name(method: str, rank: int | None, group: str | None = None, training_rule: str | None = None) -> str:
    """A job's folder name (see the module docstring)."""
    if method == "module":
        return f"module_{group}"
    base = f"{method}_{training_rule}" if training_rule else method
    return base if rank is None else f"{base}_r{rank}"


def fold_dir_name(fold: int) -> str:
    return f"fold_{fold}"


@dataclass(frozen=True)
class RunJob:
    """One planned (method, rank, fold) of a study."""

    name: str
    method: str
    family: str
    rank: int | None
    fold: int


def _uses_rank(method: str) -> bool:
    from .adapters import get_method

    return bool(get_method(method).uses_rank)


class RunFolder:
    """A crossval run folder read from its files alone: its study record, jobs, base and job outputs."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        record = self.root / STUDY_FILE
        if not record.is_file():
            raise RunFolderError(f"{self.root}: not a medlora crossval run folder (no {STUDY_FILE})")
        try:
            study = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunFolderError(f"{record}: unreadable ({' '.join(str(exc).split())})") from None
        if not isinstance(study, dict):
            raise RunFolderError(f"{record}: expected a JSON object")
        self.study: dict[str, Any] = study
        self.jobs = self._plan()

    @property
    def record(self) -> Path:
        return self.root / STUDY_FILE

    def _section(self, key: str) -> dict[str, Any]:
        value = self.study.get(key) or {}
        if not isinstance(value, dict):
            raise RunFolderError(f"{self.record}: '{key}' must be an object")
        return value

    def _plan(self) -> list[RunJob]:
        methods = self.study.get("methods")
        folds = self.study.get("folds")
        if not isinstance(methods, list) or not isinstance(folds, int) or isinstance(folds, bool):
            raise RunFolderError(f"{self.record}: needs 'folds' (an integer) and 'methods' (a list)")
        jobs = []
        for fold in range(folds):
            for i, entry in enumerate(methods):
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                    raise RunFolderError(f"{self.record}: methods[{i}] needs a 'name'")
                method = entry["name"]
                family = method_family(method)
                try:
                    ranked = family == "adapter" and _uses_rank(method)
                except ValueError as exc:
                    raise RunFolderError(f"{self.record}: methods[{i}]: {exc}") from None
                for rank in (entry.get("ranks") or []) if ranked else [None]:
                    name = job_name(method, rank, entry.get("group"), entry.get("training_rule"))
                    jobs.append(RunJob(name, method, family, rank, fold))
        return jobs

    # ---- records of the study

    @property
    def job_names(self) -> list[str]:
        return list(dict.fromkeys(j.name for j in self.jobs))

    def jobs_named(self, name: str) -> list[RunJob]:
        """The folds of job ``name``, by fold."""
        return sorted((j for j in self.jobs if j.name == name), key=lambda j: j.fold)

    @property
    def architecture(self) -> dict[str, Any]:
        """``{"backbone", "backbone_args", "spatial_dims"}`` of the study's model (its defaults if unset)."""
        model = self._section("model")
        return {"backbone": str(model.get("backbone", "mv_unet")),
                "backbone_args": dict(model.get("backbone_args") or {}),
                "spatial_dims": int(model.get("spatial_dims", 3))}

    @property
    def preprocessing(self) -> dict[str, Any]:
        """``{"hu_window", "target_spacing", "roi_size"}`` the study's evaluation used; ``roi_size`` is the
        inference ROI, else the training patch."""
        data = self._section("data")
        return {"hu_window": data.get("hu_window"), "target_spacing": data.get("target_spacing"),
                "roi_size": data.get("inference_roi") or data.get("patch_size")}

    # ---- paths

    @property
    def pretrain_dir(self) -> Path:
        return self.root / PRETRAIN_DIR

    @property
    def base_path(self) -> Path:
        """The base every job starts from: the study's ``base_checkpoint``, else the pretrained base here."""
        given = self.study.get("base_checkpoint")
        return Path(given) if given else self.pretrain_dir / BASE_FILE

    def pretrain_done(self) -> bool:
        return bool(self.study.get("base_checkpoint")) or (self.pretrain_dir / SUMMARY_FILE).exists()

    def job_dir(self, job: RunJob) -> Path:
        return self.root / JOBS_DIR / job.name / fold_dir_name(job.fold)

    def summary_path(self, job: RunJob) -> Path:
        return self.job_dir(job) / SUMMARY_FILE

    def job_done(self, job: RunJob) -> bool:
        return self.summary_path(job).exists()

    def adapter_path(self, job: RunJob) -> Path:
        return self.job_dir(job) / ADAPTER_FILE

    def model_path(self, job: RunJob) -> Path:
        return self.job_dir(job) / MODEL_FILE

    def weights_path(self, job: RunJob) -> Path | None:
        """The file a finished job's model is made of besides the base: its adapter or its fine-tuned network
        (None for ``no_finetune``, which is the base itself)."""
        return {"adapter": self.adapter_path, "full": self.model_path, "module": self.model_path}.get(
            job.family, lambda _: None)(job)
