"""Several engines on one store (`halflife serve --workers N`): each follows
the others' writes and answers as a single process that took them all would,
which is also what a restart over the store builds."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from halflife.config import Config
from halflife.interest.engine import InterestEngine
from halflife.interest.types import EventInput, ItemInput, UnknownItemsError
from halflife.interest.watermark import EventWatermark
from halflife.storage.base import StoreError, StoreHead
from halflife.storage.sqlite import SqliteStore
from tests.fakes import DIM, compact_catalogues_at, fake_embed, reads_fail_after_an_erasure, run_in_threads

DAY = 86400.0
T = 1_700_000_000.0
LIKE, RATE = 3, 6


def worker(path, follow: bool = True) -> InterestEngine:
    return InterestEngine(Config(), SqliteStore(path), DIM, fake_embed, clock=lambda: T, follow_store=follow)


def answers(engine: InterestEngine, users=("cold", "u0", "u1", "u2"), at: float = T) -> dict:
    """What the engine says to a few users at `at`: ids and scores of their recommendations."""
    return {
        user: [(item.item_id, round(item.score, 5)) for item in engine.recommend(user, 10, as_of=at).items]
        for user in users
    }


def restarted(path, users=("cold", "u0", "u1", "u2"), at: float = T) -> dict:
    engine = worker(path, follow=False)
    try:
        return answers(engine, users, at)
    finally:
        engine.store.close()


@pytest.fixture
def pair(tmp_path):
    a, b = worker(tmp_path), worker(tmp_path)
    yield a, b
    a.store.close()
    b.store.close()


def items(ids) -> list[ItemInput]:
    return [ItemInput(id=i, text=f"item {i}") for i in ids]


def likes(prefix: str, user: str, item_ids, hours_ago: float = 1.0) -> list[EventInput]:
    return [EventInput(f"{prefix}{n}", user, LIKE, i, None, None, T - hours_ago * 3600 - n) for n, i in enumerate(item_ids)]


def test_the_change_feed_keeps_one_row_per_item_and_names_no_user(tmp_path):
    store = SqliteStore(tmp_path)
    from tests.test_storage import event, item

    store.upsert_items([item("a"), item("b")])
    store.upsert_items([item("a")])
    store.delete_items(["b", "missing"])
    assert [(c.item_id, c.origin) for c in store.changes_since(0)] == [("a", store.origin), ("b", store.origin)]
    store.record_events([event("e1", "alice"), event("e2", "bob")])
    store.delete_user("alice")
    store.delete_user("bob")
    store.delete_user("nobody")  # erased nothing: no entry
    changes = store.changes_since(0)
    assert [c.item_id for c in changes] == ["a", "b", None]  # one erasure row for this writer
    assert store.head() == StoreHead(event_seq=2, change_version=changes[-1].version)
    assert store.changes_since(changes[-1].version) == []
    store.record_events([event("e3", "carol"), event("e4", "dave")])
    assert [e.event_id for e in store.events_between(2, 3)] == ["e3"]
    assert [c.seqs.tolist() for c in store.iter_events(through_seq=3)] == [[3]]
    store.close()


def feed_rows(path) -> list:
    with SqliteStore(path) as store:
        return [c.item_id for c in store.changes_since(0)]


def churned_store(path, dim: int = DIM) -> StoreHead:
    """A store whose catalogue turned over and whose users were erased: the
    feed holds a row per item id ever written and one erasure row."""
    from tests.test_storage import event, item

    with SqliteStore(path) as store:
        for day in range(3):
            store.upsert_items([item(f"d{day}-{n}", np.eye(dim, dtype=np.float32)[n]) for n in range(4)])
            if day:
                store.delete_items([f"d{day - 1}-{n}" for n in range(4)])
        store.record_events([event("e1", "alice")])
        store.delete_user("alice")
        assert len(store.changes_since(0)) == 13
        return store.head()


def test_pruning_the_change_feed_keeps_the_live_items_and_the_version(tmp_path):
    """Every item id ever written kept its row, deleted ones and erasures
    included: a catalogue that turns over grew the file without bound (a
    workers review)."""
    from tests.test_storage import item

    head = churned_store(tmp_path)
    with SqliteStore(tmp_path) as store:
        assert store.prune_change_feed() == 9
        assert [c.item_id for c in store.changes_since(0)] == [f"d2-{n}" for n in range(4)]
        assert store.head() == head  # versions go on from the high-water mark
        store.upsert_items([item("new")])
        assert [(c.item_id, c.version) for c in store.changes_since(head.change_version)] == [
            ("new", head.change_version + 1)]
        assert store.prune_change_feed() == 0


def test_serve_prunes_the_change_feed_at_start_single_or_before_its_workers(model_dir, tmp_path):
    from halflife.cli import _prepare_store
    from tests.test_interest_api import start_server

    churned_store(tmp_path / "single", dim=384)
    with start_server(model_dir, tmp_path / "single"):
        pass
    assert feed_rows(tmp_path / "single") == [f"d2-{n}" for n in range(4)]
    churned_store(tmp_path / "workers", dim=384)
    _prepare_store(tmp_path / "workers", model_dir)  # what the parent of `serve --workers` runs before starting them
    assert feed_rows(tmp_path / "workers") == [f"d2-{n}" for n in range(4)]


def test_the_watermark_takes_each_batch_once():
    mark = EventWatermark(10)
    mark.add(21, 25)  # this process's batch, above another's 11..20 not yet fetched
    assert mark.applied(10) and mark.applied(23) and not mark.applied(15) and mark.through == 10
    mark.advance(25)  # the catch-up fetched 11..25 and skipped 21..25
    assert mark.through == 25 and not mark.applied(26)
    mark.add(26, 30)
    assert mark.through == 30
    for first in (41, 51, 61):  # batches above a gap (31..40 in flight) stay one range
        mark.add(first, first + 9)
    assert mark._ahead == [(41, 70)] and not mark.applied(35)
    mark.add(31, 40)
    assert mark.through == 70 and mark._ahead == []


def test_the_watermark_marks_a_column_of_seqs_as_it_answers_each():
    mark = EventWatermark(10)
    mark.add(21, 25)
    mark.add(31, 31)  # two ranges above `through`, one of a single seq
    seqs = np.arange(0, 40)
    assert mark.applied_mask(seqs).tolist() == [mark.applied(s) for s in seqs.tolist()]
    assert np.flatnonzero(mark.applied_mask(seqs)).tolist() == [*range(11), *range(21, 26), 31]
    assert mark.applied_mask(np.array([], dtype=np.int64)).tolist() == []


@pytest.mark.parametrize("seed", range(5))
def test_the_watermark_holds_exactly_the_batches_applied_in_any_order(seed):
    """Batches (consecutive seqs) marked in a random order, with catch-ups
    between: every step, exactly the applied seqs are `applied`, every seq up
    to `through` among them, and after an add `through` is the end of the
    applied run from the start and what lies above it are the applied runs,
    each one range (adjacent batches joined)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, 200), 40, replace=False))
    batches = [(int(b[0]), int(b[-1])) for b in np.split(np.arange(1, 201), cuts)]
    mark, applied = EventWatermark(0), np.zeros(202, dtype=bool)
    applied[0] = True
    for step, i in enumerate(rng.permutation(len(batches))):
        first, last = batches[i]
        if step % 7 == 6:  # a catch-up read of the log applied everything up to here
            upto = int(rng.integers(mark.through, 201))
            mark.advance(upto)
            applied[: upto + 1] = True
            assert mark.applied_mask(np.arange(202)).tolist() == applied.tolist()
        if applied[first]:
            continue
        mark.add(first, last)
        applied[first : last + 1] = True
        assert mark.applied_mask(np.arange(202)).tolist() == applied.tolist()
        assert mark.through == int(np.argmin(applied)) - 1
        runs = np.flatnonzero(np.diff(applied[mark.through + 1 :].astype(np.int8)))  # starts and ends above
        above = [(mark.through + 2 + a, mark.through + 1 + b) for a, b in zip(runs[::2], runs[1::2])]
        assert mark._ahead == above


