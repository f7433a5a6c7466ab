"""Profile snapshots: a heavy user's profile rebuilt from their stored
snapshot and the events after it answers as a replay of their whole log,
and every case where it would not falls back to that replay."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time

import numpy as np
import pytest

from halflife.config import Config
from halflife.interest import replay as replay_module
from halflife.interest.engine import InterestEngine
from halflife.interest.pseudonyms import user_pseudonym
from halflife.interest.types import EventInput, ItemInput
from halflife.interest.state import snapshot_bytes, state_from_snapshot
from halflife.storage.sqlite import DB_NAME, SqliteStore
from tests.fakes import DIM, fake_embed, stored_history

T = 1_700_000_000.0
HOUR = 3600.0
VIEW, LIKE, DISLIKE, RATE, SEARCH = 1, 3, 4, 6, 8


@pytest.fixture(autouse=True)
def small_snapshots(monkeypatch):
    monkeypatch.setattr(replay_module, "SNAPSHOT_EVENTS", 10)


def test_the_thresholds_are_the_documented_ones(monkeypatch):
    """docs/interest.md: a replay of 1,000 events or more and of at least
    1/100 of the user's events saves a snapshot; a cached profile holds at
    most 16 events for the clock. (The other tests here set their own.)"""
    monkeypatch.undo()
    assert (replay_module.SNAPSHOT_EVENTS, replay_module.SNAPSHOT_SHARE) == (1000, 100)
    assert replay_module.MAX_HELD_EVENTS_PER_USER == 16


def open_engine(path, config: Config = Config(), now: float = T) -> InterestEngine:
    return InterestEngine(config, SqliteStore(path), DIM, fake_embed, clock=lambda: now)


def history(n: int, first: int = 0, start: float = T - 100 * HOUR) -> list[EventInput]:
    """n events of user u, an hour apart from `start`: views, likes, ratings
    high and low, dislikes and searches, over 12 items in 3 topics."""
    types = [VIEW, LIKE, RATE, DISLIKE, SEARCH, RATE]
    events = []
    for k in range(first, first + n):
        kind = types[k % len(types)]
        events.append(EventInput(
            f"e{k}", "u", kind, None if kind == SEARCH else f"i{k % 12}",
            f"search for topic {k % 3}" if kind == SEARCH else None,
            (5.0 if k % 4 else 1.0) if kind == RATE else None, start + k * HOUR,
        ))
    return events


def with_items(path, config: Config = Config(), now: float = T) -> InterestEngine:
    engine = open_engine(path, config, now)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"topic {n % 3} thing {n}") for n in range(12)])
    return engine


def filled(path, n: int, config: Config = Config()) -> InterestEngine:
    engine = with_items(path, config)
    engine.record_events(history(n))
    return engine


def full_replay_of(engine: InterestEngine, path, monkeypatch, config: Config = Config()) -> InterestEngine:
    """An engine at `engine`'s clock over the same items and user u's log,
    saving no snapshot: what a replay of the whole log answers."""
    monkeypatch.setattr(replay_module, "SNAPSHOT_EVENTS", 10**9)
    reference = with_items(path, config, engine.now())
    reference.record_events([EventInput(e.event_id, "u", e.type, e.item_id, e.text, e.value, e.event_time)
                             for e in engine.store.user_events("u")])
    return reference


def answers(engine: InterestEngine) -> tuple:
    """The user's answers after a cache miss, as a restart would give them."""
    engine._users.clear()
    profile = engine.profile("u", as_of=T)
    ranked = engine.recommend("u", 6, as_of=T)
    assert engine.snapshots.wait(10)  # saved on a thread of its own
    return (
        dict(profile.event_counts), round(profile.negative_strength, 9),
        [(round(i.strength, 9), i.event_count, i.last_event_time) for i in profile.interests],
        [(i.item_id, round(i.score, 6)) for i in ranked.items],
    )


