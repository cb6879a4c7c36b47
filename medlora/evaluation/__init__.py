"""Per-case segmentation metrics, hemorrhage volumes and study summaries."""

from .metrics import VOLUME_BINS_ML, case_metrics, nanmean_std, volume_bin

__all__ = ["VOLUME_BINS_ML", "case_metrics", "nanmean_std", "volume_bin"]
