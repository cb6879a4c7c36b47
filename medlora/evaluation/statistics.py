"""Aggregation of per-case results and the paired statistics the report's verdicts rest on.

Aggregates are over the cases of all folds pooled: mean and population standard deviation, nan-aware
(Dice is NaN when prediction and reference are both empty, as in nnU-Net, and such cases are left out).
Dice per volume bin uses the seed paper's bins (Minoccheri, Hodgman et al. 2025): (0, 25], (25, 50],
(50, 100], (100, 225] mL of the true volume.

Comparisons between two jobs are paired per case (:func:`paired_values`): a job's value of a case is first
averaged over its seeds (rows may carry a ``seed``), then the two jobs are matched on case id and cases
without a defined value on both sides are dropped. For the differences (method − reference) we report the
mean with a percentile bootstrap interval (:func:`bootstrap_ci`: cases resampled with replacement, both
sides together, from a fixed :class:`numpy.random.Generator` so that a rebuilt report shows the same
numbers) and the two-sided Wilcoxon signed-rank p-value (:func:`wilcoxon_p`), Holm-adjusted across all
comparisons of a study (:func:`holm`, Holm 1979). :func:`decide` turns them into a verdict.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MedloraError
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


# ------------------------------------------------------------------------------------- paired comparisons

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: a rebuilt report must show the same intervals
CONFIDENCE = 0.95
ALPHA = 0.05  # family-wise level of the Holm-adjusted p-values
BETTER, WORSE, INCONCLUSIVE = "better", "worse", "inconclusive"


class PairingError(MedloraError, ValueError):
    """Per-case rows that cannot be paired (a case twice under one seed of a job); the message names both."""


def per_case(rows: Iterable[dict[str, Any]], job: str, metric: str = "Dice") -> dict[str, float]:
    """``{case id: value}`` of one job, each case's value averaged over its seeds (nan-aware).

    Rows without a ``seed`` count as one seed. A case that appears twice under the same seed (say, held out
    in two folds) raises :class:`PairingError`: averaging it would hide a broken split.
    """
    by_case: dict[str, dict[Any, float]] = {}
    for r in rows:
        if r["job"] != job:
            continue
        seeds = by_case.setdefault(str(r["case_id"]), {})
        seed = r.get("seed")
        if seed in seeds:
            raise PairingError(f"job {job!r}: case {r['case_id']!r} appears twice"
                               + ("" if seed is None or seed == "" else f" under seed {seed}"))
        seeds[seed] = as_float(r.get(metric))
    return {case: nanmean(values.values()) for case, values in by_case.items()}


def paired_values(rows: Sequence[dict[str, Any]], method: str, reference: str,
                  metric: str = "Dice") -> tuple[list[str], np.ndarray, np.ndarray]:
    """The cases both jobs have a defined (seed-averaged) value for, in sorted order, and the two value arrays."""
    a, b = per_case(rows, method, metric), per_case(rows, reference, metric)
    cases = sorted(c for c in a.keys() & b.keys() if not (math.isnan(a[c]) or math.isnan(b[c])))
    return cases, np.array([a[c] for c in cases], dtype=float), np.array([b[c] for c in cases], dtype=float)


def bootstrap_ci(differences: Sequence[float] | np.ndarray, n_boot: int = BOOTSTRAP_SAMPLES,
                 seed: int = BOOTSTRAP_SEED, level: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (Efron & Tibshirani 1993, ch. 13).

    The ``n`` cases are resampled with replacement ``n_boot`` times: one ``(n_boot, n)`` draw of
    ``numpy.random.default_rng(seed).integers(0, n)``, the mean of each row, then the ``(1 ± level) / 2``
    percentiles (numpy's linear interpolation). This is what ``scipy.stats.bootstrap(..., method="percentile")``
    computes for the same generator. Pairing is kept because a case's difference is resampled as one value.
    ``(nan, nan)`` without cases.
    """
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_ci_two_sample(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                            n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                            level: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(x) − mean(y)`` for two independent groups of cases.

    Each group is resampled within itself (one ``(n_boot, len(x))`` draw, then one ``(n_boot, len(y))`` draw
    from the same generator); used where cases cannot be paired (Dice of large against small bleeds).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size == 0 or y.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means_x = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    means_y = y[rng.integers(0, y.size, size=(n_boot, y.size))].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means_x - means_y, [tail, 100.0 - tail])
    return float(low), float(high)


