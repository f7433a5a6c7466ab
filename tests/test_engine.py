"""The interest engine in-process, over a real store, with a fake embedder."""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import threading
import time

import numpy as np
import pytest

from halflife.config import Config
from halflife.deadlines import Deadline, DeadlineExpiredError
from halflife.interest.engine import InterestEngine
from halflife.interest.types import EventInput, ItemFilter, ItemInput, UnknownItemsError
from halflife.storage.base import ItemRecord, StoreError
from halflife.storage.sqlite import SqliteStore
from tests.fakes import (DIM, compact_catalogues_at, fake_embed, process_limit, reads_fail_after_an_erasure,
                         run_in_threads)

DAY = 86400.0
T = 1_700_000_000.0
SEARCH = 8


def test_a_store_with_text_events_and_no_items_reopens(tmp_path):
    first = InterestEngine(Config(), SqliteStore(tmp_path), DIM, fake_embed, clock=lambda: T)
    first.record_events([EventInput("s1", "u", SEARCH, None, "cheap flights to lisbon", None, T - DAY)])
    first.store.close()
    again = InterestEngine(Config(), SqliteStore(tmp_path), DIM, fake_embed, clock=lambda: T)
    assert again.recommend("u", 5, as_of=T).strategy == "personalized"


LIKE, RATE = 3, 6


def open_engine(path) -> InterestEngine:
    return InterestEngine(Config(), SqliteStore(path), DIM, fake_embed, clock=lambda: T)


def cold_list(engine: InterestEngine) -> list[tuple[str, float]]:
    result = engine.recommend("cold", 10, as_of=T)
    assert result.strategy == "trending"
    return [(item.item_id, round(item.score, 6)) for item in result.items]


def test_an_event_record_is_an_event_inputs_fields_then_its_vector_and_seq():
    """record_events builds EventRecords as tuples in this order."""
    from halflife.storage.base import EventRecord

    assert EventRecord._fields == (*EventInput._fields, "vector", "seq")


def test_a_restart_after_delete_user_rebuilds_the_same_popularity(tmp_path):
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(8)])
    engine.record_events(
        [EventInput(f"a{n}", "alice", LIKE, f"i{n % 3}", None, None, T - n * 3600) for n in range(9)]
        + [EventInput(f"b{n}", "bob", RATE, f"i{3 + n % 4}", None, 5.0, T - DAY - n * 3600) for n in range(8)]
        + [EventInput("b-low", "bob", RATE, "i0", None, 1.0, T - DAY)]
    )
    before = cold_list(engine)
    assert before[0][0] in {"i0", "i1", "i2"}  # alice's likes are the most recent and most numerous
    assert engine.delete_user("alice") == 9
    after_delete = cold_list(engine)
    assert after_delete[0][0] in {"i3", "i4", "i5", "i6"}  # only bob's high ratings count now
    engine.store.close()
    assert cold_list(open_engine(tmp_path)) == after_delete


def test_erasures_leave_the_popularity_log_as_a_restart_builds_it(tmp_path, monkeypatch):
    """Each erased event stayed in the log of the past beside the entry that
    took it back (32 B) until a restart: once the takings-back are many, both
    go, and looks into the past still answer as a restart does."""
    from halflife.interest import blend_indexes

    monkeypatch.setattr(blend_indexes, "NET_LOG_MIN_TAKEN_BACK", 8)
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(6)])
    for u in range(12):
        engine.record_events([EventInput(f"e{u}-{k}", f"u{u}", LIKE, f"i{(u + k) % 6}", None, None,
                                         T - DAY * (k + 1) - u) for k in range(4)])
    for u in range(8):  # a netting every second erasure
        assert engine.delete_user(f"u{u}") == 4
    assert len(engine._blend.popularity_log) == 4 * 4  # the four users left, their four likes each

    def trending(e: InterestEngine) -> list:
        return [[(i.item_id, round(i.score, 6)) for i in e.recommend("cold", 6, as_of=t).items]
                for t in (T - 2.5 * DAY, T - 1.5 * DAY, T)]

    live = trending(engine)
    assert any(score for _, score in live[0])
    engine.store.close()
    assert live == trending(open_engine(tmp_path))


def _engine_with_blend(path, **blend) -> InterestEngine:
    config = Config()
    return InterestEngine(dataclasses.replace(config, blend=dataclasses.replace(config.blend, **blend)),
                          SqliteStore(path), DIM, fake_embed, clock=lambda: T)


def _cooccurrence_parts(engine: InterestEngine, user: str) -> dict[str, float]:
    """Each item of `user`'s top 3 at T -> its score's co-occurrence part."""
    return {i.item_id: i.explanation.score_parts["cooccurrence"]
            for i in engine.recommend(user, 3, as_of=T, explain=True).items}


@pytest.mark.parametrize("read", ["past", "held"])
def test_trending_keeps_its_order_thousands_of_half_lives_after_the_events(tmp_path, read):
    """Popularity is divided by its maximum, so the time it is summed at
    cancels. Summed at the read's time, every count underflowed to 0 past
    ~1,075 half-lives and trending fell back to id order: in a look into the
    past (the log, 3 years after the events at a 1-day half-life) and in a
    read a day after events held ahead of the clock (1-minute half-life)."""
    minute = 60.0
    half_life = DAY if read == "past" else minute
    engine = _engine_with_blend(tmp_path, popularity_half_life_days=half_life / DAY)
    engine.upsert_items([ItemInput(id=i, text=f"thing {i}") for i in ("a", "b", "c")])
    start = T - 4 * 365 * DAY if read == "past" else T + minute  # held: stamped after the clock
    engine.record_events([EventInput("c1", "x", LIKE, "c", None, None, start),
                          EventInput("c2", "y", LIKE, "c", None, None, start + 1),
                          EventInput("b1", "z", LIKE, "b", None, None, start + 2)])
    if read == "past":
        engine.record_events([EventInput("later", "w", LIKE, "a", None, None, T - DAY)])  # after the look
    result = engine.recommend("cold", 3, as_of=start + (3 * 365 * DAY if read == "past" else DAY))
    assert result.strategy == "trending"
    c = 2 ** (-2 / half_life) + 2 ** (-1 / half_life)  # at b's time: c's likes 2 and 1 s older, b's 1
    assert [i.item_id for i in result.items] == ["c", "b", "a"]
    assert [i.score for i in result.items] == pytest.approx([1.0, 1 / c, 0.0], rel=1e-6)


@pytest.mark.parametrize("restart", [False, True])
def test_trending_ranks_a_long_quiet_catalogue_by_its_popularity_after_one_fresh_event(tmp_path, restart):
    """One fresh event puts its item hundreds of half-lives ahead of those of
    an older log (MovieLens ends in 2018), whose relative popularity was 0 in
    float32: they all tied and trending listed them by id (an onboarding
    review). They keep their order, their scores tiny but positive."""
    engine = open_engine(tmp_path)  # popularity half-life 7 days
    engine.upsert_items([ItemInput(id=i, text=f"thing {i}") for i in ("a-flop", "m-fresh", "z-hit", "q-none")])
    old = T - 8 * 365 * DAY  # ~417 half-lives before the fresh event
    engine.record_events([EventInput(f"hit{n}", f"u{n}", LIKE, "z-hit", None, None, old + n) for n in range(3)]
                         + [EventInput("flop", "v", LIKE, "a-flop", None, None, old + 10)])
    assert [i.item_id for i in engine.recommend("cold", 2, as_of=T).items] == ["z-hit", "a-flop"]
    engine.record_events([EventInput("fresh", "w", LIKE, "m-fresh", None, None, T - DAY)])
    if restart:
        engine.store.close()
        engine = open_engine(tmp_path)
    for as_of in (T, T - 2 * DAY):  # now, and a look into the past before the fresh event
        result = engine.recommend("cold", 4, as_of=as_of)
        ids, scores = [i.item_id for i in result.items], [i.score for i in result.items]
        assert result.strategy == "trending"
        if as_of == T:
            assert ids == ["m-fresh", "z-hit", "a-flop", "q-none"] and scores[0] == 1.0
            assert 0 < scores[2] < scores[1] < 1e-100 and scores[3] == 0.0
        else:
            assert ids == ["z-hit", "a-flop", "m-fresh", "q-none"] and scores[0] == 1.0


def test_cooccurrence_signal_is_the_same_however_long_ago_the_events(tmp_path):
    """The co-occurrence signal is divided by its maximum, so a user's
    affinities decayed alike must give the same signal; decayed to the read's
    time, they underflowed past ~1,075 affinity half-lives and the signal
    vanished (3.5 years at a 1-day half-life)."""
    parts = []
    for years in (0.5, 3.5):
        engine = _engine_with_blend(tmp_path / str(years), affinity_half_life_days=1.0)
        engine.upsert_items([ItemInput(id=i, text=f"thing {i}") for i in ("a", "b", "c")])
        t0 = T - years * 365 * DAY
        engine.record_events([EventInput("u1", "u", LIKE, "a", None, None, t0),
                              EventInput("x1", "x", LIKE, "a", None, None, t0),
                              EventInput("x2", "x", LIKE, "b", None, None, t0)])
        b = next(i for i in engine.recommend("u", 2, as_of=T, explain=True).items if i.item_id == "b")
        parts.append(b.explanation.score_parts["cooccurrence"])
    assert parts[0] > 0 and parts[1] == pytest.approx(parts[0], rel=1e-6)


@pytest.mark.parametrize("restart", [False, True])
def test_cooccurrence_reads_the_newest_users_of_an_item_within_max_co_users(tmp_path, restart):
    """`blend.max_co_users` bounds the users a Recommend's co-occurrence reads:
    item a's three users, read one of them, speak through the newest, y (who
    also took c), not x (b), the same after a restart; without the bound
    through both alike. Live the pairs wait to be merged, after a restart
    they are: the same answer (the cut once counted the merged ones alone
    and left the live answer exact, a review)."""
    parts = {}
    for limit in (0, 1):
        engine = _engine_with_blend(tmp_path / str(limit), max_co_users=limit)
        engine.upsert_items([ItemInput(id=i, text=f"thing {i}") for i in ("a", "b", "c")])
        for n, (user, item) in enumerate([("u", "a"), ("x", "a"), ("x", "b"), ("y", "a"), ("y", "c")]):
            engine.record_events([EventInput(f"e{n}", user, LIKE, item, None, None, T - 100 + n)])
        if restart:
            engine.store.close()
            engine = _engine_with_blend(tmp_path / str(limit), max_co_users=limit)
        items = engine.recommend("u", 2, as_of=T, explain=True).items
        parts[limit] = {i.item_id: i.explanation.score_parts["cooccurrence"] for i in items}
    assert parts[0]["b"] == pytest.approx(parts[0]["c"]) and parts[0]["b"] > 0
    assert parts[1]["c"] == pytest.approx(parts[0]["c"]) and parts[1]["b"] == 0.0


def test_a_restart_reads_the_same_newest_users_after_an_item_was_deleted(tmp_path, monkeypatch):
    """x's first event was on z, deleted since: x was numbered at it live and
    after y in a rebuild from the log, which skips z's events (a restart,
    another worker), so co-occurrence's sample of a's newest users changed
    (a review): users are numbered at their first event, whatever it was."""
    from halflife.core import cooccurrence

    monkeypatch.setattr(cooccurrence, "_MIN_MERGE", 1)

    engine = _engine_with_blend(tmp_path, max_co_users=1)
    engine.upsert_items([ItemInput(id=i, text=f"thing {i}") for i in ("a", "b", "c", "z")])
    for n, (user, item) in enumerate([("u", "a"), ("x", "z"), ("y", "a"), ("y", "c"), ("x", "a"), ("x", "b")]):
        engine.record_events([EventInput(f"e{n}", user, LIKE, item, None, None, T - 100 + n)])
    engine.delete_items(["z"])
    live = _cooccurrence_parts(engine, "u")
    assert live["c"] > 0 and live["b"] == 0.0  # y, the newest of a's users
    engine.store.close()
    assert _cooccurrence_parts(_engine_with_blend(tmp_path, max_co_users=1), "u") == live


def test_batches_applied_out_of_commit_order_sample_the_newest_users_as_a_restart_does(tmp_path):
    """x's batch commits before y's, but y's thread takes the lock first: y
    was numbered before x, where a restart (and every other worker) numbers
    x first, and with max_co_users = 1 item a spoke through x live and y
    after the restart (a soak). A batch now first applies those committed
    before it, from the log."""
    engine = _engine_with_blend(tmp_path, max_co_users=1)
    engine.upsert_items([ItemInput(id=i, text=f"thing {i}") for i in ("a", "b", "c")])
    engine.record_events([EventInput("e0", "u", LIKE, "a", None, None, T - 100)])
    y_applied = threading.Event()
    apply = engine._apply_new_events

    def x_applies_after_y(stored):
        if stored and stored[0].user_id == "x":
            y_applied.wait(10)
        apply(stored)
        if stored and stored[0].user_id == "y":
            y_applied.set()

    engine._apply_new_events = x_applies_after_y
    x = threading.Thread(target=engine.record_events, args=([EventInput("e1", "x", LIKE, "a", None, None, T - 99),
                                                              EventInput("e2", "x", LIKE, "b", None, None, T - 98)],))
    x.start()
    deadline = time.monotonic() + 10
    while engine.store.head().event_seq < 3 and time.monotonic() < deadline:  # x's batch committed (seqs 2-3)
        time.sleep(0.001)
    engine.record_events([EventInput("e3", "y", LIKE, "a", None, None, T - 97),
                          EventInput("e4", "y", LIKE, "c", None, None, T - 96)])
    x.join(10)
    assert y_applied.is_set() and not x.is_alive()

    live = _cooccurrence_parts(engine, "u")
    engine.store.close()
    restarted = _cooccurrence_parts(_engine_with_blend(tmp_path, max_co_users=1), "u")
    assert restarted["c"] > 0 and restarted["b"] == 0.0  # y committed last: a's newest user
    assert live == restarted


def test_one_event_calls_keep_few_popularity_log_chunks_and_the_same_past(tmp_path):
    """Each RecordEvents added a chunk of three arrays to the log of the past,
    ~400 B for a one-event call and never merged (an audit of long runs)."""
    engine = open_engine(tmp_path / "single")
    batched = open_engine(tmp_path / "batched")
    items = [ItemInput(id=f"i{n}", text=f"thing {n}") for n in range(5)]
    events = [EventInput(f"e{n}", f"u{n % 7}", LIKE, f"i{n % 5 if n % 3 else 0}", None, None, T - 50 * DAY + n * 3600)
              for n in range(300)]
    for e in (engine, batched):
        e.upsert_items(items)
    for event in events:
        engine.record_events([event])
    batched.record_events(events)
    assert len(engine._blend.popularity_log.chunks()) <= 9  # 300 = 0b100101100: one chunk a set bit
    assert len(engine._blend.popularity_log) == 300
    for as_of in (T - 45 * DAY, T - 40 * DAY, T - 38 * DAY):  # looks into the past read the log
        assert [(i.item_id, round(i.score, 6)) for i in engine.recommend("cold", 5, as_of=as_of).items] == \
            [(i.item_id, round(i.score, 6)) for i in batched.recommend("cold", 5, as_of=as_of).items]


def test_erasing_every_event_of_an_item_leaves_no_popularity_now_or_in_the_past(tmp_path):
    """Erasures subtract from popularity; an item left with nothing must be 0,
    not the subtraction's rounding, which the division by the maximum made
    the most popular item (the erased user's item first in trending), both
    in a look into the past and at the clock."""
    zeros = [("a", 0.0), ("b", 0.0), ("c", 0.0)]  # no popularity: ties, lowest ids first
    for trial in range(12):
        engine = open_engine(tmp_path / str(trial))
        engine.upsert_items([ItemInput(id=i, text=f"thing {i}") for i in ("a", "b", "c")])
        engine.record_events([EventInput("p", "alice", 5, "c", None, None, T - 3 * 3600 - trial * 97.0),
                              EventInput("v", "alice", 1, "c", None, None, T - 4 * 3600 - trial * 13.0),
                              EventInput("l", "bob", LIKE, "b", None, None, T - 3600)])
        engine.delete_user("alice")
        # Before bob's like, only alice's (erased) events had happened.
        assert [(i.item_id, i.score) for i in engine.recommend("cold", 3, as_of=T - 2 * 3600).items] == zeros, trial
        engine.store.close()
    rng = random.Random(0)
    engine = open_engine(tmp_path / "now")
    engine.upsert_items([ItemInput(id=i, text=f"thing {i}") for i in ("a", "b", "c")])
    for batch in range(6):
        engine.record_events([EventInput(f"e{batch}-{j}", f"u{rng.randrange(3)}", rng.choice([1, 2, 3, 5]),
                                         rng.choice("abc"), None, None, T - rng.uniform(0, 5 * DAY))
                              for j in range(3)])
    for user in ("u0", "u1", "u2"):
        engine.delete_user(user)
    assert [(i.item_id, i.score) for i in engine.recommend("cold", 3, as_of=T).items] == zeros


