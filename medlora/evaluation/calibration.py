"""Voxel calibration of foreground probabilities: poolable histograms, reliability diagrams, ECE.

A case is reduced to a :class:`CalibrationHistogram` (:func:`calibration_histogram`): equal-width bins of
the predicted foreground probability over [0, 1] (the last bin closed at 1), and per bin and per true
class (background, foreground) the voxel count and the summed probability. Histograms of cases add up
(``+``), so a study pools its cases without keeping a single voxel.

From a histogram, over a *region* of voxels — ``"all"``, or only the voxels whose true label is
``"foreground"`` or ``"background"`` — the reliability diagram gives per bin the mean predicted
probability against the observed foreground frequency, and the expected calibration error is
``ECE = Σ_b (n_b / N) · |mean p_b − frequency_b|`` (Naeini et al. 2015; Guo et al. 2017 for the binned
form). Restricted to one true class the frequency is constant (1 or 0), so the foreground ECE equals the
mean of ``1 − p`` over foreground voxels and the background ECE the mean ``p`` over background voxels:
the probability mass missing on the lesion, and the mass spread over everything else. Those two numbers
explain soft Dice (see ``docs/evaluation.md``).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write_bytes

DEFAULT_BINS = 10
REGIONS: tuple[str, ...] = ("all", "foreground", "background")
_CLASS_ROWS = {"all": (0, 1), "foreground": (1,), "background": (0,)}  # rows of the per-class arrays


@dataclass(frozen=True)
class CalibrationHistogram:
    """Per bin (columns) and true class (rows: 0 background, 1 foreground): voxel counts and summed probability."""

    counts: np.ndarray  # (2, n_bins) int64
    prob_sums: np.ndarray  # (2, n_bins) float64

    @property
    def n_bins(self) -> int:
        return int(self.counts.shape[1])

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.n_bins + 1)

    def __add__(self, other: CalibrationHistogram) -> CalibrationHistogram:
        if self.counts.shape != other.counts.shape:
            raise ValueError(f"cannot pool histograms of {self.n_bins} and {other.n_bins} bins")
        return CalibrationHistogram(self.counts + other.counts, self.prob_sums + other.prob_sums)

    def _region(self, region: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if region not in _CLASS_ROWS:
            raise ValueError(f"region must be one of {', '.join(REGIONS)}, got {region!r}")
        rows = list(_CLASS_ROWS[region])
        counts = self.counts[rows].sum(axis=0)
        sums = self.prob_sums[rows].sum(axis=0)
        positives = self.counts[1] if 1 in rows else np.zeros_like(counts)
        return counts, sums, positives

    def reliability(self, region: str = "all") -> dict[str, np.ndarray]:
        """Per bin: ``count``, ``confidence`` (mean probability) and ``frequency`` (foreground share); NaN if empty."""
        counts, sums, positives = self._region(region)
        with np.errstate(invalid="ignore", divide="ignore"):
            confidence = np.where(counts > 0, sums / counts, np.nan)
            frequency = np.where(counts > 0, positives / counts, np.nan)
        return {"count": counts, "confidence": confidence, "frequency": frequency, "edges": self.edges}

    def ece(self, region: str = "all") -> float:
        """Expected calibration error over ``region``'s voxels (NaN when the region holds none)."""
        counts, sums, positives = self._region(region)
        total = counts.sum()
        if total == 0:
            return float("nan")
        # n_b · |mean p_b − freq_b| is |Σp_b − positives_b|: no division per bin needed
        return float(np.abs(sums - positives).sum() / total)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for a summary's ``medlora`` block); :meth:`from_dict` reads it back."""
        return {"bins": self.n_bins, "counts": self.counts.tolist(), "prob_sums": self.prob_sums.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationHistogram:
        counts = np.asarray(data["counts"], dtype=np.int64)
        sums = np.asarray(data["prob_sums"], dtype=np.float64)
        if counts.ndim != 2 or counts.shape[0] != 2 or counts.shape != sums.shape:
            raise ValueError(f"calibration histogram needs two rows of equal length, got {counts.shape} and "
                             f"{sums.shape}")
        return cls(counts, sums)


def empty_histogram(n_bins: int = DEFAULT_BINS) -> CalibrationHistogram:
    """A histogram without voxels, the start of a pooled sum."""
    return CalibrationHistogram(np.zeros((2, n_bins), dtype=np.int64), np.zeros((2, n_bins), dtype=np.float64))


def calibration_histogram(probability: Any, label: Any, n_bins: int = DEFAULT_BINS) -> CalibrationHistogram:
    """One case's histogram from its foreground probabilities and reference label (same shape; label > 0.5 is
    foreground). Probabilities must lie in [0, 1]; a voxel goes to bin ``min(floor(p · n_bins), n_bins − 1)``
    (computed in float64), so ``p = 1`` falls in the last bin."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    p = _as_numpy(probability).astype(np.float64, copy=False).ravel()
    y = _as_numpy(label).ravel() > 0.5
    if p.shape != y.shape:
        raise ValueError(f"probability has {p.size} voxels, the label {y.size}")
    if p.size and (not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("probabilities must be finite and within [0, 1]")
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    index = bins + n_bins * y  # one bincount for both classes: row 1 (foreground) follows row 0
    counts = np.bincount(index, minlength=2 * n_bins).reshape(2, n_bins)
    sums = np.bincount(index, weights=p, minlength=2 * n_bins).reshape(2, n_bins)
    return CalibrationHistogram(counts.astype(np.int64), sums.astype(np.float64))


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def plot_reliability(hist: CalibrationHistogram, path: str | os.PathLike[str], title: str = "Reliability") -> Path:
    """A reliability diagram (observed foreground frequency against mean probability, per region) above the
    voxel counts per bin (log scale), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, height_ratios=(3, 1.3))
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    centres = (hist.edges[:-1] + hist.edges[1:]) / 2
    width = 1.0 / hist.n_bins
    for i, region in enumerate(REGIONS):
        r = hist.reliability(region)
        ok = r["count"] > 0
        top.plot(r["confidence"][ok], r["frequency"][ok], "o-", ms=4,
                 label=f"{region} voxels (ECE {hist.ece(region):.3f})")
        bottom.bar(centres - width / 2 + width * (i + 0.5) / 3, r["count"], width / 3, label=region)
    top.set_ylabel("observed foreground frequency")
    top.set_ylim(-0.02, 1.02)
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(fontsize=7, loc="upper left")
    bottom.set_yscale("log")
    bottom.set_xlabel("predicted foreground probability")
    bottom.set_ylabel("voxels")
    bottom.set_xlim(0, 1)
    bottom.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(Path(path), buffer.getvalue())


__all__ = ["DEFAULT_BINS", "REGIONS", "CalibrationHistogram", "calibration_histogram", "empty_histogram",
           "plot_reliability"]
