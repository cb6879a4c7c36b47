"""The files of a ``medlora crossval`` run folder, its job plan, and a reader of them that needs no training code.

A run folder (the ``--out`` of ``medlora crossval``) holds::

    study.json                         the study config as run (StudyConfig.to_record()); claims the folder
    splits_final.json                  the folds of the target dataset, nnU-Net format
    splits/seed_<s>_cases_<n>.json     the folds with each training set cut to n cases (train_cases), per seed
    splits/source_eval.json            the held-out source-domain cases (source_eval), split like the folds
    data/target, data/source, data/source_eval   phantom datasets, when the study generates them
    pretrain/base.safetensors          the pretrained base (unless the study gives model.pretrained); with
                                       several pretrain_seeds one folder each: pretrain/seed_<p>/base.safetensors
    pretrain/summary.json              pretraining finished (written last)
    jobs/<job>/seed_<s>/cases_<n>/fold_<k>/summary.json         a job finished (written last, nnU-Net shape)
    jobs/<job>/seed_<s>/cases_<n>/fold_<k>/summary_source.json  the same model on held-out source cases
    jobs/<job>/seed_<s>/cases_<n>/fold_<k>/adapter.safetensors  adapter jobs: the trained adapter
    jobs/<job>/seed_<s>/cases_<n>/fold_<k>/model.safetensors    full, module-wise and transplant jobs: the network;
                                       loraprune jobs: the pruned base with the adapter merged (medlora prune)
    jobs/<job>/seed_<s>/cases_<n>/fold_<k>/donor.safetensors    transplant jobs: the trained stage (NOT donor)
    locks/                             lock files of the processes sharing the folder

A job is one (method entry, rank) of the study, repeated for every fine-tuning seed ``s`` of ``seeds``, every
training-set size ``n`` of ``train_cases`` (``all``: the whole training part of the fold) and every fold ``k``.
Its name is ``<method>[_<training rule>][_fw<forgetting weight>][_r<rank>]`` for adapter methods that take a
rank, ``module_<group>`` for module-wise fine-tuning (``finetune: <group>``), ``transplant_<stage>`` for a NOT
stage (``stage: <stage>``, its ``:`` written ``-``), ``loraprune<percent>_<adapter method>_r<rank>`` for
LoRAPrune at a sparsity (``loraprune25_lora_r4``), and the method's name otherwise
(``no_finetune``, ``full``). Jobs are planned seed by seed, then training-set size, fold, and the study's
method order.

The names and rules here are the ones ``medlora.training.crossval`` writes with; they are defined once here
so that inference (and any later reader: the report, serving, transfer) never imports the training stack.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MedloraError

__all__ = [
    "ADAPTER_FILE",
    "ALL_CASES",
    "BASE_FILE",
    "BASELINE_LABELS",
    "DATA_DIR",
    "FAMILIES",
    "JOBS_DIR",
    "LOCKS_DIR",
    "MODEL_FILE",
    "DONOR_FILE",
    "PRETRAIN_DIR",
    "SOURCE_EVAL_SPLITS",
    "SOURCE_SUMMARY_FILE",
    "SPLITS_DIR",
    "SPLITS_FILE",
    "STAGE_PREFIX",
    "STUDY_FILE",
    "SUMMARY_FILE",
    "RunFolder",
    "RunFolderError",
    "RunJob",
    "job_label",
    "job_name",
    "job_name_without_forgetting",
    "job_relpath",
    "method_family",
    "plan_jobs",
    "pretrain_relpath",
    "subset_splits_name",
]

STUDY_FILE = "study.json"
SPLITS_FILE = "splits_final.json"
SPLITS_DIR = "splits"
SOURCE_EVAL_SPLITS = "source_eval.json"
SUMMARY_FILE = "summary.json"
SOURCE_SUMMARY_FILE = "summary_source.json"
DATA_DIR = "data"
PRETRAIN_DIR = "pretrain"
BASE_FILE = "base.safetensors"
JOBS_DIR = "jobs"
LOCKS_DIR = "locks"
ADAPTER_FILE = "adapter.safetensors"
MODEL_FILE = "model.safetensors"
DONOR_FILE = "donor.safetensors"
ALL_CASES = "all"

# Baseline method names and their family; every other method name is an adapter method.
FAMILIES: dict[str, str] = {"no_finetune": "none", "full": "full", "module": "module", "transplant": "transplant",
                             "loraprune": "loraprune"}
STAGE_PREFIX = "stage:"  # model.finetune of a transplant job: stage:<stage>
BASELINE_LABELS: dict[str, str] = {"no_finetune": "no fine-tuning", "full": "full fine-tuning"}


class RunFolderError(MedloraError, ValueError):
    """A run folder (or its study.json) that cannot be read; the message names the file."""


def method_family(method: str) -> str:
    """``none`` (no fine-tuning), ``full``, ``module`` (module-wise fine-tuning) or ``adapter``."""
    return FAMILIES.get(method, "adapter")


def _weight_text(weight: float) -> str:
    return f"{float(weight):g}"


def _percent(sparsity: float | None) -> str:
    return f"{float(sparsity or 0.0) * 100:g}"


def job_name(method: str, rank: int | None, finetune: str | None = None, training_rule: str | None = None,
             forgetting_weight: float = 0.0, sparsity: float | None = None, adapter_method: str | None = None) -> str:
    """A job's folder name (see the module docstring); ``finetune`` is the module group of ``module`` jobs,
    ``sparsity`` and ``adapter_method`` those of ``loraprune`` jobs (``loraprune25_lora_r4``)."""
    if method == "module":
        base = f"module_{finetune}"
    elif method == "loraprune":
        base = f"loraprune{_percent(sparsity)}_{adapter_method}"
    elif method == "transplant":
        base = f"transplant_{str(finetune).removeprefix(STAGE_PREFIX).replace(':', '-')}"
    else:
        base = f"{method}_{training_rule}" if training_rule else method
    if forgetting_weight:
        base = f"{base}_fw{_weight_text(forgetting_weight)}"
    return base if rank is None else f"{base}_r{rank}"


def job_name_without_forgetting(name: str, forgetting_weight: float) -> str:
    """The name of the same job without the forgetting regulariser (``lora_fw0.5_r4`` -> ``lora_r4``)."""
    return name.replace(f"_fw{_weight_text(forgetting_weight)}", "", 1) if forgetting_weight else name


def job_label(method: str, rank: int | None, finetune: str | None = None, training_rule: str | None = None,
              forgetting_weight: float = 0.0, sparsity: float | None = None, adapter_method: str | None = None
              ) -> str:
    """A job's display name: the method's label from the adapter registry, ``full fine-tuning``, ``module-wise
    (decoder)``; then a training rule and a forgetting weight λ, and the rank last (``LoRA + lora_pro λ=0.5 r4``),
    as the report's tables expect (:func:`medlora.evaluation.statistics.display_name`)."""
    if method == "module":
        label = f"module-wise ({finetune})"
    elif method == "transplant":
        label = f"transplant ({str(finetune).removeprefix(STAGE_PREFIX)})"
    elif method in BASELINE_LABELS:
        label = BASELINE_LABELS[method]
    elif method == "loraprune":
        from .adapters import get_method

        label = f"LoRAPrune {_percent(sparsity)}% ({get_method(str(adapter_method)).label})"
    else:
        from .adapters import get_method

        label = get_method(method).label
    if training_rule:
        label = f"{label} + {training_rule}"
    if forgetting_weight:
        label = f"{label} λ={_weight_text(forgetting_weight)}"
    return label if rank is None else f"{label} r{rank}"