def test_trending_read_between_writes_follows_every_write_as_a_restart_would(tmp_path):
    """The live items' relative popularity is cached between writes (see
    InterestEngine._relative_popularity): every kind of write must renew it."""
    engine = open_engine(tmp_path)

    def matches_a_restart() -> list[tuple[str, float]]:
        live = cold_list(engine)
        assert cold_list(engine) == live  # read again from the cache
        fresh = open_engine(tmp_path)
        assert cold_list(fresh) == live
        fresh.store.close()
        return live

    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(5)])
    engine.record_events([EventInput(f"a{n}", f"u{n}", LIKE, "i0", None, None, T - DAY) for n in range(3)])
    assert matches_a_restart()[0][0] == "i0"
    engine.record_events([EventInput(f"b{n}", f"v{n}", LIKE, "i1", None, None, T - 3600) for n in range(4)])
    assert matches_a_restart()[0][0] == "i1"
    engine.delete_items(["i1"])
    assert [i for i, _ in matches_a_restart()][:1] == ["i0"]
    engine.upsert_items([ItemInput(id="i1", text="item 1 again"), ItemInput(id="i5", text="item 5")])
    engine.record_events([EventInput("c", "w", LIKE, "i5", None, None, T - 60)])
    assert [i for i, _ in matches_a_restart()][:2] == ["i0", "i5"]
    assert engine.delete_user("u0") == 1 and engine.delete_user("u1") == 1
    assert matches_a_restart()[0][0] == "i5"


def test_a_failed_delete_user_changes_nothing_and_a_retry_takes_back_once(tmp_path, monkeypatch):
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(4)])
    engine.record_events([EventInput(f"a{n}", "alice", LIKE, "i1", None, None, T - n * 3600) for n in range(3)]
                         + [EventInput(f"b{n}", "bob", LIKE, f"i{n % 2 * 2}", None, None, T - DAY) for n in range(4)])
    before = cold_list(engine)
    erase = engine.store.delete_user

    def disk_full(user_id, guard=None):
        raise StoreError("database or disk is full")

    monkeypatch.setattr(engine.store, "delete_user", disk_full)
    with pytest.raises(StoreError):
        engine.delete_user("alice")
    assert cold_list(engine) == before  # alice's events are still stored, so still counted
    monkeypatch.setattr(engine.store, "delete_user", erase)
    assert engine.delete_user("alice") == 3
    after = cold_list(engine)
    engine.store.close()
    assert cold_list(open_engine(tmp_path)) == after  # taken back once, as a restart rebuilds it


@pytest.mark.parametrize("write", ["delete", "upsert"])
def test_a_catalogue_write_whose_read_back_failed_is_indexed_by_its_retry(tmp_path, write):
    """The index is updated from a read after the commit. Out of file
    descriptors, that read failed (UNAVAILABLE: retry), and a deleted item
    stayed recommended; the retry deleted nothing and indexed nothing, so it
    stayed until a restart."""
    import resource

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(4)])
    engine.record_events([EventInput(f"a{n}", f"u{n}", LIKE, f"i{n % 4}", None, None, T - n) for n in range(8)])
    change = ((lambda: engine.delete_items(["i0"])) if write == "delete"
              else (lambda: engine.upsert_items([ItemInput(id="new", text="new item")])))
    engine.store._readers.clear()  # the read after the commit opens a connection
    with process_limit(resource.RLIMIT_NOFILE, 3), pytest.raises(StoreError, match="Too many open files"):
        change()
    change()  # the retry UNAVAILABLE asks for
    live = cold_list(engine)
    engine.store.close()
    assert live == cold_list(open_engine(tmp_path))


def test_a_recreated_item_starts_without_its_namesakes_events(tmp_path):
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id="x", text="old x"), ItemInput(id="y", text="y")])
    engine.record_events([EventInput(f"e{n}", f"u{n}", LIKE, "x", None, None, T - DAY) for n in range(5)]
                         + [EventInput("f", "v", LIKE, "y", None, None, T - DAY)])
    engine.delete_items(["x"])
    engine.upsert_items([ItemInput(id="x", text="new x")])
    live = cold_list(engine)
    assert live[0][0] == "y"
    engine.delete_user("u0")  # its event concerned the old x: nothing to take from the new one
    assert cold_list(engine) == live
    engine.store.close()
    assert cold_list(open_engine(tmp_path)) == live


def test_a_recreated_item_gets_no_affinity_from_events_on_its_namesake(tmp_path):
    # Alice liked the old x, deleted since; the new x is another item. Her
    # co-occurrence affinity must not carry to it, as popularity and the
    # pairs do not: the same as if her event had been on an unrelated item.
    def recommend_for_alice(path, old_id):
        engine = open_engine(path)
        engine.upsert_items([ItemInput(id=old_id, text="old x"), ItemInput(id="y", text="y"),
                             ItemInput(id="z", text="z")])
        engine.record_events([EventInput("a", "alice", LIKE, old_id, None, None, T - DAY)])
        engine.delete_items([old_id])
        engine.upsert_items([ItemInput(id="x", text="new x")])
        engine.record_events([EventInput(f"b{n}", "bob", LIKE, i, None, None, T - 3600) for n, i in enumerate("xy")])
        items = engine.recommend("alice", 5, as_of=T, include_seen=True).items  # "seen" goes by id
        engine.store.close()
        return [(item.item_id, round(item.score, 6)) for item in items]

    assert recommend_for_alice(tmp_path / "namesake", "x") == recommend_for_alice(tmp_path / "unrelated", "gone")


def test_item_events_share_the_items_stored_vector(tmp_path):
    import sqlite3

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(3)])
    count = lambda: sqlite3.connect(tmp_path / "halflife.sqlite3").execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
    before = count()
    engine.record_events([EventInput(f"v{n}", f"u{n}", LIKE, f"i{n % 3}", None, None, T - n) for n in range(30)])
    assert count() == before  # 30 events, no new vectors
    engine.record_events([EventInput("t", "u", LIKE, "i0", "a review", None, T)])
    assert count() == before + 1  # item + text: a new direction


# Recommend and SimilarItems score the catalogue without the engine lock, so
# that concurrent calls use every core; a delete may land in between.

def _delete_first(engine: InterestEngine, item_id: str, compute):
    """`compute` that deletes `item_id` (as another thread would) just before it runs once."""
    calls = []

    def wrapped(*args, **kwargs):
        if not calls:
            calls.append(engine.delete_items([item_id]))
        return compute(*args, **kwargs)

    return wrapped, calls


@pytest.mark.parametrize("compact", [False, True])
def test_an_item_deleted_while_the_catalogue_is_scored_is_not_recommended(tmp_path, monkeypatch, compact):
    from halflife.interest.blend import CatalogueScan

    if compact:
        compact_catalogues_at(monkeypatch, dead_rows=1)
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"hiking boots model {n}") for n in range(8)])
    engine.record_events([EventInput("e0", "u", LIKE, "i0", None, None, T - 60)])
    before = [i.item_id for i in engine.recommend("u", 3, as_of=T).items]
    blend, calls = _delete_first(engine, before[0], CatalogueScan.blend)
    monkeypatch.setattr(CatalogueScan, "blend", blend)
    after = engine.recommend("u", 3, as_of=T, explain=True).items
    assert calls == [1]  # the delete did land mid-call
    assert engine.catalog.epoch == int(compact)  # and renumbered the rows, where compacting
    assert before[0] not in [i.item_id for i in after] and len(after) == 3
    assert after == engine.recommend("u", 3, as_of=T, explain=True).items  # as if called after it


@pytest.mark.parametrize("interest", ["single", "sum", "max"])
def test_the_blend_scored_in_row_blocks_is_the_sum_of_its_parts(interest):
    """The scan weights and adds every signal inside each row block, linear
    profile terms as one dot product; the explained parts are computed one
    by one. Both must agree, and each part must be its own definition."""
    from halflife.core.profiles import interest_scores
    from halflife.core.ranking import RowBlocks, cosine_scores, normalize
    from halflife.interest.blend import CatalogueScan

    rng = np.random.default_rng(5)
    n, d = 1000, 16
    items = normalize(rng.standard_normal((n, d)))
    negative = rng.standard_normal(d)
    cooccurrence = np.where(rng.random(n) < 0.1, rng.random(n) * 3, 0.0)
    popularity = rng.random(n) * 7
    profile = (dict(positive=rng.standard_normal(d)) if interest == "single" else
               dict(centroids=normalize(rng.standard_normal((4, d))), importances=rng.random(4) + 0.1, combine=interest))
    scan = CatalogueScan(items, negative=negative, negative_weight=0.4, **profile,
                         later={"cooccurrence": lambda: cooccurrence, "popularity": lambda: popularity})
    weights = {"interest": 0.6, "negative": 0.6, "cooccurrence": 0.3, "popularity": 0.1}
    blend = scan.blend(RowBlocks(3, min_rows=100), weights)  # ten blocks
    parts = blend.parts_at(np.arange(n))
    assert set(parts) == {"interest", "negative", "cooccurrence", "popularity"}
    np.testing.assert_allclose(blend.scores, sum(parts.values()), atol=1e-6)
    want_interest = (cosine_scores(profile["positive"], items) if interest == "single" else
                     interest_scores(items, profile["centroids"], profile["importances"], mode=interest))
    np.testing.assert_allclose(parts["interest"], 0.6 * want_interest, atol=1e-6)
    np.testing.assert_allclose(parts["negative"], -0.6 * 0.4 * cosine_scores(negative, items), atol=1e-6)
    np.testing.assert_allclose(parts["cooccurrence"], 0.3 * cooccurrence / cooccurrence.max(), atol=1e-6)
    np.testing.assert_allclose(parts["popularity"], 0.1 * popularity / popularity.max(), atol=1e-6)
    rows = rng.choice(n, 7, replace=False)
    assert all(np.array_equal(v, parts[k][rows]) for k, v in blend.parts_at(rows).items())
    whole = scan.parts(weights)  # the same terms without the blended pass
    assert set(whole) == set(parts) and all(np.array_equal(whole[k], parts[k]) for k in parts)


def test_a_blend_mixes_a_query_and_freshens_within_the_bounds_its_weights_set():
    """Blend.mixed: (1 − w)·scores + w·query cosine, its bounds moved alike;
    freshened: scores moved from [low, high] to [0, 1] (a blend of no
    signals, low = high, counts as 1) times 2^log2_fresh; unit_max: a signal
    over its maximum."""
    from halflife.core.ranking import RowBlocks, normalize
    from halflife.interest.blend import Blend, CatalogueScan, unit_max

    assert unit_max(np.array([0.5, 0.25, 0.0])).tolist() == [1.0, 0.5, 0.0]
    assert unit_max(np.zeros(2)).tolist() == [0.0, 0.0]
    scores, query = np.array([0.5, -1.0, 2.0], np.float32), np.array([0.5, 0.0, -1.0], np.float32)
    mixed = Blend(scores, lambda rows: {"interest": scores[rows]}, -1.0, 2.0).mixed("query", query, 0.25)
    np.testing.assert_allclose(mixed.scores, 0.75 * scores + 0.25 * query, rtol=1e-6)
    assert (mixed.low, mixed.high) == (0.75 * -1.0 - 0.25, 0.75 * 2.0 + 0.25)
    parts = mixed.parts_at(np.array([0, 2]))
    np.testing.assert_allclose(parts["interest"], [0.375, 1.5])
    np.testing.assert_allclose(parts["query"], [0.125, -0.25])
    items = normalize(np.random.default_rng(0).standard_normal((3, 4)))
    nothing = CatalogueScan(items).blend(RowBlocks(1), {})
    assert nothing.scores.tolist() == [0.0, 0.0, 0.0] and nothing.low == nothing.high == 0.0
    fresh = nothing.freshened(np.array([0.0, -1.0, -3.0]))
    assert fresh.reported(fresh.scores).tolist() == [1.0, 0.5, 0.125]
    # A signal below 1 is divided by its maximum too: in [0, its weight].
    small = CatalogueScan(items, later={"popularity": lambda: np.array([0.5, 0.25, 0.0])})
    small = small.blend(RowBlocks(1), {"popularity": 0.2})
    np.testing.assert_allclose(small.scores, [0.2, 0.1, 0.0], rtol=1e-6)
    assert small.high == 0.2


def test_explanations_are_read_before_a_compaction_can_move_their_rows(tmp_path, monkeypatch):
    """A compaction moves rows within the matrix that a call's scan read. The
    explanation's parts were read from it after the lock was let go: another
    thread's compaction in between gave an item another item's cosine."""
    import threading

    from halflife.interest.blend import CatalogueScan

    compact_catalogues_at(monkeypatch, dead_rows=1)
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"hiking boots model {n}") for n in range(12)])
    engine.record_events([EventInput("e0", "u", LIKE, "i11", None, None, T - 60)])
    shown = {i.item_id for i in engine.recommend("u", 4, as_of=T).items}
    victim = next(f"i{n}" for n in range(11) if f"i{n}" not in shown)  # before the shown ones' rows
    deleter = threading.Thread(target=engine.delete_items, args=([victim],))
    confirm, parts = engine._confirm, CatalogueScan._parts

    def confirm_then_delete(*args):
        result = confirm(*args)
        if not deleter.ident:
            deleter.start()  # waits for the lock this call holds
        return result

    def parts_after_any_compaction(self, *args):
        if not engine._lock._is_owned():  # read without the lock: the delete may land first, and does here
            deleter.join(10)
        return parts(self, *args)

    monkeypatch.setattr(engine, "_confirm", confirm_then_delete)
    monkeypatch.setattr(CatalogueScan, "_parts", parts_after_any_compaction)
    during = engine.recommend("u", 4, as_of=T, explain=True).items
    deleter.join(10)
    monkeypatch.undo()
    assert engine.catalog.epoch == 1 and victim not in engine.catalog
    assert during == engine.recommend("u", 4, as_of=T, explain=True).items


def test_a_recommend_started_again_after_a_compaction_explains_without_the_lock(tmp_path, monkeypatch):
    """The try that follows a compaction holds the lock throughout; the
    explanation, which reads the user's log (a user of 100k events: ~0.5 s),
    must come after it, or every other call waits for it (a review)."""
    from halflife.interest.blend import CatalogueScan

    compact_catalogues_at(monkeypatch, dead_rows=1)
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"hiking boots model {n}") for n in range(8)])
    engine.record_events([EventInput("e0", "u", LIKE, "i0", None, None, T - 60)])
    blend, calls = _delete_first(engine, "i7", CatalogueScan.blend)
    explain, locked = engine._explain, []

    def explain_noting_the_lock(*args):
        locked.append(engine._lock._is_owned())
        return explain(*args)

    monkeypatch.setattr(CatalogueScan, "blend", blend)
    monkeypatch.setattr(engine, "_explain", explain_noting_the_lock)
    items = engine.recommend("u", 3, as_of=T, explain=True).items
    assert calls == [1] and engine.catalog.epoch == 1  # the first try was renumbered
    assert locked == [False] and len(items) == 3 and all(i.explanation.events for i in items)


@pytest.mark.parametrize("compact", [False, True])
def test_an_item_deleted_while_similar_items_scores_is_not_returned(tmp_path, monkeypatch, compact):
    from halflife.interest import engine as engine_module

    if compact:
        compact_catalogues_at(monkeypatch, dead_rows=1)
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"espresso machine model {n}") for n in range(8)])
    before = [i.item_id for i in engine.similar_items(item_id="i0", limit=3).items]
    pick, calls = _delete_first(engine, before[0], engine_module.top_k)  # scored, not yet picked
    monkeypatch.setattr(engine_module, "top_k", pick)
    after = [i.item_id for i in engine.similar_items(item_id="i0", limit=3).items]
    assert calls == [1] and engine.catalog.epoch == int(compact)
    assert before[0] not in after and len(after) == 3
    assert after == [i.item_id for i in engine.similar_items(item_id="i0", limit=3).items]


# A missing profile is replayed from the log without the engine lock
# (InterestEngine._cache_profile); other calls may land in the meantime.

def _during_replay(engine: InterestEngine, monkeypatch, action) -> list:
    """Runs `action` once while the engine replays a profile, as another thread would."""
    replay, started, done = engine._builder.build, [], []

    def build(*args):
        if not started:  # once: `action` may replay too
            started.append(True)
            done.append(action())
        return replay(*args)

    monkeypatch.setattr(engine._builder, "build", build)
    return done


def _lock_is_free(engine: InterestEngine) -> bool:
    import threading

    got: list[bool] = []

    def try_lock() -> None:
        got.append(engine._lock.acquire(timeout=5))
        if got[-1]:
            engine._lock.release()

    thread = threading.Thread(target=try_lock)
    thread.start()
    thread.join(10)
    return got == [True]


def _profile_of(engine: InterestEngine, user: str):
    profile = engine.profile(user, as_of=T)
    return [(round(i.strength, 9), i.event_count) for i in profile.interests], dict(profile.event_counts)


def test_events_recorded_while_a_profile_replays_are_in_it(tmp_path, monkeypatch):
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"trail running shoe {n}") for n in range(6)])
    engine.record_events([EventInput(f"a{n}", "u", LIKE, f"i{n}", None, None, T - 3600.0 * (6 - n)) for n in range(3)])
    engine._users.clear()  # a cache miss, as after a restart

    def meanwhile():
        free = _lock_is_free(engine)
        engine.record_events([EventInput("b0", "u", LIKE, "i4", None, None, T - 60.0)])
        return free

    done = _during_replay(engine, monkeypatch, meanwhile)
    assert engine.recommend("u", 3, as_of=T).strategy == "personalized"
    assert done == [True]  # the replay ran, and without the lock
    monkeypatch.undo()
    cached = _profile_of(engine, "u")
    assert cached[1] == {LIKE: 4}
    engine.store.close()
    assert cached == _profile_of(open_engine(tmp_path), "u")  # what a restart builds


