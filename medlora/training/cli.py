"""``medlora fit|validate|test|predict --config X.yaml``: the LightningCLI of the toolkit.

The ``model:`` section is :func:`~medlora.training.module.segmentation_module`: the model record's keys
(backbone, base weights, adapter or module group, training rule) and the module's settings, built through
:func:`medlora.assembly.build_model`. The CLI always carries a ``checkpoint`` section (Lightning's
``ModelCheckpoint`` with ``save_last``) so that ``--ckpt_path last`` resumes an interrupted run, an
``adapter_file`` section (where the adapter file goes) and an ``adapter_init`` section (data-driven adapter
starts), adds the checkpoint records (:mod:`medlora.training.callbacks`), and links the data's
``spatial_dims`` and ``patch_size`` to the model's, so they are written once.
"""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from ..adapters import AdapterConfig
from ..data.datamodule import CTSegDataModule
from .callbacks import AdapterFileWriter, AdapterInitFromData, CheckpointRecords
from .module import segmentation_module


class MedloraCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.monitor": "val/Dice",
                             "checkpoint.mode": "max", "checkpoint.save_top_k": 1,
                             "checkpoint.filename": "best-{epoch:03d}"})
        parser.add_lightning_class_args(AdapterFileWriter, "adapter_file")
        parser.add_lightning_class_args(AdapterInitFromData, "adapter_init")
        parser.link_arguments("data.spatial_dims", "model.spatial_dims")
        parser.link_arguments("data.patch_size", "model.roi_size")

    def before_instantiate_classes(self) -> None:
        # Check the adapter section while we can still answer with a parser error (one line, exit 2).
        config = self.config[self.subcommand] if self.subcommand else self.config
        adapter = config.get("model.adapter") if hasattr(config, "get") else None
        if adapter is not None:
            values = adapter.as_dict() if hasattr(adapter, "as_dict") else dict(adapter)
            try:
                AdapterConfig.from_dict(values)
            except ValueError as exc:
                self.parser.error(f"model.adapter: {exc}")


def run(args: list[str]) -> int:
    """Run a LightningCLI subcommand with ``args`` (e.g. ``["fit", "--config", "configs/x.yaml"]``).

    The arguments go through ``sys.argv`` because Lightning's DDP launcher starts the other ranks by
    re-running the command line.
    """
    saved = sys.argv
    sys.argv = [saved[0] if saved else "medlora", *args]
    try:
        MedloraCLI(
            segmentation_module,
            CTSegDataModule,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": False},
            trainer_defaults={"callbacks": [CheckpointRecords()]},
        )
    finally:
        sys.argv = saved
    return 0