def replayed(engine: InterestEngine, monkeypatch) -> list[int]:
    """How many events each replay that follows applies, from scratch or onto a snapshot."""
    counts: list[int] = []
    extend = engine._builder.extend

    def counting(state, events, horizon):
        counts.append(len(events))
        return extend(state, events, horizon)

    monkeypatch.setattr(engine._builder, "extend", counting)
    return counts


def test_a_miss_replays_only_the_events_after_the_users_snapshot_and_answers_as_a_full_replay(tmp_path, monkeypatch):
    engine = filled(tmp_path / "live", 30)
    first = answers(engine)  # a miss: 30 events replayed, a snapshot saved
    snapshot, after = stored_history(engine.store, "u")
    assert snapshot.through_seq == 30 and after == []
    engine.record_events(history(4, first=30))
    counts = replayed(engine, monkeypatch)
    live = answers(engine)
    assert counts == [4]  # the profile's miss: the 4 events after the snapshot (the recommendation hits)
    assert live != first

    reference = full_replay_of(engine, tmp_path / "reference", monkeypatch)
    assert stored_history(reference.store, "u")[0] is None
    assert live == answers(reference)


def test_a_later_long_replay_saves_a_newer_snapshot(tmp_path):
    engine = filled(tmp_path, 12)
    answers(engine)
    engine.record_events(history(9, first=12))
    answers(engine)  # 9 events after the snapshot: fewer than SNAPSHOT_EVENTS, kept
    assert stored_history(engine.store, "u")[0].through_seq == 12
    engine.record_events(history(1, first=21))
    answers(engine)
    assert stored_history(engine.store, "u")[0].through_seq == 22


def _change_config(engine, path, monkeypatch):
    config = Config()
    config = dataclasses.replace(config, profile=dataclasses.replace(config.profile, cluster_threshold=0.9))
    return open_engine(path, config), config


def _damage(engine, path, monkeypatch):
    with sqlite3.connect(path / DB_NAME) as conn:
        conn.execute("UPDATE profile_snapshots SET data = substr(data, 1, 200)")
    return open_engine(path), Config()


def _late_event(engine, path, monkeypatch):
    # Stamped between the snapshot's events: a replay sorts it in among them.
    engine.record_events([EventInput("late", "u", LIKE, "i5", None, None, T - 94.5 * HOUR)])
    return engine, Config()


def _clock_before_the_snapshot(engine, path, monkeypatch):
    engine.record_events([EventInput("ahead", "u", LIKE, "i3", None, None, T + HOUR)])
    with sqlite3.connect(path / DB_NAME) as conn:
        conn.execute("DELETE FROM profile_snapshots")
    answers(open_engine(path, now=T + 2 * HOUR))  # a replay of every event, the one ahead included
    assert stored_history(engine.store, "u")[0].through_seq == 33
    # A clock before it: a replay holds the event for the clock, the snapshot has it applied.
    return open_engine(path), Config()


@pytest.mark.parametrize("change", [_change_config, _damage, _late_event, _clock_before_the_snapshot])
def test_a_snapshot_that_would_answer_otherwise_than_a_full_replay_is_not_used(tmp_path, monkeypatch, caplog, change):
    path = tmp_path / "live"
    engine = filled(path, 30)
    answers(engine)
    engine.record_events(history(2, first=40))
    engine, config = change(engine, path, monkeypatch)
    counts = replayed(engine, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="halflife.interest.replay"):
        live = answers(engine)
    assert counts[0] >= 32  # every event, not only those after the snapshot
    assert ("unreadable profile snapshot" in caplog.text) == (change is _damage)
    if change is _damage:  # an erasure cannot take an id back out of a log file: its pseudonym only
        assert user_pseudonym("u") in caplog.text and "'u'" not in caplog.text

    monkeypatch.undo()
    assert live == answers(full_replay_of(engine, tmp_path / "reference", monkeypatch, config))


