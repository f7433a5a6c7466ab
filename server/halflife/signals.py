"""Stop signals. `StopSignals`: how `halflife serve` reads SIGTERM and
SIGINT: the first asks for a graceful stop (in-flight calls finish), a later
one for a stop now, except one within REPEAT_SIGNAL_WINDOW_S of the first:
the same stop delivered twice, as timeout(1) and wrapper scripts signal the
process and then its group a millisecond apart (an operations review: calls
in flight were dropped). A single server and a --workers group's parent read
them alike. `sigterm_unwinds`: how the one-shot commands (export, eval) stop.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Callable, Iterator

REPEAT_SIGNAL_WINDOW_S = 0.5


class StopSignals:
    """The stop signals a process has counted (`counted`, in order)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.counted: list[int] = []
        self._clock = clock
        self._first_at = 0.0

    def count(self, signum: int) -> bool:
        """Counts `signum` unless it repeats the first within the window;
        returns whether it counted."""
        now = self._clock()
        if self.counted and now - self._first_at < REPEAT_SIGNAL_WINDOW_S:
            return False
        if not self.counted:
            self._first_at = now
        self.counted.append(signum)
        return True


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a timeout, a CI cancel, docker stop) unwinds as Ctrl-C does,
    so that work directories are removed: its default left export's (~200 MB
    for the bundled model) and eval's stores behind for good."""

    def stopped(signum: int, _frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
