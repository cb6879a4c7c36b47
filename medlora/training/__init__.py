"""Lightning glue: the segmentation LightningModule and the ``medlora fit|validate|test|predict`` CLI."""

from .module import SegmentationModule, predict_volume

__all__ = ["SegmentationModule", "predict_volume"]
