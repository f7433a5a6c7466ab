"""A call's deadline, for the threads that work for it, and what an answer that came too late raises."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from typing import Any, Callable

import grpc

from halflife.deadlines import Deadline


def deadline_of(context: grpc.aio.ServicerContext) -> Deadline:
    """The call's deadline (none when the client set none)."""
    remaining = context.time_remaining()
    return Deadline(None if remaining is None else time.monotonic() + remaining)


async def run_with_deadline(context: grpc.aio.ServicerContext, fn: Callable[..., Any], *args: Any,
                            threads: concurrent.futures.Executor | None = None, **kwargs: Any) -> Any:
    """fn(*args, **kwargs, deadline=the call's Deadline) on a worker thread
    of `threads` (default: the loop's, the call threads).

    gRPC cancels the handler at the deadline or on the client's cancel, but
    not the thread it waits on: the Deadline, marked cancelled here, tells
    that thread, the embedding queue and the store's writer that nobody
    waits any more, so a write the caller gave up on is not stored later."""
    deadline = deadline_of(context)
    try:
        return await asyncio.get_running_loop().run_in_executor(
            threads, functools.partial(fn, *args, **kwargs, deadline=deadline))
    except asyncio.CancelledError:
        deadline.cancelled = True
        raise


def answer_came_too_late(error: BaseException) -> bool:
    """Whether `error` is grpc.aio's failure to send a handler's answer (an
    error status) because the call had ended in its core first: the client
    cancelled, closed its channel or went away, or the deadline passed. A
    batch that core refused outright ("Failed grpc_call_start_batch") is a
    misuse, not this."""
    return isinstance(error, grpc.aio.InternalError) and str(error).startswith('Failed "execute_batch"')