def _cases_text(cases: int | str) -> str:
    return str(cases)


def job_relpath(name: str, seed: int, cases: int | str, fold: int) -> Path:
    """``jobs/<job>/seed_<s>/cases_<n>/fold_<k>`` relative to the run folder."""
    return Path(JOBS_DIR, name, f"seed_{seed}", f"cases_{_cases_text(cases)}", f"fold_{fold}")


def pretrain_relpath(seed: int, n_seeds: int) -> Path:
    """The pretraining folder: ``pretrain`` for a study with one pretraining, else ``pretrain/seed_<p>``."""
    return Path(PRETRAIN_DIR) if n_seeds <= 1 else Path(PRETRAIN_DIR, f"seed_{seed}")


def subset_splits_name(seed: int, cases: int | str) -> str:
    """The file under ``splits/`` holding the folds with training sets cut to ``cases`` for ``seed``."""
    return f"seed_{seed}_cases_{_cases_text(cases)}.json"


@dataclass(frozen=True)
class RunJob:
    """One planned (method entry, rank, seed, training-set size, fold) of a study.

    ``entry`` is the index of the method entry in the study's ``methods``; ``pretrain_seed`` says which
    pretrained base the job starts from.
    """

    name: str
    method: str
    family: str
    rank: int | None
    fold: int
    seed: int = 0
    train_cases: int | str = ALL_CASES
    pretrain_seed: int = 0
    entry: int = 0
    label: str = ""

    @property
    def relpath(self) -> Path:
        return job_relpath(self.name, self.seed, self.train_cases, self.fold)

    @property
    def is_main(self) -> bool:
        """A job on the whole training part of its fold (what the main tables and inference use)."""
        return self.train_cases == ALL_CASES

    def selectors(self) -> dict[str, str]:
        """The values ``--only key=value`` matches against."""
        return {"job": self.name, "method": self.method, "rank": str(self.rank), "fold": str(self.fold),
                "family": self.family, "seed": str(self.seed), "train_cases": _cases_text(self.train_cases)}

    def matches(self, selector: Mapping[str, str]) -> bool:
        values = self.selectors()
        return all(values.get(k) == v for k, v in selector.items())


