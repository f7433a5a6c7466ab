"""Dynamic batching of concurrent embedding requests (in the manner of TEI).

Requests queue up while the model is busy; when it frees up, the worker takes
the waiting requests in arrival order (up to a window of tokens), sorts their
inputs by length and runs them in batches bounded by a token budget, padding
counted. There is no timer: an idle queue runs a lone request at once, and a
busy one naturally batches whatever arrived during the previous run.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
from typing import Callable, Sequence

import numpy as np

Forward = Callable[[Sequence[np.ndarray]], np.ndarray]


class QueueFullError(Exception):
    """The batcher already holds its maximum of queued inputs."""


class DeadlineExpiredError(Exception):
    """The request's deadline passed before its inputs were computed."""


# Tokens of padding any batch may carry whatever its length ratio: texts of a
# few tokens stay together (1.25 x 3 tokens is not a whole token more).
PADDING_SLACK = 4


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    max_batch_tokens: int = 16384  # padded tokens per forward pass
    max_batch_size: int = 256  # inputs per forward pass
    max_queued_inputs: int = 8192  # beyond this, submit() raises QueueFullError
    window_batches: int = 4  # how many batches' worth of tokens one round sorts together
    # A batch takes inputs up to this many times its shortest one's length (+ PADDING_SLACK tokens).
    # The token budget alone let 252 titles of 8-60 tokens share one batch padded to 60: 512 mixed
    # MovieLens texts ran as 18,552 padded tokens for 4,915 real ones, 1.75 s; at 1.25, 6,157 and
    # 0.52 s (int8, 2 threads). It also keeps a short text's int8 scales from long batch-mates.
    max_length_ratio: float = 1.25


@dataclasses.dataclass(eq=False)
class _Job:
    ids: Sequence[np.ndarray]
    future: asyncio.Future
    deadline: float | None  # loop.time() seconds; None: no deadline
    out: np.ndarray | None = None
    remaining: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(i) for i in self.ids)


