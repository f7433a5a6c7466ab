"""A replay reads and applies the log a chunk at a time (engine.REPLAY_CHUNK,
Store.user_history): it builds the profile that applying the whole log at
once built, and holds no more than the chunk it applies and the one it reads.
So do the other reads of a whole log: a profile under an Elasticsearch
kernel, and an explanation's events."""

from __future__ import annotations

import contextlib
import gc
import math

import numpy as np
import pytest

from halflife.config import Config, ProfileConfig
from halflife.core.decay import kernel_sums
from halflife.interest import engine as engine_module
from halflife.interest import explain
from halflife.interest import replay as replay_module
from halflife.interest.engine import InterestEngine
from halflife.interest.replay import MAX_HELD_EVENTS_PER_USER
from halflife.interest.types import EventInput, ItemInput
from halflife.storage.base import EventRecord
from halflife.storage.sqlite import SqliteStore
from tests.fakes import DIM, fake_embed, stored_history

T = 1_700_000_000.0
HOUR = 3600.0
VIEW, LIKE, DISLIKE, RATE = 1, 3, 4, 6
CHUNK = 3
# Every event but the first batch's within its offset, weighing its type's weight: an item's like in the late
# batch ties with its like in the batch before, which came first (seq) and is stamped after it (time).
KERNEL = Config(profile=ProfileConfig(mode="single", kernel="linear", kernel_scale_days=2.0, kernel_offset_days=4.0))