def test_items_and_events_written_by_one_worker_are_seen_by_the_other(pair, tmp_path):
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(12)))
    # b never saw the items being added, yet takes events about them
    b.record_events(likes("x", "u0", ["i0", "i1", "i2"]) + likes("y", "u1", ["i3", "i4"], hours_ago=30))
    a.record_events(likes("z", "u2", ["i0", "i5"]))
    assert a.profile("u0").event_counts == {LIKE: 3}
    assert answers(a) == answers(b) == restarted(tmp_path)
    assert answers(a)["u0"][0][0] not in {"i0", "i1", "i2"}  # seen items stay out, on both


def test_a_catch_up_reads_vectors_only_for_the_profiles_it_applies_events_to(pair, tmp_path, monkeypatch):
    """Every event's vector was read (and hashed) under the follower's lock:
    ~18 us an event against ~4 without (a scaling review)."""
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(12)))
    a.record_events(likes("x", "u0", ["i0", "i1"], hours_ago=5))
    answers(b)  # b caches u0's profile (and no other with events)
    read = []
    between = b.store.events_between

    def reading(*args, **kwargs):
        events = between(*args, **kwargs)
        read.extend(events)
        return events

    monkeypatch.setattr(b.store, "events_between", reading)
    a.record_events(likes("y", "u0", ["i6", "i7"]) + likes("z", "u1", ["i3", "i4"]))
    assert answers(b) == answers(a) == restarted(tmp_path)
    assert {(e.user_id, e.vector is not None) for e in read} == {("u0", True), ("u1", False)}


def test_a_cached_profile_follows_the_other_workers_events(pair, tmp_path):
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(12)))
    a.record_events(likes("x", "u0", ["i0", "i1"], hours_ago=5))
    first = answers(b)  # b caches u0's profile
    a.record_events(likes("y", "u0", ["i6", "i7"]))  # newer: extends b's cached profile
    a.record_events(likes("late", "u0", ["i8"], hours_ago=48))  # older: b rebuilds it
    assert answers(b) != first
    assert b.profile("u0").event_counts == {LIKE: 5}
    assert answers(b) == answers(a) == restarted(tmp_path)


def test_deleting_and_recreating_an_item_elsewhere_drops_its_namesakes_events(pair, tmp_path):
    a, b = pair
    a.upsert_items(items(["x", "y", "z"]))
    a.record_events(likes("e", "u0", ["x"] * 1) + [EventInput(f"p{n}", f"p{n}", LIKE, "x", None, None, T - 60) for n in range(5)])
    assert answers(b)["cold"][0][0] == "x"
    b.delete_items(["x"])
    assert "x" not in dict(answers(a)["cold"])
    b.upsert_items([ItemInput(id="x", text="a new x")])
    assert answers(a) == answers(b) == restarted(tmp_path)