class _ModelThread:
    """One thread that runs the model, answering on the event loop.

    Instead of `loop.run_in_executor`, whose concurrent.futures plumbing (a
    second future, condition variables, the executor's locks) added ~0.18 ms
    to every Embed call at concurrency 1 (interleaved A/B, 2-vCPU VM), next
    to ~4-5 ms of model time for one short sentence.
    """

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable, *args) -> asyncio.Future:
        """Runs fn(*args) on the thread; the returned future resolves on the calling loop."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((loop, future, fn, args))
        return future

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            loop, future, fn, args = call
            try:
                outcome = (fn(*args), None)
            except Exception as exc:
                outcome = (None, exc)
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the loop closed meanwhile: nobody is waiting
                pass

    def stop(self) -> None:
        """Finishes the call in progress, then ends the thread."""
        self._calls.put(None)
        self._thread.join()


def _settle(future: asyncio.Future, result, exc: Exception | None) -> None:
    if future.done():  # the awaiting task was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class DynamicBatcher:
    """Batches `forward` calls across concurrent `submit` calls.

    forward: n token-id arrays -> (n, dim) float32. It runs on one worker
    thread, off the event loop, one batch at a time (the model itself uses
    all cores).
    """

    def __init__(self, forward: Forward, config: BatchingConfig = BatchingConfig()):
        self._forward = forward
        self.config = config
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued_inputs = 0
        self._wakeup = asyncio.Event()
        self._model_thread: _ModelThread | None = None
        self._worker: asyncio.Task | None = None
        self.batches_run = 0  # for tests and metrics

    def start(self) -> None:
        if self._worker is None:
            self._model_thread = _ModelThread("halflife-model")
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="halflife-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for job in self._jobs:
            if not job.future.done():
                job.future.cancel()
        self._jobs.clear()
        if self._model_thread is not None:
            self._model_thread.stop()
            self._model_thread = None

    @property
    def queued_inputs(self) -> int:
        return self._queued_inputs

    async def submit(self, ids: Sequence[np.ndarray], deadline: float | None = None) -> np.ndarray:
        """Embeds the token-id arrays `ids`; returns (len(ids), dim) float32.

        deadline: in `loop.time()` seconds. Raises QueueFullError at once when
        the queue is full, DeadlineExpiredError when the deadline passes first.
        Cancelling the caller drops its inputs before they are computed.
        """
        if not ids:
            raise ValueError("nothing to embed")
        if self._queued_inputs + len(ids) > self.config.max_queued_inputs:
            raise QueueFullError(
                f"embedding queue full ({self._queued_inputs} inputs waiting, max {self.config.max_queued_inputs})"
            )
        job = _Job(ids=ids, future=asyncio.get_running_loop().create_future(), deadline=deadline, remaining=len(ids))
        self._jobs.append(job)
        self._queued_inputs += len(ids)
        self._wakeup.set()
        try:
            return await job.future
        finally:
            # The caller went away (cancelled, or its deadline passed); cancelling the
            # awaiting task has usually cancelled the future already.
            if job.future.cancelled() or not job.future.done():
                job.future.cancel()
                # Free its place now, not when the worker reaches it: callers that time
                # out and retry were refused as "queue full" for a whole window's run.
                try:
                    self._jobs.remove(job)  # identity (eq=False)
                    self._queued_inputs -= len(ids)
                except ValueError:
                    pass  # already taken into a window, which counted it out

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._model_thread is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._jobs:
                for batch in self._plan(self._take_window(loop.time())):
                    batch = [(job, i) for job, i in batch if not job.future.done()]
                    if not batch:
                        continue  # every caller in it went away: skip the compute
                    try:
                        vectors = await self._model_thread.run(self._forward, [job.ids[i] for job, i in batch])
                    except Exception as exc:  # a model failure fails its callers, not the worker
                        for job, _ in batch:
                            if not job.future.done():
                                job.future.set_exception(exc)
                        continue
                    self.batches_run += 1
                    self._scatter(batch, vectors)

    def _take_window(self, now: float) -> list[_Job]:
        """Pops waiting jobs in arrival order, up to a window of tokens; fails
        those whose deadline already passed and skips cancelled ones."""
        budget = self.config.max_batch_tokens * self.config.window_batches
        window: list[_Job] = []
        tokens = 0
        while self._jobs and (not window or tokens < budget):
            job = self._jobs.popleft()
            self._queued_inputs -= len(job.ids)
            if job.future.done():
                continue
            if job.deadline is not None and now >= job.deadline:
                job.future.set_exception(DeadlineExpiredError("deadline passed while queued"))
                continue
            window.append(job)
            tokens += job.tokens
        return window

    def _plan(self, jobs: list[_Job]) -> list[list[tuple[_Job, int]]]:
        """Sorts the window's inputs by length and cuts them into batches whose
        padded size (inputs x longest input) fits the token budget and whose
        longest input is at most `max_length_ratio` x its shortest (+ slack)."""
        config = self.config
        items = [(len(ids), job, i) for job in jobs for i, ids in enumerate(job.ids)]
        items.sort(key=lambda item: item[0])
        batches: list[list[tuple[_Job, int]]] = []
        current: list[tuple[_Job, int]] = []
        longest_allowed = 0
        for length, job, i in items:
            padded = (len(current) + 1) * max(length, 1)  # sorted: this input is the longest
            if current and (padded > config.max_batch_tokens or len(current) >= config.max_batch_size
                            or length > longest_allowed):
                batches.append(current)
                current = []
            if not current:
                longest_allowed = length * config.max_length_ratio + PADDING_SLACK
            current.append((job, i))
        if current:
            batches.append(current)
        return batches

    @staticmethod
    def _scatter(batch: list[tuple[_Job, int]], vectors: np.ndarray) -> None:
        for row, (job, i) in enumerate(batch):
            if job.future.done():
                continue
            if job.out is None:
                job.out = np.empty((len(job.ids), vectors.shape[1]), dtype=np.float32)
            job.out[i] = vectors[row]
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.out)
