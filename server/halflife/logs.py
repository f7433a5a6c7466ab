"""Logging helpers shared by the server's parts."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable


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