def test_a_user_erased_by_one_worker_is_forgotten_by_the_other(pair, tmp_path):
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(8)))
    a.record_events(likes("x", "u0", ["i0", "i1", "i2", "i0"]) + likes("y", "u1", ["i5"]))
    before = answers(b)
    assert before["cold"][0][0] in {"i0", "i1", "i2"}
    assert a.delete_user("u0") == 4
    after = answers(b)
    assert after != before and after["u0"] == after["cold"]  # nothing left of u0, even in b's cache
    assert after == answers(a) == restarted(tmp_path)


def test_concurrent_writers_on_two_workers_end_as_a_restart_would(pair, tmp_path):
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(20)))

    def write(engine: InterestEngine, name: str) -> None:
        for batch in range(15):
            events = [
                EventInput(f"{name}-{batch}-{n}", f"u{(batch + n) % 3}", RATE, f"i{(batch * 7 + n) % 20}", None,
                           float(1 + (batch + n) % 5), T - (batch * 10 + n) * 600)
                for n in range(10)
            ]
            engine.record_events(events)
            answers(engine, ("u0",))

    threads = [threading.Thread(target=write, args=(engine, f"{name}{k}"))
               for name, engine in (("a", a), ("b", b)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert a.store.event_count() == 600
    assert answers(a) == answers(b) == restarted(tmp_path)


def test_an_erasure_overtaking_an_unapplied_batch_leaves_nothing_of_the_user(tmp_path):
    engine = worker(tmp_path, follow=False)  # one process: the race is between its own threads
    engine.upsert_items(items(f"i{n}" for n in range(8)))
    engine.record_events(likes("a", "u0", ["i0", "i1"]) + likes("b", "u1", ["i5"]))
    late, apply = [], engine._apply_new_events
    engine._apply_new_events = late.append  # a batch committed, its thread not yet back under the lock
    engine.record_events(likes("c", "u0", ["i2", "i2", "i3"]) + likes("d", "u2", ["i6", "i7"]))
    engine._apply_new_events = apply
    assert engine.delete_user("u0") == 5
    apply(late[0])  # the thread arrives after the erasure
    assert answers(engine) == restarted(tmp_path)
    assert engine.profile("u2").event_counts == {LIKE: 2}  # the rest of that batch counts
    engine.store.close()


def test_a_write_read_back_before_another_workers_change_is_read_again(pair):
    a, b = pair
    a.upsert_items([ItemInput(id="x", text="x, first")])
    read = a.store.get_items
    raced = []

    def read_then_b_writes(ids):
        got = read(ids)
        if not raced:  # after a's read-back, b rewrites x and one of a's readers takes that in
            raced.append(b.upsert_items([ItemInput(id="x", text="x, from b")]))
            a.similar_items(text="anything", limit=1)
        return got

    a.store.get_items = read_then_b_writes
    a.upsert_items([ItemInput(id="x", text="x, from a")])
    assert raced and a.store.get_items(["x"])["x"].text == "x, from b"  # the store's order: b last
    assert a.catalog.texts[a.catalog.row_of["x"]] == "x, from b"


def test_a_worker_reads_the_items_it_wrote_back_once(pair):
    """Its catch-up indexes them from the read-back (outside the engine lock)
    instead of reading them again under the lock; the other worker's change
    in the feed is read as before."""
    a, b = pair
    b.upsert_items(items(["y"]))
    read, reads = a.store.get_items, []
    a.store.get_items = lambda ids: reads.append(sorted(ids)) or read(ids)
    a.upsert_items(items(["x0", "x1"]))
    assert reads == [["x0", "x1"], ["y"]]
    assert {"x0", "x1", "y"} <= set(a.catalog.row_of)
    a.delete_items(["x0"])
    assert reads[2:] == [["x0"]] and "x0" not in a.catalog.row_of


def test_an_erasure_elsewhere_just_before_this_workers_own_is_still_seen(pair, tmp_path):
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(8)))
    a.record_events(likes("x", "u0", ["i0", "i1", "i0"]) + likes("y", "u1", ["i2"]) + likes("z", "u2", ["i5"]))
    answers(a)  # a has counted everyone
    erase = a.store.delete_user

    def b_erases_first(user_id, guard=None):  # after a caught up, before a's own erasure commits
        b.delete_user("u0")
        return erase(user_id, guard)

    a.store.delete_user = b_erases_first
    assert a.delete_user("u1") == 1
    assert answers(a) == answers(b) == restarted(tmp_path)


@pytest.mark.parametrize("fails", [False, True], ids=["erased", "failed"])
def test_a_rebuild_for_an_erasure_elsewhere_during_this_workers_own_is_made_again(pair, tmp_path, fails):
    """While a's erasure of u1 runs without the lock, b erases u0 and a call
    on a rebuilds a's blend from the log, u1's events still in it: a takes
    nothing back from that blend, which it cannot tell, and rebuilds it."""
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(8)))
    a.record_events(likes("x", "u0", ["i0", "i1", "i0"]) + likes("y", "u1", ["i2", "i3"]) + likes("z", "u2", ["i5"]))
    answers(a)  # a has counted everyone
    erase = a.store.delete_user

    def rebuilt_before_the_delete(user_id, guard=None):
        b.delete_user("u0")
        a.record_events(likes("w", "u1", ["i6"]))  # passed over; catches up first: rebuilt
        if fails:
            raise StoreError("database or disk is full")
        return erase(user_id, guard)

    a.store.delete_user = rebuilt_before_the_delete
    if fails:
        with pytest.raises(StoreError):
            a.delete_user("u1")
    else:
        assert a.delete_user("u1") == 3
    assert answers(a) == answers(b) == restarted(tmp_path)


