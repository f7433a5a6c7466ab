"""Advisory file locks that name their holder: one server per data
directory (`claim_data_dir`), one `--workers` group per port.

Here, not in the server, so that the commands that take a data directory
without serving it (`vacuum`) need neither the model's runtime nor the API."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO, Iterator

DATA_DIR_LOCK = "serve.lock"
# In a data directory `halflife reembed` is filling, until the copy is
# complete: a copy killed half-way (SIGKILL, the OOM killer), which no
# cleanup of its own reaches, is refused rather than served (a review).
UNFINISHED_COPY_MARK = "reembed.unfinished"


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


def claim_data_dir(data_dir: Path, holder: str = "") -> IO[str]:
    """Takes `data_dir` for this process (a single server, or the parent of
    `--workers`, which passes the file on to its workers) until the returned
    file is closed or the processes holding it end. holder: what a refused
    server is told holds it (default: this process's pid).

    Only the workers of one group follow each other's writes; a second
    independent server on the same files would answer from a stale memory
    (items it never indexed, users erased elsewhere). Raises OSError naming
    the holder."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OSError(f"{data_dir} is not a directory") from None
    except OSError as e:  # said as "[Errno 2] No such file or directory: '/proc/x'", naming neither (a review)
        raise OSError(f"data directory {data_dir}: cannot create it ({e.strerror or e})") from None
    try:
        lock = hold_lock(data_dir / DATA_DIR_LOCK, holder)
    except LockHeldError as held:
        raise OSError(f"{data_dir} is in use by another halflife process ({held.holder}); "
                      "one server or one --workers group per data directory") from None
    except OSError as e:
        raise OSError(f"data directory {data_dir}: cannot write in it ({e.strerror or e})") from None
    if (data_dir / UNFINISHED_COPY_MARK).exists():
        lock.close()
        raise OSError(f"{data_dir} holds a `halflife reembed` copy that did not finish (its process was killed): "
                      "delete the directory and run reembed again")
    return lock


def missing_directories(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist, deepest first: what
    `claim_data_dir` makes, for a start or copy that fails to take away again
    (`remove_directories`)."""
    missing = []
    for directory in (path, *path.parents):
        if os.path.lexists(directory):
            break
        missing.append(directory)
    return missing


def remove_directories(directories: list[Path]) -> None:
    """Removes `directories` (`missing_directories`, deepest first) while they
    are empty: a failed `--out a/b/c` left the `a/b` it made behind. One that
    another process put something in meanwhile stays, with those above it."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def directories_removed_on_failure(path: Path) -> Iterator[None]:
    """Removes the `missing_directories(path)` of the block's start, while
    empty, if the block fails or is interrupted (for what makes `path`)."""
    made = missing_directories(path)
    try:
        yield
    except BaseException:
        remove_directories(made)
        raise


def _same_file(lock: IO[str], path: Path) -> bool:
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(lock.fileno())
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)