def test_a_look_into_the_past_replays_the_profile_without_the_lock(tmp_path, monkeypatch):
    # A read before the user's newest event replays their log up to then:
    # other calls go on meanwhile, the answers are a restart's, and the cached
    # profile (at the clock) is left as it was.
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"kayak paddle {n}") for n in range(6)])
    engine.record_events([EventInput(f"a{n}", "u", LIKE, f"i{n}", None, None, T - 3600.0 * (6 - n)) for n in range(5)])
    past = T - 3600.0 * 3.5

    def answers(e: InterestEngine) -> tuple:
        profile = e.profile("u", as_of=past)
        ranked = [(i.item_id, round(i.score, 6)) for i in e.recommend("u", 6, as_of=past, include_seen=True).items]
        return dict(profile.event_counts), [(round(i.strength, 9), i.event_count) for i in profile.interests], ranked

    before = _profile_of(engine, "u")
    free = []
    replay = engine._builder.build
    monkeypatch.setattr(engine._builder, "build", lambda *args: free.append(_lock_is_free(engine))
                        or replay(*args))
    live = answers(engine)
    assert live[0] == {LIKE: 3}
    assert free == [True, True]  # one replay each for the profile and the recommendation, both without the lock
    monkeypatch.undo()
    assert _profile_of(engine, "u") == before  # the cache still answers at the clock, without a replay
    engine.store.close()
    assert answers(open_engine(tmp_path)) == live


@pytest.mark.parametrize("stamp", ["late", "ahead"])
def test_reads_at_the_clock_that_must_replay_do_so_without_the_lock(tmp_path, monkeypatch, stamp):
    """An event older than the profile's newest (two devices, a retried
    batch) puts the profile out of order, and the clock reaching events
    stamped ahead of it, past those a profile holds, brings them in from the
    log: either way the next read replays the log (65 ms at 1k events, 600
    at 10k), which other calls must not wait for."""
    from halflife.interest.replay import MAX_HELD_EVENTS_PER_USER

    now = [T]

    def engine_at(path) -> InterestEngine:
        return InterestEngine(Config(), SqliteStore(path), DIM, fake_embed, clock=lambda: now[0])

    engine = engine_at(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"climbing rope {n}") for n in range(30)])
    engine.record_events([EventInput(f"a{n}", "u", LIKE, f"i{n}", None, None, T - 3600.0 * (6 - n)) for n in range(5)])
    engine.recommend("u", 3)  # cached at the clock
    if stamp == "late":
        engine.record_events([EventInput("b", "u", LIKE, "i9", None, None, T - 3600.0 * 5.5)])
    else:
        engine.record_events([EventInput(f"c{n}", "u", LIKE, f"i{10 + n}", None, None, T + 60.0 * (n + 1))
                              for n in range(20)])
        engine.recommend("u", 3)
        now[0] = T + 60.0 * (MAX_HELD_EVENTS_PER_USER + 1)  # the first event not held is due
    free = []
    replay = engine._builder.build
    monkeypatch.setattr(engine._builder, "build", lambda *args: free.append(_lock_is_free(engine))
                        or replay(*args))
    ranked = [(i.item_id, round(i.score, 6)) for i in engine.recommend("u", 5).items]
    profile = engine.profile("u")
    assert free and all(free)
    monkeypatch.undo()
    engine.store.close()
    again = engine_at(tmp_path)
    assert [(i.item_id, round(i.score, 6)) for i in again.recommend("u", 5).items] == ranked
    assert again.profile("u").event_counts == profile.event_counts


def test_diversity_re_ranks_without_the_lock(tmp_path, monkeypatch):
    """MMR is quadratic in the limit (~125 ms at 1,000): other calls must not wait for it."""
    from halflife.interest import engine as engine_module

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"tent pole {n % 4}") for n in range(40)])
    engine.record_events([EventInput(f"a{n}", "u", LIKE, f"i{n}", None, None, T - 3600.0 * (6 - n)) for n in range(5)])
    free = []
    re_rank = engine_module.mmr
    monkeypatch.setattr(engine_module, "mmr", lambda *a, **k: free.append(_lock_is_free(engine)) or re_rank(*a, **k))
    diverse = engine.recommend("u", 8, diversity=0.5, explain=True).items
    assert free == [True]
    assert len(diverse) == 8 and all(item.explanation is not None for item in diverse)
    plain = engine.recommend("u", 40).items  # every candidate, by relevance
    assert {i.item_id for i in diverse} <= {i.item_id for i in plain}
    assert [i.item_id for i in diverse] != [i.item_id for i in plain[:8]]  # re-ranked, not cut


def test_a_user_erased_while_their_profile_replays_is_not_cached(tmp_path, monkeypatch):
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"camping stove {n}") for n in range(4)])
    engine.record_events([EventInput(f"a{n}", "u", LIKE, f"i{n}", None, None, T - 3600.0 * (4 - n)) for n in range(3)])
    engine._users.clear()
    done = _during_replay(engine, monkeypatch, lambda: engine.delete_user("u"))
    assert engine.recommend("u", 3, as_of=T).strategy == "trending"
    assert done == [3]
    monkeypatch.undo()
    assert _profile_of(engine, "u") == ([], {})


@pytest.mark.parametrize("compact", [False, True])
def test_an_item_deleted_while_a_profile_is_described_is_not_listed(tmp_path, monkeypatch, compact):
    from halflife.interest import engine as engine_module

    if compact:
        compact_catalogues_at(monkeypatch, dead_rows=1)
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"mountain bike part {n}") for n in range(8)])
    engine.record_events([EventInput("e0", "u", LIKE, "i0", None, None, T - 60)])

    def top() -> list[str]:
        return [item_id for item_id, _, _ in engine.profile("u", as_of=T, items_per_interest=3).interests[0].top_items]

    before = top()
    describe, calls = _delete_first(engine, before[0], engine_module.describe_clusters)
    monkeypatch.setattr(engine_module, "describe_clusters", describe)
    after = top()
    assert calls == [1] and engine.catalog.epoch == int(compact)
    assert before[0] not in after and len(after) == 3
    assert after == top()  # as if described after the delete


def test_a_catalogue_that_turns_over_stays_bounded_and_answers_as_a_restart_would(tmp_path, monkeypatch):
    """Deleted items' rows were kept until a restart: a catalogue that turns
    over (news) grew without bound, and every scan read the dead rows. The
    compactions renumber the rows of the co-occurrence pairs, popularity
    counts and log, and entries held for the clock, so the answers of the
    present, the past and after the clock stay those of a restart."""
    from halflife.interest import engine as engine_module

    monkeypatch.setattr(engine_module, "COMPACT_MIN_DEAD_ROWS", 6)
    engine = open_engine(tmp_path)
    rounds, per_round = 10, 4
    for r in range(rounds):
        fresh = [f"r{r}-{n}" for n in range(per_round)]
        engine.upsert_items([ItemInput(id=i, text=f"story {i}", categories=(f"c{n % 3}",))
                             for n, i in enumerate(fresh)])
        older = [f"r{r - 1}-{n}" for n in range(per_round)] if r else []
        engine.record_events([
            # Each user reads this round's stories and last round's; one read in four stamped after the clock.
            EventInput(f"e{r}-{u}-{k}", f"u{u}", LIKE, (fresh + older)[(u + k) % len(fresh + older)], None, None,
                       T + 600.0 * (r + 1) if k == 3 else T - 3600.0 * (rounds - r) - k)
            for u in range(5) for k in range(4)
        ])
        if r == 5:
            engine.delete_user("u4")  # its popularity taken back, in the log too
        if r >= 2:
            assert engine.delete_items([f"r{r - 2}-{n}" for n in range(per_round)]) == per_round
        assert engine.catalog.dead_rows < 6  # the dead rows go, at most this many wait
    assert engine.catalog.epoch >= 3

    def answers(e: InterestEngine) -> dict:
        out = {(u, t): [(i.item_id, round(i.score, 5)) for i in e.recommend(u, 6, as_of=t).items]
               for t in (T - 3 * 3600.0, T, T + 7200.0) for u in ("u0", "u3", "u4", "cold")}
        similar = e.similar_items(item_id=f"r{rounds - 1}-0", limit=5).items
        out["similar"] = [(i.item_id, round(i.score, 5)) for i in similar]
        interests = e.profile("u1", as_of=T).interests
        out["profile"] = [(interest.top_items, round(interest.strength, 5)) for interest in interests]
        return out

    live = answers(engine)
    assert all(live[("u3", t)] for t in (T - 3 * 3600.0, T, T + 7200.0)) and live[("cold", T)][0][1] == 1.0
    engine.store.close()
    assert live == answers(open_engine(tmp_path))


@pytest.mark.parametrize("compact", [False, True])
def test_concurrent_reads_and_writes_end_as_a_restart_would(tmp_path, monkeypatch, compact):
    """Catalogue writes, events, erasures, recommendations and profiles from
    several threads at once (reads now score without the lock; co-occurrence
    merges are built without it, made frequent here; compacting, every other
    delete renumbers the rows): nothing fails, no deleted item is ever
    returned after its delete finished, and the engine ends where a restart
    over the store ends."""
    from halflife.core import cooccurrence

    monkeypatch.setattr(cooccurrence, "_MIN_MERGE", 2)
    if compact:
        compact_catalogues_at(monkeypatch, dead_rows=2)
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"{kind}{n}", text=f"item {n}", categories=(f"c{n % 3}",))
                         for n in range(40) for kind in ("i", "d")])  # events name i*, deletes take d*
    deleted: set[str] = set()

    def catalogue(step):
        if step % 3 == 2:
            item_id = f"d{step % 40}"
            engine.delete_items([item_id])
            deleted.add(item_id)
        else:
            engine.upsert_items([ItemInput(id=f"n{step}", text=f"new item {step}", categories=("c1",))])

    def events(step):
        # The third event of each batch is stamped after the clock (held back until a read reaches it).
        engine.record_events([EventInput(f"e{step}-{k}", f"u{(step + k) % 5}", LIKE, f"i{(step * 7 + k) % 40}", None, None,
                                         T + 60.0 * step if k == 2 else T - 3600.0 * (60 - step) - k) for k in range(3)])
        if step % 20 == 19:
            engine.delete_user("u4")

    def reads(step):
        gone = set(deleted)  # deleted before this call started
        user = f"u{step % 5}"
        ids = [i.item_id for i in engine.recommend(user, 5, as_of=T, diversity=0.3 * (step % 2)).items]
        ids += [i.item_id for i in engine.similar_items(text="item", limit=5).items]
        ids += [i for interest in engine.profile(user, as_of=T).interests for i, _, _ in interest.top_items]
        assert not gone & set(ids), gone & set(ids)

    errors = run_in_threads(60, catalogue, events, reads, reads)
    assert not errors, errors
    assert engine.catalog.epoch >= 5 if compact else engine.catalog.epoch == 0

    def answers(e: InterestEngine) -> dict:
        return {(u, t): [(i.item_id, round(i.score, 5)) for i in e.recommend(u, 10, as_of=t).items]
                for t in (T, T + 7200.0) for u in ("u0", "u1", "u4", "cold")}

    live = answers(engine)
    engine.store.close()
    assert live == answers(open_engine(tmp_path))


def test_a_replay_keeps_events_applied_while_another_replays_profile_was_cached_and_dropped(tmp_path, monkeypatch):
    from halflife.storage.base import EventRecord

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"kayak paddle {n}") for n in range(4)])
    engine.record_events([EventInput("a", "u", LIKE, "i0", None, None, T - 7200.0)])
    engine._users.clear()
    vector = engine.catalog.vectors[engine.catalog.row_of["i1"]].copy()
    late = EventRecord("g", "u", LIKE, "i1", None, None, T - 3600.0, vector)

    def meanwhile():
        stored = engine.store.record_events([late])  # committed, not applied yet (its writer is slow)
        with engine._lock:  # a second replay reads it, and caches the profile (a read under the lock)
            engine._current_state("u")
        engine._apply_new_events(stored)  # applied now: at or below that profile's seq, so it is dropped
        return "u" in engine._users

    done = _during_replay(engine, monkeypatch, meanwhile)
    engine.recommend("u", 3, as_of=T)  # the first replay, which read the log before "g", ends last
    assert done == [False]
    monkeypatch.undo()
    cached = _profile_of(engine, "u")
    assert cached[1] == {LIKE: 2}
    engine.store.close()
    assert cached == _profile_of(open_engine(tmp_path), "u")


def test_a_user_after_an_erasure_gets_co_occurrence_of_their_own(tmp_path):
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"board game {n}") for n in range(8)])
    for k, user in enumerate(("a", "b", "c")):
        engine.record_events([EventInput(f"{user}{n}", user, LIKE, f"i{(3 * k + n) % 8}", None, None, T - 3600.0 * (n + 1))
                              for n in range(3)])
    engine.delete_user("b")
    engine.record_events([EventInput(f"d{n}", "d", LIKE, f"i{7 - n}", None, None, T - 60.0 * (n + 1)) for n in range(2)])
    engine.delete_user("c")  # must take only c's pairs, not the newcomer's

    def answers(e: InterestEngine) -> dict:
        return {u: [(i.item_id, round(i.score, 5)) for i in e.recommend(u, 5, as_of=T).items] for u in "abcd"}

    live, pairs = answers(engine), len(engine._blend.cooccurrence)
    engine.store.close()
    restarted = open_engine(tmp_path)
    assert (live, pairs) == (answers(restarted), len(restarted._blend.cooccurrence))


def test_a_cooccurrence_merge_is_built_on_its_own_thread_while_calls_go_on(tmp_path, monkeypatch):
    """The O(pairs) part of a merge holds neither the engine lock nor the
    writer that made it due: while one is being built, writes and
    recommendations complete, and its pairs count before and after."""
    import threading

    from halflife.core import cooccurrence

    monkeypatch.setattr(cooccurrence, "_MIN_MERGE", 4)
    monkeypatch.setattr(cooccurrence, "_INLINE_FACTOR", 10**6)  # only the background merge, here
    started, release = threading.Event(), threading.Event()
    build = cooccurrence.Merge.build

    def held_build(merge):
        started.set()
        assert release.wait(30)
        build(merge)

    monkeypatch.setattr(cooccurrence.Merge, "build", held_build)
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(6)])

    def likes(prefix, user, items):
        return [EventInput(f"{prefix}{k}", user, LIKE, item, None, None, T - 60.0 * k) for k, item in enumerate(items)]

    engine.record_events(likes("a", "u0", ["i0", "i1"]) + likes("b", "u1", ["i0", "i1", "i2"]))  # 5 pairs: due
    assert started.wait(30)
    engine.record_events(likes("c", "u2", ["i1", "i3"]))  # the merge is still being built
    during = [i.item_id for i in engine.recommend("u0", 3, as_of=T).items]
    release.set()
    for _ in range(3000):  # bounded: the merge thread ends once it has the lock again
        if not engine._blend.cooccurrence.merging:
            break
        threading.Event().wait(0.01)
    assert not engine._blend.cooccurrence.merging and len(engine._blend.cooccurrence._keys) == 5  # merged, the later pairs still waiting
    assert during == [i.item_id for i in engine.recommend("u0", 3, as_of=T).items]
    assert "i2" in during  # u1's co-occurrence reached u0's recommendations while the merge was built


def test_events_stamped_ahead_of_the_clock_count_from_their_time_and_keep_reads_fast(tmp_path):
    """Clients whose clocks run ahead stamp events after the server's now.
    Until the clock reaches them, recommendations and profiles are those of
    an engine that never saw them (as_of semantics), yet both blend indexes
    and the users' profiles stay on their fast path (before, one such event
    sent every read through a rebuild of all pairs and all popularity, 1.3 s
    a call at 1M events instead of 1.2 ms, and each of its user's reads
    through a replay of their log under the engine lock);
    a read with as_of_time past the clock counts them without moving what
    reads at the clock see; once the clock passes them, and after erasures
    of held events, the engine answers as a restart over its store would."""
    now = [T]

    def engine_at(path) -> InterestEngine:
        return InterestEngine(Config(), SqliteStore(path), DIM, fake_embed, clock=lambda: now[0])

    items = [ItemInput(id=f"i{n}", text=f"camping stove {n}") for n in range(10)]
    past = [EventInput(f"p{u}-{k}", f"u{u}", LIKE, f"i{(u * 3 + k) % 10}", None, None, T - 3600.0 * (k + 1))
            for u in range(4) for k in range(3)]
    ahead = [EventInput(f"a{u}-{k}", f"u{u}", LIKE, f"i{(u * 5 + k + 1) % 10}", None, None, T + 600.0 * (k + 1))
             for u in (1, 2, 3) for k in range(2)]
    engine, only_past = engine_at(tmp_path / "live"), engine_at(tmp_path / "past")
    for e in (engine, only_past):
        e.upsert_items(items)
        e.record_events(past)
    engine.record_events(ahead)

    def answers(e: InterestEngine, users=("u0", "u1", "u2", "cold"), at: float | None = None) -> dict:
        return {u: [(i.item_id, round(i.score, 6)) for i in e.recommend(u, 10, as_of=at).items] for u in users}

    def fast_at_the_clock() -> bool:  # both blend indexes hold nothing after the clock
        return engine._blend.cooccurrence.newest <= now[0] and engine._blend.popularity_log.newest <= now[0]

    assert answers(engine) == answers(only_past) and fast_at_the_clock()
    looked_ahead = answers(engine, at=T + 900.0)  # counts the events due by then, applies none
    assert looked_ahead != answers(only_past) and fast_at_the_clock()
    replays = []
    build = engine._builder.build

    def replaying(chunks, *args):
        replays.append([e for chunk in chunks for e in chunk])
        return build([replays[-1]], *args)

    engine._builder.build = replaying
    assert answers(engine) == answers(only_past) and engine.profile("u1").event_counts == {LIKE: 3}
    # The users' own held events cost no replay either ("cold", who has no event, is never cached:
    # its reads build a profile of nothing).
    assert [events for events in replays if events] == []
    del engine._builder.build

    now[0] = T + 900.0  # one held event per user is due: counted from its time on
    live = answers(engine)
    assert live == looked_ahead and fast_at_the_clock()
    engine.store.close()
    assert answers(engine_at(tmp_path / "live")) == live

    engine = engine_at(tmp_path / "live")  # u2's held event at T + 1200 is erased before it is due
    engine.delete_user("u2")
    engine.delete_items(["i7"])  # so is u1's pair with i7 (T + 1200 too)
    now[0] = T + 3600.0
    live = answers(engine, ("u0", "u1", "u3", "cold"))
    engine.store.close()
    assert answers(engine_at(tmp_path / "live"), ("u0", "u1", "u3", "cold")) == live