def engine_with_log(path, ahead: int = 0, config: Config = Config()) -> InterestEngine:
    """User u's log in 5 batches, 60 events an hour apart, over 12 items in 3
    topics: runs of 4 stamped alike (ties across every chunk boundary), every
    third batch stamped before the one recorded ahead of it (late events),
    and `ahead` events stamped after the clock."""
    engine = InterestEngine(config, SqliteStore(path), DIM, fake_embed, clock=lambda: T)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"topic {n % 3} thing {n}") for n in range(12)])
    kinds = [VIEW, LIKE, RATE, DISLIKE, LIKE]
    for batch in range(5):
        start = T - (100 - 20 * batch + (30 if batch % 3 == 2 else 0)) * HOUR
        engine.record_events([
            EventInput(f"e{batch}-{k}", "u", kinds[k % 5], f"i{(7 * k + batch) % 12}", None,
                       (5.0 if k % 2 else 1.0) if kinds[k % 5] == RATE else None, start + (k // 4) * HOUR)
            for k in range(12)
        ])
    engine.record_events([EventInput(f"a{k}", "u", LIKE, f"i{k % 12}", None, None, T + 60.0 * (k // 2 + 1))
                          for k in range(ahead)])
    engine._users.clear()
    return engine


def all_at_once(engine: InterestEngine, horizon: float, through_time: float = math.inf):
    """The profile as a replay built it before chunks: the whole log (up to
    `through_time`) applied in one call, in seq order (the multi-interest
    state sorts it by time)."""
    events = [e for e in engine.store.user_events("u") if e.event_time <= through_time]
    return engine._builder.build([events], horizon)


def assert_same_profile(chunked, whole, t: float) -> None:
    """Equal counts, items, times and held events; sums read at t equal to
    rounding (the chunks store them against other landmarks)."""
    close = dict(rtol=1e-9, atol=1e-12)
    for read in ("vector", "negative_vector", "strength", "negative_strength"):
        np.testing.assert_allclose(getattr(chunked.single, read)(t), getattr(whole.single, read)(t), **close)
    np.testing.assert_allclose(chunked.multi.cluster_vectors(t), whole.multi.cluster_vectors(t), **close)
    np.testing.assert_allclose(chunked.multi.importances(t), whole.multi.importances(t), **close)
    np.testing.assert_allclose(chunked.multi.trends(), whole.multi.trends(), **close)
    assert chunked.multi.counts.tolist() == whole.multi.counts.tolist()
    assert chunked.multi.last_time.tolist() == whole.multi.last_time.tolist()
    for name in ("seen", "api_counts", "newest_time", "max_seq", "ahead_in_log"):
        assert getattr(chunked, name) == getattr(whole, name), name
    assert sorted(e.seq for e in chunked.ahead) == sorted(e.seq for e in whole.ahead)

    def affinity(state):
        return sorted(zip(state.affinity_seqs, state.affinity_items, state.affinity_types, state.affinity_times))

    assert affinity(chunked) == affinity(whole)


@pytest.mark.parametrize("ahead", [0, 4, MAX_HELD_EVENTS_PER_USER + 6])
def test_a_miss_replayed_in_chunks_builds_the_profile_the_whole_log_at_once_built(tmp_path, monkeypatch, ahead):
    monkeypatch.setattr(engine_module, "REPLAY_CHUNK", CHUNK)
    engine = engine_with_log(tmp_path, ahead)
    engine.recommend("u", 3)
    whole, replayed = all_at_once(engine, T)
    assert_same_profile(engine._users["u"], whole, T)
    assert replayed.events == 60 + ahead and engine._users["u"].multi.n_clusters > 1  # something to compare
    assert len(engine._users["u"].ahead) == min(ahead, MAX_HELD_EVENTS_PER_USER)


@pytest.mark.parametrize("hours_back", [0.0, 41.0, 41.5, 95.0])
def test_a_look_into_the_past_replayed_in_chunks_stops_where_a_whole_replay_did(tmp_path, monkeypatch, hours_back):
    """as_of between two events, at a run of events stamped alike, and so
    early that a late batch is partly in."""
    monkeypatch.setattr(engine_module, "REPLAY_CHUNK", CHUNK)
    engine = engine_with_log(tmp_path, ahead=5)
    as_of = T - hours_back * HOUR
    assert_same_profile(engine._replay_until("u", as_of), all_at_once(engine, as_of, as_of)[0], as_of)


def test_a_snapshot_and_the_events_after_it_replayed_in_chunks_answer_as_the_whole_log(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "REPLAY_CHUNK", CHUNK)
    monkeypatch.setattr(replay_module, "SNAPSHOT_EVENTS", 10)
    engine = engine_with_log(tmp_path, ahead=MAX_HELD_EVENTS_PER_USER + 2)
    engine.recommend("u", 3)
    assert engine.snapshots.wait(10)
    snapshot = stored_history(engine.store, "u")[0]
    assert snapshot.through_seq == 60  # the events held for the clock left out, as before chunks
    engine.record_events([EventInput(f"n{k}", "u", VIEW, f"i{k}", None, None, T - 0.5 * HOUR + k) for k in range(7)])
    engine._users.clear()
    engine.recommend("u", 3)
    assert_same_profile(engine._users["u"], all_at_once(engine, T)[0], T)


def live() -> int:
    """User u's events in memory."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is EventRecord and o.user_id == "u")


def chunks_read(engine: InterestEngine, monkeypatch) -> list[int]:
    """A list that each chunk `engine` reads from its store's user_history
    appends `live()` to, counted as it arrives."""
    reading: list[int] = []
    read_history = engine.store.user_history

    @contextlib.contextmanager
    def counted_history(user, **options):
        with read_history(user, **options) as (snapshot, chunks):
            yield snapshot, (reading.append(live()) or chunk for chunk in chunks)

    monkeypatch.setattr(engine.store, "user_history", counted_history)
    return reading


def test_a_replay_holds_the_chunk_it_applies_and_the_one_it_reads_not_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "REPLAY_CHUNK", CHUNK)
    engine = engine_with_log(tmp_path)
    applying = []
    extend = engine._builder.extend
    monkeypatch.setattr(engine._builder, "extend", lambda *args: applying.append(live()) or extend(*args))
    reading = chunks_read(engine, monkeypatch)
    before = live()  # the store's last batch written, other tests' engines
    engine.recommend("u", 3)
    assert len(applying) == len(reading) == 60 // CHUNK
    # The previous chunk goes once the next one is in.
    assert max(applying) - before <= CHUNK and max(reading) - before <= 2 * CHUNK


def directed_log(engine: InterestEngine, t: float) -> tuple[list[EventRecord], np.ndarray, np.ndarray]:
    """What a kernel profile and an explanation read of u's log up to t, the
    whole of it at once in seq order (as they read it before chunks): the
    events, their weights and their kernel's weights at t ((n,) each)."""
    events = [e for e in engine.store.user_events("u") if e.event_time <= t]
    types = engine._builder.record_types(events)
    return events, engine._builder.types.weights[types], engine._decay(types, t)(np.array([e.event_time for e in events]))


def test_a_kernel_profile_read_in_chunks_is_the_whole_logs_and_holds_a_chunk_or_two(tmp_path, monkeypatch):
    """Under a kernel other than half_life the profile is computed from the
    log on every read: all at once, a 1M-event user's held 5.4 GiB."""
    monkeypatch.setattr(engine_module, "REPLAY_CHUNK", CHUNK)
    engine = engine_with_log(tmp_path, ahead=4, config=KERNEL)
    engine.recommend("u", 3)  # the cached profile's replay
    reading = chunks_read(engine, monkeypatch)
    before = live()
    with engine._lock:
        positive, negative, strength, negative_strength = engine._single_profile("u", engine._users["u"], T)
    assert len(reading) == 60 // CHUNK and max(reading) - before <= 2 * CHUNK  # not the 4 after the clock
    events, weights, kernel = directed_log(engine, T)
    (whole_positive, whole_negative), (whole_strength, whole_negative_strength) = kernel_sums(
        np.stack([e.vector for e in events]), np.array([e.event_time for e in events]), weights, lambda _: kernel)
    assert whole_negative.any() and whole_strength > 0  # something to compare
    np.testing.assert_allclose(positive, whole_positive, rtol=1e-12)
    np.testing.assert_allclose(negative, whole_negative, rtol=1e-12)
    assert strength == pytest.approx(whole_strength, rel=1e-12)
    assert negative_strength == pytest.approx(whole_negative_strength, rel=1e-12)


@pytest.mark.parametrize("chunk", [CHUNK, 64])
def test_an_explanation_read_in_chunks_picks_the_events_of_the_whole_log_ties_by_seq(tmp_path, monkeypatch, chunk):
    """An explanation reads the log a chunk at a time by event time, and
    picks as it did from the whole log in seq order: each item's strongest
    events, ties by seq (by position in a chunk read by time, a late
    event went before events recorded ahead of it), across chunks and
    within one (64: the log)."""
    monkeypatch.setattr(engine_module, "REPLAY_CHUNK", chunk)
    engine = engine_with_log(tmp_path, ahead=4, config=KERNEL)
    engine.recommend("u", 3)  # the cached profile's replay
    reading = chunks_read(engine, monkeypatch)
    before = live()
    items = engine.recommend("u", 12, include_seen=True, explain=True).items
    assert len(reading) == 2 * math.ceil(60 / chunk)  # the kernel profile's read, then the explanation's
    assert max(reading) - before <= 2 * chunk + 12 * explain.EXPLAINED_EVENTS
    events, weights, kernel = directed_log(engine, T)
    ties = 0
    for item in items:
        vector = engine.catalog.vectors[engine.catalog.row_of[item.item_id]]
        strengths = [(w * k * max(float(np.dot(vector, e.vector)), 0.0), e.seq, e)
                     for e, w, k in zip(events, weights, kernel) if w > 0]
        ranked = sorted(strengths, key=lambda s: (-s[0], s[1]))
        listed = [e.event_id for s, _, e in ranked[: explain.EXPLAINED_EVENTS] if s > 0]
        assert [e.event_id for e in item.explanation.events] == listed
        # Ties among those listed and at the cut where the first recorded was stamped after the other.
        top = ranked[: explain.EXPLAINED_EVENTS + 1]
        ties += sum(a[0] == b[0] > 0 and a[2].event_time > b[2].event_time for a, b in zip(top, top[1:]))
    assert ties  # something to compare: listed by seq, not by time


def test_ratings_map_by_value_with_the_thresholds_inclusive_and_unknown_types_are_store_damage():
    """docs/configuration.md: a rating >= ratings.positive_min (4) is "rate",
    <= ratings.negative_max (2) "rate_low", between them "rate_mid"; a type
    this server does not know, in any event of a batch, is a damaged store."""
    from halflife.config import EVENT_TYPE_NAMES
    from halflife.storage.base import StoreDamagedError

    builder = replay_module.ProfileBuilder(Config(), DIM)
    got = builder.internal_types(np.array([RATE] * 5 + [VIEW]), np.array([1.0, 2.0, 3.0, 4.0, 5.0, np.nan]))
    assert [EVENT_TYPE_NAMES[i] for i in got] == ["rate_low", "rate_low", "rate_mid", "rate", "rate", "view"]
    for unknown in (0, len(EVENT_TYPE_NAMES) + 1):
        with pytest.raises(StoreDamagedError):
            builder.internal_types(np.array([VIEW, unknown]), np.array([np.nan, np.nan]))


def test_a_replay_counts_the_lowest_seq_it_held_and_the_highest_it_applied():
    """What decides whether its snapshot may be taken: one held for the clock
    below an applied event would be skipped by every replay after the snapshot."""
    def event(seq: int, at: float, vector=np.ones(DIM, np.float32)) -> EventRecord:
        return EventRecord(f"e{seq}", "u", VIEW, "i", None, None, at, vector, seq)

    replayed = replay_module.Replayed()
    replayed.count([event(3, T + HOUR), event(2, T), event(4, T + HOUR), event(0, T)], horizon=T)  # at it: applied
    replayed.count([event(1, T + 2 * HOUR, None), event(5, T)], horizon=T)
    assert (replayed.events, replayed.applied_through, replayed.first_held, replayed.damaged) == (6, 5, 1, True)
    replayed.count([event(7, T + 3 * HOUR)], horizon=T)  # a later chunk's held events are higher
    assert replayed.first_held == 1


def _views(n: int, first_seq: int = 1, vector=np.ones(DIM, np.float32)) -> list[EventRecord]:
    return [EventRecord(f"e{s}", "u", VIEW, f"i{s % 7}", None, None, T + s, vector, s)
            for s in range(first_seq, first_seq + n)]


@pytest.mark.parametrize("earlier", [0, 99_000, 99_100])
@pytest.mark.parametrize("n", [999, 1000])
def test_a_replay_of_1000_events_and_a_hundredth_of_the_users_saves_a_snapshot(n, earlier):
    """docs/interest.md: a replay of 1,000 events or more and of at least
    1/100 of the user's events (those of the profile it started from
    included) saves the profile it built."""
    builder = replay_module.ProfileBuilder(Config(), DIM)
    start = None
    if earlier:
        start, _ = builder.build([_views(1)], horizon=T + 1)
        start.api_counts[VIEW] = earlier  # as if the snapshot it started from held that many
    state, replayed = builder.build([_views(n, first_seq=2)], horizon=T + 2 * n, start=start)
    total = n + earlier
    saved = builder.snapshot_of(state, replayed)
    assert (saved is not None) == (n >= 1000 and n >= total / 100)


def test_events_read_back_without_a_vector_count_without_a_direction():
    """A chunk of events whose stored vectors were all damaged (None): each
    counts as an event seen, none adds a direction (storage.base.EventRecord)."""
    builder = replay_module.ProfileBuilder(Config(), DIM)
    state, replayed = builder.build([_views(3, vector=None)], horizon=T + 10)
    assert state.api_counts[VIEW] == 3 and state.seen == {"i1", "i2", "i3"} and replayed.damaged
    assert state.multi.n_clusters == 0 and state.newest_time == T + 3
    assert builder.snapshot_of(state, replayed) is None


def test_a_snapshot_newer_than_the_horizon_or_not_through_its_seq_is_not_thawed():
    """docs/interest.md: a snapshot is not used where its newest event is
    after the clock (a replay would hold it), nor where it does not cover
    the seq it was saved through (damaged): the log is replayed instead."""
    from halflife.storage.base import ProfileSnapshot
    from halflife.interest.state import snapshot_bytes

    builder = replay_module.ProfileBuilder(Config(), DIM)
    state, _ = builder.build([_views(5)], horizon=T + 10)
    snapshot = ProfileSnapshot(5, builder.snapshot_key, snapshot_bytes(state))
    assert builder.thawed("u", snapshot, oldest_after=np.inf, horizon=T + 5) is not None
    assert builder.thawed("u", snapshot, oldest_after=np.inf, horizon=T + 4) is None  # its newest is at T + 5
    assert builder.thawed("u", snapshot._replace(through_seq=6), oldest_after=np.inf, horizon=T + 5) is None
    assert builder.thawed("u", snapshot, oldest_after=T + 4, horizon=T + 5) is None  # a late event after it
    assert builder.thawed("u", snapshot, oldest_after=T + 5, horizon=T + 5) is not None  # a tie: after it by seq


def test_a_profile_is_stale_once_a_pending_event_is_older_than_its_newest_or_the_clock_reaches_the_log():
    """ProfileBuilder.stale and needs_replay, at their edges: an event
    stamped at the profile's newest time comes after it (ties go by seq), and
    one stamped at the clock is due."""
    builder, stale, needs_replay = (replay_module.ProfileBuilder(Config(), DIM), replay_module.ProfileBuilder.stale,
                                    replay_module.ProfileBuilder.needs_replay)
    state, _ = builder.build([_views(3)], horizon=T + 10)  # newest at T + 3
    assert not stale(state, T + 100)
    state.pending = _views(1, first_seq=9)  # at T + 9
    state.pending[0] = state.pending[0]._replace(event_time=T + 3)
    assert not stale(state, T + 100)
    state.pending.insert(0, state.pending[0]._replace(event_time=T + 2, seq=8))  # one late, one not
    assert stale(state, T + 100)
    state.pending = []
    assert not needs_replay(state, T + 3) and needs_replay(state, T + 2.5)
    state.ahead = [_views(1, first_seq=20)[0]]  # held, at T + 20
    assert needs_replay(state, T + 20) and not needs_replay(state, T + 19)
    state.ahead = []
    state.ahead_in_log = T + 50
    assert stale(state, T + 50) and not stale(state, T + 49)
    assert needs_replay(state, T + 50) and not needs_replay(state, T + 49)


def test_a_batch_applies_the_events_stamped_up_to_the_horizon_and_holds_the_later_ones():
    """extend: an event stamped at the horizon is applied, also in a batch
    that holds later ones; every applied view (weight 1) is an affinity event."""
    builder = replay_module.ProfileBuilder(Config(), DIM)
    state, _ = builder.build([_views(4)], horizon=T + 3)  # at T + 1 .. T + 4
    assert state.api_counts[VIEW] == 3 and [e.seq for e in state.ahead] == [4]
    assert state.affinity_items == ["i1", "i2", "i3"] and state.newest_time == T + 3
    from halflife.config import EventTypeConfig

    unweighted = Config(event_types={**Config().event_types, "view": EventTypeConfig(0.0, 7.0)})
    state, _ = replay_module.ProfileBuilder(unweighted, DIM).build([_views(4)], horizon=T + 3)
    assert state.api_counts[VIEW] == 3 and state.affinity_items == []  # a type weighing 0 is no affinity event


def test_no_snapshot_is_taken_of_a_long_replay_that_applied_nothing():
    """1,000 events all stamped ahead of the clock (held, or waiting in the
    log): a snapshot would claim events it never applied."""
    builder = replay_module.ProfileBuilder(Config(), DIM)
    state, replayed = builder.build([_views(1000)], horizon=T)
    assert state.api_counts.total() == 0 and replayed.events == 1000
    assert builder.snapshot_of(state, replayed) is None