@pytest.mark.parametrize("written", ["passed over after a rebuild", "on a new item"])
def test_what_another_worker_writes_during_this_workers_erasures_catch_up_is_counted(pair, tmp_path, monkeypatch,
                                                                                  written):
    """a's erasure ended by catching up, then applying the log through the
    head it read next (a race review): b's events committed between the
    two were applied without the item changes before them (a new item's
    event counted for nothing), or, the catch-up having rebuilt the blend
    for b's erasure of u0, u1's events among them were applied to nothing
    and never added, as events the erasure passed over are. b writes right
    after a's read of the change feed there."""
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(8)))
    a.record_events(likes("x", "u0", ["i0", "i1", "i0"]) + likes("y", "u1", ["i2", "i3"]) + likes("z", "u2", ["i5"]))
    answers(a)  # a has counted everyone
    erase, changes_since, wrote = a.store.delete_user, a.store.changes_since, []

    def erased_then_b_erases(user_id, guard=None):
        deleted = erase(user_id, guard)
        if written == "passed over after a rebuild":
            b.delete_user("u0")  # seen at the erasure's end: its catch-up rebuilds a's blend from the log
        monkeypatch.setattr(a.store, "changes_since", changes_then_b_writes)
        return deleted

    def changes_then_b_writes(version):
        monkeypatch.setattr(a.store, "changes_since", changes_since)
        read = changes_since(version)
        if written == "on a new item":
            b.upsert_items(items(["new"]))
            b.record_events(likes("n", "u2", ["new", "i6"]))
        else:
            b.record_events(likes("w", "u1", ["i6", "i7"]))
        wrote.append(True)
        return read

    monkeypatch.setattr(a.store, "delete_user", erased_then_b_erases)
    assert a.delete_user("u1") == 2 and wrote
    monkeypatch.undo()
    users = ("cold", "u0", "u1", "u2")
    assert answers(a, users) == answers(b, users) == restarted(tmp_path, users)
    again = worker(tmp_path, follow=False)
    try:
        assert dict(zip(a.catalog.ids, a.popularity(T))) == pytest.approx(dict(zip(again.catalog.ids, again.popularity(T))),
                                                                         abs=1e-6)
        assert len(a._blend.cooccurrence) == len(again._blend.cooccurrence)
    finally:
        again.store.close()


def test_a_store_read_failing_as_an_erasure_ends_is_mended_by_a_rebuild(pair, tmp_path, monkeypatch):
    """A read of the store that raised at an erasure's end, after its
    take-back, left the user's events recorded during the erasure (passed
    over) in no index: a later call's catch-up rebuilds the blend from the
    log, as after a rebuild that raised."""
    from halflife.interest import engine as engine_module

    a, _ = pair
    a.upsert_items(items(f"i{n}" for n in range(8)))
    a.record_events(likes("x", "u0", ["i0", "i1", "i0"]) + likes("y", "u1", ["i2", "i3"]) + likes("z", "u2", ["i5"]))
    answers(a)
    # Recorded after the delete: kept, and passed over meanwhile.
    reads_fail_after_an_erasure(a.store, monkeypatch, lambda: a.record_events(likes("w", "u1", ["i6", "i7"])))
    with pytest.raises(StoreError):
        a.delete_user("u1")
    monkeypatch.setattr(engine_module, "REBUILD_RETRY_S", 0.0)
    a.catch_up()
    rebuilt(a)
    assert answers(a) == restarted(tmp_path)


def test_a_profile_replaying_while_another_worker_erases_its_user_is_dropped(pair, tmp_path, monkeypatch):
    a, b = pair
    a.upsert_items(items(["x", "y", "z"]))
    a.record_events(likes("e", "u0", ["x", "y"]))
    replay, done = a._builder.build, []

    def build(*args):  # the other worker erases u0, and a call on this one catches up, mid-replay
        if not done:
            done.append(b.delete_user("u0"))
            a.catch_up()
        return replay(*args)

    monkeypatch.setattr(a._builder, "build", build)
    assert a.recommend("u0", 3, as_of=T).strategy == "trending"
    assert done == [2]
    monkeypatch.undo()
    assert answers(a) == answers(b) == restarted(tmp_path)


def test_a_profile_of_events_another_worker_recorded_is_replayed_once(pair, monkeypatch):
    a, b = pair
    b.upsert_items(items(["x", "y", "z"]))
    b.record_events(likes("e", "u0", ["x", "y", "z"]))
    replay, replays = a._builder.build, []

    def build(chunks, *args):
        chunks = list(chunks)
        replays.append(sum(map(len, chunks)))
        return replay(chunks, *args)

    monkeypatch.setattr(a._builder, "build", build)
    assert a.recommend("u0", 3, as_of=T).strategy == "personalized"
    assert replays == [3]


def rebuilt(*engines: InterestEngine, timeout: float = 30.0) -> None:
    """Waits (bounded) for the engines' rebuilds of the blend off the lock to be in."""
    import time

    deadline = time.monotonic() + timeout
    while any(engine._rebuilding for engine in engines):
        assert time.monotonic() < deadline, "a rebuild of the blend did not finish"
        time.sleep(0.01)


def hold_first_build(monkeypatch, engine) -> tuple[threading.Event, threading.Event, list[bool]]:
    """Holds the engine's first blend build until `release` is set (`started`
    is set once it is held), and records, build by build, whether it ran
    under the engine's lock: (started, release, builds)."""
    started, release, build, builds = threading.Event(), threading.Event(), engine._built_blend, []

    def held_build(*args):
        builds.append(engine._lock._is_owned())
        if len(builds) == 1:
            started.set()
            assert release.wait(30)
        return build(*args)

    monkeypatch.setattr(engine, "_built_blend", held_build)
    return started, release, builds


