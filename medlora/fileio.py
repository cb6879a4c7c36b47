"""The one I/O layer for tensor files: atomic writes, and the readers of safetensors files and checkpoints.

Writes are atomic: a reader, or a resumed job, sees either the old file or the complete new one. The
temporary file lives in the destination folder (``os.replace`` is atomic only within one file system)
and starts with a dot so that dataset readers skip leftovers of a crash.

Reads never unpickle code (safetensors, or ``torch.load(weights_only=True)``) and refuse what would
give a silently wrong model: every floating-point tensor that is read must be finite, because a NaN or
Inf weight does not fail loudly, it turns every prediction into NaN (or an empty label map with exit
code 0). Each problem is one line naming the file (and the tensor), raised as the caller's error type.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import MedloraError


class TensorFileError(MedloraError, ValueError):
    """A tensor file (safetensors, checkpoint) that cannot be read or holds unusable values."""


def _final_permissions(tmp: str) -> None:
    # mkstemp creates 0600; results are meant to be shared like any other file the user writes
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


@contextlib.contextmanager
def _temporary_beside(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        _final_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically, flushed to disk."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with _temporary_beside(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` to ``path`` atomically (tensors are made contiguous on the CPU)."""
    path = Path(path)
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with _temporary_beside(path) as tmp:
        save_file(clean, tmp, metadata=metadata)
    return path


# ------------------------------------------------------------------------------------------------ reading


def _first_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception from a foreign library (ANSI colour codes removed)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def check_finite(
    tensors: Mapping[str, torch.Tensor], source: str | os.PathLike[str], error: type[MedloraError] = TensorFileError
) -> None:
    """Raise ``error`` naming ``source`` and the first tensor (in the mapping's order) with a NaN or Inf entry.

    Integer and boolean tensors cannot hold either and are skipped.
    """
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        if bool(torch.isfinite(t).all()):
            continue
        nan, bad = int(torch.isnan(t).sum()), int((~torch.isfinite(t)).sum())
        raise error(f"{source}: tensor {name!r} holds non-finite values ({nan} NaN, {bad - nan} Inf of "
                    f"{t.numel()}); the file is corrupt or comes from a diverged training")


def read_safetensors(
    path: str | os.PathLike[str], *, error: type[MedloraError] = TensorFileError, finite: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on the CPU, in the file's order) and the header metadata of a safetensors file.

    A missing, truncated or foreign file, and (with ``finite``) a NaN/Inf tensor, raise ``error`` in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise error(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    if finite:
        check_finite(tensors, path, error)
    return tensors, metadata


def _refused_global(exc: BaseException) -> str | None:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    return found.group(1) if found else None


def read_torch_file(path: str | os.PathLike[str], *, error: type[MedloraError] = TensorFileError) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` on the CPU, memory-mapped where the file allows it.

    Nothing but tensors and plain containers is unpickled. An object weights-only loading refuses raises
    ``error`` with the attribute ``refused_global`` (the pickled class's dotted name), so that a caller can
    say what such a file is; any other failure is one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    for mmap in (True, False):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:
            refused = _refused_global(exc)
            if refused:
                err = error(f"{path}: holds a pickled {refused} object; weights-only loading refuses to unpickle "
                            "it (no code from checkpoints is run)")
                err.refused_global = refused  # type: ignore[attr-defined]
                raise err from None
            if not mmap:  # a legacy (non-zip) file cannot be memory-mapped: tried again without
                raise error(f"{path}: cannot read weights ({_first_line(exc)})") from None
    raise AssertionError("unreachable")


@dataclass
class Checkpoint:
    """What a weights file holds, whatever its kind.

    ``state_dict``: the model's tensors, with a Lightning ``model.`` or a DDP ``module.`` prefix removed.
    ``hyper_parameters``: a Lightning checkpoint's (None for a plain state dict or a safetensors file).
    ``records``: a checkpoint's other top-level entries (e.g. ``medlora_preprocessing``, ``epoch``), or the
    header metadata of a safetensors file. ``finite``: whether ``state_dict`` was checked finite when read.
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    hyper_parameters: dict[str, Any] | None = None
    records: dict[str, Any] = field(default_factory=dict)
    finite: bool = False

    @property
    def is_lightning(self) -> bool:
        return self.hyper_parameters is not None


def read_checkpoint(
    path: str | os.PathLike[str], *, error: type[MedloraError] = TensorFileError, finite: bool = True
) -> Checkpoint:
    """Read a safetensors file, a state-dict ``.pt``/``.pth``, a Lightning ``.ckpt`` or a SAM-style training
    file (``{"model": state_dict}``) without running code; with ``finite``, every model tensor must be finite."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state, metadata = read_safetensors(path, error=error, finite=False)
        obj: Any = state
        records: dict[str, Any] = dict(metadata)
    else:
        obj = read_torch_file(path, error=error)
        records = {}
    hyper_parameters = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        if "hyper_parameters" in obj:
            hyper_parameters = dict(obj["hyper_parameters"] or {})
        records = {k: v for k, v in obj.items() if k not in ("state_dict", "hyper_parameters")}
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # MedSAM / SAM-Med2D training files
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise error(f"{path}: not a state dict of tensors")
    if finite:
        check_finite(obj, path, error)
    for prefix in ("model.", "module."):  # Lightning checkpoints; DataParallel/DDP-wrapped saves
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return Checkpoint(path, obj, hyper_parameters, records, finite)
