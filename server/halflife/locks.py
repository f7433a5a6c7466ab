"""Advisory file locks that name their holder: one server per data
directory, one `--workers` group per port."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class LockHeldError(OSError):
    """Another process holds the lock; `holder` says which ("pid 123")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def hold_lock(path: Path, holder: str = "") -> IO[str]:
    """Takes an exclusive flock on `path` (created if missing) and writes
    `holder` (default: "pid <this process's>") into it. Held until the
    returned file is closed in every process that has it (children it was
    passed to included) or they end, crash included. Raises LockHeldError
    naming the holder.

    A holder may delete the file as it lets go (`remove_lock`): a lock taken
    on a file no longer at `path` is let go and `path` opened again, or two
    processes would each hold a lock, one of them on a deleted file."""
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise LockHeldError(holder) from None
        except BaseException:
            lock.close()
            raise
        if _same_file(lock, path):
            break
        lock.close()
    lock.truncate(0)
    lock.write(f"{holder or f'pid {os.getpid()}'}\n")
    lock.flush()
    return lock


def remove_lock(lock: IO[str], path: Path) -> None:
    """Deletes a lock file `hold_lock` took, then lets go of it, so that locks
    of short-lived names (one per port) do not pile up."""
    try:
        if _same_file(lock, path):
            os.unlink(path)
    finally:
        lock.close()


def _same_file(lock: IO[str], path: Path) -> bool:
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(lock.fileno())
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)