@pytest.mark.parametrize("attempts", [3, 1], ids=["started again", "then under the lock"])
def test_a_long_log_is_rebuilt_off_the_lock_after_an_erasure_elsewhere(pair, tmp_path, monkeypatch, attempts):
    """Another worker's erasure rebuilds the blend from the whole log: a long
    one off the lock, the indexes as they were answering meanwhile (2.2M
    events held every call up for 10-12 s), then swapped in with the events
    applied since. This worker's own erasure while it reads makes it start
    again (or, its tries spent, rebuild under the lock); both workers then
    answer as a restart does."""
    from halflife.interest import engine as engine_module

    monkeypatch.setattr(engine_module, "BACKGROUND_REBUILD_EVENTS", 0)
    monkeypatch.setattr(engine_module, "BACKGROUND_REBUILD_ATTEMPTS", attempts)
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(8)))
    a.record_events(likes("x", "u0", ["i0", "i1", "i2"]) + likes("y", "u1", ["i2", "i3"]) + likes("z", "u2", ["i5"]))
    answers(b)
    started, release, builds = hold_first_build(monkeypatch, b)
    a.delete_user("u0")
    answered = []
    reader = threading.Thread(target=lambda: answered.append(answers(b)))
    reader.start()
    reader.join(10)
    assert answered and started.wait(10)  # answered while the rebuild reads the log
    assert b.profile("u0").event_counts == {}  # the erased user's profile went at once
    # Meanwhile: events on both workers, an item deleted and created anew, an erasure here.
    a.record_events(likes("p", "u1", ["i4", "i6"]))
    b.record_events(likes("q", "u2", ["i1", "i7"]) + likes("r", "u3", ["i0"]))
    b.delete_items(["i3"])
    b.upsert_items(items(["i3"]))
    b.delete_user("u2")
    release.set()
    rebuilt(b)
    assert builds == [False, attempts == 1]  # the stale one, then one off the lock again, or, tries spent, under it
    a.catch_up()  # a catches up with b's erasure: its own rebuild
    rebuilt(a)
    users = ("cold", "u0", "u1", "u2", "u3")
    assert answers(b, users) == answers(a, users) == restarted(tmp_path, users)


def test_an_erasure_elsewhere_truncates_the_wal_while_a_rebuild_reads_the_log(pair, tmp_path, monkeypatch):
    """A rebuild read the whole log in one statement, whose snapshot no
    checkpoint could pass: at 5M events 30-50 s in which the WAL grew with
    every write and another worker's erasure stayed in it (a scale review).
    A read each chunk (5 events here): between two, the erasure's
    truncation completes, and the rebuild still ends as a restart would."""
    from halflife.interest import engine as engine_module
    from halflife.storage import sqlite as sqlite_mod

    monkeypatch.setattr(engine_module, "BACKGROUND_REBUILD_EVENTS", 0)
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(8)))
    for user in ("u0", "u1", "u2", "u3"):
        a.record_events(likes(f"{user}-", user, [f"i{n}" for n in range(8)]))
    answers(b)
    read, owed = b.store.iter_events, []

    def in_chunks_of_five(*args, **kwargs):
        for n, chunk in enumerate(read(*args, **{**kwargs, "chunk": 5})):
            yield chunk
            if n == 0 and not owed:  # the rebuild's first chunk read: the other worker erases
                a.delete_user("u1")
                owed.append(list(tmp_path.glob(sqlite_mod.DB_NAME + sqlite_mod.ERASED_MARK + "*")))

    monkeypatch.setattr(b.store, "iter_events", in_chunks_of_five)
    a.delete_user("u0")
    b.catch_up()  # starts b's rebuild off the lock
    rebuilt(b)
    assert owed == [[]] and not a.store._truncate_pending  # a's truncation was not held back by b's read
    b.catch_up()  # b's rebuild for the erasure of u1
    rebuilt(b)
    users = ("cold", "u0", "u1", "u2", "u3")
    assert answers(b, users) == restarted(tmp_path, users)


@pytest.mark.parametrize("compact", [False, True])
def test_items_deleted_while_the_blend_is_rebuilt_off_the_lock_leave_it_off_the_lock(pair, tmp_path, monkeypatch,
                                                                                       compact):
    """Items deleted, created anew and a compaction while the rebuild reads
    the log are made in the rebuilt blend too, which is swapped in: each
    started it again, so that a catalogue turning over (an item deleted a
    second, 1M events) spent its tries and had it built under the lock,
    every call held up for the whole pass (5 s)."""
    from halflife.core.cooccurrence import Cooccurrence
    from halflife.interest import engine as engine_module

    monkeypatch.setattr(engine_module, "BACKGROUND_REBUILD_EVENTS", 0)
    monkeypatch.setattr(engine_module, "BACKGROUND_REBUILD_ATTEMPTS", 1)
    if compact:
        compact_catalogues_at(monkeypatch, dead_rows=2)
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(8)))
    a.record_events(likes("x", "u0", ["i0", "i1", "i2"]) + likes("y", "u1", ["i2", "i3", "i5"])
                    + likes("z", "u2", ["i3", "i5", "i6"]))
    answers(b)
    _, release, builds = hold_first_build(monkeypatch, b)
    remove, passes = Cooccurrence.remove_items, []

    def counted(index, rows):
        if index not in (a._blend.cooccurrence, b._blend.cooccurrence):  # the rebuilt one, before its swap
            passes.append(rows)
        return remove(index, rows)

    monkeypatch.setattr(Cooccurrence, "remove_items", counted)
    a.delete_user("u0")
    b.catch_up()  # the rebuild starts, held
    b.delete_items(["i3"])
    a.delete_items(["i6"])
    b.upsert_items(items(["i3", "i8"]))  # i3 anew
    b.record_events(likes("p", "u1", ["i3", "i8"]) + likes("q", "u3", ["i5", "i8"]))
    a.delete_items(["i1"])  # compacting: after the rows were renumbered
    b.catch_up()
    release.set()
    rebuilt(b)
    assert builds == [False]  # the one off the lock, swapped in
    assert b.catalog.epoch == int(compact)
    assert len(passes) == 1 + compact  # the rows dropped between renumberings at once: each is a pass over every pair
    users = ("cold", "u0", "u1", "u2", "u3")
    assert answers(b, users) == restarted(tmp_path, users)


