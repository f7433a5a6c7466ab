"""Stop signals. `StopSignals`: how `halflife serve` reads SIGTERM, SIGINT
and SIGHUP (`STOP_SIGNALS`): the first asks for a graceful stop (in-flight calls finish), a later
one for a stop now, except one within REPEAT_SIGNAL_WINDOW_S of the first:
the same stop delivered twice, as timeout(1) and wrapper scripts signal the
process and then its group a millisecond apart (an operations review: calls
in flight were dropped). A single server and a --workers group's parent read
them alike. `sigterm_unwinds`: how the one-shot commands (export, eval) stop.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Callable, Iterator

# What stops `halflife serve` gracefully: SIGHUP too (a closed terminal, or an operator's reload habit: it has
# nothing to reload), which ended the process at once, without a drain or a line (an operations review).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
REPEAT_SIGNAL_WINDOW_S = 0.5
# How often sigterm_unwinds delivers SIGTERM again until its stop unwinds.
REDELIVERY_S = 0.05


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


class SignalExit(SystemExit):
    """A stop by signal `signum`: exit status 128 + signum, as a shell
    reports a process the signal ended."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a timeout, a CI cancel, docker stop) raises SignalExit in the
    main thread, so that it unwinds as Ctrl-C does and work directories are
    removed: its default left export's (~200 MB for the bundled model) and
    eval's stores behind for good. Enter it in the main thread.

    A handler's exception can be lost where the handler runs: C code that
    runs it may clear it (compile()'s constant folding clears all but
    KeyboardInterrupt: `halflife eval`, importing a module from source as it
    was signalled, ran on to exit 0), and so does a finaliser's caller. So
    SIGTERM is delivered again every REDELIVERY_S until the handler sees its
    stop unwind (then no more: each one interrupts a system call of the
    cleanup), and should every raise be lost, the block's end raises it."""
    main = threading.main_thread().ident
    stop_redelivering = threading.Event()  # set once the handler sees its stop unwind, or the block ends
    redelivery: threading.Thread | None = None  # started by the first SIGTERM

    def redeliver() -> None:
        while not stop_redelivering.wait(REDELIVERY_S):
            signal.pthread_kill(main, signal.SIGTERM)

    def stopped(signum: int, _frame) -> None:
        nonlocal redelivery
        if _unwinding():  # its `finally`s and `except`s run: another raise would cut their cleanup short
            stop_redelivering.set()
            return
        if redelivery is None:
            redelivery = threading.Thread(target=redeliver, name="halflife-sigterm", daemon=True)
            redelivery.start()
        raise SignalExit(signum)

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        yield
        if redelivery is not None:  # every raise was lost: the work ran to its end, the exit still says why
            raise SignalExit(signal.SIGTERM)
    finally:
        stop_redelivering.set()
        if redelivery is not None:
            redelivery.join()
        signal.signal(signal.SIGTERM, previous)


def _unwinding() -> bool:
    """Whether a stop is being handled (a SignalExit, or Ctrl-C's
    KeyboardInterrupt): one of its `finally`s, `except`s or `with` exits
    runs, or code those reached."""
    exc = sys.exc_info()[1]
    while exc is not None:
        if isinstance(exc, (SignalExit, KeyboardInterrupt)):
            return True
        exc = exc.__context__
    return False