def _uses_rank(method: str) -> bool:
    from .adapters import get_method

    return bool(get_method(method).uses_rank)


def plan_jobs(study: Mapping[str, Any], where: str = "study") -> list[RunJob]:
    """Every job of a study record (``study.json``, or ``StudyConfig.to_record()``), in run order.

    Raises ``ValueError`` naming ``where`` and the entry when the record cannot be planned.
    """
    methods, folds = study.get("methods"), study.get("folds")
    if not isinstance(methods, list) or not isinstance(folds, int) or isinstance(folds, bool):
        raise ValueError(f"{where}: needs 'folds' (an integer) and 'methods' (a list)")
    seeds = list(study.get("seeds") or [0])
    pretrain_seeds = list(study.get("pretrain_seeds") or seeds[:1])
    sizes = list(study.get("train_cases") or [ALL_CASES])
    jobs: list[RunJob] = []
    for si, seed in enumerate(seeds):
        pretrain_seed = pretrain_seeds[si] if len(pretrain_seeds) > 1 else pretrain_seeds[0]
        for cases in sizes:
            for fold in range(folds):
                for i, entry in enumerate(methods):
                    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                        raise ValueError(f"{where}: methods[{i}] needs a 'name'")
                    method = entry["name"]
                    family = method_family(method)
                    model = entry.get("model") or {}
                    adapter_method = method if family == "adapter" else entry.get("prune_method")
                    try:
                        ranked = family in ("adapter", "loraprune") and _uses_rank(str(adapter_method))
                    except ValueError as exc:
                        raise ValueError(f"{where}: methods[{i}]: {exc}") from None
                    details = (model.get("finetune"), model.get("training_rule"),
                               float(model.get("forgetting_weight") or 0.0), entry.get("sparsity"),
                               entry.get("prune_method"))
                    for rank in (entry.get("ranks") or []) if ranked else [None]:
                        jobs.append(RunJob(job_name(method, rank, *details), method, family, rank, fold, seed,
                                           cases, pretrain_seed, i, job_label(method, rank, *details)))
    return jobs


