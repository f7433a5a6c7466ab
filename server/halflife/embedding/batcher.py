"""Dynamic batching of concurrent embedding requests (in the manner of TEI).

Requests queue up while the model is busy; when it frees up, its thread takes
a window of the waiting inputs (a few batches' worth of tokens), sorts them by
length and runs them in batches bounded by a token budget, padding counted.
There is no timer: an idle queue runs a lone request at once, and a busy one
naturally batches whatever arrived during the previous run.

A window takes some of the oldest request's inputs first (one batch's worth at
most), then those of the others, the fewest tokens left first (less
`PASSING_SHARE` of a window for each window a request has waited), then more of the
oldest one if room is left. A request too big for one window goes through
several, its inputs shortest first. So a short request is not held back by
every big one queued before it (in arrival order, one Embed of a sentence
waited 62 s behind 256 requests of 32 KiB of text each), a newer shorter one
passes a waiting one only for a bounded number of windows, and the oldest
request always progresses.

Priority requests (the server's own writes and queries, not Embed calls) are
taken right after the oldest one's share, in the same order among themselves,
until the window holds `PRIORITY_SHARE` of its tokens, and run first in it;
the rest of the window goes to the other requests in the order above, then
to the priority ones' rest. So under a flood of others they wait for the
window in progress, not for the whole queue, and never take more than that
share of a window while others wait.

Once well-filled windows have run, deadlines bound windows too, by the model's
seconds per token in them (SPEED_SAMPLES): a window takes a request only if, behind what it holds
already, the request would end by its deadline, and stops where a request in it
would not (the oldest one's inputs go on alone when none would); and a request
that could not end by its deadline even alone, at SPEED_SPREAD x that speed,
fails at once. Otherwise, past the model's capacity, each request spread over
its whole window and ended with it, after its deadline: 64 callers of 32
sentences with 1 s deadlines got none of 640 calls answered while the model ran
flat out for them (docs/embedding.md).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import threading
import time
from typing import Callable, Sequence

import numpy as np

from halflife.deadlines import DeadlineExpiredError

log = logging.getLogger(__name__)

Forward = Callable[[Sequence[np.ndarray]], np.ndarray]


class QueueFullError(Exception):
    """The batcher already holds its maximum of queued inputs."""


class BatcherStoppedError(Exception):
    """The batcher is not running: not started, stopped, or its model thread died."""


# Tokens of padding any batch may carry whatever its length ratio: texts of a
# few tokens stay together (1.25 x 3 tokens is not a whole token more).
PADDING_SLACK = 4
# Each window a request waits counts as this share of a window's tokens off
# its tokens left when windows pick requests fewest tokens left first: a
# shorter request queued w windows later passes a waiting one only while
# their tokens left differ by more than a window x w / 64 (requests of one
# window go fewest tokens first). So a request of T tokens is passed by newer,
# shorter ones for at most 64 x T tokens of model work, whatever the window:
# with 16,384-token batches (65,536-token windows) that is 1,024 tokens a
# window, and a request of 1k tokens is passed for at most one window, one of
# ~7k (32 long texts) for about 7, while a one-sentence call still passes a
# 7k-token request queued a window before it. A fixed 1,024 tokens a window
# made requests age 8x faster in model time under CPU's 8,192-token windows:
# behind 24 queued requests of 32 long texts a short call waited 12 s, not
# 0.7 s, once they had waited 8 windows (a review's simulation).
PASSING_SHARE = 1 / 64
# How much of a window priority requests (submit's `priority`) may take ahead
# of the others: under a flood of Embed calls (64 callers of 32 sentences, 10 s
# deadlines) a write's texts waited for the whole queue, p50 4.2-6.0 s on 2
# shared cores (0.5-0.7 s with it); the rest of each window keeps Embed calls going
# however many priority ones queue (docs/embedding.md).
PRIORITY_SHARE = 1 / 2
# How long the queue stays empty before the model thread calls `on_idle`
# (e.g. to give back the model's memory), and again while it stays so.
IDLE_AFTER_S = 1.0
# The model's speed is the median seconds per token of its last SPEED_SAMPLES
# well-filled windows (whose batches held half a batch's tokens or inputs, at
# least; by window, since mixed lengths and windows cut short by deadlines run
# as batches each under half: counted batch by batch, a model 2x slower for 10 s
# kept its old speed for most of them): a small batch costs more a token (a
# pass's fixed cost: 1.7x on CPU, far more on a GPU), and with small ones in
# the estimate, a one-sentence stream made every
# larger call look too slow to finish; a median, since one batch slowed by other
# load would otherwise fail calls until later batches diluted it, and a stream
# of small calls runs none that would. An estimate SPEED_FRESH_S old is dropped:
# whatever made it wrong, deadlines then plan nothing until well-filled windows
# measure again (both found by reviews, on a real server and in-process).
SPEED_SAMPLES = 5
SPEED_FRESH_S = 10.0
# How far a window's time may stray from that speed either way: batch times vary
# (padding, cache warmth, other load on the machine; small batches cost more a
# token), so a request is failed early only if it could not finish even this many
# times faster, since failing a call that would have made it is worse than
# computing one that then misses; and a window only takes a request that would
# end by its deadline were the model this many times slower, since a window a
# little late fails every request in it. In-process (a model sleeping 0.3 s a
# 2,048-token batch), 64 callers of 32 sentences with 1 s deadlines: with
# windows planned at the speed itself, 63% of the inputs computed went to calls
# answered; 1.5 x slower, 80-86%.
SPEED_SPREAD = 1.5


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    # Padded tokens per forward pass. None: the model's own best size, which the server fills in
    # (EmbeddingEngine.batch_tokens: 2,048 on CPU, 16,384 on CUDA); DynamicBatcher needs a number.
    max_batch_tokens: int | None = None
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
    # Settled on the event loop only. The model thread reads future.done() to skip
    # callers that went away: cancelling the awaiting task cancels it at once.
    future: asyncio.Future
    deadline: float | None  # time.monotonic() seconds; None: no deadline
    priority: bool = False  # taken ahead of the others, up to PRIORITY_SHARE of a window
    arrived: int = 0  # how many windows had been taken when it was queued
    out: np.ndarray | None = None
    remaining: int = 0  # inputs whose vectors have not come back (event loop only)
    # Under the batcher's lock: the inputs' indices shortest first (set when first
    # taken), how many of them windows took so far, and the tokens of the rest.
    order: Sequence[int] = ()
    taken: int = 0
    tokens_left: int = 0


# A window's share of one request: its inputs job.order[start:stop].
_Slice = tuple[_Job, int, int]


@dataclasses.dataclass
class _Work:
    """What a window's batches that ran held, and their time in forward."""
    inputs: int = 0
    tokens: int = 0
    padded: int = 0  # inputs x longest input, batch by batch
    seconds: float = 0.0

    def add(self, lengths: list[int], seconds: float) -> None:
        self.inputs += len(lengths)
        self.tokens += sum(lengths)
        self.padded += len(lengths) * max(lengths)
        self.seconds += seconds


