"""Markdown tables and number formats of the study report.

Tables are padded so that ``report.md`` also reads as a table in a terminal; a missing value is ``—``.
Every table the report shows is built here from :class:`~medlora.evaluation.statistics.JobStats`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .calibration import CalibrationHistogram
from .statistics import ALPHA, CONFIDENCE, PAPER_BINS, Comparison, JobStats

NA = "—"


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals, ``—`` for a missing or NaN one."""
    return NA if value is None or math.isnan(value) else f"{value:.{digits}f}"


def fmt_mean_std(stat: tuple[float, float, int], digits: int = 3) -> str:
    """``"mean ± std"`` of a ``(mean, std, n)`` triple, ``—`` when ``n`` is 0."""
    mean, std, n = stat
    return NA if n == 0 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_signed(value: float) -> str:
    """A difference with its sign and a true minus sign, e.g. ``"−0.020"``."""
    return f"{value:+.3f}".replace("-", "−")


def fmt_p(p: float) -> str:
    """A p-value: three decimals, ``<0.001`` below that, ``—`` when missing."""
    if math.isnan(p):
        return NA
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_ci(ci: tuple[float, float]) -> str:
    """A confidence interval of a difference, e.g. ``"[−0.020, +0.041]"``."""
    return NA if any(math.isnan(v) for v in ci) else f"[{fmt_signed(ci[0])}, {fmt_signed(ci[1])}]"


def fmt_comparison(c: Comparison) -> str:
    """A comparison's numbers in a sentence: ``Δ +0.070 (95% CI [...], p_adj 0.012, n = 15 cases)``."""
    return (f"Δ {fmt_signed(c.delta)} ({CONFIDENCE:.0%} CI {fmt_ci(c.ci)}, p_adj {fmt_p(c.p_adj)}, "
            f"n = {c.n} cases)")


def fmt_percent(percent: float) -> str:
    """A percentage with three significant digits."""
    return NA if math.isnan(percent) else f"{percent:.3g}%"


def fmt_setting(value: Any) -> str:
    """A study setting as one table cell (lists comma-joined, dicts as JSON, pipes and newlines escaped)."""
    if value is None:
        return NA
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt_setting(v) for v in value) or NA
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """A Markdown table; ``right[i]`` right-aligns column ``i`` (numbers)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    widths = [max(w, 3) for w in widths]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).rjust(w) if r else str(c).ljust(w)
                                 for c, w, r in zip(cells, widths, right, strict=True)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right, strict=True))
    return "\n".join([line(header), rule + "|", *(line(r) for r in rows)])


def study_table(study_info: dict[str, Any]) -> str:
    """The study's settings, one row each (the job list is left out: the completeness section uses it)."""
    return md_table(("Setting", "Value"),
                    [(str(k), fmt_setting(v)) for k, v in study_info.items() if k != "job_names"], (False, False))


def results_table(stats: Sequence[JobStats]) -> str:
    """Per job: rank, parameters, Dice, soft Dice, HD95, volume error, Dice per volume bin, training time."""
    header = ("Method", "Rank", "Trainable params", "% of model", "Dice", "n", "soft Dice", "HD95 (mm)",
              "Abs. vol. error (mL)", *(f"Dice {b}" for b in PAPER_BINS), "Train (s)")
    rows = [(s.name, NA if s.rank is None else str(s.rank), f"{s.trainable:,}", fmt_percent(s.percent),
             fmt_mean_std(s.dice), f"{s.dice[2]}/{s.n_cases}", fmt_mean_std(s.soft_dice), fmt_mean_std(s.hd95, 1),
             fmt(s.abs_volume_error, 2), *(fmt(s.bins[b][0]) if s.bins[b][1] else NA for b in PAPER_BINS),
             f"{s.train_seconds:.1f}") for s in stats]
    return md_table(header, rows, (False, *(True for _ in header[1:])))


RESULTS_NOTE = (
    "Mean ± population std over the cases of all folds, nan-aware: n counts the cases with a defined "
    "Dice of all held-out cases (Dice is NaN when prediction and reference are both empty, as in nnU-Net). "
    "Soft Dice is over whole volumes: a low probability spread over every background voxel dominates its "
    "denominator, so it sits far below Dice (docs/evaluation.md). "
    "Abs. vol. error: mean absolute error of the thresholded predicted volume. Dice per volume bin: mean "
    f"over cases whose true volume lies in (lo, hi] mL ({NA}: no case). Train: training wall time summed "
    "over folds."
)


