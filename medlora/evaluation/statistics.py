"""Aggregation of per-case results: nan-aware means, and per-job statistics over the cases of all folds.

Statistics are over the cases of all folds pooled: mean and population standard deviation, nan-aware
(Dice is NaN when prediction and reference are both empty, as in nnU-Net, and such cases are left out).
Dice per volume bin uses the seed paper's bins (Minoccheri, Hodgman et al. 2025): (0, 25], (25, 50],
(50, 100], (100, 225] mL of the true volume. This is where paired comparisons between jobs (bootstrap
intervals, signed-rank tests) belong; they take the per-case tables of :mod:`medlora.evaluation.results`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .metrics import VOLUME_BINS_ML

if TYPE_CHECKING:
    from .results import FoldResult

PAPER_BINS: tuple[str, ...] = tuple(
    f"{lo:g}-{hi:g}" for lo, hi in zip(VOLUME_BINS_ML[:-1], VOLUME_BINS_ML[1:], strict=True)
)


def nanmean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    """Mean and (population) standard deviation over the non-NaN values, and their count (NaN, NaN, 0 if none)."""
    arr = np.asarray(list(values), dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan"), 0
    return float(arr.mean()), float(arr.std()), int(arr.size)


def nanmean(values: Iterable[Any]) -> float:
    """Mean over the non-NaN values; NaN when there are none (no warning, unlike ``numpy.nanmean``)."""
    return nanmean_std(values)[0]


def as_float(value: Any) -> float:
    """``float(value)``, with ``None`` (a missing value) as NaN."""
    return float("nan") if value is None else float(value)


def column(rows: Iterable[dict[str, Any]], key: str) -> list[float]:
    """The values of one metric over per-case rows, missing ones as NaN."""
    return [as_float(r.get(key)) for r in rows]


def display_name(label: str, rank: int | None) -> str:
    """A job's name in tables and plots: its label with the rank, e.g. ``"LoRA r4"``."""
    # the study runner's labels already carry the rank ("CP-DoRA r8"); hand-written ones may not
    if rank is None or label.endswith(f" r{rank}"):
        return label
    return f"{label} r{rank}"


def bin_dice(rows: Iterable[dict[str, Any]]) -> dict[str, tuple[float, float, int]]:
    """Mean, std and count of Dice per seed-paper volume bin (by the rows' ``volume_bin``)."""
    rows = list(rows)
    return {b: nanmean_std(column((r for r in rows if r["volume_bin"] == b), "Dice")) for b in PAPER_BINS}


@dataclass
class JobStats:
    """One job's statistics over the held-out cases of all its folds; ``(mean, std, n)`` triples are nan-aware."""

    job: str
    name: str
    method: str
    rank: int | None
    family: str
    trainable: int
    total: int
    percent: float
    n_cases: int
    dice: tuple[float, float, int]
    soft_dice: tuple[float, float, int]
    hd95: tuple[float, float, int]
    abs_volume_error: float
    bins: dict[str, tuple[float, int]]  # volume bin -> (mean Dice, n)
    train_seconds: float  # summed over folds
    folds: dict[int, float]  # fold -> mean Dice


def job_stats(folds: Sequence[FoldResult]) -> list[JobStats]:
    """Statistics per job, in the order the jobs first appear in ``folds``."""
    by_job: dict[str, list[FoldResult]] = {}
    for fold in folds:
        by_job.setdefault(fold.info["job"], []).append(fold)
    stats = []
    for job, job_folds in by_job.items():
        job_folds = sorted(job_folds, key=lambda f: f.info["fold"])
        info = job_folds[0].info
        rows = [r for fold in job_folds for r in fold.rows]
        stats.append(JobStats(
            job=job, name=display_name(info["label"], info["rank"]), method=info["method"], rank=info["rank"],
            family=info["family"], trainable=info["trainable_params"], total=info["total_params"],
            percent=info["percent_trainable"], n_cases=len(rows),
            dice=nanmean_std(column(rows, "Dice")), soft_dice=nanmean_std(column(rows, "soft_Dice")),
            hd95=nanmean_std(column(rows, "HD95_mm")),
            abs_volume_error=nanmean([abs(v) for v in column(rows, "volume_error_ml")]),
            bins={b: (mean, n) for b, (mean, _, n) in bin_dice(rows).items()},
            # train_seconds is per fold (repeated on every case row), so it is summed once per fold
            train_seconds=float(sum(f.info["train_seconds"] for f in job_folds
                                    if not math.isnan(f.info["train_seconds"]))),
            folds={f.info["fold"]: nanmean(column(f.rows, "Dice")) for f in job_folds},
        ))
    return stats


__all__ = ["PAPER_BINS", "JobStats", "as_float", "bin_dice", "column", "display_name", "job_stats", "nanmean",
           "nanmean_std"]