class DynamicBatcher:
    """Batches `forward` calls across concurrent `submit` calls.

    forward: n token-id arrays -> (n, dim) float32. It runs on one model
    thread, off the event loop, one batch at a time (the model itself uses
    all cores). That thread also takes the queue and plans the batches, so
    one forward pass follows the last without waiting for the event loop:
    when the loop planned them, the model sat idle ~3.4 ms (median) between
    batches of ~16 short sentences at 32 concurrent callers, 12% of its time,
    while the loop handled the calls that had just come in. The loop only
    queues jobs and hands results back. on_idle: called on the model thread
    once the queue has been empty for IDLE_AFTER_S, and every IDLE_AFTER_S
    while it stays so. on_death: called on the loop with the exception
    should the model thread die (nothing embeds after that).
    """

    def __init__(self, forward: Forward, config: BatchingConfig,
                 on_idle: Callable[[], None] | None = None,
                 on_death: Callable[[BaseException], None] | None = None):
        if config.max_batch_tokens is None:
            raise ValueError("BatchingConfig.max_batch_tokens is None: set it (the server uses its engine's "
                             "batch_tokens)")
        self._forward = forward
        self._on_idle = on_idle
        self._on_death = on_death
        self.config = config
        self._jobs: collections.deque[_Job] = collections.deque()  # guarded by _lock, as are the next four
        self._queued_inputs = 0  # inputs of queued jobs that no window took yet
        self._tokenizing = 0  # inputs callers are tokenizing, to submit next (begin_tokenizing)
        self._windows_taken = 0
        self._stopping = False
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the model thread waits here for jobs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.batches_run = 0  # forward passes, for tests and metrics
        self.inputs_run = 0  # inputs in them
        self.forward_seconds = 0.0  # time in forward (failed passes too): its rate is the model's busy share
        # Model thread only: seconds per token of the last well-filled batches, and when the last one ended.
        self._token_rates: collections.deque[float] = collections.deque(maxlen=SPEED_SAMPLES)
        self._rates_measured = -math.inf

    def start(self) -> None:
        """Starts the model thread, answering on the running loop. After a
        stop, first waits for the old thread to end its batch in progress."""
        self._loop = asyncio.get_running_loop()  # a thread still running from an earlier loop answers here now
        if self._thread is None or not self._thread.is_alive() or self._stopping:
            if self._thread is not None:
                # A stop whose wait was cancelled returns before the thread
                # ends: seen alive, it was taken for a running one.
                self._thread.join()
            self._stopping = False
            self._thread = threading.Thread(target=self._serve, name="halflife-model", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        """Cancels the callers still queued and lets the batch in progress
        finish. Later submits raise BatcherStoppedError."""
        _cancel(self._close_queue())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)  # cancelling this wait leaves the thread to end on its own

    def _close_queue(self) -> list[_Job]:
        """Refuses new jobs and wakes the model thread to end; returns the
        jobs still queued, which leave the queue."""
        with self._work:
            self._stopping = True
            self._work.notify()
            queued = list(self._jobs)
            self._jobs.clear()
            self._queued_inputs = 0
        return queued

    @property
    def queued_inputs(self) -> int:
        return self._queued_inputs

    @property
    def tokenizing_inputs(self) -> int:
        return self._tokenizing

    def begin_tokenizing(self, inputs: int) -> None:
        """Counts `inputs` that a caller tokenizes before it submits them
        against the queue bound, as submit would count them; call
        `end_tokenizing` once that work has ended (not when its caller went
        away: the tokenizing goes on until it looks). Unbounded, 40 calls of
        256 long texts all waited for the tokenizer threads (a review: 601 s,
        0 refused, a short call behind 12 of them 117 s). Raises QueueFullError."""
        with self._lock:
            self._refuse_past_bound(inputs)
            self._tokenizing += inputs

    def end_tokenizing(self, inputs: int) -> None:
        with self._lock:
            self._tokenizing -= inputs

    def _refuse_past_bound(self, inputs: int) -> None:
        """QueueFullError where `inputs` more would pass max_queued_inputs. Lock held."""
        if self._tokenizing + self._queued_inputs + inputs > self.config.max_queued_inputs:
            raise QueueFullError(f"embedding queue full ({self._tokenizing} inputs being tokenized and "
                                 f"{self._queued_inputs} waiting, max {self.config.max_queued_inputs})")

    async def submit(self, ids: Sequence[np.ndarray], deadline: float | None = None,
                     priority: bool = False) -> np.ndarray:
        """Embeds the token-id arrays `ids`; returns (len(ids), dim) float32.

        deadline: in `time.monotonic()` seconds. priority: windows take its
        inputs ahead of those of requests without, up to PRIORITY_SHARE of
        each (the module docstring). Raises QueueFullError at once
        when the queue is full (inputs being tokenized counted in),
        DeadlineExpiredError when the deadline passes first. Cancelling the
        caller drops its inputs before they are computed.
        """
        if not ids:
            raise ValueError("nothing to embed")
        job = _Job(ids=ids, future=asyncio.get_running_loop().create_future(), deadline=deadline,
                   priority=priority, remaining=len(ids), tokens_left=sum(len(i) for i in ids))
        with self._work:
            job.arrived = self._windows_taken
            if self._stopping or self._thread is None:
                raise BatcherStoppedError("the embedding model is not running (the server is starting or stopping)")
            # Those being tokenized count too: an Embed taken past them made 456 inputs of a bound of 256 (a review).
            self._refuse_past_bound(len(ids))
            self._jobs.append(job)
            self._queued_inputs += len(ids)
            self._work.notify()
        try:
            return await job.future
        finally:
            if not job.future.done() or job.future.cancelled():  # the caller went away (cancelled, or timed out)
                job.future.cancel()
            if job.taken < len(ids):
                # Gone (cancelled, timed out, or failed by a batch): free its places now,
                # not when the model thread reaches it: callers that time out and retry
                # were refused as "queue full" for a whole window's run.
                # Not queued any more where a window dropped it (its deadline passed, or it was behind): a test,
                # not deque.remove's ValueError, whose message is the job's repr, every token id in it: on the
                # event loop, 1 ms for 32 sentences, 0.2 s for 256 long texts, for every call failed under overload.
                with self._lock:
                    if job in self._jobs:  # identity (eq=False)
                        self._jobs.remove(job)
                        self._queued_inputs -= len(ids) - job.taken

    def _serve(self) -> None:
        """The model thread: takes a window of jobs, runs its batches, repeats.
        Should it die (a bug, or a BaseException from forward), it fails the
        callers it holds and those queued, and the batcher refuses new ones."""
        window: list[_Slice] = []
        try:
            while True:
                with self._work:
                    idle = False
                    while not self._jobs and not self._stopping and not idle:
                        idle = not self._work.wait(IDLE_AFTER_S if self._on_idle is not None else None)
                    if self._stopping:
                        return
                    if self._jobs:
                        idle = False
                        window, expired, behind = self._take_window(time.monotonic())
                if idle:  # without the lock, so that callers can queue meanwhile
                    window = []
                    try:
                        self._on_idle()
                    except Exception:  # housekeeping: never worth the model thread
                        log.exception("on_idle failed")
                    continue
                if expired:
                    self._post(_fail, expired, DeadlineExpiredError("deadline passed while queued"))
                if behind:
                    self._post(_fail, behind, DeadlineExpiredError(
                        "the embedding model is behind: the call could not finish before its deadline"))
                self._run_window(window)
        except BaseException as exc:
            log.exception("the model thread died")
            held = [job for job, _, _ in window] + self._close_queue()
            self._post(_fail, held, BatcherStoppedError(f"the model thread died: {exc!r}"))
            if self._on_death is not None:
                self._post(self._on_death, exc)

    def _run_window(self, window: list[_Slice]) -> None:
        """Runs the window's batches, posting each one's results; before each,
        drops the inputs of callers gone or past their deadline; after a stop,
        cancels the batches not yet run instead."""
        batches = self._plan(window)
        ran = _Work()
        for n, batch in enumerate(batches):
            if self._stopping:
                self._post(_cancel, [job for rest in batches[n:] for job, _ in rest])
                return
            # A caller's deadline can pass while the window's earlier batches run, and the event loop, which
            # cancels the call, ran up to 0.4 s late in a flood: 55 of 5,035 inputs were computed for them.
            now = time.monotonic()
            gone = dict.fromkeys(job for job, _ in batch if _gone(job, now))  # each job once, in order
            if late := [job for job in gone if not job.future.done()]:
                self._post(_fail, late, DeadlineExpiredError("deadline passed while queued"))
            batch = [(job, i) for job, i in batch if job not in gone]
            if not batch:
                continue  # every caller in it went away: skip the compute
            started = time.perf_counter()
            try:
                vectors = self._forward([job.ids[i] for job, i in batch])
                if vectors.ndim != 2 or vectors.shape[0] != len(batch):
                    raise ValueError(f"the model returned {vectors.shape} for {len(batch)} inputs")
            except Exception as exc:  # a model failure fails its callers, not the thread
                self._post(_fail, [job for job, _ in batch], exc)
                continue
            finally:
                took = time.perf_counter() - started
                self.forward_seconds += took
            ran.add([len(job.ids[i]) for job, i in batch], took)
            self.batches_run += 1
            self.inputs_run += len(batch)
            self._post(_scatter, batch, vectors)
        self._measure(ran)

    def _post(self, fn: Callable, *args) -> None:
        """Runs fn(*args) on the event loop."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed meanwhile: nobody is waiting
            pass

    def _measure(self, ran: _Work) -> None:
        """Learns the model's speed from a window's batches that ran, if they
        held half a batch at least (SPEED_SAMPLES)."""
        config = self.config
        if 2 * ran.padded >= config.max_batch_tokens or 2 * ran.inputs >= config.max_batch_size:
            self._token_rates.append(ran.seconds / max(ran.tokens, 1))
            self._rates_measured = time.monotonic()

    def _token_seconds(self, now: float) -> float | None:
        """The model's seconds per (unpadded) token in well-filled windows: the
        lower median of the last ones; None where no such window ran in the
        last SPEED_FRESH_S (SPEED_SAMPLES)."""
        if not self._token_rates or now - self._rates_measured > SPEED_FRESH_S:
            return None
        return sorted(self._token_rates)[(len(self._token_rates) - 1) // 2]

    def _take_window(self, now: float) -> tuple[list[_Slice], list[_Job], list[_Job]]:
        """Takes a window of waiting inputs (see the module docstring): up to
        one batch's tokens of the oldest job (a window's when it waits
        alone), then the priority jobs' until the window holds
        PRIORITY_SHARE of its tokens, then the other jobs' inputs, the
        fewest tokens left (less PASSING_SHARE of a window for each window
        waited) first, then the priority ones' rest, then more of the oldest
        job, up to a window of tokens (each job taken from adds at least one
        input), and, once the model's speed is known, only the
        jobs that would end by their deadlines (the oldest one's share when
        none would). Drops the jobs whose caller went away, those whose
        deadline passed, and those that could not end by it even alone at
        SPEED_SPREAD x the model's speed (keeping one, were that all of them).
        Returns (window, jobs whose deadline passed, jobs behind). Lock held."""
        token_seconds = self._token_seconds(now)
        waiting: collections.deque[_Job] = collections.deque()
        expired: list[_Job] = []
        behind: list[_Job] = []
        for job in self._jobs:
            if _gone(job, now):
                self._queued_inputs -= len(job.ids) - job.taken
                if not job.future.done():
                    expired.append(job)
            elif token_seconds is not None and _slack(job, now, token_seconds / SPEED_SPREAD) < 0:
                behind.append(job)
            else:
                waiting.append(job)
        if behind and not waiting:
            # Every job looks behind: the estimate may be what is wrong (a slow first batch, a burst of other
            # load), and with no batch run nothing would correct it. Run the likeliest one as if there were none.
            keep = max(behind, key=lambda job: _slack(job, now, token_seconds))
            behind.remove(keep)
            waiting.append(keep)
            token_seconds = None
        for job in behind:
            self._queued_inputs -= len(job.ids) - job.taken
        self._jobs = waiting
        if not waiting:
            return [], expired, behind
        budget = self.config.max_batch_tokens * self.config.window_batches
        oldest, *others = waiting
        taken_before = self._windows_taken
        # Stable: arrival order among equals.
        passing = budget * PASSING_SHARE
        others.sort(key=lambda job: job.tokens_left - passing * (taken_before - job.arrived))
        self._windows_taken += 1
        # The rest of the window goes to the others first: in the one order, the priority jobs' rest came first
        # wherever it was shorter, and an Embed call waited for every write queued before it (a catalogue load).
        prioritised = [job for job in others if job.priority]
        shares = [(oldest, self.config.max_batch_tokens if others else budget),
                  *((job, budget * PRIORITY_SHARE) for job in prioritised),
                  *((job, budget) for job in others if not job.priority), *((job, budget) for job in prioritised)]
        if others:
            shares.append((oldest, budget))  # the room the others left
        window: list[_Slice] = []
        tokens = 0
        room = float("inf")  # the tokens the window can hold and still let each of its jobs end by its deadline

        def tokens_by(deadline: float | None) -> float:
            if deadline is None or not token_seconds:
                return float("inf")
            return (deadline - now) / (token_seconds * SPEED_SPREAD)

        def take(job: _Job, limit: float) -> None:
            nonlocal tokens, room
            if not job.taken:
                job.order = sorted(range(len(job.ids)), key=lambda i: len(job.ids[i]))
            start = stop = job.taken
            while stop < len(job.ids) and (stop == start or tokens < limit):
                length = len(job.ids[job.order[stop]])
                if tokens + length > room and (window or stop > start):
                    break
                tokens += length
                job.tokens_left -= length
                stop += 1
            if stop > start:
                window.append((job, start, stop))
                job.taken = stop
                self._queued_inputs -= stop - start
                room = min(room, tokens_by(job.deadline) - job.tokens_left)

        for job, limit in shares:
            if tokens >= budget:
                break
            # Behind what the window holds already, a job that would end after its deadline waits for a later one;
            # a priority job past PRIORITY_SHARE waits for its place among the others.
            if tokens < limit and job.taken < len(job.ids) and tokens + job.tokens_left <= tokens_by(job.deadline):
                take(job, limit)
        if not window:  # by the estimate none would end in time: the oldest goes on all the same
            take(oldest, shares[0][1])
        self._jobs = collections.deque(job for job in waiting if job.taken < len(job.ids))
        return window, expired, behind

    def _plan(self, window: list[_Slice]) -> list[list[tuple[_Job, int]]]:
        """Sorts the window's inputs by length and cuts them into batches whose
        padded size (inputs x longest input) fits the token budget and whose
        longest input is at most `max_length_ratio` x its shortest (+ slack).
        Priority jobs' inputs go first, in batches of their own: else they
        waited for half their window on average."""
        config = self.config
        items = [(len(job.ids[i]), job, i) for job, start, stop in window for i in job.order[start:stop]]
        items.sort(key=lambda item: (not item[1].priority, item[0]))
        batches: list[list[tuple[_Job, int]]] = []
        current: list[tuple[_Job, int]] = []
        longest_allowed = 0
        for length, job, i in items:
            padded = (len(current) + 1) * max(length, 1)  # sorted: this input is the longest of its class
            if current and (padded > config.max_batch_tokens or len(current) >= config.max_batch_size
                            or length > longest_allowed or job.priority != current[0][0].priority):
                batches.append(current)
                current = []
            if not current:
                longest_allowed = length * config.max_length_ratio + PADDING_SLACK
            current.append((job, i))
        if current:
            batches.append(current)
        return batches


def _slack(job: _Job, now: float, token_seconds: float) -> float:
    """Seconds to spare, were the job's tokens left computed now, alone, at `token_seconds` a token."""
    return float("inf") if job.deadline is None else job.deadline - now - token_seconds * job.tokens_left


def _gone(job: _Job, now: float) -> bool:
    """Whether nobody waits for the job's vectors any more: its caller went away, or its deadline passed."""
    return job.future.done() or (job.deadline is not None and now >= job.deadline)


# Run on the event loop, posted by the model thread.

def _scatter(batch: list[tuple[_Job, int]], vectors: np.ndarray) -> None:
    """Copies a batch's rows into their jobs; completes the jobs it finishes."""
    for row, (job, i) in enumerate(batch):
        if job.future.done():
            continue
        if job.out is None:
            job.out = np.empty((len(job.ids), vectors.shape[1]), dtype=np.float32)
        job.out[i] = vectors[row]
        job.remaining -= 1
        if job.remaining == 0:
            job.future.set_result(job.out)


def _fail(jobs: list[_Job], exc: Exception) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)


def _cancel(jobs: list[_Job]) -> None:
    for job in jobs:
        job.future.cancel()
