"""Trained blocks as transplantable checkpoints: Neural Organ Transplantation (NOT; Al-Zuraiqi, arXiv 2601.13580).

NOT extracts a contiguous set of layers of a network (the "donor organ"; the paper takes 3 transformer layers
starting at a third of the depth), trains them inside the otherwise frozen network, saves them as a standalone
checkpoint and inserts them into a compatible recipient. For a segmentation network this is fine-tuning one
stage and keeping the stage as a file (partial fine-tuning, not a low-rank update); what this module adds is
the file and the checks that it lands where it was trained:

* a **stage** names the organ: a module (``down_list.1``, ``M2``, ``image_encoder.neck``) or a contiguous range of
  numbered children of one container, ``<container>.<i>:<j>`` (children ``i`` to ``j - 1``, Python's slice
  convention, e.g. ``image_encoder.blocks.4:7``) (:func:`stage_modules`);
* while a stage trains (:func:`freeze_outside`), everything else is frozen, the normalisation statistics
  included: norm layers outside the stage run in evaluation mode, so the host network is bitwise the recipient
  it will be inserted into. (In the paper, ``Embed`` is likewise a frozen copy of the recipient's.)
* the donor file (:func:`save_donor`, safetensors, nothing pickled) holds the stage's whole ``state_dict``
  (weights, biases, normalisation statistics) and, as JSON metadata, the module names, every tensor's shape, a
  checksum of its tensors, and the fingerprints of the **neighbouring blocks**: the sibling module just before
  and just after the stage in its parent's order (the blocks whose outputs it reads and whose inputs it
  writes), plus a fingerprint of everything outside the stage (the host it was trained in);
* :func:`transplant` refuses, with one line naming the file and the first mismatch, a recipient that lacks a
  module, holds a tensor of another shape, or whose neighbouring blocks differ from the donor's (``strict=False``
  checks names and shapes only: a deliberate transplant into another host). Nothing of the recipient changes
  unless every check passes. Inserting a donor into the host it was trained in gives that trained network
  bitwise.

Generic core: works on any ``nn.Module`` (a UNet stage as much as a few transformer blocks); adapters must not be
attached inside the stage (a donor carries plain weights).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import TensorFileError, atomic_save_safetensors, read_safetensors
from .io import _digest_of, frozen_base_state, tensors_checksum, weight_fingerprint

__all__ = [
    "DONOR_FORMAT",
    "DonorFileError",
    "donor_state",
    "freeze_outside",
    "hold_norms_outside",
    "read_donor",
    "save_donor",
    "stage_modules",
    "stage_neighbours",
    "transplant",
]

DONOR_FORMAT = "medlora.donor/1"
_RANGE = re.compile(r"(?:(.+)\.)?(\d+):(\d+)")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


class DonorFileError(TensorFileError):
    """A donor file that cannot be read or does not fit the recipient; one line naming the file."""


def stage_modules(model: nn.Module, stage: str) -> list[str]:
    """The dotted module names of ``stage`` (see the module docstring), in their parent's order.

    ``ValueError`` (one line) for a name the model lacks, an empty or reversed range, or a range over a
    container whose children are not numbered.
    """
    if not isinstance(stage, str) or not stage.strip():
        raise ValueError(f"stage: expected a module name or <container>.<i>:<j>, got {stage!r}")
    modules = dict(model.named_modules())
    found = _RANGE.fullmatch(stage)
    if found is None:
        if stage not in modules or stage == "":
            raise ValueError(f"stage {stage!r}: {type(model).__name__} has no module of that name")
        return [stage]
    parent, start, stop = found.group(1) or "", int(found.group(2)), int(found.group(3))
    if parent not in modules:
        raise ValueError(f"stage {stage!r}: {type(model).__name__} has no module {parent!r}")
    if stop <= start:
        raise ValueError(f"stage {stage!r}: empty range (children {start} to {stop - 1})")
    children = [n for n, _ in modules[parent].named_children()]
    wanted = [str(i) for i in range(start, stop)]
    missing = [w for w in wanted if w not in children]
    if missing:
        raise ValueError(f"stage {stage!r}: {parent or 'the model'} has no child {missing[0]!r} (children: "
                         f"{', '.join(children[:8])}{', ...' if len(children) > 8 else ''})")
    return [f"{parent}.{w}" if parent else w for w in wanted]


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def stage_neighbours(model: nn.Module, stage: str) -> dict[str, str | None]:
    """``{"before": name, "after": name}``: the siblings just before the stage's first module and just after its
    last one in their parent's order (None at either end)."""
    names = stage_modules(model, stage)
    parent, _, _ = names[0].rpartition(".")
    owner = dict(model.named_modules())[parent]
    siblings = [f"{parent}.{n}" if parent else n for n, _ in owner.named_children()]
    first, last = siblings.index(names[0]), siblings.index(names[-1])
    return {"before": siblings[first - 1] if first > 0 else None,
            "after": siblings[last + 1] if last + 1 < len(siblings) else None}


def _state(model: nn.Module, prefixes: list[str], inside: bool) -> dict[str, torch.Tensor]:
    """``frozen_base_state`` entries inside (or outside) the stage; counters of BatchNorm steps left out."""
    return {k: v for k, v in frozen_base_state(model).items() if _inside(k, prefixes) == inside}