def test_a_look_into_the_past_rebuilds_the_blend_without_the_lock(tmp_path, monkeypatch):
    """A read with as_of before the newest applied event rebuilds co-occurrence
    and popularity as of then, a pass over every pair and event (1.3 s at 1M
    events): it copies them under the engine lock and builds after releasing
    it, so other calls go on meanwhile; the answers are those of a restart."""
    from halflife.core.cooccurrence import Cooccurrence
    from halflife.interest import engine as engine_module

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"tent {n}") for n in range(8)])
    engine.record_events([EventInput(f"e{u}-{k}", f"u{u}", LIKE, f"i{(u + k) % 8}", None, None, T - DAY * (u + k))
                          for u in range(4) for k in range(3)])
    past = T - 2.5 * DAY

    def answers(e: InterestEngine) -> dict:
        return {u: [(i.item_id, round(i.score, 6)) for i in e.recommend(u, 5, as_of=past).items] for u in ("u3", "cold")}

    free: list[tuple[str, bool]] = []
    from_pairs, decayed_sum = Cooccurrence.from_pairs.__func__, engine_module.decayed_sum
    monkeypatch.setattr(Cooccurrence, "from_pairs", classmethod(
        lambda cls, *a: free.append(("pairs", _lock_is_free(engine))) or from_pairs(cls, *a)))
    monkeypatch.setattr(engine_module, "decayed_sum",
                        lambda *a: free.append(("popularity", _lock_is_free(engine))) or decayed_sum(*a))
    live = answers(engine)
    assert ("pairs", True) in free and ("popularity", True) in free and all(ok for _, ok in free), free
    monkeypatch.undo()
    engine.store.close()
    assert answers(open_engine(tmp_path)) == live


def test_a_profile_holds_a_bounded_number_of_events_for_the_clock(tmp_path):
    """Held events keep their vectors, so a profile holds at most
    MAX_HELD_EVENTS_PER_USER of them, the soonest due; later ones wait in the
    log, and the profile replays it once the clock reaches them. Applying
    them all instead made every read at the clock replay the whole log until
    the clock caught up (17 events ahead: a 10k-event user's reads 235 ms
    instead of 2-6 ms, an audit)."""
    from halflife.interest.replay import MAX_HELD_EVENTS_PER_USER

    now = [T]

    def engine_at(path) -> InterestEngine:
        return InterestEngine(Config(), SqliteStore(path), DIM, fake_embed, clock=lambda: now[0])

    engine, only_past = engine_at(tmp_path / "live"), engine_at(tmp_path / "past")
    past = [EventInput(f"p{n}", "u", LIKE, f"i{n}", None, None, T - DAY * (n + 1)) for n in range(3)]
    for e in (engine, only_past):
        e.upsert_items([ItemInput(id=f"i{n}", text=f"lantern {n}") for n in range(40)])
        e.record_events(past)
    answers = lambda e, at=None: [(i.item_id, round(i.score, 6)) for i in e.recommend("u", 5, as_of=at).items]
    assert answers(engine) == answers(only_past)  # cached
    replays = []
    build = engine._builder.build
    engine._builder.build = lambda *args: replays.append(args) or build(*args)
    for n in reversed(range(MAX_HELD_EVENTS_PER_USER + 4)):  # each sooner due than those before it
        engine.record_events([EventInput(f"a{n}", "u", LIKE, f"i{10 + n}", None, None, T + 60.0 * (n + 1))])
        assert answers(engine) == answers(only_past)
    assert replays == []  # reads at the clock: not one replay
    state = engine._users["u"]
    assert len(state.ahead) == MAX_HELD_EVENTS_PER_USER and state.ahead_in_log == T + 60.0 * (MAX_HELD_EVENTS_PER_USER + 1)
    assert sorted(e.event_time for e in state.ahead) == [T + 60.0 * (n + 1) for n in range(MAX_HELD_EVENTS_PER_USER)]
    del engine._builder.build

    for at in (T + 60.0 * 5, T + 60.0 * (MAX_HELD_EVENTS_PER_USER + 1), T + 60.0 * 30):
        looked_ahead = answers(engine, at)  # counts what is due by then, on a replay
        now[0] = at  # the clock reaches it: held events applied, or the log replayed
        restart = engine_at(tmp_path / "live")
        assert answers(engine) == looked_ahead == answers(restart)
        assert engine.profile("u").event_counts == restart.profile("u").event_counts
        restart.store.close()
    assert engine._users["u"].ahead == [] and engine._users["u"].ahead_in_log == np.inf


def test_freshness_ranks_the_newer_of_two_equal_items_first_and_shows_as_a_part(tmp_path):
    """ranking.freshness_half_life_days multiplies a personal score, moved
    to [0, 1], and a trending one by 2^(-age/h) of the item's create_time."""
    import dataclasses

    config = Config()
    config = dataclasses.replace(config, ranking=dataclasses.replace(config.ranking, freshness_half_life_days=10.0))
    engine = InterestEngine(config, SqliteStore(tmp_path), DIM, fake_embed, clock=lambda: T)
    twin = fake_embed(["hiking boots"])[0]
    engine.upsert_items(
        [ItemInput(id="seed", text="", vector=twin, create_time=T - 50 * DAY),
         ItemInput(id="old-twin", text="", vector=twin, create_time=T - 40 * DAY),
         ItemInput(id="new-twin", text="", vector=twin, create_time=T - 5 * DAY)]
        + [ItemInput(id=f"other{n}", text=f"other thing {n}", create_time=T - 100 * DAY) for n in range(6)]
    )
    engine.record_events([EventInput("e0", "fan", LIKE, "seed", None, None, T - 60),
                          EventInput("e1", "crowd1", LIKE, "old-twin", None, None, T - 60),
                          EventInput("e2", "crowd2", LIKE, "new-twin", None, None, T - 60)])
    personal = engine.recommend("fan", 2, as_of=T, explain=True)
    assert [i.item_id for i in personal.items] == ["new-twin", "old-twin"]
    for item, age in zip(personal.items, (5, 40)):
        parts = dict(item.explanation.score_parts)
        fresh = parts.pop("freshness")
        assert fresh == pytest.approx(2 ** (-age / 10), rel=1e-5)
        # A personal score lies in [-w, 1] (w the interest's share of the blend: a cosine times w, the other
        # signals in [0, their weight]), moved to [0, 1].
        w = config.blend.interest / (config.blend.interest + config.blend.cooccurrence + config.blend.popularity)
        assert item.score == pytest.approx((sum(parts.values()) + w) / (1 + w) * fresh, abs=1e-6)
    trending = engine.recommend("cold", 3, as_of=T)
    assert trending.strategy == "trending"
    assert [i.item_id for i in trending.items] == ["new-twin", "old-twin", "seed"]
    assert [i.score for i in trending.items] == pytest.approx([2 ** (-5 / 10), 2 ** (-40 / 10), 2 ** (-50 / 10)], rel=1e-5)


@pytest.mark.parametrize("user", ["critic", "cold"])
def test_freshness_lowers_scores_below_zero_too(tmp_path, user):
    """A score can be negative: a personal one with a dislike reaches below
    -1, a trending one with a query's cosine below 0. Freshness must still
    rank the newer of two equal items first (mapped as if in [-1, 1], or not
    at all, such scores grew with age)."""
    import dataclasses

    config = Config()
    config = dataclasses.replace(config, ranking=dataclasses.replace(config.ranking, freshness_half_life_days=30.0))
    engine = InterestEngine(config, SqliteStore(tmp_path), DIM, fake_embed, clock=lambda: T)
    liked, other = fake_embed(["liked thing", "something else"])
    twin = (-liked + 0.5 * other) / np.linalg.norm(-liked + 0.5 * other)  # far from the like, near the dislike
    engine.upsert_items([ItemInput(id="liked", text="", vector=liked), ItemInput(id="disliked", text="", vector=-liked),
                         ItemInput(id="new-twin", text="", vector=twin, create_time=T - DAY),
                         ItemInput(id="old-twin", text="", vector=twin, create_time=T - 365 * DAY)])
    engine.record_events([EventInput("a", "critic", LIKE, "liked", None, None, T - 3600),
                          EventInput("b", "critic", 10, "disliked", None, None, T - 3600)])
    query = "liked thing" if user == "cold" else ""  # the twins' cosine to it is negative
    result = engine.recommend(user, 2, as_of=T, query=query, filter=ItemFilter(exclude_item_ids=("liked", "disliked")))
    assert result.strategy == ("trending" if user == "cold" else "personalized")
    assert [i.item_id for i in result.items] == ["new-twin", "old-twin"]
    assert result.items[0].score > result.items[1].score >= 0


@pytest.mark.parametrize("user", ["fan", "cold"])
def test_freshness_ranks_items_of_any_age_by_relevance(tmp_path, user):
    """Items 13 years old at a 30-day freshness half-life (2^-158: below
    float32's range) still rank by the rest of their score, personal or
    trending: as float32 products every such score was 0 and they ranked by
    id. A score that underflows is shown as 0, as is its freshness part."""
    config = Config()
    config = dataclasses.replace(config, ranking=dataclasses.replace(config.ranking, freshness_half_life_days=30.0))
    engine = InterestEngine(config, SqliteStore(tmp_path), DIM, fake_embed, clock=lambda: T)
    liked, other = fake_embed(["liked thing", "something else"])
    near = (liked + 0.05 * other) / np.linalg.norm(liked + 0.05 * other)
    old = T - 13 * 365 * DAY
    engine.upsert_items([ItemInput(id="liked", text="", vector=liked, create_time=T - DAY),
                         ItemInput(id="a-unrelated", text="", vector=other, create_time=old),
                         ItemInput(id="z-matching", text="", vector=near, create_time=old + 1),
                         ItemInput(id="m-older", text="", vector=near, create_time=old - 1)])
    engine.record_events([EventInput("e", "fan", LIKE, "liked", None, None, T - 60)]
                         + [EventInput("p", "crowd1", LIKE, "z-matching", None, None, T - 60),
                            EventInput("q", "crowd2", LIKE, "m-older", None, None, T - 60)])
    result = engine.recommend(user, 3, as_of=T, explain=True, filter=ItemFilter(exclude_item_ids=("liked",)))
    assert result.strategy == ("personalized" if user == "fan" else "trending")
    # Of the two matching (and as popular) items the newer first, by 2 s, then the unrelated one.
    assert [i.item_id for i in result.items] == ["z-matching", "m-older", "a-unrelated"]
    assert all(i.score == 0.0 and i.explanation.score_parts["freshness"] == 0.0 for i in result.items)


def test_cosines_reported_stay_within_one_for_equal_vectors(tmp_path):
    """The API promises cosines in [-1, 1]; a float32 product of a unit row
    with itself lands on 1.0000002 for some rows. Twin items (one vector)
    liked by a user: profile items and labels, explanations and SimilarItems."""
    engine = open_engine(tmp_path)
    vectors = fake_embed([f"twin {n}" for n in range(24)])
    engine.upsert_items([ItemInput(id=f"{side}{n}", text="", vector=v, categories=(f"c{n}",))
                         for n, v in enumerate(vectors) for side in ("a", "b")])
    engine.record_events([EventInput(f"e{n}", f"u{n}", LIKE, f"a{n}", None, None, T - 60) for n in range(24)])
    reported = []
    for n in range(24):
        profile = engine.profile(f"u{n}", as_of=T, items_per_interest=3)
        reported += [s for view in profile.interests for _, _, s in view.top_items]
        reported += [s for view in profile.interests for _, s in view.labels]
        for item in engine.recommend(f"u{n}", 2, as_of=T, include_seen=True, explain=True).items:
            reported += [i.similarity for i in item.explanation.interests]
            reported += [e.similarity for e in item.explanation.events]
        reported += [i.score for i in engine.similar_items(item_id=f"a{n}", limit=1).items]
    assert max(reported) == 1.0 and min(reported) >= -1.0


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_a_profiles_top_items_order_equal_items_by_id_whatever_their_rows(tmp_path, limit):
    """Workers number rows in the order they learned of items; a profile's
    top items picked and ordered equal ones by row (and a GEMM scored equal
    vectors apart in the last bit), so two workers answered differently."""
    twin, other = fake_embed(["twin", "other"])
    answers = []
    for order in (("x1", "x2"), ("x2", "x1")):
        engine = open_engine(tmp_path / "-".join(order))
        engine.upsert_items([ItemInput(id=i, text="", vector=twin) for i in order]
                            + [ItemInput(id="y", text="", vector=(twin + 0.3 * other) / np.linalg.norm(twin + 0.3 * other)),
                               ItemInput(id="z", text="", vector=other)])
        engine.record_events([EventInput("e", "u", LIKE, "x1", None, None, T - 60)])
        (view,) = engine.profile("u", as_of=T, items_per_interest=limit).interests
        answers.append([(i, round(sim, 6)) for i, _, sim in view.top_items])
    assert answers[0] == answers[1]
    assert [i for i, _ in answers[0]] == ["x1", "x2", "y"][:limit]


def test_an_item_changed_while_a_profile_is_described_is_named_as_it_is_now(tmp_path, monkeypatch):
    """The profile's products run without the lock; an item re-upserted in
    between came back with its new text beside its old cosine and rank."""
    from halflife.interest import engine as engine_module

    near, far = fake_embed(["near", "far"])
    mid = (near + 0.6 * far) / np.linalg.norm(near + 0.6 * far)
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id="x", text="x", vector=near), ItemInput(id="y", text="y", vector=mid)])
    engine.record_events([EventInput("e", "u", LIKE, "x", None, None, T - 60)])
    nearest, changed = engine_module._nearest, []

    def then_change(*args):
        out = nearest(*args)
        if not changed:
            changed.append(engine.upsert_items([ItemInput(id="x", text="x now far", vector=far)]))
        return out

    monkeypatch.setattr(engine_module, "_nearest", then_change)
    (view,) = engine.profile("u", as_of=T, items_per_interest=2).interests
    cosine = {i: float(np.dot(engine.catalog.vectors[engine.catalog.row_of[i]], near)) for i in ("x", "y")}
    assert changed and [(i, t) for i, t, _ in view.top_items] == [("y", "y"), ("x", "x now far")]
    assert [s for _, _, s in view.top_items] == pytest.approx([cosine["y"], cosine["x"]], abs=1e-5)


def test_the_unweighted_signals_are_the_explained_parts_over_their_weights(tmp_path):
    """`signals` (what `halflife eval` blends offline) gives each signal of
    the blend before weighting: a Recommend's explained parts are them
    times the blend's weights; `popularity` needs no user, and a user
    Recommend ranks by trending gets None."""
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"camping gear {n}") for n in range(12)])
    dislike = 10
    events = [EventInput("u-0", "u", LIKE, "i0", None, None, T - 3 * DAY),
              EventInput("u-1", "u", LIKE, "i1", None, None, T - DAY),
              EventInput("u-2", "u", dislike, "i2", None, None, T - DAY)]
    events += [EventInput(f"c{n}-{i}", f"crowd{n}", LIKE, f"i{i}", None, None, T - 2 * DAY)
               for n in range(3) for i in (0, 3 + n, 9)]
    engine.record_events(events)
    response = engine.recommend("u", 6, as_of=T, explain=True)
    signals, popularity = engine.signals("u", T), engine.popularity(T)
    assert engine.signals("crowd-less newcomer", T) is None
    assert set(signals) == {"interest", "negative", "cooccurrence", "popularity"}
    assert signals["popularity"].max() == pytest.approx(1.0) and signals["cooccurrence"].max() == pytest.approx(1.0)
    np.testing.assert_array_equal(popularity, signals["popularity"])
    weights = engine._blend_weights()
    for item in response.items:
        row = engine.catalog.row_of[item.item_id]
        parts = item.explanation.score_parts
        assert set(parts) == set(signals)
        for name, part in parts.items():
            assert part == pytest.approx(weights[name] * signals[name][row], abs=1e-6)


