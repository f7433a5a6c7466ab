"""Logging helpers shared by the server's parts."""

from __future__ import annotations

import collections
import itertools
import logging
import os
import select
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

# Lines a log call may leave waiting for stderr (~150 bytes each): past them, lines are dropped, and counted.
MAX_WAITING_LINES = 10_000
# How long a flush (logging.shutdown's at exit, say) waits for the waiting lines to be written.
FLUSH_WAIT_S = 2.0
# How often a long pass (a start's read of the store) says how far it has come.
PROGRESS_INTERVAL_S = 5.0


class Progress:
    """Says, at INFO every PROGRESS_INTERVAL_S while a long pass runs, how
    far it has come: `what`, done of `total` `unit`, the rate and the time
    left. A pass that ends sooner logs nothing. A start at 5M events was
    20-56 s of NOT_SERVING without a line: a slow start read as a hung one
    (a scale review). Advanced a chunk at a time: no cost per row.
    `following`: the pass this one comes after, whose next line it keeps
    to (a line 5 s after the last, not 5 s after this pass began)."""

    def __init__(self, logger: logging.Logger, what: str, total: int, unit: str,
                 clock: Callable[[], float] = time.monotonic, following: Progress | None = None):
        self._log, self._what, self._total, self._unit, self._clock = logger, what, total, unit, clock
        self._started = clock()
        self._next = self._started + PROGRESS_INTERVAL_S if following is None else following._next
        self.done = 0

    def advance(self, count: int) -> None:
        self.done += count
        now = self._clock()
        if now < self._next:
            return
        self._next = now + PROGRESS_INTERVAL_S
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        left = max(self._total - self.done, 0) / rate if rate else float("inf")
        self._log.info("%s: %d of %d %s in %.0f s (%d%%, %.0f/s, ~%.0f s left)", self._what, self.done, self._total,
                       self._unit, elapsed, 100 * self.done // max(self._total, 1), rate, left)

    def counted(self, rows: Iterable[T], every: int = 1000) -> Iterator[T]:
        """`rows`, passed through, advancing every `every` of them."""
        it = iter(rows)
        while batch := list(itertools.islice(it, every)):
            yield from batch
            self.advance(len(batch))


class RepeatedWarning:
    """A warning (or an error, at `level`) that may repeat for as long as a
    condition lasts (a full disk fails every write): logged at most once per
    `interval` seconds, the next one saying how many were held back
    meanwhile. A line per failed write filled the log, on the same disk at
    times (an operations review)."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, level: int = logging.WARNING):
        self._log, self._interval, self._clock, self._level = logger, interval, clock, level
        self._lock = threading.Lock()
        self._next = -float("inf")  # the time the last line was logged, plus the interval
        self._held = 0

    def log(self, message: str, *args) -> None:
        now = self._clock()
        with self._lock:
            if now < self._next:
                self._held += 1
                return
            # Since the last line, not "in the last interval": those held back may be older (one held 10 s after
            # a line and the next failure an hour later read as a failure in the last 60 s, an ongoing one).
            since = now - (self._next - self._interval)
            held, self._held, self._next = self._held, 0, now + self._interval
        if held:
            message += f" (and {held} more like it in the {since:.0f} s since the last)"
        self._log.log(self._level, message, *args)


class StderrInBackground(logging.Handler):
    """Writes log lines to stderr from a thread of its own: a log call only
    formats its line and queues it. Written by the caller, a line blocked it
    for as long as stderr's reader did not read (a pipe fills at 64 KiB), and
    a line logged on the event loop stopped every call, health checks and
    SIGTERM too, for good under a reader that had stalled (a review). Past
    MAX_WAITING_LINES waiting, lines are dropped, and a line says how many.

    Written to the stream's file descriptor, past Python's buffer: a thread
    stuck inside a buffered write holds its lock, which Python's last flush
    at exit would wait for. In whole lines of at most PIPE_BUF bytes a
    write, which a pipe never interleaves with another's: the workers of
    `--workers` share their parent's stderr, and writes of many lines at
    once tore lines mid-way into each other once the pipe filled."""

    def __init__(self, stream: TextIO | None = None, capacity: int = MAX_WAITING_LINES):
        super().__init__()
        self._stream = sys.stderr if stream is None else stream
        try:
            self._fd: int | None = self._stream.fileno()
        except (AttributeError, OSError, ValueError):  # a stream in memory (tests): written as it is
            self._fd = None
        self._encoding = getattr(self._stream, "encoding", None) or "utf-8"
        self._capacity = capacity
        self._lines: collections.deque[str] = collections.deque()
        self._dropped = 0
        self._writing = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None  # started by the first line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        with self._changed:
            if len(self._lines) >= self._capacity:
                self._dropped += 1
                return
            self._lines.append(line)
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_lines, name="halflife-log", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def flush(self, timeout: float = FLUSH_WAIT_S) -> bool:
        """Waits up to `timeout` seconds for the lines logged so far to be written; False if some still wait."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._lines and not self._writing, timeout)

    def _write_lines(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._lines)
                lines = list(self._lines)
                self._lines.clear()
                dropped, self._dropped = self._dropped, 0
                self._writing = True
            if dropped:  # after the lines that were waiting: those dropped came once they filled the queue
                lines.append(self.format(logging.makeLogRecord({
                    "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                    "msg": "%d log lines dropped: stderr was not read as fast as they came", "args": (dropped,),
                })) + "\n")
            try:
                self._write(lines)
            except (OSError, ValueError):  # stderr closed, or its reader gone: nowhere to say it
                pass
            finally:
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()

    def _write(self, lines: list[str]) -> None:
        if self._fd is None:
            self._stream.write("".join(lines))
            self._stream.flush()
            return
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            data = line.encode(self._encoding, errors="backslashreplace")
            if chunk and size + len(data) > select.PIPE_BUF:
                self._write_fd(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        if chunk:
            self._write_fd(b"".join(chunk))

    def _write_fd(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
