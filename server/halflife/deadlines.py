"""A call's deadline, as the threads that work for it see it.

gRPC cancels a handler at its deadline, or when the client cancels, but not
the worker thread the handler waits on. A `Deadline` tells that thread, the
embedding queue and the store's writer that nobody waits for the result any
more: work the caller gave up on is dropped, and, above all, a write it gave
up on is not applied later, after writes it has sent since.
"""

from __future__ import annotations

import dataclasses
import threading
import time

# How often a thread that waits for other work looks at its caller's Deadline:
# a cancel, which no timer sees, ends the wait within this long.
POLL_S = 0.05


class DeadlineExpiredError(Exception):
    """The caller stopped waiting (its deadline passed, or it cancelled) before the work was done; it was dropped."""


@dataclasses.dataclass
class Deadline:
    expires: float | None = None  # time.monotonic() seconds; None: no deadline
    cancelled: bool = False  # set on the event loop when the caller cancels; read by threads

    def check(self) -> None:
        """Raises DeadlineExpiredError once the caller has stopped waiting."""
        if self.cancelled:
            raise DeadlineExpiredError("the call was cancelled")
        if self.expires is not None and time.monotonic() > self.expires:
            raise DeadlineExpiredError("the deadline passed")


def check(deadline: Deadline | None) -> None:
    """`deadline.check()`, where there is a deadline."""
    if deadline is not None:
        deadline.check()


def acquire(lock: threading.Lock, deadline: Deadline | None) -> None:
    """Takes `lock`; DeadlineExpiredError, without it, once the caller has gone."""
    while not lock.acquire(timeout=-1 if deadline is None else POLL_S):
        deadline.check()


def wait(event: threading.Event, deadline: Deadline | None) -> None:
    """Waits until `event` is set; DeadlineExpiredError once the caller has gone."""
    while not event.wait(None if deadline is None else POLL_S):
        check(deadline)
