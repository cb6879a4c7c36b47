"""Atomic file writes: a reader, or a resumed job, sees either the old file or the complete new one.

The temporary file lives in the destination folder (``os.replace`` is atomic only within one file
system) and starts with a dot so that dataset readers skip leftovers of a crash.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


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