def wilcoxon_p(differences: Sequence[float] | np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences, with scipy's defaults.

    ``scipy.stats.wilcoxon(d)``: zero differences are dropped (``zero_method="wilcox"``, Wilcoxon's own
    rule); up to 50 differences without ties or zeros get the exact null distribution, with ties or zeros
    an exhaustive permutation test up to 13 differences, otherwise the normal approximation without
    continuity correction. Where nothing is left to rank (all differences zero) the p-value is 1; without
    any pair it is NaN.
    """
    from scipy.stats import wilcoxon

    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return float("nan")
    if not np.any(d != 0):
        return 1.0
    with warnings.catch_warnings():  # scipy warns on tiny samples; the p-value itself says what they support
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        return float(wilcoxon(d).pvalue)


def mann_whitney_p(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Two-sided Mann–Whitney U p-value of two independent groups (``scipy.stats.mannwhitneyu`` defaults)."""
    from scipy.stats import mannwhitneyu

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size == 0 or y.size == 0:
        return float("nan")
    return float(mannwhitneyu(x, y, alternative="two-sided").pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979) of a family of p-values; NaN ones are not counted and stay NaN.

    With the ``m`` defined p-values sorted ascending, the ``i``-th (from 0) becomes
    ``max over j <= i of min(1, (m − j) · p_(j))``, returned in the input order.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    defined = np.flatnonzero(~np.isnan(p))
    running = 0.0
    for i, j in enumerate(defined[np.argsort(p[defined], kind="stable")]):
        running = max(running, min(1.0, (defined.size - i) * float(p[j])))
        adjusted[j] = running
    return [float(v) for v in adjusted]


def decide(low: float, high: float, p_adj: float, alpha: float = ALPHA) -> str:
    """``better``/``worse`` when the interval excludes 0 and the adjusted p-value is below ``alpha``.

    Otherwise (an interval that spans 0 whatever the mean's sign, or a difference the signed-rank test
    does not support after Holm's adjustment, or missing numbers) ``inconclusive``. The p-value condition
    keeps a verdict from resting on a percentile interval alone, which undercovers with few cases (with
    five cases of one sign it always excludes 0, while no two-sided signed-rank test can reach 0.05).
    """
    if any(math.isnan(v) for v in (low, high, p_adj)) or low <= 0.0 <= high or not p_adj < alpha:
        return INCONCLUSIVE
    return BETTER if low > 0.0 else WORSE


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of two jobs: ``delta`` is the mean over paired cases of method − reference."""

    method: str
    reference: str
    n: int
    delta: float
    ci: tuple[float, float]
    p: float
    p_adj: float = float("nan")
    why: str = ""  # what asked for it: "vs full fine-tuning", "vs best module-wise", "study", a finding

    @property
    def verdict(self) -> str:
        return decide(self.ci[0], self.ci[1], self.p_adj)

    def flipped(self) -> Comparison:
        """The same comparison read the other way round (reference − method); p-values are two-sided."""
        return Comparison(self.reference, self.method, self.n, -self.delta, (-self.ci[1], -self.ci[0]), self.p,
                          self.p_adj, self.why)


def compare(rows: Sequence[dict[str, Any]], method: str, reference: str, metric: str = "Dice",
            n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED, why: str = "") -> Comparison:
    """One paired comparison (not yet Holm-adjusted: see :func:`compare_all`)."""
    _, a, b = paired_values(rows, method, reference, metric)
    d = a - b
    delta = float(d.mean()) if d.size else float("nan")
    return Comparison(method, reference, int(d.size), delta, bootstrap_ci(d, n_boot, seed), wilcoxon_p(d), why=why)


def compare_all(rows: Sequence[dict[str, Any]], pairs: Iterable[tuple[str, str] | tuple[str, str, str]],
                metric: str = "Dice", n_boot: int = BOOTSTRAP_SAMPLES,
                seed: int = BOOTSTRAP_SEED) -> list[Comparison]:
    """The comparisons of a study, Holm-adjusted together: ``pairs`` of ``(method, reference[, why])``.

    A pair whose reverse (or itself) came earlier is the same test and is left out, so that the family
    counts each test once. Every comparison resamples with the same seed.
    """
    seen: set[frozenset[str]] = set()
    out = []
    for pair in pairs:
        method, reference = pair[0], pair[1]
        key = frozenset((method, reference))
        if method == reference or key in seen:
            continue
        seen.add(key)
        out.append(compare(rows, method, reference, metric, n_boot, seed, pair[2] if len(pair) > 2 else ""))
    adjusted = holm([c.p for c in out])
    return [Comparison(c.method, c.reference, c.n, c.delta, c.ci, c.p, p, c.why) for c, p in zip(out, adjusted,
                                                                                              strict=True)]


def study_pairs(stats: Sequence[JobStats]) -> list[tuple[str, str, str]]:
    """The standard comparisons: every job against full fine-tuning and against the best module-wise job.

    The best module-wise job is the one of highest mean Dice (the first of equals). Jobs without a defined
    Dice take no part.
    """
    scored = [s for s in stats if s.dice[2] > 0]
    full = next((s for s in scored if s.family == "full"), None)
    modules = [s for s in scored if s.family == "module"]
    best_module = max(modules, key=lambda s: s.dice[0], default=None)
    pairs = []
    for reference, why in ((full, "vs full fine-tuning"), (best_module, "vs best module-wise")):
        if reference is not None:
            pairs += [(s.job, reference.job, why) for s in scored if s.job != reference.job]
    return pairs


__all__ = ["ALPHA", "BETTER", "BOOTSTRAP_SAMPLES", "BOOTSTRAP_SEED", "CONFIDENCE", "INCONCLUSIVE", "PAPER_BINS",
           "WORSE", "Comparison", "JobStats", "PairingError", "as_float", "bin_dice", "bootstrap_ci",
           "bootstrap_ci_two_sample", "column", "compare", "compare_all", "decide", "display_name", "holm",
           "job_stats", "mann_whitney_p", "nanmean", "nanmean_std", "paired_values", "per_case", "study_pairs",
           "wilcoxon_p"]