def test_erasures_elsewhere_while_the_blend_is_rebuilt_off_the_lock_leave_it_off_the_lock(pair, tmp_path, monkeypatch):
    """Another worker's erasures while the rebuild reads: the rebuilt blend
    (which may still hold their users, as the one it replaces does) is
    swapped in and read again for them. Each started it again, so that
    erasures one after another (one a second, 1M events) spent its tries and
    had it built under the lock, every call held up for the whole pass (9.4 s)."""
    from halflife.interest import engine as engine_module

    monkeypatch.setattr(engine_module, "BACKGROUND_REBUILD_EVENTS", 0)
    monkeypatch.setattr(engine_module, "BACKGROUND_REBUILD_ATTEMPTS", 1)
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(8)))
    a.record_events(likes("x", "u0", ["i0", "i1", "i2"]) + likes("y", "u1", ["i2", "i3", "i5"])
                    + likes("z", "u2", ["i3", "i5", "i6"]) + likes("w", "u3", ["i1", "i6"]))
    answers(b)
    _, release, builds = hold_first_build(monkeypatch, b)
    a.delete_user("u0")
    b.catch_up()  # the rebuild starts, held
    a.delete_user("u1")
    b.catch_up()
    a.delete_user("u2")
    b.catch_up()
    release.set()
    rebuilt(b)
    assert builds == [False, False]  # swapped in, then read again for the erasures meanwhile: off the lock
    users = ("cold", "u0", "u1", "u2", "u3")
    assert answers(b, users) == restarted(tmp_path, users)


def test_events_applied_while_the_blend_is_rebuilt_off_the_lock_are_in_the_rebuilt_one(pair, tmp_path, monkeypatch):
    from halflife.interest import engine as engine_module

    monkeypatch.setattr(engine_module, "BACKGROUND_REBUILD_EVENTS", 0)
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(8)))
    a.record_events(likes("x", "u0", ["i0", "i1"]) + likes("y", "u1", ["i2", "i3"]))
    answers(b)
    _, release, _ = hold_first_build(monkeypatch, b)
    a.delete_user("u0")
    b.catch_up()  # catches up: the rebuild starts, held
    a.record_events(likes("p", "u1", ["i4"]) + likes("t", "u4", ["i5", "i6"], hours_ago=-2))  # and after the clock
    b.record_events(likes("q", "u2", ["i1", "i7"]))
    release.set()
    rebuilt(b)
    assert answers(b) == restarted(tmp_path)
    later = T + 4 * 3600.0
    assert answers(b, at=later) == restarted(tmp_path, at=later)


def test_a_rebuild_under_the_lock_that_raised_is_tried_again(pair, tmp_path, monkeypatch):
    """A short log's rebuild for another worker's erasure that raised (a
    read of the log failed) had marked the erasure seen and the events
    through the head applied: the erased user's pairs and popularity
    stayed, and the events it was to add never came, until a restart. The
    next catch-up tries it again, as after a rebuild off the lock."""
    from halflife.storage.base import StoreError

    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(8)))
    a.record_events(likes("x", "u0", ["i0", "i1", "i2"]) + likes("y", "u1", ["i2", "i3"]))
    answers(b)
    build = b._built_blend

    def fails_once(*args):
        monkeypatch.setattr(b, "_built_blend", build)
        raise StoreError("the log could not be read")

    from halflife.interest import engine as engine_module

    monkeypatch.setattr(b, "_built_blend", fails_once)
    monkeypatch.setattr(engine_module, "REBUILD_RETRY_S", 0.0)
    a.delete_user("u0")
    a.record_events(likes("p", "u2", ["i4", "i5"]) + likes("q", "u1", ["i5"]))
    with pytest.raises(StoreError):
        b.catch_up()
    assert answers(b) == restarted(tmp_path)