def test_exact_ties_go_by_item_id_whatever_order_the_items_came_in(tmp_path):
    """Rows number items in the order a process learned of them, which differs
    between workers and across restarts: an answer cut through a group of
    exactly tied items takes the lowest ids, in every engine alike."""
    rng = np.random.default_rng(3)
    twin, other = rng.standard_normal(DIM), rng.standard_normal(DIM)
    items = [ItemInput(id=f"t{n}", text="", vector=twin) for n in range(6)]
    items += [ItemInput(id=f"o{n}", text="", vector=other) for n in range(6)]
    items += [ItemInput(id="liked", text="", vector=twin + 0.05 * rng.standard_normal(DIM))]
    events = [EventInput("like", "u", LIKE, "liked", None, None, T - DAY)]
    # Equal popularity for liked and o0..o5.
    events += [EventInput(f"p{n}", f"fan{n}", LIKE, f"o{n}", None, None, T - DAY) for n in range(6)]
    answers = []
    for name, order in (("forward", items), ("backward", items[::-1])):
        engine = InterestEngine(Config(), SqliteStore(tmp_path / name), DIM, fake_embed, clock=lambda: T)
        for item in order:  # one at a time: each gets the next row
            engine.upsert_items([item])
        engine.record_events(events)
        answers.append({
            "personal": [i.item_id for i in engine.recommend("u", 3, as_of=T).items],
            "diverse": [i.item_id for i in engine.recommend("u", 3, as_of=T, diversity=0.3).items],
            "trending": [i.item_id for i in engine.recommend("cold", 2, as_of=T).items],
            "similar": [i.item_id for i in engine.similar_items(item_id="t5", limit=2).items],
        })
    assert answers[0] == answers[1]
    assert answers[0]["personal"] == ["t0", "t1", "t2"]
    assert answers[0]["trending"] == ["liked", "o0"]  # one like each, at the same time
    assert answers[0]["similar"] == ["t0", "t1"]


def test_a_catalogue_without_events_answers_the_lowest_ids_then_the_popular_ones_first(tmp_path):
    """Before any event every item ties at popularity 0: the cut runs
    through the whole catalogue, and the lowest ids win, whatever rows the
    items got; the first popular items then go before them."""
    ids = [f"item-{n:04d}" for n in np.random.default_rng(4).permutation(1500)]
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=i, text="", vector=np.ones(DIM)) for i in ids])
    assert [i.item_id for i in engine.recommend("cold", 4, as_of=T).items] == sorted(ids)[:4]
    engine.record_events([EventInput(f"e{n}", f"u{n}", LIKE, "item-0700", None, None, T - DAY) for n in range(2)]
                         + [EventInput("f", "v", LIKE, "item-1200", None, None, T - DAY)])
    assert [i.item_id for i in engine.recommend("cold", 4, as_of=T).items] == [
        "item-0700", "item-1200", "item-0000", "item-0001"]


def test_an_interest_is_named_only_by_categories_that_point_its_way(tmp_path):
    """With 3 labels asked for and 3 categories, the two pointing away from
    the interest (negative cosines) named it too (an onboarding review)."""
    engine = open_engine(tmp_path)
    e = np.eye(DIM, dtype=np.float32)
    directions = {"up": e[0], "down": -e[0], "side": e[1]}
    engine.upsert_items([ItemInput(id=f"{name}{n}", text="", vector=v + 0.1 * n * e[2 + n], categories=(name,))
                         for name, v in directions.items() for n in range(2)])
    engine.record_events([EventInput("like", "u", LIKE, "up0", None, None, T - 60)])
    (interest,) = engine.profile("u", as_of=T).interests
    assert [label for label, _ in interest.labels] == ["up"] and interest.labels[0][1] > 0.9


def test_a_one_item_category_from_another_domain_does_not_name_an_interest(tmp_path):
    """A centroid centred on the catalogue mean, as the labels are, met a
    category far from the catalogue (one sock among films) with the bias
    -mean.(sock - mean) > 0, which cancelled their dissimilarity: a film less
    typical than most read "drama, Socks" ("Crime, Shoes, Socks" on MovieLens
    after the README's example items)."""
    engine = open_engine(tmp_path)
    e = np.eye(DIM, dtype=np.float32)
    films = [ItemInput(id=f"{genre}{n}", text="", vector=e[0] + 0.5 * e[1 + k] + 0.2 * e[4 + n], categories=(genre,))
             for k, genre in enumerate(("drama", "comedy", "horror")) for n in range(4)]
    engine.upsert_items(films + [ItemInput(id="sock", text="", vector=e[9], categories=("Socks",)),
                                 ItemInput(id="cult", text="", vector=0.5 * e[0] + e[1], categories=("drama",))])
    engine.record_events([EventInput("like", "u", LIKE, "cult", None, None, T - 60)])
    (interest,) = engine.profile("u", as_of=T).interests
    assert [label for label, _ in interest.labels] == ["drama"]


def test_labels_updated_where_their_items_changed_equal_labels_built_anew(tmp_path):
    """The label space keeps each label's mean and recomputes only those
    whose items changed: after every kind of catalogue write it must equal
    one built from the catalogue as it is."""
    from halflife.core.ranking import normalize

    engine = open_engine(tmp_path)
    rng = np.random.default_rng(8)

    def upsert(ids, categories):
        engine.upsert_items([ItemInput(id=i, text="", vector=rng.standard_normal(DIM), categories=c)
                             for i, c in zip(ids, categories)])

    def assert_as_built_anew():
        names, vectors = engine._label_space()
        catalog = engine.catalog
        assert names == catalog.all_categories
        want = normalize(np.array([catalog.mean(n) - catalog.mean() for n in names]).reshape(len(names), DIM))
        np.testing.assert_allclose(vectors, want, atol=1e-5)

    upsert([f"i{n}" for n in range(12)], [("a", "b"), ("b",), ("c",)] * 4)
    assert_as_built_anew()
    upsert(["i0", "i1"], [("a",), ("a", "c")])  # members move between labels: means only
    assert_as_built_anew()
    upsert(["i3"], [("b",)])  # a new vector, the same labels
    assert_as_built_anew()
    upsert(["t"], [("transient",)])
    engine.delete_items(["t"])  # came and went between two reads
    assert_as_built_anew()
    engine.delete_items([f"i{n}" for n in range(12) if n % 3 == 2])  # "c" keeps i1 only
    upsert(["i1"], [("a",)])  # and now no label "c"
    assert_as_built_anew()
    assert "c" not in engine._label_space()[0]
    upsert(["j"], [("c", "d")])  # "c" back, "d" new
    assert_as_built_anew()


def test_a_write_whose_caller_gave_up_while_it_embedded_is_neither_stored_nor_applied(tmp_path):
    deadline = Deadline()

    def embed(texts, given):
        assert given is deadline
        deadline.cancelled = any("late" in text for text in texts)  # the caller cancels meanwhile
        return fake_embed(texts)

    engine = InterestEngine(Config(), SqliteStore(tmp_path), DIM, embed, clock=lambda: T)
    engine.upsert_items([ItemInput(id="i1", text="first text")], deadline)
    vector = engine.catalog.vectors[engine.catalog.row_of["i1"]].copy()
    with pytest.raises(DeadlineExpiredError):
        engine.upsert_items([ItemInput(id="i1", text="late text")], deadline)
    with pytest.raises(DeadlineExpiredError):
        engine.record_events([EventInput("e1", "u", LIKE, "i1", "a late review", None, T)], deadline)
    assert engine.get_items(["i1"])["i1"].text == "first text"
    assert np.array_equal(engine.catalog.vectors[engine.catalog.row_of["i1"]], vector)
    assert engine.store.event_count() == 0 and engine.profile("u").event_counts == {}
    engine.record_events([EventInput("e1", "u", LIKE, "i1", "a review", None, T)], deadline)
    deadline.expires = 0.0  # long past
    with pytest.raises(DeadlineExpiredError):
        engine.delete_user("u", deadline)
    with pytest.raises(DeadlineExpiredError):
        engine.delete_items(["i1"], deadline)
    assert engine.profile("u").event_counts == {LIKE: 1} and "i1" in engine.catalog.row_of


def test_a_start_sizes_the_catalogue_for_the_stored_items_at_once(tmp_path, monkeypatch):
    from halflife.interest.catalog import CatalogIndex

    rng = np.random.default_rng(3)
    store = SqliteStore(tmp_path)
    store.upsert_items([ItemRecord(id=f"i{n}", text="", categories=(), attributes={}, create_time=None,
                                   vector=rng.standard_normal(DIM).astype(np.float32)) for n in range(3000)])
    store.close()
    growths = []
    grow = CatalogIndex._grow
    monkeypatch.setattr(CatalogIndex, "_grow", lambda self, capacity: (growths.append(capacity), grow(self, capacity)))
    engine = open_engine(tmp_path)
    # Grown from the 1,024 rows it began with, it copied every row at each growth (1,536, 2,304, 3,456 here).
    assert len(engine.catalog) == 3000 and growths == []
    engine.upsert_items([ItemInput(id="one-more", text="after the start")])  # and it grows as before
    assert growths == [4500] and len(engine.catalog) == 3001


def test_a_start_says_how_far_its_load_has_come(tmp_path, monkeypatch, caplog):
    """A start at 5M events was 20-56 s of NOT_SERVING with no line between
    the model's and "serving on": a slow start read as a hung one (a scale
    review). Every PROGRESS_INTERVAL_S (0 here: at every chunk) a line for
    the items, then the events, read so far of all."""
    from halflife import logs

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text="", vector=np.eye(DIM, dtype=np.float32)[n % DIM])
                         for n in range(2_500)])
    engine.record_events([EventInput(f"e{n}", f"u{n % 7}", LIKE, f"i{n}", None, None, T - n) for n in range(30)])
    engine.store.close()
    monkeypatch.setattr(logs, "PROGRESS_INTERVAL_S", 0.0)
    with caplog.at_level(logging.INFO, logger="halflife.interest.engine"):
        open_engine(tmp_path).store.close()
    timed = r" in \S+ s( \((\d+%), \S+/s, ~\S+ s left\))?$"  # the times, rates and times left: the clock's
    assert [re.sub(timed, r" \2", record.getMessage()).rstrip() for record in caplog.records] == [
        "loading the store: 1000 of 2500 items 40%",
        "loading the store: 2000 of 2500 items 80%",
        "loading the store: 2500 of 2500 items 100%",
        "loading the store: 30 of 30 events 100%",
        "loaded 2500 items and popularity from 30 events",
    ]


def test_an_item_whose_vector_was_damaged_on_disk_is_left_out_at_load(tmp_path):
    import sqlite3

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(4)])
    engine.record_events([EventInput(f"e{n}", "u", LIKE, f"i{n}", None, None, T - n) for n in range(4)])
    engine.store.close()
    with sqlite3.connect(tmp_path / "halflife.sqlite3") as conn:
        conn.execute("UPDATE vectors SET data = ? WHERE id = (SELECT vector_id FROM items WHERE id = 'i1')",
                     (np.full(DIM, np.nan, dtype=np.float32).tobytes(),))
    again = open_engine(tmp_path)
    assert "i1" not in again.catalog.row_of
    # The event on it still counts (4 likes), but adds no direction: the profile stays finite.
    profile = again.profile("u", items_per_interest=2)
    assert profile.event_counts == {LIKE: 4} and sum(view.event_count for view in profile.interests) == 3
    for user in ("u", "v"):  # personal and trending
        result = again.recommend(user, 3, include_seen=True, explain=True)
        assert len(result.items) == 3 and all(np.isfinite(item.score) for item in result.items)


Y2000 = 946_684_800.0  # 2000-01-01: 23.9 years before T, over 1,075 7-day half-lives
VIEW = 1


def test_trend_labels_read_decades_after_the_events_are_those_read_just_after(tmp_path):
    """Decay scales each horizon's masses alike for every interest, so the
    shares, and the labels, hold from the newest event on; read at t, the
    7-day masses underflowed to 0 and every interest read as fading."""
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=i, text=f"topic {i}") for i in ("old", "new")])
    engine.record_events([EventInput(f"o{n}", "u", LIKE, "old", None, None, Y2000 + n * DAY) for n in range(5)]
                         + [EventInput("n", "u", LIKE, "new", None, None, Y2000 + 150 * DAY)])
    just_after = engine.profile("u", as_of=Y2000 + 151 * DAY)
    decades_after = engine.profile("u", as_of=T)
    assert sorted(v.trend for v in just_after.interests) == ["fading", "rising"]
    assert [(v.top_items[0][0], v.trend) for v in decades_after.interests] == \
        [(v.top_items[0][0], v.trend) for v in just_after.interests]


def test_an_interest_whose_strength_underflowed_is_neither_listed_nor_explained(tmp_path):
    """A 2000 view (7-day half-life) is worth exactly 0 by T; a 2000 rating
    (a year) is not. The view's interest has no direction left to describe."""
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=i, text=f"topic {i}") for i in ("viewed", "rated", "other")])
    engine.record_events([EventInput("v", "u", VIEW, "viewed", None, None, Y2000),
                          EventInput("r", "u", RATE, "rated", None, 5.0, Y2000)])
    profile = engine.profile("u", as_of=T)
    assert [(v.interest_id, v.top_items[0][0]) for v in profile.interests] == [(0, "rated")]
    assert all(v.strength > 0 for v in profile.interests)
    for item in engine.recommend("u", 3, as_of=T, explain=True).items:
        assert [c.interest_id for c in item.explanation.interests] == [0]


def test_a_repeat_within_a_batch_is_a_duplicate_whatever_item_it_names(tmp_path):
    """As when sent in two calls: only the first is stored, so an unknown item
    on the repeat does not refuse the batch (it did, NOT_FOUND)."""
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id="known", text="a known item")])
    first = EventInput("e1", "u", LIKE, "known", None, None, T - DAY)
    assert engine.record_events([first, first._replace(item_id="no-such-item")]) == (1, 1)
    assert [e.item_id for e in engine.store.user_events("u")] == ["known"]
    with pytest.raises(UnknownItemsError):  # the first occurrence is the one stored: its item must exist
        engine.record_events([first._replace(event_id="e2", item_id="no-such-item"), first._replace(event_id="e2")])


def _engine_counting_texts(path, embedder_id: str | None = None) -> tuple[InterestEngine, list[str]]:
    """An engine and every text it embedded."""
    embedded: list[str] = []

    def embed(texts, deadline=None):
        embedded.extend(texts)
        return fake_embed(texts)

    engine = InterestEngine(Config(), SqliteStore(path), DIM, embed, clock=lambda: T, embedder_id=embedder_id)
    return engine, embedded


def test_a_retry_does_not_embed_the_texts_of_events_already_stored(tmp_path):
    """A re-sent batch embedded every text again before the store found them
    all duplicates (300 reviews: 19 s each time, in an audit)."""
    engine, embedded = _engine_counting_texts(tmp_path)
    engine.upsert_items([ItemInput(id="x", text="x")])
    embedded.clear()
    batch = [EventInput(f"r{n}", "u", SEARCH, None, f"review {n}", None, T - 60.0 * n) for n in range(3)]
    assert engine.record_events(batch) == (3, 0) and len(embedded) == 3
    assert engine.record_events(batch) == (0, 3) and len(embedded) == 3  # the retry embedded nothing
    new = EventInput("r3", "u", LIKE, "x", "review 3", None, T - 1.0)
    # New events with text, a repeat of one within the batch, an item-only event: only new texts are embedded.
    mixed = batch[:2] + [new, new._replace(text="another"), EventInput("l", "u", LIKE, "x", None, None, T - 2.0)]
    assert engine.record_events(mixed) == (2, 3)
    assert embedded[3:] == ["review 3"]
    (stored,) = [e for e in engine.store.user_events("u") if e.event_id == "r3"]
    expected = engine.catalog.vectors[engine.catalog.row_of["x"]] + fake_embed(["review 3"])[0]
    np.testing.assert_allclose(stored.vector, expected / np.linalg.norm(expected), atol=1e-6)


def erase_after_the_read(engine: InterestEngine, monkeypatch, user: str) -> None:
    """Another caller erases `user` between record_events' read of the events
    already stored and its commit."""
    read = engine.store.existing_event_ids

    def read_then_erase(ids):
        found = read(ids)
        monkeypatch.setattr(engine.store, "existing_event_ids", read)
        engine.delete_user(user)
        return found

    monkeypatch.setattr(engine.store, "existing_event_ids", read_then_erase)


def test_a_retry_that_an_erasure_overtakes_is_stored_whole_after_it(tmp_path, monkeypatch):
    """The re-sent events were found stored, so their texts were not embedded;
    erased before the commit, they are new again: embedded then, and the batch
    is stored whole after the erasure, as without the saving (a review saw half
    a batch stored, the erased half counted as duplicates)."""
    engine, embedded = _engine_counting_texts(tmp_path)
    batch = [EventInput(f"r{n}", "u", SEARCH, None, f"review {n}", None, T - 60.0 * n) for n in range(2)]
    engine.record_events(batch)
    erase_after_the_read(engine, monkeypatch, "u")
    batch.append(EventInput("n", "u", SEARCH, None, "a new review", None, T - 1.0))
    assert engine.record_events(batch) == (3, 0)
    assert sorted(e.event_id for e in engine.store.user_events("u")) == ["n", "r0", "r1"]
    assert embedded == ["review 0", "review 1", "a new review", "review 0", "review 1"]
    assert engine.profile("u", as_of=T).event_counts == open_engine(tmp_path).profile("u", as_of=T).event_counts


