"""DynamicBatcher against a fake model whose speed the test controls."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time

import numpy as np
import pytest

from halflife.deadlines import DeadlineExpiredError
from halflife.embedding.batcher import BatcherStoppedError, BatchingConfig, DynamicBatcher, QueueFullError

DIM = 4
# The server's CPU default (EmbeddingEngine.batch_tokens); tests that need small batches set their own.
CONFIG = BatchingConfig(max_batch_tokens=2048)


class GatedModel:
    """forward() returns each input's length and first id as a vector, and
    blocks until the test opens the gate; records every batch it saw."""

    def __init__(self, open_gate: bool = True):
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.batches: list[list[int]] = []  # first id of each input, per batch
        self.started = threading.Event()

    def forward(self, ids):
        self.started.set()
        assert self.gate.wait(10), "test forgot to open the gate"
        self.batches.append([int(i[0]) for i in ids])
        return np.array([[len(i), i[0], 0, 0] for i in ids], dtype=np.float32)


def tokens(first_id: int, length: int) -> np.ndarray:
    return np.full(length, first_id, dtype=np.int64)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def busy_batcher(config: BatchingConfig = CONFIG):
    """A started batcher whose model is busy (gate closed) with one request,
    first id 1: (model, batcher, that request's future)."""
    model = GatedModel(open_gate=False)
    batcher = DynamicBatcher(model.forward, config)
    batcher.start()
    busy = asyncio.ensure_future(batcher.submit([tokens(1, 2)]))
    assert await asyncio.to_thread(model.started.wait, 10)
    return model, batcher, busy


def test_a_batcher_needs_a_token_budget():
    # None in BatchingConfig means "the engine's batch_tokens", which only the server knows.
    with pytest.raises(ValueError, match="max_batch_tokens is None"):
        DynamicBatcher(GatedModel().forward, BatchingConfig())


def test_results_map_back_to_their_requests_in_order():
    async def main():
        model = GatedModel()
        batcher = DynamicBatcher(model.forward, CONFIG)
        batcher.start()
        requests = [[tokens(r * 10 + i, 1 + (r + i) % 7) for i in range(r % 3 + 1)] for r in range(20)]
        results = await asyncio.gather(*(batcher.submit(ids) for ids in requests))
        await batcher.stop()
        return requests, results

    requests, results = run(main())
    for ids, vectors in zip(requests, results):
        assert vectors.shape == (len(ids), DIM)
        np.testing.assert_array_equal(vectors[:, 0], [len(i) for i in ids])
        np.testing.assert_array_equal(vectors[:, 1], [i[0] for i in ids])


def test_concurrent_requests_share_batches_sorted_by_length_within_budget():
    async def main():
        model = GatedModel(open_gate=False)
        batcher = DynamicBatcher(model.forward, BatchingConfig(max_batch_tokens=64, max_batch_size=8))
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([tokens(0, 4)]))
        assert await asyncio.to_thread(model.started.wait, 10)  # the model is now busy with `first`
        lengths = [9, 3, 12, 5, 7, 2, 16, 4, 6, 8]
        rest = [asyncio.ensure_future(batcher.submit([tokens(100 + n, n)])) for n in lengths]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(first, *rest)
        await batcher.stop()
        return model.batches, lengths

    batches, lengths = run(main())
    assert batches[0] == [0]  # the idle queue ran the lone request at once
    queued = batches[1:]
    # The 10 queued requests were batched together, not run one by one.
    assert len(queued) < len(lengths)
    flat = [first_id - 100 for batch in queued for first_id in batch]
    assert flat == sorted(lengths)  # length-sorted to cut padding
    for batch in queued:
        assert len(batch) * max(first_id - 100 for first_id in batch) <= 64  # padded tokens within budget
        assert len(batch) <= 8


def test_a_batch_keeps_lengths_within_its_ratio():
    # The token budget alone let texts of 8 and 60 tokens share a batch padded
    # to 60: 3.8x the real tokens on mixed MovieLens texts.
    async def main():
        model, batcher, busy = await busy_batcher()
        lengths = [41, 2, 12, 3, 40, 10, 4, 11]
        rest = [asyncio.ensure_future(batcher.submit([tokens(100 + n, n)])) for n in lengths]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(busy, *rest)
        await batcher.stop()
        return model.batches[1:]

    queued = [[first_id - 100 for first_id in batch] for batch in run(main())]
    assert queued == [[2, 3, 4], [10, 11, 12], [40, 41]]  # each within 1.25x its shortest + 4 tokens


def test_the_next_batch_runs_without_waiting_for_the_event_loop():
    # The model thread plans and starts the next batch itself: when the event
    # loop did it, the model sat idle 12% of the time at 32 callers, waiting
    # for a loop busy with incoming calls.
    async def main():
        model, batcher, busy = await busy_batcher()
        queued = asyncio.ensure_future(batcher.submit([tokens(2, 2)]))
        await asyncio.sleep(0)  # `queued` is in the queue
        model.gate.set()
        deadline = time.monotonic() + 5
        while len(model.batches) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)  # blocks the event loop on purpose
        ran_while_blocked = len(model.batches)
        await asyncio.gather(busy, queued)
        await batcher.stop()
        return ran_while_blocked

    assert run(main()) == 2


