"""Per-case result tables of a study run folder: scan its job folders' ``summary.json`` files, write CSV.

:func:`scan_run` is the one reader of a run folder's results: it turns every finished fold (a folder with a
``summary.json``; the layout is :mod:`medlora.runs`', ``jobs/<job>/seed_<s>/cases_<n>/fold_<k>``, or the older
``jobs/<job>/fold_<k>``) into a :class:`FoldResult` of per-case rows (ids, seed, training-set size, domain, all
metrics, volume bin, parameters, training time) and lists the unfinished ones. A fold's ``summary_source.json``
(the same model on held-out source-domain cases) gives rows of domain ``source``. :func:`collect` flattens them
in the study's job order and :func:`write_results_csv` writes them as ``results.csv`` with a stable column
order. :meth:`RunScan.select` keeps one condition (the main tables use the target cases of jobs trained on
whole folds).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_bytes
from ..runs import ALL_CASES, JOBS_DIR, SOURCE_SUMMARY_FILE, SUMMARY_FILE
from .calibration import CalibrationHistogram
from .metrics import volume_bin
from .statistics import as_float, nanmean
from .summary import FOREGROUND_LABELS, ReportError, load_summary

METRIC_COLUMNS: tuple[str, ...] = (
    "Dice", "IoU", "soft_Dice", "HD95_mm", "TP", "FP", "FN", "TN", "n_pred", "n_ref",
    "volume_true_ml", "volume_pred_ml", "volume_soft_ml", "volume_error_ml",
)
ID_COLUMNS: tuple[str, ...] = ("job", "method", "label", "rank", "family", "seed", "train_cases", "domain", "fold",
                               "case_id")
TAIL_COLUMNS: tuple[str, ...] = ("volume_bin", "n_train_cases", "forgetting_weight", "trainable_params",
                                 "total_params", "percent_trainable", "train_seconds")
TARGET, SOURCE = "target", "source"  # the rows' domains

_FAMILY_ORDER = {"none": 0, "full": 1, "module": 2, "transplant": 3, "adapter": 4, "loraprune": 5}
# Used only when the study does not tell its own method order (``study_info["job_names"]``).
_ADAPTER_ORDER = ("lora", "dora", "lora_c", "dora_c", "conv_lora", "conv_dora", "cp_lora", "cp_dora", "salt", "svd")
_FAMILY_BY_JOB = {"no_finetune": "none", "full": "full"}


@dataclass
class FoldResult:
    """One finished (job, fold): its ``summary.json``, the job's description and one row per held-out case.

    ``info["calibration"]`` is the fold's :class:`~.calibration.CalibrationHistogram` when its summary's
    ``medlora`` block carries one (``CalibrationHistogram.to_dict()`` under ``calibration``), else None.
    """

    path: Path
    info: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunScan:
    """What a run folder holds: the finished folds and the ``job/fold_<k>`` names of unfinished ones."""

    folds: list[FoldResult]
    unfinished: list[str]

    def rows(self, job_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """All per-case rows in the study's order (see :func:`job_sort_key`)."""
        return sort_rows([row for fold in self.folds for row in fold.rows], job_names)

    def seed_averaged(self) -> RunScan:
        """One fold result per (job, domain, size, fold) whose rows are the case's metrics averaged over the
        seeds (nan-aware; ``seed`` is None), training time averaged too: the numbers the main tables and the
        paired tests use. Calibration histograms of the seeds are pooled."""
        groups: dict[tuple[Any, ...], list[FoldResult]] = {}
        for f in self.folds:
            key = (f.info["job"], f.info["domain"], str(f.info["train_cases"]), f.info["fold"])
            groups.setdefault(key, []).append(f)
        out = []
        for members in groups.values():
            if len(members) == 1 and members[0].info["seed"] is None:
                out.append(members[0])
                continue
            info = {**members[0].info, "seed": None,
                    "train_seconds": nanmean([m.info["train_seconds"] for m in members])}
            hists = [m.info.get("calibration") for m in members if m.info.get("calibration") is not None]
            info["calibration"] = sum(hists[1:], hists[0]) if hists else None
            by_case: dict[str, list[dict[str, Any]]] = {}
            for m in members:
                for row in m.rows:
                    by_case.setdefault(row["case_id"], []).append(row)
            rows = []
            for case_rows in by_case.values():
                row = {**case_rows[0], "seed": None, "train_seconds": info["train_seconds"]}
                for key in METRIC_COLUMNS:
                    if key in row:
                        row[key] = nanmean([as_float(r.get(key)) for r in case_rows])
                rows.append(row)
            out.append(FoldResult(members[0].path, info, rows))
        return RunScan(out, self.unfinished)

    def select(self, domain: str = TARGET, train_cases: int | str | None = ALL_CASES) -> RunScan:
        """The folds of one domain, trained on ``train_cases`` cases (None: every size)."""
        return RunScan([f for f in self.folds if f.info["domain"] == domain
                        and (train_cases is None or str(f.info["train_cases"]) == str(train_cases))],
                       self.unfinished)


