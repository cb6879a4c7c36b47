"""Evaluation: per-case metrics, summary.json I/O, per-case result tables, statistics, the study report.

``metrics`` (one case), ``calibration`` (a case's poolable calibration histogram, ECE, reliability
diagrams), ``summary`` (nnU-Net-shaped ``summary.json``), ``results`` (a run folder's per-case rows,
``results.csv``), ``statistics`` (aggregation and paired comparisons), ``tables``/``plots`` (the report's
Markdown and figures), ``findings`` (the seed paper's claims and their check), ``report``
(``medlora report``), and ``predict`` (sliding-window prediction of one volume).
"""

from .calibration import CalibrationHistogram, calibration_histogram
from .metrics import VOLUME_BINS_ML, case_metrics, volume_bin
from .statistics import nanmean, nanmean_std

__all__ = ["VOLUME_BINS_ML", "CalibrationHistogram", "calibration_histogram", "case_metrics", "nanmean",
           "nanmean_std", "volume_bin"]