def _fingerprint(state: dict[str, torch.Tensor]) -> str:
    return _digest_of({k: weight_fingerprint(v) for k, v in state.items()})


def _fingerprints(model: nn.Module, stage: str) -> dict[str, Any]:
    names = stage_modules(model, stage)
    modules = dict(model.named_modules())
    neighbours = {}
    for side, name in stage_neighbours(model, stage).items():
        neighbours[side] = None if name is None else {"module": name,
                                                      "sha256": _fingerprint(frozen_base_state(modules[name]))}
    return {"neighbours": neighbours, "host_sha256": _fingerprint(_state(model, names, inside=False))}


def donor_state(model: nn.Module, stage: str) -> dict[str, torch.Tensor]:
    """The stage's ``state_dict`` entries (full keys), detached CPU copies; refused if adapters are attached in it."""
    names = stage_modules(model, stage)
    state = model.state_dict()
    if any(".parametrizations." in k for k in state if _inside(k, names)):
        raise ValueError(f"stage {stage!r}: holds adapters; merge or remove them before saving the stage as a donor")
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if _inside(k, names)}


def freeze_outside(model: nn.Module, stage: str) -> list[nn.Parameter]:
    """Make exactly the stage's parameters trainable and return them; the norm layers outside the stage are put in
    evaluation mode (call :func:`hold_norms_outside` again after every ``model.train()``)."""
    names = stage_modules(model, stage)
    trainable = []
    for n, p in model.named_parameters():
        p.requires_grad_(_inside(n, names))
        if p.requires_grad:
            trainable.append(p)
    hold_norms_outside(model, stage)
    return trainable


def hold_norms_outside(model: nn.Module, stage: str) -> None:
    """Normalisation layers outside ``stage`` to evaluation mode: their running statistics stay the recipient's."""
    names = stage_modules(model, stage)
    for n, m in model.named_modules():
        if isinstance(m, _NORMS) and not _inside(n, names):
            m.eval()


def save_donor(model: nn.Module, stage: str, path: str | os.PathLike[str],
               extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write the stage of ``model`` as a donor file (atomically) with where it fits (module docstring)."""
    tensors = donor_state(model, stage)
    meta = {"format": DONOR_FORMAT, "stage": stage, "modules": stage_modules(model, stage),
            "shapes": {k: list(v.shape) for k, v in tensors.items()}, **_fingerprints(model, stage),
            "tensors_sha256": tensors_checksum(tensors), "extra": extra_metadata or {}}
    from .. import __version__

    meta["medlora_version"] = __version__
    return atomic_save_safetensors(tensors, Path(path), {"format": "pt", "medlora_donor": json.dumps(meta)})


def read_donor(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and tensors of a donor file, checked (format, checksum, finite values); never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise DonorFileError(f"{path}: donor file not found")
    tensors, header = read_safetensors(path, error=DonorFileError)
    try:
        meta = json.loads(header["medlora_donor"])
    except (KeyError, json.JSONDecodeError):
        raise DonorFileError(f"{path}: not a medlora donor file (no donor metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != DONOR_FORMAT:
        raise DonorFileError(f"{path}: unsupported donor format (expected {DONOR_FORMAT})")
    if meta.get("tensors_sha256") != tensors_checksum(tensors):
        raise DonorFileError(f"{path}: tensors do not match the checksum stored when the file was written; the "
                             "file is corrupt")
    return meta, tensors


def _mismatches(recipient: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                strict: bool) -> Iterator[str]:
    modules = dict(recipient.named_modules())
    for name in meta["modules"]:
        if name not in modules:
            yield f"the recipient has no module {name!r}"
    state = recipient.state_dict()
    for key, value in tensors.items():
        if key not in state:
            yield f"the recipient has no tensor {key!r}"
        elif tuple(state[key].shape) != tuple(value.shape):
            yield f"tensor {key!r} is {tuple(state[key].shape)} in the recipient, {tuple(value.shape)} in the donor"
    extra = sorted(k for k in state if _inside(k, list(meta["modules"])) and k not in tensors)
    if extra:
        yield f"the recipient's stage has tensors the donor lacks (first {extra[0]!r})"
    if not strict:
        return
    for side, info in meta["neighbours"].items():
        if info is None:
            continue
        if info["module"] not in modules:
            yield f"the recipient has no neighbouring block {info['module']!r}"
        elif _fingerprint(frozen_base_state(modules[info["module"]])) != info["sha256"]:
            yield (f"the neighbouring block {info['module']!r} ({side} the stage) differs from the one the donor "
                   "was trained with")


def transplant(recipient: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> nn.Module:
    """Insert the donor at ``path`` into ``recipient`` in place (after every check of :func:`_mismatches`:
    modules, tensor names and shapes, and with ``strict`` the neighbouring blocks' fingerprints) and return it.

    Raises :class:`DonorFileError` naming the file and the first mismatch; the recipient is then unchanged.
    """
    path = Path(path)
    meta, tensors = read_donor(path)
    problem = next(_mismatches(recipient, meta, tensors, strict), None)
    if problem is not None:
        raise DonorFileError(f"{path}: does not fit this recipient ({problem}); a donor goes into the network it "
                             f"was trained in (stage {meta['stage']!r})")
    state = recipient.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            state[key].copy_(value)
    return recipient
