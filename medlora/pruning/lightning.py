"""LoRAPrune inside ``medlora fit``: a Lightning callback around :class:`~medlora.pruning.LoRAPruner`.

Add it to the trainer's callbacks (``trainer.callbacks`` in a fit config)::

    trainer:
      callbacks:
        - class_path: medlora.pruning.lightning.LoRAPruneCallback
          init_args: {sparsity: 0.5}

The importance is updated before every optimiser step (the factors' gradients are there then); the masks apply
to training and validation alike, so validation scores the masked network; the adapter file written at the end
of fit carries the LoRAPrune record that ``medlora prune`` reads. Resuming is refused: the moving importance is
not kept in checkpoints.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from .graph import PruningError
from .loraprune import LoRAPruner


class LoRAPruneCallback(pl.Callback):
    """Args: ``sparsity`` (final share of units masked per channel group), ``init``, ``warmup``, ``cooldown`` and
    ``frequency`` as in :class:`~medlora.pruning.LoRAPruner` (the paper's 0, 0.1, 0.1, 10)."""

    def __init__(self, sparsity: float, init: float = 0.0, warmup: float = 0.1, cooldown: float = 0.1,
                 frequency: int = 10) -> None:
        self.options = {"init": init, "warmup": warmup, "cooldown": cooldown, "frequency": frequency}
        self.sparsity = sparsity
        self.pruner: LoRAPruner | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:
            raise PruningError(f"LoRAPruneCallback: cannot resume from {trainer.ckpt_path} (the moving importance "
                               "is not in checkpoints); start the run again")
        total = int(trainer.estimated_stepping_batches)
        self.pruner = LoRAPruner(pl_module.model, self.sparsity, total_steps=max(total, 1), **self.options)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.pruner is not None:
            ratio = self.pruner.step()
            pl_module.log("loraprune_sparsity", ratio, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is not None:
            self.pruner.remove_masks()

    def adapter_file_records(self) -> dict[str, Any]:
        """Metadata the adapter file writer adds (``extra["loraprune"]``)."""
        return {} if self.pruner is None else {"loraprune": self.pruner.record()}