def test_a_repeat_stays_a_duplicate_when_an_erasure_overtakes_the_retry(tmp_path, monkeypatch):
    """The store keeps an id's first event: a review saw the repeat stored
    (the first, found stored, had been dropped), or the batch refused for the
    unknown item the repeat named."""
    engine, embedded = _engine_counting_texts(tmp_path)
    engine.upsert_items([ItemInput(id="x", text="x")])
    review = EventInput("e1", "u", LIKE, "x", "loved it", None, T - 60.0)
    engine.record_events([review])
    erase_after_the_read(engine, monkeypatch, "u")
    assert engine.record_events([review, review._replace(item_id="gone", text=None)]) == (1, 1)
    assert [(e.event_id, e.item_id, e.text) for e in engine.store.user_events("u")] == [("e1", "x", "loved it")]


def test_a_resent_event_of_a_gone_item_is_refused_when_an_erasure_overtakes_it(tmp_path, monkeypatch):
    """Found stored, it passed with a placeholder vector; erased before the
    commit, it was stored anew naming the deleted item (a review)."""
    engine, _ = _engine_counting_texts(tmp_path)
    engine.upsert_items([ItemInput(id="x", text="x")])
    liked = EventInput("e1", "u", LIKE, "x", None, None, T - 60.0)
    engine.record_events([liked])
    engine.delete_items(["x"])
    assert engine.record_events([liked]) == (0, 1)  # a duplicate, whatever item it names
    erase_after_the_read(engine, monkeypatch, "u")
    with pytest.raises(UnknownItemsError):  # erased first, it is new: its item must exist
        engine.record_events([liked])
    assert engine.store.user_events("u") == []


def change_x_after_every_read(engine: InterestEngine, monkeypatch) -> list:
    """Another caller updates item x (an update counts too) between each of
    record_events' reads of the items and its commit; returns the reads."""
    read, tries = engine._item_vectors, []

    def read_then_change(events):
        tries.append(1)
        out = read(events)
        engine.upsert_items([ItemInput(id="x", text=f"x, version {len(tries)}")])
        return out

    monkeypatch.setattr(engine, "_item_vectors", read_then_change)
    return tries


def test_an_erasure_overtaking_a_retry_uses_none_of_the_item_change_tries(tmp_path, monkeypatch):
    from halflife.interest.engine import RECORD_ATTEMPTS
    from halflife.storage.base import ItemsChangedError

    engine, _ = _engine_counting_texts(tmp_path)
    engine.upsert_items([ItemInput(id="x", text="x")])
    resent = EventInput("r0", "u", SEARCH, None, "a review", None, T - 60.0)
    engine.record_events([resent])
    erase_after_the_read(engine, monkeypatch, "u")
    tries = change_x_after_every_read(engine, monkeypatch)
    with pytest.raises(ItemsChangedError):
        engine.record_events([resent, EventInput("n", "u", LIKE, "x", None, None, T - 1.0)])
    assert len(tries) == 1 + RECORD_ATTEMPTS  # the erasure's try, then every item-change try


def test_an_unknown_item_is_named_at_its_place_in_the_batch_sent(tmp_path):
    """Events found stored are not embedded, but they keep their places: a
    review saw events[1] named for the unknown item of events[2]."""
    engine, _ = _engine_counting_texts(tmp_path)
    engine.upsert_items([ItemInput(id="x", text="x")])
    resent = EventInput("r0", "u", SEARCH, None, "a review", None, T - 60.0)
    engine.record_events([resent])
    with pytest.raises(UnknownItemsError) as refused:
        engine.record_events([resent, EventInput("n1", "u", LIKE, "x", None, None, T - 2.0),
                              EventInput("n2", "u", LIKE, "nope", None, None, T - 1.0)])
    assert refused.value.missing == [(2, "nope")]


def test_an_upsert_that_repeats_an_items_text_keeps_the_vector_its_model_embedded(tmp_path):
    """A re-sent upsert, or a catalogue re-synced whole, embedded every text
    again. Only what the same model embedded from the same text is kept."""
    engine, embedded = _engine_counting_texts(tmp_path, "model-a")
    given = np.eye(DIM, dtype=np.float32)[0]
    engine.upsert_items([ItemInput(id="a", text="red boots"), ItemInput(id="b", text="blue hat", vector=given)])
    assert embedded == ["red boots"]
    vector = engine.get_items(["a"])["a"].vector
    resync = [ItemInput(id="a", text="red boots", categories=("shoes",)), ItemInput(id="b", text="blue hat"),
              ItemInput(id="c", text="green scarf")]
    assert engine.upsert_items(resync) == (1, 2)
    assert embedded == ["red boots", "blue hat", "green scarf"]  # b's vector was given, not embedded: it is now
    stored = engine.get_items(["a", "b"])
    assert stored["a"].categories == ("shoes",) and stored["a"].vector.tobytes() == vector.tobytes()
    hat = fake_embed(["blue hat"])[0]
    np.testing.assert_allclose(stored["b"].vector, hat / np.linalg.norm(hat), atol=1e-6)
    engine.upsert_items([ItemInput(id="a", text="red leather boots")])  # a new text is embedded
    assert embedded[-1] == "red leather boots"
    engine.store.close()

    other, embedded = _engine_counting_texts(tmp_path, "model-b")  # another model: its own vectors
    other.upsert_items([ItemInput(id="c", text="green scarf")])
    assert embedded == ["green scarf"]
    other.store.close()
    unnamed, embedded = _engine_counting_texts(tmp_path)  # no identity: always embedded
    unnamed.upsert_items([ItemInput(id="c", text="green scarf")])
    unnamed.upsert_items([ItemInput(id="c", text="green scarf")])
    assert embedded == ["green scarf"] * 2


def test_an_upsert_of_the_same_text_still_repairs_a_damaged_item(tmp_path):
    """The read for vectors to keep met the damaged row and refused the upsert
    that would rewrite it (a review): it embeds then, as without the saving."""
    import sqlite3

    engine, _ = _engine_counting_texts(tmp_path, "model-a")
    engine.upsert_items([ItemInput(id="x", text="red boots", categories=("shoes",))])
    with sqlite3.connect(engine.store.path) as conn:
        conn.execute("UPDATE items SET categories = 'not json' WHERE id = 'x'")
    assert engine.upsert_items([ItemInput(id="x", text="red boots", categories=("boots",))]) == (0, 1)
    assert engine.store.get_items(["x"])["x"].categories == ("boots",)


def _engine_embedding_with(path, during_first_text):
    """An engine whose embedder runs `during_first_text(engine)` (another
    caller's catalogue write) the first time it embeds an event's text,
    between record_events' read of the items and its commit; and its calls."""
    calls = []

    def embed(texts, deadline=None):
        calls.append(list(texts))
        if texts == ["a review"] and sum(c == ["a review"] for c in calls) == 1:
            during_first_text(engine)
        return fake_embed(texts)

    engine = InterestEngine(Config(), SqliteStore(path), DIM, embed, clock=lambda: T)
    engine.upsert_items([ItemInput(id="x", text="old x"), ItemInput(id="y", text="y")])
    return engine, calls


def test_an_item_recreated_while_its_event_embeds_gives_the_event_the_new_items_vector(tmp_path):
    """The event committed after the new x: it counts for it, so it must carry
    its vector, as if sent after the re-creation. It carried the old x's
    (cosine 0.015 with the new x in an audit) while counting for the new one."""
    def recreate(engine):
        engine.delete_items(["x"])
        engine.upsert_items([ItemInput(id="x", text="new x")])

    engine, calls = _engine_embedding_with(tmp_path / "race", recreate)
    assert engine.record_events([EventInput("r", "u", LIKE, "x", "a review", None, T - 60)]) == (1, 0)
    assert calls.count(["a review"]) == 1  # the retry reads the items again, not the texts
    new_x = engine.catalog.vectors[engine.catalog.row_of["x"]]
    (stored,) = engine.store.user_events("u")
    expected = new_x + fake_embed(["a review"])[0]
    np.testing.assert_allclose(stored.vector, expected / np.linalg.norm(expected), atol=1e-6)

    serial, _ = _engine_embedding_with(tmp_path / "serial", lambda engine: None)
    recreate(serial)
    serial.record_events([EventInput("r", "u", LIKE, "x", "a review", None, T - 60)])
    scores = lambda e: [(i.item_id, round(i.score, 5)) for i in e.recommend("u", 2, as_of=T, include_seen=True).items]
    assert scores(engine) == scores(serial)
    assert cold_list(engine) == cold_list(serial)


def test_an_item_deleted_while_its_event_embeds_refuses_the_batch(tmp_path):
    engine, _ = _engine_embedding_with(tmp_path, lambda engine: engine.delete_items(["x"]))
    with pytest.raises(UnknownItemsError) as raised:
        engine.record_events([EventInput("r", "u", LIKE, "x", "a review", None, T - 60),
                              EventInput("s", "u", LIKE, "y", None, None, T - 60)])
    assert raised.value.missing == [(0, "x")]
    assert engine.store.user_events("u") == []


def test_items_changing_at_every_try_end_in_items_changed_after_the_last(tmp_path, monkeypatch):
    from halflife.interest.engine import RECORD_ATTEMPTS
    from halflife.storage.base import ItemsChangedError

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id="x", text="x"), ItemInput(id="y", text="y")])
    tries = change_x_after_every_read(engine, monkeypatch)
    with pytest.raises(ItemsChangedError):
        engine.record_events([EventInput("r", "u", LIKE, "x", None, None, T - 60)])
    assert len(tries) == RECORD_ATTEMPTS
    assert engine.store.user_events("u") == []
    monkeypatch.undo()
    engine.record_events([EventInput("r", "u", LIKE, "y", None, None, T - 60)])  # other items: no retry needed
    assert [e.item_id for e in engine.store.user_events("u")] == ["y"]


@pytest.mark.parametrize("top_deleted", [False, True])
def test_an_item_rewritten_while_recommend_scores_is_ranked_and_explained_with_one_vector(tmp_path, monkeypatch,
                                                                                          top_deleted):
    """Upserted with a new text between the scan and the naming, a pick was
    scored with its old vector and explained (its score's parts) with the
    new one: parts that no longer summed to its score (a race review); and
    a pick from past the first ones, taken when one of those was deleted
    meanwhile, went unchecked (a later review)."""
    from halflife.interest import blend as blend_module

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(8)])
    engine.record_events([EventInput("e1", "u", LIKE, "i0", None, None, T - 60)])
    before = [i.item_id for i in engine.recommend("u", 3, as_of=T).items]
    scan = blend_module.CatalogueScan.blend
    rewrites = []

    def then_rewrite(self, *args, **kwargs):
        scores = scan(self, *args, **kwargs)  # scored, the lock let go
        if not rewrites:
            if top_deleted:  # the top pick goes, and only those past the first three are rewritten
                engine.delete_items([before[0]])
            rewritten = [f"i{n}" for n in range(1, 8) if not top_deleted or f"i{n}" not in before]
            rewrites.append(engine.upsert_items([ItemInput(id=i, text=f"something else {i}") for i in rewritten]))
        return scores

    monkeypatch.setattr(blend_module.CatalogueScan, "blend", then_rewrite)
    racing = engine.recommend("u", 3, as_of=T, explain=True)
    assert rewrites
    for item in racing.items:
        assert sum(item.explanation.score_parts.values()) == pytest.approx(item.score, abs=1e-6), item
    monkeypatch.undo()
    assert [(i.item_id, i.score) for i in racing.items] == [(i.item_id, i.score) for i in
                                                            engine.recommend("u", 3, as_of=T, explain=True).items]


def test_an_upsert_that_grows_the_catalogue_allocates_without_the_lock(tmp_path, monkeypatch):
    """10k new items at ~100k held the lock 0.84 s, most of it the growth's
    first touch of its new arrays (a scaling review)."""
    from halflife.interest.catalog import CatalogIndex

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}", vector=np.eye(DIM, dtype=np.float32)[n % DIM])
                         for n in range(1000)])
    reserved, allocations = [], []
    reserve, reallocate = CatalogIndex.reserve, CatalogIndex._reallocate
    monkeypatch.setattr(CatalogIndex, "reserve",
                        lambda self, rows: reserved.append((rows, _lock_is_free(engine))) or reserve(self, rows))
    monkeypatch.setattr(CatalogIndex, "_reallocate", lambda self, *a: allocations.append(a) or reallocate(self, *a))
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}", vector=np.eye(DIM, dtype=np.float32)[n % DIM])
                         for n in range(990, 1100)])  # 100 new (past 1,024 rows), 10 updated
    assert reserved == [(100, True)] and allocations == []
    assert len(engine.catalog) == 1100 and engine.similar_items(item_id="i1099", limit=3).items


def test_cooccurrence_is_scored_without_the_lock(tmp_path, monkeypatch):
    """Under it, a user whose items many others share held every other call
    up: 30 ms at 2M pairs, 0.8 s under "jaccard" (a scaling review)."""
    from halflife.interest import engine as engine_module

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"kayak paddle {n % 5}") for n in range(20)])
    engine.record_events([EventInput(f"e{u}-{n}", f"u{u}", LIKE, f"i{(u + n) % 20}", None, None, T - 600.0 * n)
                          for u in range(6) for n in range(4)])
    free = []
    score = engine_module.cooccurrence_scores
    monkeypatch.setattr(engine_module, "cooccurrence_scores",
                        lambda *a, **k: free.append(_lock_is_free(engine)) or score(*a, **k))
    before = engine.recommend("u0", 5, as_of=T, explain=True)
    assert free and all(free)
    assert any(item.explanation.score_parts["cooccurrence"] > 0 for item in before.items)