def test_a_rebuild_off_the_lock_that_raised_is_tried_again_keeping_the_profiles(pair, tmp_path, monkeypatch):
    """Off the lock, the rebuild's failure is logged and a call once
    REBUILD_RETRY_S have passed starts it again (not every call: each try
    is a pass over the log); the profiles cached meanwhile stay (they do not
    depend on the blend: dropping them again on each try made every user's
    next call replay)."""
    from halflife.interest import engine as engine_module
    from halflife.storage.base import StoreError

    monkeypatch.setattr(engine_module, "BACKGROUND_REBUILD_EVENTS", 0)
    a, b = pair
    a.upsert_items(items(f"i{n}" for n in range(8)))
    a.record_events(likes("x", "u0", ["i0", "i1", "i2"]) + likes("y", "u1", ["i2", "i3"]))
    answers(b)
    build, tries, release = b._built_blend, [], threading.Event()

    def fails_once(*args):
        tries.append(1)
        if len(tries) == 1:
            assert release.wait(30)
            raise StoreError("the log could not be read")
        return build(*args)

    monkeypatch.setattr(b, "_built_blend", fails_once)
    monkeypatch.setattr(engine_module, "REBUILD_RETRY_S", 3600.0)
    a.delete_user("u0")
    b.catch_up()  # starts it (held)
    b.recommend("u1", 3, as_of=T)  # caches u1's profile meanwhile
    release.set()  # it fails
    rebuilt(b)
    assert b._rebuild_failed_at is not None and len(tries) == 1 and "u1" in b._users
    b.catch_up()  # too soon to try again (each try is a pass over the log)
    rebuilt(b)
    assert len(tries) == 1
    monkeypatch.setattr(engine_module, "REBUILD_RETRY_S", 0.0)
    b.catch_up()  # starts it again
    rebuilt(b)
    assert len(tries) == 2 and b._rebuild_failed_at is None and "u1" in b._users
    assert answers(b) == restarted(tmp_path)


@pytest.mark.parametrize("background", [False, True], ids=["rebuilt under the lock", "rebuilt off it"])
@pytest.mark.parametrize("compact", [False, True])
def test_two_workers_under_concurrent_writes_erasures_and_reads_end_as_a_restart_would(pair, tmp_path, monkeypatch,
                                                                                      compact, background):
    """Each worker records events, erases users, adds items and deletes and
    re-creates others while both serve reads, all at once (with frequent
    co-occurrence merges, every second event stamped after the clock, and
    compacting, a catalogue renumbered every other delete, each worker's
    its own way); afterwards both answer as a restart does, now and once
    the clock has passed those events."""
    from halflife.core import cooccurrence
    from halflife.interest import engine as engine_module

    monkeypatch.setattr(cooccurrence, "_MIN_MERGE", 2)
    if background:  # each erasure elsewhere: the log read off the lock, while the rest goes on
        monkeypatch.setattr(engine_module, "BACKGROUND_REBUILD_EVENTS", 0)
    if compact:
        compact_catalogues_at(monkeypatch, dead_rows=2)
    a, b = pair
    a.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}", categories=(f"c{n % 3}",)) for n in range(30)])

    def writer(engine: InterestEngine, tag: str, offset: float):
        def write(step: int) -> None:
            if step % 7 == 3:
                engine.delete_items([f"i{(step * 3) % 30}"])
            if step % 7 == 6:  # the id deleted 3 steps ago, as a new item
                engine.upsert_items([ItemInput(id=f"i{((step - 3) * 3) % 30}", text=f"again {tag} {step}")])
            try:
                engine.record_events([EventInput(f"{tag}{step}-{k}", f"u{(step + k) % 4}", LIKE, f"i{(step * 7 + k) % 30}",
                                                 None, None, T + 60.0 * step + offset if k else T - 3600.0 * (40 - step) - offset)
                                      for k in range(2)])
            except UnknownItemsError:  # one of them was deleted just now
                pass
            if step % 15 == 14:
                engine.delete_user(f"u{(step // 15) % 4}")
            if step % 10 == 5:
                engine.upsert_items([ItemInput(id=f"{tag}n{step}", text=f"new {tag} {step}", categories=("c1",))])
        return write

    def reader(engine: InterestEngine):
        def read(step: int) -> None:
            engine.recommend(f"u{step % 4}", 5, as_of=T)
            engine.profile(f"u{step % 4}", as_of=T)
        return read

    errors = run_in_threads(40, writer(a, "a", 0.0), writer(b, "b", 0.5), reader(a), reader(b))
    assert not errors, errors
    for engine in (a, b):  # each catches up with the other's last erasure, and its rebuild is in
        engine.catch_up()
        rebuilt(engine)
    assert min(a.catalog.epoch, b.catalog.epoch) >= 2 if compact else a.catalog.epoch == b.catalog.epoch == 0
    users = ("cold", "u0", "u1", "u2", "u3")
    assert answers(a, users) == answers(b, users) == restarted(tmp_path, users)
    later = T + 7200.0
    assert answers(a, users, later) == answers(b, users, later) == restarted(tmp_path, users, later)


@pytest.mark.parametrize("recreate", [True, False], ids=["deleted and created anew", "deleted"])
def test_an_item_changed_by_another_worker_while_an_event_embeds_is_read_again(tmp_path, recreate):
    """Worker A reads x's vector, embeds the event's text, and meanwhile
    worker B deletes x (and creates it anew): A's write must see that B's
    change came after its read, read x again, and store the new x's vector,
    or refuse the batch when x is gone, as one worker does (test_engine)."""
    import numpy as np

    from halflife.core.ranking import normalize

    b = worker(tmp_path)
    embedded = []

    def embed(texts, deadline=None):
        if texts == ["a review"] and not embedded:
            embedded.append(1)
            b.delete_items(["x"])
            if recreate:
                b.upsert_items([ItemInput(id="x", text="new x")])
        return fake_embed(texts)

    a = InterestEngine(Config(), SqliteStore(tmp_path), DIM, embed, clock=lambda: T, follow_store=True)
    a.upsert_items(items(["x", "y"]))
    event = EventInput("r", "u", 3, "x", "a review", None, T - 60)
    try:
        if recreate:
            assert a.record_events([event]) == (1, 0)
            new_x = fake_embed(["new x"])[0]
            (stored,) = a.store.user_events("u")
            np.testing.assert_allclose(stored.vector, normalize(new_x + fake_embed(["a review"])[0]), atol=1e-6)
            assert answers(a, ("u", "cold")) == answers(b, ("u", "cold")) == restarted(tmp_path, ("u", "cold"))
        else:
            with pytest.raises(UnknownItemsError):
                a.record_events([event])
            assert a.store.user_events("u") == []
    finally:
        a.store.close()
        b.store.close()


