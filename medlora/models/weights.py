"""Loading pretrained base weights from the files users have: Lightning checkpoints, state dicts, safetensors.

Files are read by :func:`medlora.fileio.read_checkpoint`: only tensors are ever read
(``torch.load(weights_only=True)`` for pickled containers, safetensors otherwise), so a checkpoint cannot
execute code, and a NaN or Inf weight is refused with one line naming the file and the tensor.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..fileio import Checkpoint, TensorFileError, check_finite, read_checkpoint


class WeightsError(TensorFileError):
    """A weights file that cannot be read or does not fit the model (one line naming the file)."""


def read_state_dict(source: str | os.PathLike | Checkpoint) -> dict[str, torch.Tensor]:
    """The model state dict in ``source`` (a path, or a file already read by :func:`read_checkpoint`);
    a Lightning checkpoint's ``model.`` prefix is removed."""
    if isinstance(source, Checkpoint):
        path, state = source.path, source.state_dict
        if not source.finite:
            check_finite(state, path, WeightsError)
    else:
        path = Path(source)
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found")
        state = read_checkpoint(path, error=WeightsError).state_dict
    if any(".parametrizations." in k for k in state):
        raise WeightsError(
            f"{path}: holds adapter parameters (a checkpoint of an adapter run); load its base weights and "
            "then its adapter file (medlora.adapters.load_adapter) instead"
        )
    return state


def load_weights(model: nn.Module, source: str | os.PathLike | Checkpoint) -> nn.Module:
    """Load a full set of pretrained weights into ``model`` (strict: every key must fit) from a file, or from
    a :class:`~medlora.fileio.Checkpoint` already read (a file is then read once).

    A model may define ``adapt_state_dict(state) -> (state, notes)`` to fit files made for another
    configuration (e.g. SAM at another input size); each note is logged.
    """
    state = read_state_dict(source)
    path = source.path if isinstance(source, Checkpoint) else source
    adapt = getattr(model, "adapt_state_dict", None)
    if callable(adapt):
        state, notes = adapt(state)
        for note in notes:
            logging.getLogger("medlora").info("%s: %s", path, note)
    own = model.state_dict()
    for prefix in ("model.", "module."):
        # the reader strips a Lightning/DDP prefix that every key has; a network whose own keys all carry it
        # (MONAI's UNet keeps its layers in ``self.model``) gets it back
        if set(state) != set(own) and {prefix + k for k in state} == set(own):
            state = {prefix + k: v for k, v in state.items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(
            f"{path}: weights do not fit this model (missing {len(missing)} keys, e.g. {missing[:3]}; "
            f"unexpected {len(unexpected)}, e.g. {unexpected[:3]})"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise WeightsError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state)
    return model