def strongest(items: np.ndarray, events: np.ndarray, weights: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """explain.StrongestEvents' picks of `events` added at once, keyed by their order: (m, min(k, n)) indices."""
    from halflife.interest.explain import StrongestEvents

    best = StrongestEvents(items, k)
    best.add(events, weights, np.arange(len(events)), chunk=chunk)
    return best.keys


def _exactly_scored(rng) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A few items and events with coordinates of quarters, so that every
    product is exact and ties are exact, whatever the chunk: (items (m, 4),
    events (n, 4), weights (n,), each event's strength for each item (m, n))."""
    m, n = int(rng.integers(1, 12)), int(rng.integers(1, 50))
    items = rng.choice([0.0, 0.25, 0.5], size=(m, 4)).astype(np.float32)
    events = rng.choice([0.0, 0.25, 0.5], size=(n, 4)).astype(np.float32)
    weights = rng.choice([0.5, 1.0, 2.0], n)
    return items, events, weights, weights * np.maximum(items @ events.T, 0)


def test_an_explanation_names_at_most_three_interests_and_events_numbered_as_the_profile_lists_them():
    """docs/interest.md: an explanation names the interests an item matches
    (numbered strongest first, as GetProfile lists them) and up to three
    events that weigh most; a user without events (or a chunk without any) has none."""
    from halflife.interest.explain import explanations, ranked_interests
    from halflife.storage.base import EventRecord

    assert ranked_interests(np.array([0.2, 0.5, 0.0, 0.3])).tolist() == [1, 3, 0]
    item = np.full((1, 8), 8 ** -0.5, dtype=np.float32)  # every interest and event points towards it
    centroids = (np.eye(8, dtype=np.float32) + 1) / np.sqrt(np.float32(12))
    shares = np.arange(1, 9, dtype=np.float64)[::-1] / 36  # interest 0 the strongest
    labels = [(f"label{c}",) for c in range(8)]
    events = [EventRecord(f"e{n}", "u", 1, f"i{n}", None, None, 100.0 + n, centroids[n], seq=n) for n in range(6)]
    weights = np.array([1.0, 6.0, 2.0, 5.0, 3.0, 4.0])
    (one,) = explanations(item, {"interest": np.array([0.5])}, shares, centroids, labels,
                          [([], np.zeros(0)), (events[:4], weights[:4]), (events[4:], weights[4:])])
    assert [i.interest_id for i in one.interests] == [0, 1, 2] and one.interests[0].labels == ("label0",)
    assert [e.event_id for e in one.events] == ["e1", "e3", "e5"]
    assert one.score_parts == {"interest": 0.5}
    (alone,) = explanations(item, {"interest": np.array([0.5])}, shares, centroids, labels, [])
    assert alone.events == () and len(alone.interests) == 3
    # Events both weighing and pointing towards the item above 0, a light one included; not one at 90°, nor
    # one weighing 0 (a kernel past its reach).
    axis = np.eye(8, dtype=np.float32)
    light, across, spent = (EventRecord(f"e{n}", "u", 1, f"i{n}", None, None, 100.0, axis[n % 2], seq=n)
                            for n in (0, 1, 2))
    chunk = ([light, across, spent], np.array([0.5, 2.0, 0.0]))
    (towards,) = explanations(axis[:1], {}, shares, centroids, labels, [chunk])
    assert [(e.event_id, e.weight) for e in towards.events] == [("e0", 0.5)]


def test_the_strongest_events_chunked_are_those_of_one_stable_sort():
    """Explanations pick each item's strongest events a chunk of events at a
    time (all at once, 1,000 items by 100k events took 1.3 GB): the same
    events as one stable sort of all, ties by event order. Coordinates of
    quarters keep every product exact, whatever the chunk, so ties are exact."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        items, events, weights, strength = _exactly_scored(rng)
        k, chunk = int(rng.integers(1, 5)), int(rng.integers(1, 12))
        expected = np.argsort(-strength, kind="stable", axis=1)[:, :k]
        np.testing.assert_array_equal(strongest(items, events, weights, k, chunk=chunk), expected,
                                      err_msg=f"trial {trial}")


def test_the_strongest_events_of_a_log_added_in_chunks_in_any_order_are_those_of_one_stable_sort_by_key():
    """An explanation reads the log a chunk at a time by event time, where
    the picks tie by seq (as they did when it read the whole log in seq
    order): a late event comes after later-stamped ones with greater seqs,
    and under a kernel with an offset events of different times weigh
    alike. Coordinates of quarters keep every product exact: ties are exact."""
    from halflife.interest.explain import StrongestEvents

    rng = np.random.default_rng(4)
    for trial in range(200):
        items, events, weights, strength = _exactly_scored(rng)
        n = len(events)
        seqs = rng.permutation(n) + 1
        k = int(rng.integers(1, 5))
        expected = seqs[np.lexsort((np.broadcast_to(seqs, strength.shape), -strength), axis=1)[:, :k]]
        best = StrongestEvents(items, k)
        order = rng.permutation(n)  # the read's order
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(0, 6))), replace=False))
        for part in np.split(order, cuts):
            best.add(events[part], weights[part], seqs[part], chunk=int(rng.integers(1, 12)))
        np.testing.assert_array_equal(best.keys, expected, err_msg=f"trial {trial}")


def test_explanations_read_the_log_and_score_its_events_without_the_lock(tmp_path, monkeypatch):
    """A user of 100k events at limit 1,000 held every other call up for 8.7 s."""
    from halflife.interest import explain

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"kayak paddle {n % 5}") for n in range(20)])
    engine.record_events([EventInput(f"a{n}", "u", LIKE, f"i{n % 7}", None, None, T - 600.0 * (30 - n))
                          for n in range(30)])
    free = []
    add = explain.StrongestEvents.add
    monkeypatch.setattr(explain.StrongestEvents, "add",
                        lambda *a, **k: free.append(_lock_is_free(engine)) or add(*a, **k))
    read = engine.store.user_history
    monkeypatch.setattr(engine.store, "user_history",
                        lambda user, **options: free.append(_lock_is_free(engine)) or read(user, **options))
    items = engine.recommend("u", 5, as_of=T, explain=True).items
    assert free and all(free)
    for item in items:
        events = item.explanation.events
        assert len(events) == explain.EXPLAINED_EVENTS
        strengths = [e.weight * max(e.similarity, 0) for e in events]
        assert strengths == sorted(strengths, reverse=True)


def test_reads_for_users_without_events_cache_nothing_and_evict_no_profile(tmp_path):
    engine = InterestEngine(Config(profile=dataclasses.replace(Config().profile, cache_users=2)), SqliteStore(tmp_path),
                            DIM, fake_embed, clock=lambda: T)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"sailing gear {n}") for n in range(6)])
    engine.record_events([EventInput(f"{u}{n}", u, LIKE, f"i{n}", None, None, T - 600.0 * n)
                          for u in ("alice", "bob") for n in range(3)])
    before = engine.recommend("alice", 3, as_of=T), engine.recommend("bob", 3, as_of=T)
    assert set(engine._users) == {"alice", "bob"}
    for n in range(20):  # new visitors
        assert engine.recommend(f"visitor{n}", 3, as_of=T).strategy == "trending"
        assert engine.profile(f"visitor-p{n}", as_of=T).interests == ()
    assert set(engine._users) == {"alice", "bob"}  # still cached: no replay needed
    assert (engine.recommend("alice", 3, as_of=T), engine.recommend("bob", 3, as_of=T)) == before
    engine.record_events([EventInput("v", "visitor0", LIKE, "i5", None, None, T - 60)])
    assert engine.recommend("visitor0", 3, as_of=T).strategy == "personalized"


def test_long_replays_run_one_at_a_time_and_short_ones_never_wait_for_them(tmp_path, monkeypatch):
    """Concurrent replays convoy on the GIL: 8 of 5k events at once took 3.5x
    as long as one after another on 2 cores, and starved the other calls."""
    import threading

    from halflife.interest import engine as engine_module

    monkeypatch.setattr(engine_module, "LONG_REPLAY_EVENTS", 4)
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"climbing rope {n}") for n in range(6)])
    engine.record_events([EventInput(f"{u}{n}", u, LIKE, f"i{n}", None, None, T - 600.0 * (n + 1))
                          for u, count in (("long", 6), ("short", 2)) for n in range(count)])
    engine._users.clear()

    def waits_for_the_long_replay(user, as_of=T, patience=0.5) -> bool:
        """Reads `user`'s profile while another long replay runs; whether it
        waited for it (was not done within `patience` seconds)."""
        done = []
        with engine._long_replay:
            reader = threading.Thread(target=lambda: done.append(engine.profile(user, as_of=as_of).event_counts))
            reader.start()
            reader.join(patience)
            waited = not done
        reader.join(10)
        assert done and not reader.is_alive()
        return waited

    # A read expected not to wait gets all the time a slow machine needs: it ends as soon as it is done.
    assert not waits_for_the_long_replay("short", patience=30)
    assert waits_for_the_long_replay("long")  # a miss
    assert waits_for_the_long_replay("long", as_of=T - 1800.0)  # a look into the past


@pytest.mark.parametrize("read", ["look into the past", "explanation"])
def test_a_long_read_of_the_log_waits_its_turn_and_not_for_a_caller_gone(tmp_path, monkeypatch, read):
    """16 concurrent looks back at a 100k-event user each held a copy of the
    log while they waited their turn (past 6 GiB), and callers gone at their
    deadline left ~50 s of replays behind them (a resource audit); 8
    concurrent explained Recommends of a 50k-event user each held a copy at
    once, +1.5 GB (a scaling review)."""
    import threading
    import time

    from halflife.deadlines import Deadline, DeadlineExpiredError
    from halflife.interest import engine as engine_module

    monkeypatch.setattr(engine_module, "LONG_REPLAY_EVENTS", 4)
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"climbing rope {n}") for n in range(8)])
    engine.record_events([EventInput(f"e{n}", "long", LIKE, f"i{n}", None, None, T - 600.0 * (n + 1)) for n in range(6)])
    engine.recommend("long", 2, as_of=T)  # cached: what follows is the long read alone
    reads = []
    read_log = engine.store.user_history  # an explanation's read, a look into the past's
    monkeypatch.setattr(engine.store, "user_history", lambda user, **options: reads.append(user)
                        or read_log(user, **options))
    calls = {
        "look into the past": lambda deadline: engine.profile("long", as_of=T - 1800.0, deadline=deadline),
        "explanation": lambda deadline: engine.recommend("long", 2, as_of=T, explain=True, deadline=deadline),
    }
    outcome = []

    def call(deadline):
        try:
            outcome.append(calls[read](deadline))
        except DeadlineExpiredError:
            outcome.append("expired")

    with engine._long_replay:  # another long replay runs, and runs on
        waiting = threading.Thread(target=call, args=(Deadline(time.monotonic() + 1.0),))
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive() and reads == []  # waits its turn without the log in hand
        waiting.join(10)  # ... and not past its caller's deadline: the thread is free again
        assert outcome == ["expired"] and reads == []  # never read, never replayed
    call(None)
    assert reads == ["long"]
    if read == "look into the past":
        assert sum(outcome[-1].event_counts.values()) == 4  # the 4 events up to T - 1800 s
    else:
        assert all(item.explanation.events for item in outcome[-1].items)


def test_a_kernel_read_of_a_long_log_waits_its_turn_when_its_profile_is_not_cached(tmp_path, monkeypatch):
    """The turn went by the cached profile's count: a user evicted between
    the caller's caching and this read (a small cache_users) counted 0
    events and read a log of any length at once."""
    import threading

    from halflife.interest import engine as engine_module

    monkeypatch.setattr(engine_module, "LONG_REPLAY_EVENTS", 4)
    config = Config(profile=dataclasses.replace(Config().profile, kernel="exp"))
    engine = InterestEngine(config, SqliteStore(tmp_path), DIM, fake_embed, clock=lambda: T)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"rain jacket {n}") for n in range(6)])
    engine.record_events([EventInput(f"e{n}", "long", LIKE, f"i{n}", None, None, T - 600.0 * (n + 1)) for n in range(6)])
    engine._users.clear()
    done = []
    with engine._long_replay:  # another long read runs
        reader = threading.Thread(target=lambda: done.append(engine._kernel_profile("long", T)))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive() and not done
    reader.join(10)
    assert done and done[0].weight > 0


def test_concurrent_misses_of_one_user_read_the_log_once(tmp_path, monkeypatch):
    """Each of 16 concurrent misses of a 100k-event user would hold a copy of
    its log: a second caller waits for the replay in flight instead, and
    not past its own deadline."""
    import threading
    import time

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"tent stake {n}") for n in range(4)])
    engine.record_events([EventInput(f"e{n}", "u", LIKE, f"i{n}", None, None, T - 600.0 * (n + 1)) for n in range(4)])
    expected = engine.profile("u", as_of=T).event_counts
    engine._users.clear()  # a miss, as after a restart
    reads, outcome = [], []
    read_history = engine.store.user_history
    monkeypatch.setattr(engine.store, "user_history",
                        lambda user, **options: reads.append(user) or read_history(user, **options))

    def second(deadline=None):
        try:
            outcome.append(engine.profile("u", as_of=T, deadline=deadline).event_counts)
        except DeadlineExpiredError:
            outcome.append("expired")

    def meanwhile(deadline):
        """Starts a second caller while the first replays; returns once it
        read the log (the fault) or has waited 0.5 s for the first."""
        caller = threading.Thread(target=second, args=(deadline,))
        caller.start()
        began = time.monotonic()
        while len(reads) < 2 and time.monotonic() - began < 0.5:
            time.sleep(0.01)
        return caller

    for deadline, want in ((None, expected), (Deadline(time.monotonic() + 0.1), "expired")):
        engine._users.clear()
        reads.clear()
        outcome.clear()
        started = _during_replay(engine, monkeypatch, lambda: meanwhile(deadline))
        assert engine.profile("u", as_of=T).event_counts == expected
        started[0].join(10)
        assert reads == ["u"] and outcome == [want]
        monkeypatch.setattr(engine._builder, "build", type(engine._builder).build.__get__(engine._builder))


def test_when_the_replay_misses_wait_for_fails_they_wait_for_one_replay_again(tmp_path, monkeypatch):
    """Waiters woken by a replay that raised each read the log (an audit: 8
    copies held at once): one of them replays, the others wait for it."""
    import threading
    import time

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"canoe paddle {n}") for n in range(4)])
    engine.record_events([EventInput(f"e{n}", "u", LIKE, f"i{n}", None, None, T - 600.0 * (n + 1)) for n in range(4)])
    expected = engine.profile("u", as_of=T).event_counts
    engine._users.clear()
    reads, outcome = [], []
    read_history = engine.store.user_history

    def slow_reads(user, **options):
        """The first read fails once 4 more misses had time to arrive; each read is slow."""
        reads.append(user)
        time.sleep(0.3)
        if len(reads) == 1:
            raise StoreError("disk I/O error")
        return read_history(user, **options)

    monkeypatch.setattr(engine.store, "user_history", slow_reads)

    def read():
        try:
            outcome.append(engine.profile("u", as_of=T).event_counts)
        except StoreError:
            outcome.append("failed")

    callers = [threading.Thread(target=read)]
    callers[0].start()
    while not reads:
        time.sleep(0.01)
    callers += [threading.Thread(target=read) for _ in range(4)]
    for caller in callers[1:]:
        caller.start()
    for caller in callers:
        caller.join(30)
    assert len(reads) == 2 and sorted(map(str, outcome)) == sorted(map(str, ["failed"] + [expected] * 4))


def test_a_cached_profiles_derived_rows_follow_every_catalogue_change_and_event(tmp_path):
    """Seen rows and affinity columns are kept with the profile (a 10k-event
    user's Recommend took 3.9 ms rebuilding them, 1.5 kept): each step below
    must answer as a restart over the same store."""
    engine = open_engine(tmp_path / "live")
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"hiking boot {n % 3}") for n in range(8)])
    engine.record_events([EventInput(f"b{n}", "bob", LIKE, f"i{n}", None, None, T - 600.0 * (n + 1)) for n in range(8)])
    engine.record_events([EventInput(f"a{n}", "alice", LIKE, f"i{n}", None, None, T - 700.0 * (n + 1))
                          for n in range(3)])

    def answer(e: InterestEngine) -> list:
        return [(i.item_id, round(i.score, 6)) for i in e.recommend("alice", 8, as_of=T).items]

    steps = [
        lambda: None,
        lambda: engine.delete_items(["i1"]),  # seen, gone
        lambda: engine.upsert_items([ItemInput(id="i1", text="hiking boot 1")]),  # a namesake: not seen
        lambda: engine.upsert_items([ItemInput(id="i9", text="hiking boot 9")]),  # the catalogue grows
        lambda: engine.record_events([EventInput("a9", "alice", LIKE, "i9", None, None, T - 60)]),
        lambda: engine.delete_items(["i0"]),
    ]
    for n, step in enumerate(steps):
        step()
        live = answer(engine)
        restart = open_engine(tmp_path / "live")
        assert live == answer(restart), n
        restart.store.close()
    assert "alice" in engine._users and engine._users["alice"].derived  # kept, not rebuilt per call
    engine.store.close()


def test_explanations_name_only_interests_and_events_pointing_towards_the_item(tmp_path):
    """An item opposite the user's only interest listed that interest and the
    event as its 'most responsible', with similarity -1 (an audit): what
    points away from an item, or across it, did not produce it."""
    engine = open_engine(tmp_path)
    axes = np.eye(DIM, dtype=np.float32)
    engine.upsert_items([ItemInput(id="toward", text="", vector=axes[0]), ItemInput(id="across", text="", vector=axes[1]),
                         ItemInput(id="away", text="", vector=-axes[0])])
    engine.record_events([EventInput("liked", "u", LIKE, "toward", None, None, T - DAY)])
    explained = {item.item_id: item.explanation
                 for item in engine.recommend("u", 3, as_of=T, include_seen=True, explain=True).items}
    assert [e.event_id for e in explained["toward"].events] == ["liked"]
    assert [c.similarity for c in explained["toward"].interests] == [pytest.approx(1.0)]
    for item_id in ("across", "away"):
        assert explained[item_id].events == () and explained[item_id].interests == ()
        assert explained[item_id].score_parts["interest"] <= 0  # still said, in the score's parts


def test_a_category_repeated_in_an_item_counts_once(tmp_path):
    """The gRPC layer drops repeats, but a library caller's reach the engine:
    a category's mean (its label direction) counted the item twice."""
    vector = np.zeros(DIM, dtype=np.float32)
    vector[0] = 1.0
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id="a", text="a", categories=("x", "y", "x"), vector=vector),
                         ItemInput(id="b", text="b", categories=("x",), vector=-vector)])
    assert engine.get_items(["a"])["a"].categories == ("x", "y")
    for reopened in (engine, open_engine(tmp_path)):
        np.testing.assert_allclose(reopened.catalog.mean("x"), np.zeros(DIM), atol=1e-7)
    # Records stored with the repeat (before the engine dropped repeats) count it once too.
    store = SqliteStore(tmp_path / "old")
    store.upsert_items([ItemRecord("a", "a", ("x", "y", "x"), {}, None, vector),
                        ItemRecord("b", "b", ("x",), {}, None, -vector)])
    store.close()
    np.testing.assert_allclose(open_engine(tmp_path / "old").catalog.mean("x"), np.zeros(DIM), atol=1e-7)


@pytest.mark.parametrize("mode", ["multi", "single"])
def test_an_interest_ranks_alike_however_long_ago_its_events_were(tmp_path, mode):
    """~1,070 half-lives after a user's views and skip (7 days each: 20
    years; a 1-minute half-life: 18 hours) their strengths are near
    float64's floor, and slower types (a year) have no events: the interest
    signal, a share-weighted cosine, had shrunk to nothing there and the
    labels and the skip's direction had turned to noise, while the user
    still got a personalised list. Once the views decayed to 0 in float64,
    Recommend goes trending and GetProfile lists no interests, alike."""
    VIEW, SKIP, half_life = 1, 11, 7 * DAY
    start = T - 1070 * half_life
    config = Config()
    config = dataclasses.replace(config, profile=dataclasses.replace(config.profile, mode=mode))
    engine = InterestEngine(config, SqliteStore(tmp_path), DIM, fake_embed, clock=lambda: T)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}", categories=(f"c{n % 3}",)) for n in range(30)])
    engine.record_events([EventInput(f"e{n}", "u", VIEW, f"i{n}", None, None, start + n) for n in range(3)]
                         + [EventInput("s", "u", SKIP, "i3", None, None, start + 3)])
    reads = {}
    for label, as_of in (("near", start + 10 * half_life), ("far", T), ("gone", start + 1100 * half_life)):
        result = engine.recommend("u", 5, as_of=as_of, explain=True)
        parts = [(i.item_id, round(i.explanation.score_parts.get("interest", 0), 5),
                  round(i.explanation.score_parts.get("negative", 0), 5))
                 for i in result.items]
        reads[label] = (result.strategy, parts, [(round(i.share, 6), i.labels) for i in engine.profile("u", as_of=as_of).interests])
    assert reads["far"][0] == "personalized" and any(negative for _, _, negative in reads["far"][1])
    assert reads["far"] == reads["near"]
    assert reads["gone"][0] == "trending" and reads["gone"][2] == []