@pytest.mark.parametrize("stop_cancelled", [False, True], ids=["stop", "stop-cancelled"])
def test_stop_finishes_the_batch_in_progress_and_cancels_the_waiting_callers(stop_cancelled):
    # Even a stop that is itself cancelled ends the thread and cancels the queue:
    # it used to leave callers waiting and a dead thread that start() took for live.
    async def main():
        model, batcher, busy = await busy_batcher()
        waiting = asyncio.ensure_future(batcher.submit([tokens(2, 2)]))
        await asyncio.sleep(0)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.05)
        if stop_cancelled:
            stopping.cancel()
        model.gate.set()
        try:
            await stopping
        except asyncio.CancelledError:
            assert stop_cancelled
        with pytest.raises(asyncio.CancelledError):
            await waiting
        done = (await busy), list(model.batches), batcher.queued_inputs
        batcher.start()  # a new thread serves
        again = await batcher.submit([tokens(3, 2)])
        await batcher.stop()
        return done, again

    (vectors, batches, queued), again = run(main())
    assert vectors.shape == (1, DIM) and batches == [[1]] and queued == 0  # the waiting caller was not computed
    assert again[0, 1] == 3


def test_start_right_after_a_cancelled_stop_waits_for_the_old_thread_and_serves():
    """The old model thread is still in its batch when start() comes: it
    must not be taken for a running one (a flaky failure of the test above)."""
    async def main():
        model, batcher, busy = await busy_batcher()
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.05)
        stopping.cancel()
        threading.Timer(0.2, model.gate.set).start()  # start() below waits for the old batch
        batcher.start()
        again = await batcher.submit([tokens(3, 2)])
        await batcher.stop()
        return await busy, again

    busy, again = run(main())
    assert busy[0, 1] == 1 and again[0, 1] == 3