def test_a_damaged_snapshot_is_saved_again_by_the_replay_that_found_it(tmp_path, monkeypatch, caplog):
    """With no event since, the new snapshot ended where the damaged one did
    and was not written: every miss of the user replayed their whole log,
    with a warning, until their next event (a durability review)."""
    engine = filled(tmp_path, 30)
    answers(engine)
    engine, _ = _damage(engine, tmp_path, monkeypatch)
    first = answers(engine)
    snapshot = stored_history(engine.store, "u")[0]
    assert snapshot.through_seq == 30 and state_from_snapshot(snapshot.data).max_seq == 30
    counts = replayed(engine, monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="halflife.interest.replay"):
        assert answers(engine) == first
    assert sum(counts) == 0 and "unreadable profile snapshot" not in caplog.text


def test_a_user_erased_while_their_profile_replays_leaves_no_snapshot(tmp_path, monkeypatch):
    engine = filled(tmp_path, 20)
    engine._users.clear()
    build, done = engine._builder.build, []

    def erase_meanwhile(*args):
        if not done:
            done.append(engine.delete_user("u"))
        return build(*args)

    monkeypatch.setattr(engine._builder, "build", erase_meanwhile)
    assert engine.recommend("u", 3, as_of=T).strategy == "trending"
    assert done == [20] and engine.snapshots.wait(10)
    assert stored_history(engine.store, "u") == (None, [])
    monkeypatch.undo()
    engine.record_events(history(2, first=50))  # the id anew: nothing of the erased user comes back
    assert answers(engine)[0] == {RATE: 1, DISLIKE: 1}


def test_a_snapshot_holds_every_part_of_a_profile(tmp_path):
    engine = filled(tmp_path, 40)
    state = engine._builder.build([stored_history(engine.store, "u")[1]], T)[0]
    again = state_from_snapshot(snapshot_bytes(state))
    for name in ("multi", "single"):
        arrays, restored = getattr(state, name).to_arrays(), getattr(again, name).to_arrays()
        assert arrays.keys() == restored.keys()
        for key, value in arrays.items():
            assert np.array_equal(value, restored[key], equal_nan=True) and value.dtype == restored[key].dtype, key
    for name in ("seen", "api_counts", "newest_time", "max_seq", "affinity_items", "affinity_types",
                 "affinity_times", "affinity_seqs"):
        assert getattr(again, name) == getattr(state, name), name
    assert state.affinity_items and state.seen and state.multi.n_clusters > 1  # something to compare
    state.pending.append(engine.store.user_events("u")[0])
    with pytest.raises(ValueError, match="applied events only"):
        snapshot_bytes(state)


def test_a_replay_of_a_damaged_vector_saves_no_snapshot(tmp_path):
    """The event counts without its direction; a full replay after an upsert
    rewrote the vector counts it with one, which a snapshot would not."""
    engine = filled(tmp_path, 30)
    with sqlite3.connect(tmp_path / DB_NAME) as conn:  # bytes changed under an unchanged hash
        conn.execute("UPDATE vectors SET data = ? WHERE id = (SELECT vector_id FROM items WHERE id = 'i5')",
                     (np.full(DIM, np.nan, dtype=np.float32).tobytes(),))
    damaged = answers(engine)
    assert stored_history(engine.store, "u")[0] is None
    engine.upsert_items([ItemInput(id="i5", text="topic 2 thing 5")])  # the same text: the same vector
    repaired = answers(engine)
    assert repaired != damaged and stored_history(engine.store, "u")[0].through_seq == 30