def test_a_dislike_sinks_items_by_its_share_of_the_decayed_weight(tmp_path):
    """The negative term is β × fade × cosine, fade the negative side's
    share of the decayed weight over `negative_full_share`, at most 1: a
    dislike two years old (8 of its 90-day half-lives) beside a like of an
    hour ago sinks the disliked item's twin by a fraction of β, not, as it
    did before, by the full β as if it were new."""
    DISLIKE = 10
    config = Config()
    engine = InterestEngine(config, SqliteStore(tmp_path), DIM, fake_embed, clock=lambda: T)
    liked, other = fake_embed(["liked thing", "something else"])
    twin = (-liked + 0.5 * other) / np.linalg.norm(-liked + 0.5 * other)
    engine.upsert_items([ItemInput(id="liked", text="", vector=liked), ItemInput(id="disliked", text="", vector=-liked),
                         ItemInput(id="twin", text="", vector=twin)])
    ages = {"fresh": 3600.0, "stale": 2 * 365 * DAY}
    engine.record_events([e for user, age in ages.items() for e in (
        EventInput(f"{user}-like", user, LIKE, "liked", None, None, T - 3600),
        EventInput(f"{user}-dislike", user, DISLIKE, "disliked", None, None, T - age))])
    like, dislike = config.event_types["like"], config.event_types["dislike"]
    total = config.blend.interest + config.blend.cooccurrence + config.blend.popularity
    cosine = float(twin @ -liked)
    for user, age in ages.items():
        negative = -dislike.weight * 2 ** (-age / (dislike.half_life_days * DAY))
        share = negative / (negative + like.weight * 2 ** (-3600 / (like.half_life_days * DAY)))
        fade = min(1.0, share / config.profile.negative_full_share)
        (item,) = engine.recommend(user, 1, as_of=T, explain=True, filter=ItemFilter(exclude_item_ids=("liked", "disliked"))).items
        expected = -config.blend.interest / total * config.profile.negative_weight * fade * cosine
        assert item.explanation.score_parts["negative"] == pytest.approx(expected, rel=1e-4)
        assert (fade < 0.5) if user == "stale" else (fade == 1.0)


def test_an_explanations_strongest_events_do_not_depend_on_the_chunks_they_were_scored_in():
    """Identical events (one item viewed again and again) tie, and ties go
    by event order; a GEMM's rounding depends on where a column sits, so in
    another chunk an identical event scored one ulp apart and jumped the
    queue (for users of over 4,096 events: a review)."""
    from halflife.core.ranking import normalize

    rng = np.random.default_rng(5)
    distinct = normalize(rng.normal(size=(5, 384)))
    events = distinct[rng.integers(0, 5, size=40)]
    items = normalize(rng.normal(size=(50, 384)))
    weights = np.ones(40)
    whole = strongest(items, events, weights, 3)
    for chunk in (1, 3, 7, 16):
        np.testing.assert_array_equal(strongest(items, events, weights, 3, chunk=chunk), whole)
    # Within one chunk too: a GEMM's tail columns round apart from the others (a review: 66 in 300 picked late ones).
    for m, n in ((38, 155), (1, 30), (7, 300)):
        for dtype in (np.float32, np.float64):
            same = np.tile(distinct[0].astype(dtype), (n, 1))
            picked = strongest(normalize(rng.normal(size=(m, 384)), dtype=dtype), same, np.ones(n), 3)
            assert (picked == [0, 1, 2]).all(), (m, n, dtype, picked[:3])


def test_a_users_events_committed_right_after_their_erasure_keep_their_pairs(tmp_path):
    """A batch of the user's queued behind DeleteUser commits with it (group
    commit), after it. DeleteUser applied that batch, then dropped the
    user's co-occurrence row with its pairs: the events stayed stored and
    counted, but paired with nothing until a restart (a race review)."""
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(6)])
    engine.record_events([EventInput(f"v{n}", "v", LIKE, f"i{n}", None, None, T - 100 + n) for n in range(3)])
    engine.record_events([EventInput("u0", "u", LIKE, "i0", None, None, T - 50),
                          EventInput("u1", "u", LIKE, "i3", None, None, T - 40)])
    store_record, store_delete = engine.store.record_events, engine.store.delete_user
    entered, erased, recorded = threading.Event(), threading.Event(), threading.Event()

    def record_after_the_erasure(*args, **kwargs):  # the later batch's commit lands after the erasure's
        entered.set()
        assert erased.wait(10)
        try:
            return store_record(*args, **kwargs)
        finally:
            recorded.set()

    def erase_then_let_it_commit(*args, **kwargs):
        deleted = store_delete(*args, **kwargs)
        erased.set()
        assert recorded.wait(10)
        return deleted

    engine.store.record_events, engine.store.delete_user = record_after_the_erasure, erase_then_let_it_commit
    later = threading.Thread(target=engine.record_events, args=(
        [EventInput("u-new", "u", LIKE, "i1", None, None, T - 10), EventInput("u-new2", "u", LIKE, "i2", None, None, T - 5)],))
    later.start()
    assert entered.wait(10)  # its items read: the erasure takes the lock after that
    assert engine.delete_user("u") == 2
    later.join(10)
    engine.store.record_events, engine.store.delete_user = store_record, store_delete
    restarted = open_engine(tmp_path)
    for user in ("u", "v"):
        live, again = engine.signals(user, T), restarted.signals(user, T)
        for name in ("cooccurrence", "popularity"):
            np.testing.assert_allclose(live[name], again[name], atol=1e-6)
    assert len(engine._blend.cooccurrence) == len(restarted._blend.cooccurrence)


def _during_the_erasure(engine: InterestEngine, monkeypatch, call, at: str) -> None:
    """Runs `call` on another thread while delete_user erases without the
    lock, once it has read the user's log (at="read") or once the store has
    deleted it (at="deleted"): it must finish meanwhile (the store's delete
    under the lock held up every other call 2.8 s for a user of 1M events)."""
    name = {"read": "iter_events", "deleted": "delete_user"}[at]
    original = getattr(engine.store, name)

    def then_call(*args, **kwargs):
        result = original(*args, **kwargs)
        if name == "iter_events":
            result = list(result)
        monkeypatch.setattr(engine.store, name, original)  # the first call only
        errors = run_in_threads(1, lambda step: call())
        assert not errors, errors
        return result

    monkeypatch.setattr(engine.store, name, then_call)


def _assert_as_restarted(engine: InterestEngine, path, users=("u", "v")) -> None:
    """The engine's popularity, pairs and profiles of `users` are what a restart over the store builds."""
    again = open_engine(path)
    np.testing.assert_allclose(engine.popularity(T), again.popularity(T), atol=1e-6)
    assert len(engine._blend.cooccurrence) == len(again._blend.cooccurrence)
    for user in users:
        live, restarted = engine.signals(user, T), again.signals(user, T)
        assert (live is None) == (restarted is None)
        for name in () if live is None else ("cooccurrence", "popularity"):
            np.testing.assert_allclose(live[name], restarted[name], atol=1e-6)
        assert engine.profile(user, as_of=T).event_counts == again.profile(user, as_of=T).event_counts
    again.store.close()


def _users_u_and_v(path) -> InterestEngine:
    engine = open_engine(path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(8)])
    engine.record_events([EventInput(f"v{n}", "v", LIKE, f"i{n}", None, None, T - 100 + n) for n in range(3)]
                         + [EventInput(f"u{n}", "u", LIKE, f"i{n % 2}", None, None, T - 50 + n) for n in range(4)])
    engine.recommend("u", 3, as_of=T)  # u's profile cached
    return engine


@pytest.mark.parametrize("at", ["read", "deleted"])
def test_calls_go_on_during_an_erasure_and_it_ends_as_a_restart_would(tmp_path, monkeypatch, at):
    """The user's events recorded meanwhile go with the erasure where they
    commit before the store's delete, and stay, paired and counted, after it."""
    engine = _users_u_and_v(tmp_path)

    def meanwhile():
        engine.record_events([EventInput(f"late{n}", "u", LIKE, "i4", None, None, T - 10 + n) for n in range(2)]
                             + [EventInput("v-late", "v", LIKE, "i5", None, None, T - 5)])
        engine.recommend("v", 5, as_of=T)
        engine.recommend("u", 5, as_of=T)
        engine.profile("u", as_of=T)

    _during_the_erasure(engine, monkeypatch, meanwhile, at)
    assert engine.delete_user("u") == {"read": 6, "deleted": 4}[at]
    assert engine.profile("u", as_of=T).event_counts == {"read": {}, "deleted": {LIKE: 2}}[at]
    _assert_as_restarted(engine, tmp_path)


def test_a_user_who_records_during_their_erasure_keeps_their_place_among_the_users_numbered_meanwhile(
        tmp_path, monkeypatch):
    """u's batch commits after the store's delete, then y's, both while the
    erasure runs: u's events stay, and a restart (every other worker) numbers
    u before y. u was numbered only as the erasure ended, after y, so with
    max_co_users = 1 item a spoke through u live and y after a restart (a
    race review)."""
    from halflife.core import cooccurrence

    monkeypatch.setattr(cooccurrence, "_MIN_MERGE", 1)

    engine = _engine_with_blend(tmp_path, max_co_users=1)
    engine.upsert_items([ItemInput(id=i, text=f"thing {i}") for i in ("a", "b", "c", "d")])
    engine.record_events([EventInput("q0", "q", LIKE, "a", None, None, T - 100),
                          EventInput("u0", "u", LIKE, "d", None, None, T - 90)])

    def meanwhile():
        engine.record_events([EventInput("u1", "u", LIKE, "a", None, None, T - 50),
                              EventInput("u2", "u", LIKE, "b", None, None, T - 49)])
        engine.record_events([EventInput("y1", "y", LIKE, "a", None, None, T - 40),
                              EventInput("y2", "y", LIKE, "c", None, None, T - 39)])

    _during_the_erasure(engine, monkeypatch, meanwhile, "deleted")
    assert engine.delete_user("u") == 1
    live = _cooccurrence_parts(engine, "q")
    engine.store.close()
    restarted = _cooccurrence_parts(_engine_with_blend(tmp_path, max_co_users=1), "q")
    assert restarted["c"] > 0 and restarted["b"] == 0.0  # y came last: a's newest user
    assert live == restarted


def test_an_erasure_of_the_user_during_anothers_waits_and_takes_nothing_back_twice(tmp_path, monkeypatch):
    engine = _users_u_and_v(tmp_path)
    from halflife import deadlines

    waiting, wait = threading.Event(), deadlines.wait
    monkeypatch.setattr(deadlines, "wait", lambda event, deadline: waiting.set() or wait(event, deadline))
    second, read = [], engine.store.iter_events

    def read_then_erase_again(*args, **kwargs):  # the second erasure begins after the first read the log
        monkeypatch.setattr(engine.store, "iter_events", read)
        chunks = list(read(*args, **kwargs))
        thread = threading.Thread(target=lambda: second.append(engine.delete_user("u")))
        thread.start()
        assert waiting.wait(10), "a second erasure of the user did not wait for the first"
        second.append(thread)
        return iter(chunks)

    monkeypatch.setattr(engine.store, "iter_events", read_then_erase_again)
    assert engine.delete_user("u") == 4
    second[0].join(10)
    assert second[1:] == [0]
    _assert_as_restarted(engine, tmp_path)


def test_a_failed_erasure_applies_the_users_events_it_passed_over(tmp_path, monkeypatch):
    engine = _users_u_and_v(tmp_path)

    def record_then_fail(user_id, guard=None):
        errors = run_in_threads(1, lambda step: engine.record_events(
            [EventInput(f"late{n}", "u", LIKE, "i4", None, None, T - 10 + n) for n in range(2)]))
        assert not errors, errors
        raise StoreError("database or disk is full")

    monkeypatch.setattr(engine.store, "delete_user", record_then_fail)
    with pytest.raises(StoreError):
        engine.delete_user("u")
    assert engine.profile("u", as_of=T).event_counts == {LIKE: 6}
    _assert_as_restarted(engine, tmp_path)


def test_a_store_read_failing_as_an_erasure_ends_still_forgets_what_the_store_erased(tmp_path, monkeypatch):
    """The erasure's end reads the store (its head, the log) before it takes
    back what it had counted: a read that raised there left the erased
    user's popularity, pairs and cached profile served after the store had
    erased them, and a DeleteUser tried again, finding nothing left to
    erase, took nothing back (a race review)."""
    engine = _users_u_and_v(tmp_path)
    reads_fail_after_an_erasure(engine.store, monkeypatch)
    with pytest.raises(StoreError):
        engine.delete_user("u")
    monkeypatch.undo()
    assert not engine._erasing
    assert engine.delete_user("u") == 0  # the client's retry
    _assert_as_restarted(engine, tmp_path)


def test_an_explanation_is_of_the_profile_its_list_was_ranked_for(tmp_path, monkeypatch):
    """Explanations are built after the ranking, without the lock: they read
    the cached profile and the log again, so events recorded in between
    (and applied by another read) explained a list they had no part in (a
    race review)."""
    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(20)])
    engine.record_events([EventInput(f"a{n}", "u", LIKE, f"i{n}", None, None, T - 100 + n) for n in range(3)])
    before = engine.recommend("u", 3, as_of=T, explain=True)
    explain = engine._explain

    def meanwhile(*args, **kwargs):
        monkeypatch.setattr(engine, "_explain", explain)
        engine.record_events([EventInput(f"b{n}", "u", LIKE, f"i{n + 10}", None, None, T - 50 + n) for n in range(5)])
        engine.profile("u", as_of=T)  # applies them to the cached profile
        return explain(*args, **kwargs)

    monkeypatch.setattr(engine, "_explain", meanwhile)
    during = engine.recommend("u", 3, as_of=T, explain=True)
    assert during == before
    assert engine.recommend("u", 3, as_of=T, explain=True) != before  # the new events count from the next call


def test_a_cached_profile_written_to_and_not_read_holds_a_few_events_and_none_of_their_batches(tmp_path, monkeypatch):
    """Each event recorded for a cached user waited for the user's next read
    (UserState.pending), with its vector a row of its batch's matrix, which
    it held whole: 40k events to a user not read took +74 MB and a first read
    of 1.08 s under the lock (a soak). A profile applies them once
    MAX_PENDING_EVENTS wait, each with a vector of its own, and stays cached:
    its next read replays nothing (dropping it there made every read of a
    user written to steadily replay the log, a review)."""
    from halflife.interest.engine import MAX_PENDING_EVENTS

    engine = open_engine(tmp_path)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(60)])
    engine.record_events([EventInput("first", "u", LIKE, "i0", None, None, T - DAY)])
    engine.profile("u", as_of=T)  # cached from here on
    replays = []
    real_restore = engine._restore
    monkeypatch.setattr(engine, "_restore", lambda *args, **kwargs: replays.append(args[0]) or real_restore(*args, **kwargs))

    def record(first: int, count: int, others: int = 3) -> None:  # u's events, each among `others` of other users'
        engine.record_events([EventInput(f"e{n}-{k}", "u" if k == 0 else f"other{k}", LIKE, f"i{(7 * n + k) % 60}",
                                         None, None, T - DAY + 60 * n + k) for n in range(first, first + count)
                              for k in range(1 + others)])

    record(0, MAX_PENDING_EVENTS - 1)
    pending = engine._users["u"].pending
    assert len(pending) == MAX_PENDING_EVENTS - 1  # all of them wait for a read
    assert all(e.vector.base is None and e.vector.shape == (DIM,) for e in pending)  # not rows of the batch
    record(MAX_PENDING_EVENTS - 1, 1)
    assert engine._users["u"].pending == []  # the one that made them MAX_PENDING_EVENTS applied them all
    record(MAX_PENDING_EVENTS, 3 * MAX_PENDING_EVENTS + 5)
    assert len(engine._users["u"].pending) == 5 and MAX_PENDING_EVENTS < 100
    read = engine.profile("u", as_of=T, items_per_interest=3)
    assert replays == []  # applied from the cache, without a replay of the log
    restart = open_engine(tmp_path).profile("u", as_of=T, items_per_interest=3)
    assert read.event_counts == restart.event_counts == {LIKE: 1 + 4 * MAX_PENDING_EVENTS + 5}
    # Applied in steps, not at once: the sums may round differently in the last bit.
    assert [i.share for i in read.interests] == pytest.approx([i.share for i in restart.interests], rel=1e-12)
    assert [[item for item, _, _ in i.top_items] for i in read.interests] == [
        [item for item, _, _ in i.top_items] for i in restart.interests]