class RunFolder:
    """A crossval run folder read from its files alone: its study record, jobs, bases and job outputs."""

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
        if "seeds" not in study and "seed" in study:
            raise RunFolderError(f"{record}: written by an older medlora (jobs/<job>/fold_<k> layout); run the study "
                                 "again with this version to read it")
        self.study: dict[str, Any] = study
        try:
            self.jobs = plan_jobs(study, str(record))
        except ValueError as exc:
            raise RunFolderError(str(exc)) from None

    @property
    def record(self) -> Path:
        return self.root / STUDY_FILE

    def _section(self, key: str) -> dict[str, Any]:
        value = self.study.get(key) or {}
        if not isinstance(value, dict):
            raise RunFolderError(f"{self.record}: '{key}' must be an object")
        return value

    # ---- records of the study

    @property
    def job_names(self) -> list[str]:
        return list(dict.fromkeys(j.name for j in self.jobs))

    @property
    def main_seed(self) -> int:
        """The first fine-tuning seed: the one whose fold models inference ensembles."""
        return self.jobs[0].seed if self.jobs else 0

    def jobs_named(self, name: str, seed: int | None = None) -> list[RunJob]:
        """The folds of job ``name`` trained on the whole training part of each fold with fine-tuning seed
        ``seed`` (default: the study's first), by fold."""
        seed = self.main_seed if seed is None else seed
        return sorted((j for j in self.jobs if j.name == name and j.is_main and j.seed == seed),
                      key=lambda j: j.fold)

    @property
    def architecture(self) -> dict[str, Any]:
        """``{"backbone", "backbone_args", "spatial_dims"}`` of the study's model (its defaults if unset)."""
        model, data = self._section("model"), self._section("data")
        return {"backbone": str(model.get("backbone", "mv_unet")),
                "backbone_args": dict(model.get("backbone_args") or {}),
                "spatial_dims": int(data.get("spatial_dims", 3))}

    @property
    def preprocessing(self) -> dict[str, Any]:
        """``{"hu_window", "target_spacing", "roi_size"}`` the study's evaluation used; ``roi_size`` is the
        model's sliding-window size, else the training patch."""
        model, data = self._section("model"), self._section("data")
        return {"hu_window": data.get("hu_window"), "target_spacing": data.get("target_spacing"),
                "roi_size": model.get("roi_size") or data.get("patch_size")}

    # ---- paths

    @property
    def _pretrain_seeds(self) -> Sequence[int]:
        return list(self.study.get("pretrain_seeds") or (self.study.get("seeds") or [0])[:1])

    def pretrain_dir(self, seed: int | None = None) -> Path:
        seeds = self._pretrain_seeds
        return self.root / pretrain_relpath(seeds[0] if seed is None else seed, len(seeds))

    def base_path_of(self, job: RunJob | None = None) -> Path:
        """The base a job starts from: the study's ``model.pretrained``, else the base pretrained with the job's
        pretraining seed in this folder (default: the first)."""
        given = self._section("model").get("pretrained")
        if given:
            return Path(given)
        return self.pretrain_dir(None if job is None else job.pretrain_seed) / BASE_FILE

    @property
    def base_path(self) -> Path:
        """The base of the main jobs (:meth:`base_path_of` the first pretraining)."""
        return self.base_path_of(self.jobs_named(self.jobs[0].name)[0] if self.jobs else None)

    def pretrain_done(self, seed: int | None = None) -> bool:
        given = self._section("model").get("pretrained")
        return bool(given) or (self.pretrain_dir(seed) / SUMMARY_FILE).exists()

    def job_dir(self, job: RunJob) -> Path:
        return self.root / job.relpath

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
        return {"adapter": self.adapter_path, "full": self.model_path, "module": self.model_path,
                "transplant": self.model_path, "loraprune": self.model_path}.get(
            job.family, lambda _: None)(job)