@pytest.mark.parametrize("ahead", [3, replay_module.MAX_HELD_EVENTS_PER_USER + 4])
def test_events_held_for_the_clock_after_every_applied_one_are_left_out_of_the_snapshot(tmp_path, monkeypatch, ahead):
    """A client clock running ahead holds some events at every read (past
    MAX_HELD_EVENTS_PER_USER, some wait in the log instead): the snapshot
    ends before them, and a read once the clock passed them answers as a
    full replay. Without a snapshot, such a user's replays grew with every
    event since the last one (an audit)."""
    path = tmp_path / "live"
    engine = filled(path, 30)
    engine.record_events([EventInput(f"ahead{k}", "u", LIKE, f"i{k % 12}", None, None, T + 60.0 * (k + 1))
                          for k in range(ahead)])
    held = answers(engine)
    assert held[0] == answers(filled(tmp_path / "without", 30))[0]  # not counted yet
    assert stored_history(engine.store, "u")[0].through_seq == 30

    later = open_engine(path, now=T + HOUR)
    counts = replayed(later, monkeypatch)
    later._users.clear()
    live = later.profile("u", as_of=T + HOUR)
    assert counts == [ahead]  # the held events, onto the snapshot
    expected = full_replay_of(later, tmp_path / "reference", monkeypatch).profile("u", as_of=T + HOUR)
    assert live.event_counts == expected.event_counts == {**held[0], LIKE: held[0][LIKE] + ahead}
    assert [(round(i.strength, 9), i.event_count) for i in live.interests] == \
        [(round(i.strength, 9), i.event_count) for i in expected.interests]


def test_a_snapshot_is_rewritten_once_enough_of_the_users_events_are_new(tmp_path, monkeypatch):
    monkeypatch.setattr(replay_module, "SNAPSHOT_SHARE", 2)  # at least half the user's events
    engine = filled(tmp_path, 30)
    answers(engine)
    engine.record_events(history(12, first=30))
    answers(engine)  # 12 of 42: no rewrite
    assert stored_history(engine.store, "u")[0].through_seq == 30
    engine.record_events(history(20, first=42))
    answers(engine)  # 32 of 62
    assert stored_history(engine.store, "u")[0].through_seq == 62


def test_a_read_does_not_wait_for_its_snapshot_to_be_saved(tmp_path, monkeypatch):
    """A save waits for the store's writer (another process's transaction:
    up to the busy timeout); the read that made the snapshot answers first."""
    import threading

    engine = filled(tmp_path, 30)
    release, saving = threading.Event(), threading.Event()
    save = engine.store.save_profile_snapshot

    def held_save(*args):
        saving.set()
        assert release.wait(10)
        return save(*args)

    monkeypatch.setattr(engine.store, "save_profile_snapshot", held_save)
    engine._users.clear()
    assert engine.recommend("u", 3, as_of=T).strategy == "personalized"
    assert saving.wait(10) and not engine.snapshots.wait(0.01)  # answered while the save waits
    release.set()
    assert engine.snapshots.wait(10) and stored_history(engine.store, "u")[0].through_seq == 30


def test_an_event_held_for_the_clock_before_an_applied_one_keeps_the_profile_out_of_snapshots(tmp_path, monkeypatch):
    """A snapshot covers every event up to its seq: one held (stamped ahead)
    before an applied one could not be left out of it."""
    engine = filled(tmp_path, 30)
    engine.record_events([EventInput("ahead", "u", LIKE, "i3", None, None, T + 60.0)])
    engine.record_events(history(2, first=30))  # applied, after the held one
    answers(engine)
    assert stored_history(engine.store, "u")[0] is None
    later = open_engine(tmp_path, now=T + HOUR)
    later._users.clear()
    assert later.profile("u", as_of=T + HOUR).event_counts[LIKE] == engine.profile("u").event_counts[LIKE] + 1


def test_a_store_that_keeps_failing_saves_logs_a_line_a_minute_not_one_a_save(caplog):
    """With a full disk every save fails, and the profile it would have
    spared is replayed at the next miss, which tries again: a WARNING line a
    read of a heavy user (an audit: 30 reads, 30 lines)."""
    from halflife.interest.snapshot_saver import SnapshotSaver
    from halflife.storage.base import ProfileSnapshot, StoreUnavailableError

    class FullDisk:
        def save_profile_snapshot(self, user_id, snapshot):
            raise StoreUnavailableError("database or disk is full")

    saver = SnapshotSaver(FullDisk())
    with caplog.at_level(logging.INFO, logger="halflife.interest.snapshot_saver"):
        for n in range(20):
            saver.submit(f"u{n}", ProfileSnapshot(1, "k", b""))
            assert saver.wait(10)
    lines = [r.getMessage() for r in caplog.records if "could not save" in r.getMessage()]
    assert lines == [f"could not save the profile snapshot of {user_pseudonym('u0')}: database or disk is full"]
    saver.close(10)


