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


def hold_lock(path: Path) -> IO[str]:
    """Takes an exclusive flock on `path` (created if missing) and writes this
    process's pid into it. Held until the returned file is closed or the
    process ends, crash included. Raises LockHeldError naming the holder."""
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
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    return lock
