"""Advisory file locks that let several ``medlora crossval`` processes share one run folder safely.

A lock is ``fcntl.flock`` on a file under ``RUN_DIR/locks``. The operating system releases it when its
process ends in any way (exit, crash, ``kill -9``), so a lock left by a dead process is never stale: the
next process simply takes it. An exclusive lock writes its holder (``pid N on HOST``) into the file, only
to name it in messages; the file itself is never deleted, because deleting a lock file that another
process has just opened would let two processes hold "the" lock at once.

flock works across processes on one machine and, on Linux, across NFS clients (the kernel maps it to NFS
byte-range locks). Platforms without ``fcntl`` (Windows) get no locking, as before these locks existed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class FileLock:
    """An exclusive (or, with ``shared=True``, shared) lock on ``path``; not re-entrant.

    ``acquire(wait=False)`` returns False at once if another process holds a conflicting lock;
    ``holder()`` then says who. Use as a context manager for a blocking acquire.
    """

    def __init__(self, path: str | os.PathLike[str], shared: bool = False) -> None:
        self.path = Path(path)
        self.shared = shared
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = True) -> bool:
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: lock already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
            try:
                fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
        if not self.shared:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)  # closing the last descriptor of the open file releases the flock

    def holder(self) -> str:
        """Who holds (or last held) the lock, as written by its holder: ``pid N on HOST``."""
        try:
            text = self.path.read_text(encoding="utf-8").strip()
        except OSError:
            text = ""
        return text or "another process"

    def __enter__(self) -> FileLock:
        self.acquire(wait=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