def test_the_snapshot_saver_drops_what_does_not_fit_and_survives_a_failing_store(caplog):
    import threading

    from halflife.interest.snapshot_saver import MAX_PENDING, SnapshotSaver
    from halflife.storage.base import ProfileSnapshot, StoreError

    release, saving, saved = threading.Event(), threading.Event(), []

    class Store:
        def save_profile_snapshot(self, user_id, snapshot):
            saving.set()
            assert release.wait(10)
            if user_id == "broken":
                raise StoreError("disk full")
            saved.append(user_id)
            return True

    saver = SnapshotSaver(Store())
    saver.submit("first", ProfileSnapshot(1, "k", b""))
    assert saving.wait(10)  # taken: the queue is empty again
    with caplog.at_level(logging.INFO, logger="halflife.interest.snapshot_saver"):
        for n in range(MAX_PENDING + 2):
            saver.submit("broken" if n == 0 else f"u{n}", ProfileSnapshot(1, "k", b""))
        release.set()
        assert saver.wait(10)
    assert saved == ["first", *(f"u{n}" for n in range(1, MAX_PENDING))]
    assert "dropped: 8 saves waiting" in caplog.text and "disk full" in caplog.text
    assert f"snapshot of {user_pseudonym('broken')}: disk full" in caplog.text and "'broken'" not in caplog.text
    saver.submit("after", ProfileSnapshot(1, "k", b""))
    assert saver.wait(10) and saved[-1] == "after"

    release.clear()
    saver.submit("queued before close", ProfileSnapshot(1, "k", b""))
    closing = threading.Thread(target=saver.close, args=(10,))
    closing.start()
    for _ in range(1000):  # until close() has begun
        if saver._closed:
            break
        time.sleep(0.01)
    saver.submit("after close", ProfileSnapshot(1, "k", b""))  # dropped
    release.set()
    closing.join(10)
    assert saved[-1] == "queued before close" and not saver._thread.is_alive()


def test_snapshots_still_queued_when_close_gives_up_are_dropped(caplog):
    import threading

    from halflife.interest.snapshot_saver import SnapshotSaver
    from halflife.storage.base import ProfileSnapshot

    release, saving, saved = threading.Event(), threading.Event(), []

    class Store:
        def save_profile_snapshot(self, user_id, snapshot):
            saving.set()
            assert release.wait(10)  # a writer held up by another process
            saved.append(user_id)
            return True

    saver = SnapshotSaver(Store())
    saver.submit("in flight", ProfileSnapshot(1, "k", b""))
    assert saving.wait(10)
    saver.submit("queued", ProfileSnapshot(1, "k", b""))
    with caplog.at_level(logging.INFO, logger="halflife.interest.snapshot_saver"):
        saver.close(timeout=0.05)
    release.set()
    saver._thread.join(10)
    assert saved == ["in flight"] and "1 profile snapshots not saved" in caplog.text


def test_the_command_docs_give_finds_a_users_pseudonym_in_the_logs():
    """docs/serving.md tells operators how to find a user's log lines: its
    command must print what the server logs for that id."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    command = next(line.strip() for line in doc.splitlines() if line.strip().startswith("python3 -c 'import hashlib"))
    argv = shlex.split(command)
    assert argv[0] == "python3" and argv[-1] == "USER_ID"
    for user_id in ("u", "ünïcode user 42", "a" * 500):
        printed = subprocess.run([sys.executable, *argv[1:-1], user_id], capture_output=True, text=True, check=True,
                                 timeout=30).stdout.strip()
        assert printed == user_pseudonym(user_id)
    assert user_pseudonym("u") != user_pseudonym("v")
