"""The study report's figures, as PNGs written atomically (matplotlib, headless).

Each figure is one function of the job statistics, per-case rows and the study's paired comparisons;
:data:`FIGURES` lists them in the report's order with their captions and file names, and
:func:`plot_report` draws them all (a function that returns None has nothing to show and is left out).
A job keeps the same colour in every figure.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write_bytes
from .calibration import CalibrationHistogram
from .statistics import BETTER, CONFIDENCE, PAPER_BINS, WORSE, Comparison, JobStats, column, nanmean


class PlotData:
    """What every figure function receives: the jobs (report order), rows, comparisons, colours and pyplot."""

    def __init__(self, stats: Sequence[JobStats], rows: Sequence[dict[str, Any]], plt: Any,
                 comparisons: Sequence[Comparison] = (), calibration: dict[str, CalibrationHistogram] | None = None,
                 size_rows: Sequence[dict[str, Any]] = ()) -> None:
        self.stats, self.rows, self.plt, self.comparisons = stats, rows, plt, comparisons
        self.size_rows = size_rows  # target rows of every training-set size (seed-averaged)
        self.calibration = calibration or {}
        self.names = {s.job: s.name for s in stats}
        cmap = plt.get_cmap("tab10" if len(stats) <= 10 else "tab20")
        self.colours = {s.job: cmap(i % cmap.N) for i, s in enumerate(stats)}
        self.rows_of = {s.job: [r for r in rows if r["job"] == s.job] for s in stats}


def dice_per_method(f: PlotData) -> Any:
    """Box plot of per-case Dice per job (cases of all folds pooled), with the cases as jittered points."""
    stats = f.stats
    fig, ax = f.plt.subplots(figsize=(max(6.0, 0.7 * len(stats) + 2), 4.5))
    data = [[v for v in column(f.rows_of[s.job], "Dice") if not math.isnan(v)] for s in stats]
    ax.boxplot([d if d else [float("nan")] for d in data], positions=range(len(stats)), widths=0.6,
               showfliers=False)
    jitter = np.random.default_rng(0)  # fixed, so that a rebuilt report has the same figure
    for i, (s, d) in enumerate(zip(stats, data, strict=True)):
        ax.scatter(i + jitter.uniform(-0.15, 0.15, len(d)), d, s=12, color=f.colours[s.job], alpha=0.8, zorder=3)
    ax.set_xticks(range(len(stats)), [s.name for s in stats], rotation=40, ha="right")
    ax.set_ylabel("Dice per case")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Dice per method (cases of all folds)")
    ax.grid(axis="y", alpha=0.3)
    return fig


def dice_by_volume(f: PlotData) -> Any:
    """Mean Dice per job in each of the seed paper's true-volume bins, with the number of cases per bin."""
    stats = f.stats
    fig, ax = f.plt.subplots(figsize=(max(7.0, 0.4 * len(stats) * len(PAPER_BINS) / 2 + 3), 4.5))
    bar = 0.8 / max(len(stats), 1)
    x = np.arange(len(PAPER_BINS))
    for i, s in enumerate(stats):
        heights = [s.bins[b][0] if s.bins[b][1] else np.nan for b in PAPER_BINS]
        ax.bar(x - 0.4 + bar * (i + 0.5), heights, bar, label=s.name, color=f.colours[s.job])
    cases_in_bin = {b: len({r["case_id"] for r in f.rows if r["volume_bin"] == b}) for b in PAPER_BINS}
    ax.set_xticks(x, [f"{b} mL\n(n={cases_in_bin[b]})" for b in PAPER_BINS])
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1.02)
    ax.set_title("Dice by true hemorrhage volume")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return fig


def volume_pred_vs_true(f: PlotData) -> Any:
    """Thresholded predicted against true hemorrhage volume per case, with the identity line."""
    fig, ax = f.plt.subplots(figsize=(6, 5.5))
    top = 1.0
    for s in f.stats:
        t = np.array(column(f.rows_of[s.job], "volume_true_ml"))
        p = np.array(column(f.rows_of[s.job], "volume_pred_ml"))
        ok = ~(np.isnan(t) | np.isnan(p))
        if ok.any():
            top = max(top, float(t[ok].max()), float(p[ok].max()))
        ax.scatter(t[ok], p[ok], s=14, color=f.colours[s.job], label=s.name, alpha=0.8)
    ax.plot([0, top * 1.05], [0, top * 1.05], "k--", lw=1, label="identity")
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("true volume (mL)")
    ax.set_ylabel("predicted volume (mL, thresholded)")
    ax.set_title("Predicted vs true hemorrhage volume")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    return fig


