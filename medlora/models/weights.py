"""Loading pretrained base weights from the files users have: Lightning checkpoints, state dicts, safetensors.

Only tensors are ever read: ``torch.load(weights_only=True)`` for pickled containers and safetensors
otherwise, so a checkpoint cannot execute code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import MedloraError


class WeightsError(MedloraError, ValueError):
    """A weights file that cannot be read or does not fit the model (one line naming the file)."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict in ``path``; a Lightning checkpoint's ``model.`` prefix is removed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):  # MedSAM / SAM-Med2D training files
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    for prefix in ("model.", "module."):  # Lightning checkpoints; DataParallel/DDP-wrapped saves
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if any(".parametrizations." in k for k in state):
        raise WeightsError(
            f"{path}: holds adapter parameters (a checkpoint of an adapter run); load its base weights and "
            "then its adapter file (medlora.adapters.load_adapter) instead"
        )
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a full set of pretrained weights into ``model`` (strict: every key must fit).

    A model may define ``adapt_state_dict(state) -> (state, notes)`` to fit files made for another
    configuration (e.g. SAM at another input size); each note is logged.
    """
    state = read_state_dict(path)
    adapt = getattr(model, "adapt_state_dict", None)
    if callable(adapt):
        state, notes = adapt(state)
        for note in notes:
            logging.getLogger("medlora").info("%s: %s", path, note)
    own = model.state_dict()
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