def folds_table(stats: Sequence[JobStats]) -> str:
    """Mean Dice per job and fold."""
    folds = sorted({f for s in stats for f in s.folds})
    return md_table(("Method", *(f"fold {f}" for f in folds)),
                    [(s.name, *(fmt(s.folds[f]) if f in s.folds else NA for f in folds)) for s in stats],
                    (False, *(True for _ in folds)))


def significance_table(comparisons: Sequence[Comparison], names: Mapping[str, str]) -> str:
    """Per comparison: method, reference, paired cases, Δ Dice, its interval, Holm-adjusted p, verdict."""
    header = ("Method", "Reference", "n", "Δ Dice", f"{CONFIDENCE:.0%} CI", "p_adj", "Verdict")
    rows = [(names.get(c.method, c.method), names.get(c.reference, c.reference), str(c.n),
             NA if math.isnan(c.delta) else fmt_signed(c.delta), fmt_ci(c.ci), fmt_p(c.p_adj), c.verdict)
            for c in comparisons]
    return md_table(header, rows, (False, False, True, True, True, True, False))


SIGNIFICANCE_NOTE = (
    "Δ: mean over the paired cases of the method's Dice minus the reference's (each case averaged over seeds "
    f"first; cases without a Dice on both sides left out). CI: percentile bootstrap over cases. p_adj: two-sided "
    "Wilcoxon signed-rank p-value (scipy defaults: zero differences dropped), Holm-adjusted over all "
    f"comparisons of this table. Verdict: better/worse when the CI excludes 0 and p_adj < {ALPHA:g}, else "
    "inconclusive. Full numbers in significance.csv."
)
SIGNIFICANCE_COLUMNS: tuple[str, ...] = ("method", "reference", "method_name", "reference_name", "why", "n",
                                         "delta", "ci_low", "ci_high", "p", "p_adj", "verdict")


def significance_csv(comparisons: Sequence[Comparison], names: Mapping[str, str]) -> str:
    """``significance.csv``: one row per comparison, numbers unrounded (NaN empty)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SIGNIFICANCE_COLUMNS)
    for c in comparisons:
        numbers = (c.delta, c.ci[0], c.ci[1], c.p, c.p_adj)
        writer.writerow([c.method, c.reference, names.get(c.method, c.method), names.get(c.reference, c.reference),
                         c.why, c.n, *("" if math.isnan(v) else repr(float(v)) for v in numbers), c.verdict])
    return buffer.getvalue()


def calibration_table(histograms: Sequence[tuple[str, CalibrationHistogram]]) -> str:
    """Per job: expected calibration error over all, foreground and background voxels, and the voxel counts."""
    header = ("Method", "ECE all", "ECE foreground", "ECE background", "Foreground voxels", "Background voxels")
    rows = [(name, fmt(h.ece("all"), 4), fmt(h.ece("foreground"), 4), fmt(h.ece("background"), 4),
             f"{int(h.counts[1].sum()):,}", f"{int(h.counts[0].sum()):,}") for name, h in histograms]
    return md_table(header, rows, (False, True, True, True, True, True))


CALIBRATION_NOTE = (
    "Held-out voxels of all folds pooled, equal-width probability bins. ECE foreground is the mean of 1 − p over "
    "the lesion's voxels (probability missing where the bleed is), ECE background the mean p over all other "
    "voxels (probability spread where there is none); ECE all compares each bin's mean p with its foreground "
    "share. See docs/evaluation.md for what this means for soft Dice."
)


__all__ = ["CALIBRATION_NOTE", "NA", "RESULTS_NOTE", "SIGNIFICANCE_COLUMNS", "SIGNIFICANCE_NOTE", "calibration_table",
           "fmt", "fmt_ci", "fmt_comparison", "fmt_mean_std", "fmt_p", "fmt_percent", "fmt_setting", "fmt_signed",
           "folds_table", "md_table", "results_table", "significance_csv", "significance_table", "study_table"]