def dice_vs_params(f: PlotData) -> Any:
    """Mean Dice (± std over cases) against trainable parameters, one line per method through its ranks."""
    fig, ax = f.plt.subplots(figsize=(7.5, 4.8))
    families: dict[str, list[JobStats]] = {}
    for s in f.stats:
        if s.dice[2] > 0:
            families.setdefault(s.method, []).append(s)
    for jobs in families.values():
        first = jobs[0]
        label = first.name.removesuffix(f" r{first.rank}") if first.rank is not None else first.name
        tuned = sorted((s for s in jobs if s.trainable > 0), key=lambda s: s.trainable)
        if tuned:
            x, y, err = ([s.trainable for s in tuned], [s.dice[0] for s in tuned], [s.dice[1] for s in tuned])
            ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, color=f.colours[first.job], label=label, alpha=0.9)
            for s in tuned:
                if s.rank is not None:
                    ax.annotate(f"r{s.rank}", (s.trainable, s.dice[0]), textcoords="offset points", xytext=(4, 4),
                                fontsize=7)
        for s in jobs:
            if s.trainable == 0:
                # no fine-tuning (0 parameters) cannot sit on a log axis: a horizontal line instead
                ax.axhline(s.dice[0], ls=":", color=f.colours[s.job], label=f"{s.name} (0 params)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("mean Dice ± std over cases")
    ax.set_title("Dice vs trainable parameters per method")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def significance_forest(f: PlotData) -> Any:
    """The study's paired Dice differences (method − reference) with their bootstrap intervals, one row each."""
    shown = [c for c in f.comparisons if c.n > 0]
    if not shown:
        return None
    fig, ax = f.plt.subplots(figsize=(7.5, max(2.5, 0.28 * len(shown) + 1.2)))
    colour = {BETTER: "tab:green", WORSE: "tab:red"}
    for i, c in enumerate(shown):
        y = len(shown) - 1 - i  # the table's order, top to bottom
        ax.plot(c.ci, [y, y], color=colour.get(c.verdict, "0.5"), lw=2)
        ax.plot([c.delta], [y], "o", color=colour.get(c.verdict, "0.5"), ms=4)
    ax.axvline(0.0, color="k", lw=1)
    ax.set_yticks(range(len(shown)), [f"{f.names.get(c.method, c.method)} vs {f.names.get(c.reference, c.reference)}"
                                      for c in reversed(shown)], fontsize=7)
    ax.set_xlabel(f"Δ Dice (method − reference), {CONFIDENCE:.0%} bootstrap CI")
    ax.set_title("Paired differences (green/red: significant after Holm, grey: inconclusive)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return fig


def reliability(f: PlotData) -> Any:
    """Reliability diagram of every job with calibration histograms: foreground share against mean probability."""
    jobs = [s for s in f.stats if s.job in f.calibration]
    if not jobs:
        return None
    fig, ax = f.plt.subplots(figsize=(6.5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for s in jobs:
        hist = f.calibration[s.job]
        r = hist.reliability("all")
        ok = r["count"] > 0
        ax.plot(r["confidence"][ok], r["frequency"][ok], "o-", ms=3, color=f.colours[s.job],
                label=f"{s.name} (ECE {hist.ece('all'):.3f})")
    ax.set_xlabel("predicted foreground probability (bin mean)")
    ax.set_ylabel("observed foreground frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Reliability of the probability maps (held-out voxels)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def dice_vs_train_cases(f: PlotData) -> Any:
    """Mean Dice against the number of training cases per fold, one line per job (seeds and cases averaged);
    no fine-tuning, which trains on nothing, as a horizontal line. None with fewer than two sizes."""
    sizes = sorted({str(r["train_cases"]) for r in f.size_rows})
    if len(sizes) < 2:
        return None
    fig, ax = f.plt.subplots(figsize=(7.5, 4.8))
    for s in f.stats:
        rows = [r for r in f.size_rows if r["job"] == s.job]
        if s.family == "none":
            ax.axhline(nanmean(column(rows, "Dice")), ls=":", color=f.colours[s.job], label=s.name)
            continue
        points = []
        for size in sizes:
            at = [r for r in rows if str(r["train_cases"]) == size]
            n_train = nanmean(float(r["n_train_cases"]) for r in at if r.get("n_train_cases") is not None)
            if at and not math.isnan(n_train):
                points.append((n_train, nanmean(column(at, "Dice"))))
        if points:
            x, y = zip(*sorted(points), strict=True)
            ax.plot(x, y, "o-", color=f.colours[s.job], label=s.name, alpha=0.9)
    ax.set_xlabel("training cases per fold")
    ax.set_ylabel("mean Dice (held-out cases)")
    ax.set_title("Dice vs amount of target training data")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# (file name, caption, figure function), in the report's order
FIGURES: tuple[tuple[str, str, Callable[[PlotData], Any]], ...] = (
    ("dice_per_method.png", "Dice per method", dice_per_method),
    ("dice_by_volume.png", "Dice by volume bin", dice_by_volume),
    ("volume_pred_vs_true.png", "Predicted vs true volume", volume_pred_vs_true),
    ("dice_vs_params.png", "Dice vs trainable parameters", dice_vs_params),
    ("dice_vs_train_cases.png", "Dice vs training cases", dice_vs_train_cases),
    ("significance.png", "Paired differences with 95% CIs", significance_forest),
    ("reliability.png", "Reliability diagram", reliability),
)


def plot_report(stats: Sequence[JobStats], rows: Sequence[dict[str, Any]], plots_dir: str | Path,
                comparisons: Sequence[Comparison] = (),
                calibration: dict[str, CalibrationHistogram] | None = None,
                size_rows: Sequence[dict[str, Any]] = ()) -> dict[str, Path]:
    """Draw the figures of :data:`FIGURES` into ``plots_dir``; returns ``{caption: path}`` in report order."""
    import matplotlib

    matplotlib.use("Agg")  # headless: reports are built on cluster nodes and in CI
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    figure = PlotData(stats, rows, plt, comparisons, calibration, size_rows)
    out: dict[str, Path] = {}
    for filename, caption, draw in FIGURES:
        fig = draw(figure)
        if fig is None:
            continue
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        out[caption] = atomic_write_bytes(plots_dir / filename, buffer.getvalue())
    return out


__all__ = ["FIGURES", "PlotData", "dice_by_volume", "dice_per_method", "dice_vs_params", "dice_vs_train_cases",
           "plot_report",
           "reliability", "significance_forest", "volume_pred_vs_true"]
