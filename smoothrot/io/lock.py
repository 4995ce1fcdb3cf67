"""One run per output folder: an exclusive lock held for the whole run.

Two runs writing one folder would interleave checkpoints and leave the report of whichever
finished last beside the scales of the other. ``flock`` locks are released by the kernel when
the process ends, however it ends (Ctrl-C, SIGKILL), so a stale lock file never blocks a rerun.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_FILE", "FolderInUseError", "folder_lock"]

LOCK_FILE = ".smoothrot.lock"


class FolderInUseError(RuntimeError):
    """Another process holds the lock of an output folder."""


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder``'s exclusive lock (``<folder>/.smoothrot.lock``) for the block; raise
    :class:`FolderInUseError` at once, naming the holder's pid, if another process holds it."""
    path = Path(folder) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise FolderInUseError(
                f"output dir {folder} is in use by another run (pid {holder}); wait for it to "
                "finish or pass another --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