def _infer_family(job: str) -> str:
    if job in _FAMILY_BY_JOB:
        return _FAMILY_BY_JOB[job]
    if job.startswith("transplant_"):
        return "transplant"
    if job.startswith("loraprune"):
        return "loraprune"
    return "module" if job.startswith("module_") else "adapter"


def _fold_result(path: Path, job_dir: str, domain: str = TARGET) -> FoldResult:
    summary = load_summary(path)
    block = summary.get("medlora")
    if not isinstance(block, dict):
        raise ReportError(f"{path}: summary.json has no 'medlora' block (not written by a medlora study?)")
    fold_dir = path.parent.name
    job = str(block.get("job") or job_dir)
    try:
        fold = int(block["fold"]) if block.get("fold") is not None else int(fold_dir.removeprefix("fold_"))
        seed = None if block.get("seed") is None else int(block["seed"])
        cases = block.get("train_cases", ALL_CASES)
        cases = cases if cases == ALL_CASES else int(cases)
        n_train = None if block.get("n_train_cases") is None else int(block["n_train_cases"])
        weight = as_float(block.get("forgetting_weight", 0.0))
        rank = None if block.get("rank") is None else int(block["rank"])
        trainable = int(block.get("trainable_params") or 0)
        total = int(block.get("total_params") or 0)
        train_seconds = as_float(block.get("train_seconds", 0.0))
    except (TypeError, ValueError) as exc:
        raise ReportError(f"{path}: corrupt 'medlora' block ({exc})".replace("\n", " ")) from None
    calibration = None
    if block.get("calibration") is not None:  # optional: pooled voxel histograms of the fold's cases
        try:
            calibration = CalibrationHistogram.from_dict(block["calibration"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"{path}: corrupt 'medlora.calibration' block ({type(exc).__name__} {exc})"
                              .replace("\n", " ")) from None
    info = {
        "job": job, "method": str(block.get("method") or job), "label": str(block.get("label") or job),
        "rank": rank, "family": str(block.get("family") or _infer_family(job)), "seed": seed, "train_cases": cases,
        "domain": str(block.get("domain") or domain), "fold": fold, "n_train_cases": n_train,
        "forgetting_weight": weight,
        "trainable_params": trainable, "total_params": total,
        "percent_trainable": 100.0 * trainable / total if total else float("nan"),
        "train_seconds": train_seconds, "calibration": calibration,
    }
    result = FoldResult(path, info)
    label = FOREGROUND_LABELS[0]
    for i, case in enumerate(summary["metric_per_case"]):
        try:
            metrics = case["metrics"][label]
            case_id = str(case["case_id"])
        except KeyError as exc:
            raise ReportError(f"{path}: corrupt summary.json (metric_per_case[{i}]: KeyError {exc})") from None
        true_ml = metrics.get("volume_true_ml", float("nan"))
        row = {k: info[k] for k in ID_COLUMNS if k != "case_id"}
        row["case_id"] = case_id
        row.update(metrics)
        row["volume_bin"] = "" if math.isnan(true_ml) else volume_bin(true_ml)
        row.update({k: info[k] for k in TAIL_COLUMNS if k != "volume_bin"})
        result.rows.append(row)
    return result


def scan_run(run_dir: str | os.PathLike[str]) -> RunScan:
    """Read every job fold folder of a run folder (:mod:`medlora.runs`' layout, or the older
    ``jobs/<job>/fold_<k>``); a fold folder without ``summary.json`` is unfinished. A corrupt summary raises
    :class:`~medlora.evaluation.summary.ReportError` whose one line names the file.
    """
    jobs = Path(run_dir) / JOBS_DIR
    found = [(p, p.parents[2].name) for p in jobs.glob("*/seed_*/cases_*/fold_*") if p.is_dir()]
    found += [(p, p.parent.name) for p in jobs.glob("*/fold_*") if p.is_dir()]
    folds, unfinished = [], []
    for fold_dir, job in sorted(found):
        summary = fold_dir / SUMMARY_FILE
        if summary.is_file():
            folds.append(_fold_result(summary, job))
            source = fold_dir / SOURCE_SUMMARY_FILE
            if source.is_file():
                folds.append(_fold_result(source, job, SOURCE))
        else:
            unfinished.append(fold_dir.relative_to(jobs).as_posix())
    return RunScan(folds, unfinished)


def job_sort_key(family: str, method: str, rank: int | None, job: str,
                 job_names: Sequence[str] | None = None) -> tuple[Any, ...]:
    """The study's order: no fine-tuning, full, module-wise, adapters; within a family the config's order.

    Jobs the study did not name (``job_names``) follow in a fixed adapter order, then by method, rank and name.
    """
    if job_names and job in job_names:
        within: tuple[Any, ...] = (0, job_names.index(job))
    elif method in _ADAPTER_ORDER:
        within = (1, _ADAPTER_ORDER.index(method), method, rank or 0, job)
    else:
        within = (2, 0, method, rank or 0, job)
    return (_FAMILY_ORDER.get(family, len(_FAMILY_ORDER)), *within)


def sort_rows(rows: Sequence[dict[str, Any]], job_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per-case rows in job order (:func:`job_sort_key`), then by fold and case id."""
    return sorted(rows, key=lambda r: (*job_sort_key(r["family"], r["method"], r["rank"], r["job"], job_names),
                                       r["domain"] != TARGET, _size_key(r["train_cases"]), r["seed"] or 0,
                                       r["fold"], r["case_id"]))


def _size_key(cases: int | str) -> tuple[int, int]:
    return (1, 0) if cases == ALL_CASES else (0, int(cases))


def collect(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per (job, fold, case) of every finished job: ids, all metrics, volume bin, parameters, time.

    Job folders without a ``summary.json`` (unfinished) are skipped; a corrupt one raises ``ReportError``
    (a ``ValueError``) whose one-line message names the file.
    """
    return scan_run(run_dir).rows()


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    fixed = set(ID_COLUMNS) | set(METRIC_COLUMNS) | set(TAIL_COLUMNS)
    extra = sorted({k for r in rows for k in r} - fixed)
    return [*ID_COLUMNS, *METRIC_COLUMNS, *extra, *TAIL_COLUMNS]


def write_results_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write ``rows`` (from :func:`collect`) as CSV with a stable column order, atomically. Returns the path."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


__all__ = ["ID_COLUMNS", "METRIC_COLUMNS", "SOURCE", "TAIL_COLUMNS", "TARGET", "FoldResult", "RunScan", "collect",
           "job_sort_key", "scan_run", "sort_rows", "write_results_csv"]