def test_full_queue_is_refused_at_once():
    async def main():
        model, batcher, busy = await busy_batcher(dataclasses.replace(CONFIG, max_queued_inputs=3))
        waiting = asyncio.ensure_future(batcher.submit([tokens(2, 2), tokens(3, 2)]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await batcher.submit([tokens(4, 2), tokens(5, 2)])
        model.gate.set()
        await asyncio.gather(busy, waiting)
        # Once drained, the queue takes work again.
        await batcher.submit([tokens(6, 2), tokens(7, 2)])
        await batcher.stop()

    run(main())


def test_cancelled_and_expired_requests_are_dropped_before_compute():
    async def main():
        model, batcher, busy = await busy_batcher()
        cancelled = asyncio.ensure_future(batcher.submit([tokens(2, 2)]))
        expired = asyncio.ensure_future(batcher.submit([tokens(3, 2)], deadline=time.monotonic() + 0.01))
        alive = asyncio.ensure_future(batcher.submit([tokens(4, 2)], deadline=time.monotonic() + 30))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        model.gate.set()
        await busy
        await alive
        with pytest.raises(DeadlineExpiredError):
            await expired
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await batcher.stop()
        return model.batches

    batches = run(main())
    seen = [first_id for batch in batches for first_id in batch]
    assert 4 in seen and 1 in seen
    assert 2 not in seen and 3 not in seen


def test_a_request_whose_deadline_passes_during_an_earlier_batch_of_its_window_is_dropped():
    """The event loop cancels a call at its deadline, but in a flood it ran
    up to 0.4 s late, and the batches run meanwhile computed the inputs of
    callers already past their deadline."""
    async def main():
        model, batcher, busy = await busy_batcher(BatchingConfig(max_batch_tokens=4, max_batch_size=2))
        expires = time.monotonic() + 0.5

        def slow_first_batch(ids):  # the batch before the late request's ends after its deadline
            if ids[0][0] == 2:
                time.sleep(max(0.0, expires - time.monotonic()) + 0.05)
            return model.forward(ids)

        batcher._forward = slow_first_batch
        first = asyncio.ensure_future(batcher.submit([tokens(2, 2)] * 2))  # a batch of its own
        late = asyncio.ensure_future(batcher.submit([tokens(3, 2)], deadline=expires))  # the window's 2nd batch
        await asyncio.sleep(0)  # both queued
        model.gate.set()
        await asyncio.gather(busy, first)
        with pytest.raises(DeadlineExpiredError):
            await late
        await batcher.stop()
        return model.batches

    assert run(main()) == [[1], [2, 2]]


def test_a_cancelled_request_frees_its_queue_place_at_once():
    # While the model is busy, callers that give up must not keep the queue
    # full: their retries were refused for a whole window's run.
    async def main():
        model, batcher, busy = await busy_batcher(dataclasses.replace(CONFIG, max_queued_inputs=4))
        given_up = [asyncio.ensure_future(batcher.submit([tokens(10 + n, 2)] * 2)) for n in range(2)]
        await asyncio.sleep(0)
        assert batcher.queued_inputs == 4
        for call in given_up:
            call.cancel()
        await asyncio.gather(*given_up, return_exceptions=True)
        assert batcher.queued_inputs == 0
        retry = asyncio.ensure_future(batcher.submit([tokens(20, 2)] * 4))  # the whole queue, while still busy
        await asyncio.sleep(0)
        model.gate.set()
        await asyncio.gather(busy, retry)
        await batcher.stop()
        return model.batches

    seen = [first_id for batch in run(main()) for first_id in batch]
    assert seen.count(20) == 4 and 10 not in seen and 11 not in seen


def test_a_model_failure_fails_only_its_callers_and_the_worker_lives_on():
    calls = {"n": 0}

    def flaky(ids):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("model exploded")
        return np.ones((len(ids), DIM), dtype=np.float32)

    async def main():
        batcher = DynamicBatcher(flaky, CONFIG)
        batcher.start()
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit([tokens(1, 3)])
        ok = await batcher.submit([tokens(2, 3)])
        await batcher.stop()
        return ok

    assert run(main()).shape == (1, DIM)


@pytest.mark.parametrize("config, most_inputs", [
    (BatchingConfig(max_batch_tokens=64, max_batch_size=16), 4),
    # Windows of 8 tokens: most requests go through several, cut anywhere.
    (BatchingConfig(max_batch_tokens=8, max_batch_size=4, window_batches=1), 12),
], ids=["whole-requests", "requests-across-windows"])
def test_many_callers_that_cancel_or_expire_at_random_leave_nothing_behind(config, most_inputs):
    # The model thread and the event loop share the queue: every caller that
    # stays gets its own rows, the others their own error (or their rows, when
    # computed first), and the queue empties.
    rng = np.random.default_rng(5)

    def slow_forward(ids):
        threading.Event().wait(0.002)  # long enough for callers to queue up behind it
        return np.array([[len(i), i[0], 0, 0] for i in ids], dtype=np.float32)

    async def caller(batcher, first_id, n, kind):
        ids = [tokens(first_id + k, 1 + (first_id + k) % 9) for k in range(n)]
        deadline = time.monotonic() + 0.005 if kind == "expires" else None
        call = asyncio.ensure_future(batcher.submit(ids, deadline))
        if kind == "cancels":
            await asyncio.sleep(float(rng.random() * 0.01))
            call.cancel()
        try:
            return kind, ids, await call
        except (asyncio.CancelledError, DeadlineExpiredError) as error:
            return kind, ids, error

    async def main():
        batcher = DynamicBatcher(slow_forward, config)
        batcher.start()
        kinds = rng.choice(["stays", "stays", "cancels", "expires"], 300)
        outcomes = await asyncio.gather(*(caller(batcher, c * 100, int(rng.integers(1, most_inputs + 1)), kind)
                                          for c, kind in enumerate(kinds)))
        left = batcher.queued_inputs
        await batcher.stop()
        return outcomes, left

    outcomes, left = run(main())
    assert left == 0
    expected_error = {"stays": (), "cancels": asyncio.CancelledError, "expires": DeadlineExpiredError}
    for kind, ids, outcome in outcomes:
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, expected_error[kind]), (kind, outcome)
            continue
        np.testing.assert_array_equal(outcome[:, 0], [len(i) for i in ids])
        np.testing.assert_array_equal(outcome[:, 1], [i[0] for i in ids])
    failed = collections.Counter(kind for kind, _, outcome in outcomes if isinstance(outcome, BaseException))
    assert failed["cancels"] > 0 and failed["expires"] > 0  # both paths were exercised


def _finish_order(config: BatchingConfig, requests: dict[str, list[np.ndarray]],
                  priority: frozenset[str] = frozenset()) -> tuple[list[str], GatedModel]:
    """Queues `requests` (in order; those named in `priority` with priority)
    behind a busy model, then lets it run; returns the names in the order
    their results came back, and the model."""
    async def main():
        model, batcher, busy = await busy_batcher(config)
        done: list[str] = []
        calls = []
        for name, ids in requests.items():
            call = asyncio.ensure_future(batcher.submit(ids, priority=name in priority))
            call.add_done_callback(lambda _, name=name: done.append(name))
            calls.append(call)
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.gather(busy, *calls)
        await batcher.stop()
        for ids, vectors in zip(requests.values(), results[1:]):  # every row its own, across windows
            np.testing.assert_array_equal(vectors[:, 1], [i[0] for i in ids])
        return done, model

    return run(main())


SMALL_WINDOWS = BatchingConfig(max_batch_tokens=64, max_batch_size=8, window_batches=2)  # 128-token windows


def test_a_short_request_goes_before_big_ones_queued_earlier():
    """Taken in arrival order, one sentence waited 62 s behind 256 requests of
    32 KiB of text each: the window now takes the requests with the fewest
    tokens left first, after a share of the oldest one."""
    big = {name: [tokens(first + k, 16) for k in range(16)] for name, first in (("A", 100), ("B", 200), ("C", 300))}
    done, model = _finish_order(SMALL_WINDOWS, big | {"short": [tokens(9, 3)]})
    assert done[0] == "short" and sorted(done) == ["A", "B", "C", "short"]
    # In the first window after the busy one: its batches hold A's share (64 tokens), the sentence and B's rest.
    first_window = [first_id for batch in model.batches[1:4] for first_id in batch]
    assert 9 in first_window and {first_id // 100 for first_id in first_window} == {0, 1, 2}


def test_the_oldest_request_is_never_passed_over_by_a_stream_of_shorter_ones():
    shorts = {f"short{n}": [tokens(1000 + n, 8)] for n in range(64)}  # 512 tokens: 4 windows' worth
    done, _ = _finish_order(SMALL_WINDOWS, {"big": [tokens(100 + k, 16) for k in range(16)]} | shorts)
    # 256 tokens, 64 of them a window: the big request ends with the 4th window, before the shorts do.
    assert done.index("big") < len(done) - 1
    assert done[-1].startswith("short")


def test_a_request_across_windows_goes_shortest_input_first():
    """Sliced in index order, each window sorted only its own slice: a
    request of mixed lengths ran with more padding than in one window."""
    lengths = list(np.random.default_rng(2).permutation(np.arange(1, 49)))  # 1,176 tokens: ~10 windows
    done, model = _finish_order(SMALL_WINDOWS, {"big": [tokens(100 + n, n) for n in lengths]})
    ran = [first_id - 100 for batch in model.batches[1:] for first_id in batch]
    assert ran == sorted(lengths)


def _windows_until_taken(config: BatchingConfig, queued: list[list[np.ndarray]], newcomer: list[np.ndarray],
                         arrivals: list[list[np.ndarray]], windows_before: int = 0, most: int = 20,
                         priority: frozenset[str] = frozenset()) -> int:
    """Plans windows as the model thread would (it waits in a busy forward
    meanwhile): `queued` requests first, `windows_before` windows of them,
    then `newcomer`, and before each later window the requests `arrivals`
    (again each time); those of them named in `priority` ("queued",
    "newcomer", "arrivals") with priority. Returns how many windows ran
    after the newcomer queued until one took it (`most` where none did)."""
    async def main():
        model, batcher, busy = await busy_batcher(config)
        calls = [asyncio.ensure_future(batcher.submit(ids, priority="queued" in priority)) for ids in queued]

        async def window():
            await asyncio.sleep(0)  # queued
            with batcher._lock:
                return batcher._take_window(time.monotonic())[0]

        for _ in range(windows_before):
            await window()
        calls.append(asyncio.ensure_future(batcher.submit(newcomer, priority="newcomer" in priority)))
        for count in range(1, most + 1):
            calls += [asyncio.ensure_future(batcher.submit(ids, priority="arrivals" in priority)) for ids in arrivals]
            if any(job.ids is newcomer for job, _, _ in await window()):
                break
        else:
            count = most
        for call in calls:
            call.cancel()
        model.gate.set()
        await asyncio.gather(busy, *calls, return_exceptions=True)
        await batcher.stop()
        return count

    return run(main())


def test_a_newer_shorter_request_passes_a_waiting_one_only_for_a_few_windows():
    """Sorted only by tokens left, a 40-token request waited behind every
    8-token call that kept arriving (more than a window's worth each time),
    until the big request ahead of both was done."""
    config = BatchingConfig(max_batch_tokens=1024, max_batch_size=64, window_batches=2)  # 2,048-token windows
    big = [tokens(100 + k, 16) for k in range(1280)]  # the oldest: 1,024 tokens of it a window, for 20 windows
    calls = [[tokens(1000 + n, 8)] for n in range(300)]  # 2,400 tokens, of 1,024 left a window
    # The 8-token calls queued with it pass it (their 2,400 tokens take 3 windows); those queued a window
    # later have aged 32 tokens less (PASSING_SHARE of a window), which the 40-token request makes up.
    assert _windows_until_taken(config, [big], [tokens(7, 40)], calls) <= 4


def test_a_short_request_is_not_passed_by_big_ones_that_waited_many_windows():
    """Requests age by a share of a window's tokens, not by a fixed count:
    under CPU's smaller windows a fixed 1,024 tokens a window made 24 big
    queued requests pass a new short call once they had waited 8 windows,
    and it waited for all of them (12 s in a review's simulation)."""
    config = BatchingConfig(max_batch_tokens=64, max_batch_size=8, window_batches=4)  # 256-token windows
    burst = [[tokens(100 * r + k, 8) for k in range(32)] for r in range(1, 25)]  # 24 x 256 tokens
    assert _windows_until_taken(config, burst, [tokens(9, 3)], [], windows_before=10) == 1


CPU_LIKE_WINDOWS = BatchingConfig(max_batch_tokens=64, max_batch_size=8, window_batches=4)  # 256-token windows


def test_a_priority_request_is_taken_into_the_next_window_ahead_of_a_flood_of_others():
    """A write's texts queued with the Embed calls, unprioritised: under a
    flood of them (64 callers of 32 sentences) writes waited 4-6 s (p50) on 2 cores.
    A priority request goes into the next window, whatever waits before it."""
    flood = [[tokens(1000 + n, 8)] for n in range(64)]  # 512 tokens: two windows, and 8 more calls each window
    write = [tokens(9, 8) for _ in range(4)]  # more tokens left than any of them
    assert _windows_until_taken(CPU_LIKE_WINDOWS, flood, write, flood[:8]) > 2  # the flood goes first
    assert _windows_until_taken(CPU_LIKE_WINDOWS, flood, write, flood[:8], priority=frozenset({"newcomer"})) == 1


def test_priority_requests_take_at_most_their_share_of_a_window():
    """However many priority requests queue, each window keeps the part
    PRIORITY_SHARE leaves for the others, in the usual order."""
    writes = [[tokens(100 * r + k, 8) for k in range(4)] for r in range(1, 65)]  # 64 x 32 tokens: 8 windows
    embed = [tokens(9, 8)]
    assert _windows_until_taken(CPU_LIKE_WINDOWS, writes, embed, [], priority=frozenset({"queued"})) == 1
    # And with more of them arriving before every window.
    priority = frozenset({"queued", "arrivals"})
    assert _windows_until_taken(CPU_LIKE_WINDOWS, writes, embed, writes[:8], priority=priority) == 1
    # Shorter writes too: in the one order their rest went first, and an Embed call waited for every write queued
    # before it (320 of 8 tokens: 11 windows), however few of each window the writes took ahead.
    short_writes, embed = [[tokens(100 + r, 8)] for r in range(320)], [tokens(9, 8) for _ in range(4)]
    assert _windows_until_taken(CPU_LIKE_WINDOWS, short_writes, embed, [], priority=frozenset({"queued"})) == 1
    assert _windows_until_taken(CPU_LIKE_WINDOWS, short_writes, embed, short_writes[:40], priority=priority) == 1


def test_a_priority_requests_inputs_run_first_in_their_window_in_batches_of_their_own():
    """Sorted by length with the window's other inputs, a write's texts ran
    anywhere in it: half a window's wait on average, a second or more on 2
    cores under a flood."""
    flood = {f"embed{n}": [tokens(1000 + n, 4)] for n in range(24)}  # 96 tokens: one 256-token window
    write = {"write": [tokens(9, 8), tokens(10, 4)]}
    done, model = _finish_order(CPU_LIKE_WINDOWS, flood | write, priority=frozenset({"write"}))
    assert done[0] == "write"
    assert model.batches[1] == [10, 9]  # its own batch, by length, however short the others
    assert sorted(first_id for batch in model.batches[2:] for first_id in batch) == list(range(1000, 1024))
    done, model = _finish_order(CPU_LIKE_WINDOWS, flood | write)
    assert done[-1] == "write"  # without priority: after the shorter ones


def test_the_queue_counts_what_no_window_took_yet_and_frees_a_failed_requests_rest():
    """A request in progress still has inputs waiting: they count against
    max_queued_inputs, so the bound holds what waits (before, a request
    taken into a window whole counted out, however long it ran). One that
    its first batch failed frees the rest at once, not at the next window."""
    config = BatchingConfig(max_batch_tokens=16, max_batch_size=8, window_batches=2, max_queued_inputs=300)
    release_c = threading.Event()

    class Model(GatedModel):
        def forward(self, ids):
            if any(5000 <= i[0] < 6000 for i in ids):
                raise RuntimeError("model failed")  # request B's batch
            if any(i[0] >= 7000 for i in ids):
                assert release_c.wait(10)  # request C's batch, in the same window as B's
            return super().forward(ids)

    async def main():
        model = Model(open_gate=False)
        batcher = DynamicBatcher(model.forward, config)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit([tokens(1 + k, 2) for k in range(280)]))  # 18 windows
        assert await asyncio.to_thread(model.started.wait, 10)
        in_progress = batcher.queued_inputs
        with pytest.raises(QueueFullError):
            await batcher.submit([tokens(3000 + k, 2) for k in range(250)])
        model.gate.set()
        await running
        model.gate.clear()
        model.started.clear()
        busy = asyncio.ensure_future(batcher.submit([tokens(1, 2)]))
        assert await asyncio.to_thread(model.started.wait, 10)  # the model waits at the gate with it alone
        b = asyncio.ensure_future(batcher.submit([tokens(5000 + k, 2) for k in range(290)]))
        c = asyncio.ensure_future(batcher.submit([tokens(7000 + k, 2) for k in range(10)]))
        await asyncio.sleep(0)
        model.gate.set()  # next window: 8 of B's inputs, then 8 of C's, whose batch waits
        with pytest.raises(RuntimeError, match="model failed"):
            await b
        after_failure = batcher.queued_inputs  # B's rest freed; C's last 2 wait
        release_c.set()
        await asyncio.gather(busy, c)
        accepted = await batcher.submit([tokens(9000 + k, 2) for k in range(300)])
        await batcher.stop()
        return in_progress, after_failure, accepted.shape

    # The first window took 16 of the 280 inputs (32 tokens).
    assert run(main()) == (280 - 16, 2, (300, DIM))


def test_a_batcher_not_running_refuses_at_once():
    async def main():
        batcher = DynamicBatcher(GatedModel().forward, CONFIG)
        with pytest.raises(BatcherStoppedError):
            await batcher.submit([tokens(1, 2)])  # not started
        batcher.start()
        assert (await batcher.submit([tokens(1, 2)])).shape == (1, DIM)
        await batcher.stop()
        with pytest.raises(BatcherStoppedError):
            await batcher.submit([tokens(2, 2)])  # stopped: a late caller must not wait forever
        batcher.start()  # and it starts again
        result = await batcher.submit([tokens(3, 2)])
        await batcher.stop()
        return result

    assert run(main())[0, 1] == 3


def test_a_batcher_started_on_a_new_loop_answers_there():
    model = GatedModel()
    batcher = DynamicBatcher(model.forward, CONFIG)

    async def one(first_id):
        batcher.start()
        return await batcher.submit([tokens(first_id, 2)])

    assert run(one(1))[0, 1] == 1  # the first loop closes without stop()
    assert run(one(2))[0, 1] == 2


@pytest.mark.parametrize("bad_output", [np.zeros((1, DIM), np.float32), np.zeros(2, np.float32)],
                         ids=["rows-missing", "one-dimensional"])
def test_a_model_output_of_the_wrong_shape_fails_its_callers(bad_output):
    async def main():
        batcher = DynamicBatcher(lambda ids: bad_output if len(ids) == 2 else np.ones((len(ids), DIM), np.float32),
                                 CONFIG)
        batcher.start()
        with pytest.raises(ValueError, match="the model returned"):
            await batcher.submit([tokens(1, 2), tokens(2, 2)])
        ok = await batcher.submit([tokens(3, 2)])
        await batcher.stop()
        return ok

    assert run(main()).shape == (1, DIM)


def test_a_model_thread_that_dies_fails_its_callers_and_refuses_new_ones():
    class Fatal(BaseException):
        pass

    def fatal(ids):
        raise Fatal("not an Exception")

    async def main():
        batcher = DynamicBatcher(fatal, CONFIG)
        batcher.start()
        with pytest.raises(BatcherStoppedError, match="model thread died"):
            await batcher.submit([tokens(1, 2)])
        with pytest.raises(BatcherStoppedError):
            await batcher.submit([tokens(2, 2)])
        await batcher.stop()

    run(main())


def test_a_worker_thread_waiting_on_a_stopped_batcher_gets_batcher_stopped():
    # Upserts embed from worker threads (Backend.embed_blocking); a stop that
    # cancels their job must read as "stopped" (UNAVAILABLE), not INTERNAL.
    from halflife.api.backend import Backend
    from halflife.embedding.engine import TokenizedInputs

    class Tokens:
        def tokenize(self, texts, truncate, check=None):
            ids = [tokens(len(text), len(text)) for text in texts]
            return TokenizedInputs(ids=ids, token_counts=np.array([len(t) for t in texts]),
                                   truncated=np.zeros(len(texts), bool))

    async def main():
        model, batcher, busy = await busy_batcher()
        backend = Backend()
        backend.attach(Tokens(), batcher, asyncio.get_running_loop())
        worker = asyncio.ensure_future(asyncio.to_thread(backend.embed_blocking, ["abc"]))
        while batcher.queued_inputs == 0:
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(stopping, busy)
        backend.close()
        with pytest.raises(BatcherStoppedError, match="shutting down"):
            await worker

    run(main())


def test_on_idle_runs_on_the_model_thread_once_the_queue_stays_empty(monkeypatch):
    """The server gives back the model's memory there: not between the
    windows of a burst (each batch takes a quarter of the idle time), and a
    failing on_idle does not take the model thread down."""
    from halflife.embedding import batcher as batcher_module

    monkeypatch.setattr(batcher_module, "IDLE_AFTER_S", 0.2)
    model = GatedModel()
    forward = model.forward

    def slow_forward(ids):
        time.sleep(0.05)
        return forward(ids)

    calls: list[tuple[str, int]] = []  # (thread name, batches run by then)

    def on_idle():
        calls.append((threading.current_thread().name, len(model.batches)))
        if len(calls) == 1:
            raise RuntimeError("housekeeping failed")

    async def main():
        # One batch of at most 4 inputs per window: the burst runs as 8 windows.
        config = BatchingConfig(max_batch_size=4, window_batches=1, max_batch_tokens=12)
        batcher = DynamicBatcher(slow_forward, config, on_idle=on_idle)
        batcher.start()
        await asyncio.gather(*(batcher.submit([tokens(n, 3)]) for n in range(1, 30)))
        burst = len(model.batches)
        for _ in range(100):  # bounded: 5 s
            if sum(b == burst for _, b in calls) >= 2:
                break
            await asyncio.sleep(0.05)
        after_failure = await batcher.submit([tokens(99, 2)])
        await batcher.stop()
        return after_failure, burst

    after_failure, burst = run(main())
    assert burst >= 8
    assert after_failure[0].tolist() == [2, 99, 0, 0]
    assert {name for name, _ in calls} == {"halflife-model"}
    assert [b for _, b in calls if 0 < b < burst] == []  # never within the burst
    assert sum(b == burst for _, b in calls) >= 2  # again while the queue stays empty, after the failure


async def _queue_with_speed(seconds_per_token: float, requests: list[tuple[list[np.ndarray], float | None]],
                            measured_ago: float = 0.0):
    """A busy batcher (gate closed) that has measured the model at
    `seconds_per_token` `measured_ago` seconds ago, with `requests` (ids,
    deadline) queued behind: (model, batcher, busy call, their calls)."""
    model, batcher, busy = await busy_batcher()
    batcher._token_rates.append(seconds_per_token)
    batcher._rates_measured = time.monotonic() - measured_ago
    calls = [asyncio.ensure_future(batcher.submit(ids, deadline)) for ids, deadline in requests]
    await asyncio.sleep(0)  # queued
    return model, batcher, busy, calls


async def _release(model, batcher, busy, calls) -> None:
    for call in calls:
        call.cancel()
    model.gate.set()
    await asyncio.gather(busy, *calls, return_exceptions=True)
    await batcher.stop()


def test_a_call_fails_at_once_only_if_it_could_not_end_by_its_deadline_even_on_a_faster_model():
    """Past the model's capacity the calls it could not serve in time took
    its time all the same, and those it could failed too: now one that could
    not end by its deadline even alone, at SPEED_SPREAD x the measured speed,
    is failed before any compute, and a window takes only those that would
    end in time behind what it holds already."""
    now = time.monotonic()
    hundred = [tokens(7, 10) for _ in range(10)]  # 100 tokens: 0.1 s at the 1 ms a token measured

    async def main():
        queued = await _queue_with_speed(0.001, [
            (hundred, now + 0.06),  # could not end in time even at 1.5 x the speed (0.067 s)
            (hundred, now + 0.08),  # could at 1.5 x, but not at the speed itself: not now, not failed either
            (hundred, now + 10),
            (hundred, None),
        ])
        batcher = queued[1]
        with batcher._lock:
            window, expired, behind = batcher._take_window(now)
            still_queued = list(batcher._jobs)
            queued_inputs = batcher.queued_inputs
        await _release(*queued)
        return window, expired, behind, still_queued, queued_inputs

    window, expired, behind, still_queued, queued_inputs = run(main())
    assert expired == [] and [job.deadline for job in behind] == [now + 0.06]
    assert [(job.deadline, start, stop) for job, start, stop in window] == [(now + 10, 0, 10), (None, 0, 10)]
    assert [job.deadline for job in still_queued] == [now + 0.08]
    assert queued_inputs == 10  # the failed call's places are free


def test_a_call_a_window_dropped_is_not_formatted_on_the_event_loop(monkeypatch):
    """A call failed by a window (behind, or its deadline passed while
    queued) is no longer queued when its caller cleans up: deque.remove then
    raised ValueError with the job's repr, every token id of it, on the event
    loop (0.2 s for 256 long texts; in-process under overload the loop stalled
    0.6-0.9 s at a time and the model sat idle 55% of the run)."""
    from halflife.embedding import batcher as batcher_module

    formatted = []
    monkeypatch.setattr(batcher_module._Job, "__repr__", lambda job: formatted.append(job) or "job")
    now = time.monotonic()

    async def main():
        model, batcher, busy, calls = await _queue_with_speed(0.001, [
            ([tokens(7, 10) for _ in range(10)], now + 0.06),  # behind
            ([tokens(8, 10)], now),  # expires while queued
            ([tokens(9, 10)], None)])
        model.gate.set()
        outcomes = await asyncio.gather(busy, *calls, return_exceptions=True)
        await batcher.stop()
        return outcomes, batcher.queued_inputs

    outcomes, queued_inputs = run(main())
    assert [type(outcome) for outcome in outcomes[1:3]] == [DeadlineExpiredError] * 2
    assert "behind" in str(outcomes[1]) and "passed" in str(outcomes[2])
    assert formatted == [] and queued_inputs == 0


def test_a_stale_estimate_of_the_models_speed_fails_nothing():
    """Whatever made an estimate wrong, one SPEED_FRESH_S old plans nothing:
    the hopeless-looking call is taken, as before any batch ran."""
    from halflife.embedding.batcher import SPEED_FRESH_S

    now = time.monotonic()

    async def main():
        queued = await _queue_with_speed(0.001, [([tokens(7, 10) for _ in range(10)], now + 0.06),
                                                 ([tokens(8, 10)], None)], measured_ago=SPEED_FRESH_S + 1)
        with queued[1]._lock:
            window, expired, behind = queued[1]._take_window(now)
        await _release(*queued)
        return window, expired, behind

    window, expired, behind = run(main())
    assert expired == behind == [] and [(start, stop) for _, start, stop in window] == [(0, 10), (0, 1)]


def test_a_window_ends_where_a_call_in_it_would_end_after_its_deadline():
    now = time.monotonic()
    twenties = [tokens(7, 20) for _ in range(5)]  # 100 tokens

    async def main():
        windows = []
        for requests in ([(twenties, now + 0.3), (twenties, now + 10), (twenties, None)],
                         [(twenties, now + 0.1)]):  # alone: in time only on a faster model
            queued = await _queue_with_speed(0.001, requests)
            with queued[1]._lock:
                windows.append(queued[1]._take_window(now)[0])
            await _release(*queued)
        return windows

    cut, lone = run(main())
    # 0.3 s at 1.5 ms a token (SPEED_SPREAD slower) is 200 tokens: the first two calls, not the third's first text.
    assert [(job.deadline, start, stop) for job, start, stop in cut] == [(now + 0.3, 0, 5), (now + 10, 0, 5)]
    # A window takes at least one call's inputs, the oldest's, so that the queue moves on.
    assert [(job.deadline, start, stop) for job, start, stop in lone] == [(now + 0.1, 0, 5)]


def test_a_wrong_estimate_of_the_models_speed_does_not_fail_every_call_for_good():
    """A slow first batch (or a burst of other load) makes every call look
    hopeless; failing them all, no batch would run to correct the estimate."""
    many = [tokens(2, 5) for _ in range(220)]  # 1,100 tokens: a well-filled batch, which the speed is learnt from

    async def main():
        model = GatedModel()

        def slow_first_batch(ids):
            if not model.batches:
                time.sleep(1.0)  # ~0.8 ms a token: 1,100 tokens look like 0.6 s even on a model 1.5 x faster
            return model.forward(ids)

        batcher = DynamicBatcher(slow_first_batch, CONFIG)
        batcher.start()
        await batcher.submit([tokens(1, 5) for _ in range(240)])
        rounds = []
        for _ in range(20):
            deadline = time.monotonic() + 0.5
            results = await asyncio.gather(*(batcher.submit(many, deadline) for _ in range(8)),
                                           return_exceptions=True)
            rounds.append([str(r) if isinstance(r, Exception) else "ok" for r in results])
            if rounds[-1] == ["ok"] * 8:
                break
        await batcher.stop()
        return rounds

    rounds = run(main())
    assert any("the embedding model is behind" in outcome for outcome in rounds[0])  # the estimate was that bad
    assert rounds[-1] == ["ok"] * 8


def test_the_speed_is_learnt_from_well_filled_batches_and_one_slowed_batch_moves_it_not():
    """A batch costs a fixed time besides its tokens, so a small one costs more
    a token, and a one-sentence stream made the estimate say that a call of 32
    sentences could not end in time: every such call failed at once, while the
    model could do it in a third of its deadline (a review, in-process and on a
    real server); and one batch slowed by other load did as much for as long as
    only small calls came, whose batches never corrected it."""
    slowed = [False]

    def forward(ids):
        seconds = 0.004 + 1e-5 * len(ids) * max(len(i) for i in ids)  # 4 ms a pass, 10 µs a token
        if slowed[0]:
            slowed[0], seconds = False, seconds * 50
        time.sleep(seconds)
        return np.zeros((len(ids), DIM), np.float32)

    async def main():
        batcher = DynamicBatcher(forward, CONFIG)
        batcher.start()
        well_filled = [tokens(1, 12) for _ in range(150)]  # 1,800 tokens: ~22 ms
        for _ in range(3):
            await batcher.submit(well_filled)
        slowed[0] = True
        await batcher.submit(well_filled)  # ~1.1 s
        outcomes = []
        for _ in range(10):  # a stream of one-sentence calls (~5 ms a pass, 0.4 ms a token), and a call of 384 tokens
            small = [asyncio.ensure_future(batcher.submit([tokens(2, 12)], time.monotonic() + 1)) for _ in range(5)]
            big = batcher.submit([tokens(3, 12) for _ in range(32)], time.monotonic() + 0.05)  # ~8 ms of work
            try:
                await big
                outcomes.append("ok")
            except DeadlineExpiredError as e:
                outcomes.append(str(e))
            await asyncio.gather(*small)
        await batcher.stop()
        return outcomes

    outcomes = run(main())
    assert not [o for o in outcomes if "behind" in o], outcomes
    assert outcomes.count("ok") >= 8, outcomes  # the shared box may delay a few past 50 ms


def test_the_speed_is_learnt_from_a_window_whose_batches_together_fill_half_a_batch():
    """Texts of mixed lengths, and windows cut short by deadlines, run as
    batches each under half a batch: counted batch by batch, none measured,
    and a model 2x slower for 10 s kept its old speed (in-process, 64 callers
    x 32 sentences at 1 s deadlines answered nothing for 9 s of it)."""
    def forward(ids):
        time.sleep(0.002 + 1e-5 * len(ids) * max(len(i) for i in ids))
        return np.zeros((len(ids), DIM), np.float32)

    async def main():
        batcher = DynamicBatcher(forward, CONFIG)
        batcher.start()
        # Three batches (length ratio) of 250, 500 and 875 padded tokens: 1,625 together, over half of 2,048.
        await batcher.submit([tokens(1, length) for length in (10, 20, 35) for _ in range(25)])
        batches, speed = batcher.batches_run, batcher._token_seconds(time.monotonic())
        await batcher.stop()
        return batches, speed

    batches, speed = run(main())
    assert batches == 3 and speed is not None and 1e-5 <= speed < 1e-4


def test_past_the_models_capacity_most_of_its_work_goes_to_calls_answered_in_time():
    """64 callers of 32 sentences with 1 s deadlines, on a model at 0.3 s a
    2,048-token batch, got none of 640 calls answered while it ran flat out
    for them: each call spread over its window of 4 batches and ended with it.
    Here the same at a sixth of the times (the CI box is shared: the bound is
    loose; in-process runs gave 75-90%)."""
    computed = [0]

    def forward(ids):
        time.sleep(len(ids) * max(len(i) for i in ids) * 25e-6)  # 0.05 s a 2,048-token batch
        computed[0] += len(ids)
        return np.zeros((len(ids), DIM), np.float32)

    async def main():
        batcher = DynamicBatcher(forward, CONFIG)
        batcher.start()
        rng = np.random.default_rng(1)
        answered = [0]
        stop = time.monotonic() + 3

        async def caller():
            while time.monotonic() < stop:
                ids = [tokens(1, int(rng.integers(10, 18))) for _ in range(32)]
                deadline = time.monotonic() + 1 / 6
                try:
                    await asyncio.wait_for(batcher.submit(ids, deadline), 1 / 6)
                    answered[0] += len(ids)
                except (asyncio.TimeoutError, DeadlineExpiredError):
                    pass

        await asyncio.gather(*(caller() for _ in range(64)))
        await batcher.stop()
        return answered[0]

    answered = run(main())
    assert computed[0] > 1000  # the model was busy
    assert answered > computed[0] / 2
