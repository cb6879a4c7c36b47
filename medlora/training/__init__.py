"""Lightning glue: the segmentation LightningModule, its callbacks and the ``medlora fit|validate|test|predict`` CLI."""

from .callbacks import AdapterFileWriter, AdapterInitFromData, CheckpointRecords, run_callbacks
from .module import SegmentationModule, predict_volume, segmentation_module

__all__ = ["AdapterFileWriter", "AdapterInitFromData", "CheckpointRecords", "SegmentationModule", "predict_volume",
           "run_callbacks", "segmentation_module"]