def everything(engine: InterestEngine, users=("cold", "u0", "u1", "u2", "u3")) -> dict:
    """`answers`, and the profiles' event counts, popularity by item id and a few items' nearest, at T."""
    popularity = engine.popularity(T)
    with engine._lock:
        popular = sorted((engine.catalog.ids[r], round(float(p), 4)) for r, p in enumerate(popularity.tolist())
                         if p > 0 and engine.catalog._alive[r])
    return {
        "answers": answers(engine, users), "popular": popular,
        "profiles": {user: engine.profile(user, as_of=T).event_counts for user in users},
        "similar": {i: [s.item_id for s in engine.similar_items(item_id=i, limit=5).items] for i in ("i0", "i1")
                    if i in engine.catalog.row_of},
    }


@pytest.mark.parametrize("background", [False, True], ids=["rebuilt under the lock", "rebuilt off it"])
@pytest.mark.parametrize("seed", range(6))
def test_writes_between_the_chunks_of_a_start_and_of_rebuilds_end_as_a_restart_would(tmp_path, monkeypatch, seed,
                                                                                      background):
    """Passes over the catalogue and the log read a chunk at a time, each
    in a read of its own (3 items, 4 events here): between two, another
    worker upserts items (same id, new text), deletes them and creates them
    anew (a new rowid: read twice), erases users and records events, with
    catalogues compacted every other delete; during a rebuild off the lock
    this worker writes and catches up too. Once all have caught up, every
    answer is a restart's."""
    import random

    from halflife.core import cooccurrence
    from halflife.interest import engine as engine_module
    from halflife.storage import sqlite as sqlite_module

    monkeypatch.setattr(cooccurrence, "_MIN_MERGE", 2)
    compact_catalogues_at(monkeypatch, dead_rows=2)
    monkeypatch.setattr(sqlite_module, "ITEMS_PER_READ", 3)
    if background:
        monkeypatch.setattr(engine_module, "BACKGROUND_REBUILD_EVENTS", 0)
    rng, ids, users = random.Random(seed), [f"i{n}" for n in range(20)], ["u0", "u1", "u2", "u3"]

    def write(engine: InterestEngine, step: int) -> None:
        k, item = rng.random(), rng.choice(ids)
        if k < 0.15:
            engine.upsert_items([ItemInput(id=item, text=f"text {step}")])
        elif k < 0.3:
            engine.delete_items([item])
        elif k < 0.45:
            engine.delete_items([item])
            engine.upsert_items([ItemInput(id=item, text=f"again {step}")])
        elif k < 0.55:
            engine.delete_user(rng.choice(users))
        else:
            try:
                engine.record_events([EventInput(f"e{step}-{n}", rng.choice(users), LIKE, rng.choice(ids), None, None,
                                                 T - rng.random() * 3 * DAY) for n in range(3)])
            except UnknownItemsError:  # deleted just now
                pass

    a = worker(tmp_path)
    a.upsert_items(items(ids))
    for step in range(30):
        write(a, step)
    steps, b, writing, busy = iter(range(100, 10_000)), [], threading.Lock(), threading.local()

    def meanwhile() -> None:
        if getattr(busy, "on", False) or not writing.acquire(blocking=False):
            return
        busy.on = True
        try:
            write(a, next(steps))
            off_the_lock = threading.current_thread().name == "halflife-blend-rebuild" and not b[0]._lock._is_owned()
            if off_the_lock and rng.random() < 0.6:  # b's rebuild reads the log: b writes or catches up meanwhile
                if rng.random() < 0.5:
                    b[0].catch_up()
                else:
                    write(b[0], next(steps))
        finally:
            busy.on = False
            writing.release()

    iter_items, iter_events = SqliteStore.iter_items, SqliteStore.iter_events

    def items_in_parts(store, *args, **kwargs):
        for item in iter_items(store, *args, **kwargs):
            yield item
            if store is not a.store:
                meanwhile()

    def events_in_parts(store, *args, **kwargs):
        for chunk in iter_events(store, *args, **{**kwargs, "chunk": 4}):
            yield chunk
            if store is not a.store:
                meanwhile()

    monkeypatch.setattr(SqliteStore, "iter_items", items_in_parts)
    monkeypatch.setattr(SqliteStore, "iter_events", events_in_parts)
    b.append(worker(tmp_path))  # a start, read between writes
    try:
        for _ in range(6):
            write(a, next(steps))
            b[0].catch_up()  # its rebuild for a's erasure, read between writes
            rebuilt(b[0])
            write(b[0], next(steps))
        with writing:
            monkeypatch.setattr(SqliteStore, "iter_items", iter_items)
            monkeypatch.setattr(SqliteStore, "iter_events", iter_events)
        for engine in (a, b[0], a, b[0]):
            engine.catch_up()
            rebuilt(engine)
        restart = worker(tmp_path, follow=False)
        try:
            assert everything(a) == everything(b[0]) == everything(restart)
        finally:
            restart.store.close()
    finally:
        a.store.close()
        b[0].store.close()
