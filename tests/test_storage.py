"""The SQLite store: items, content-addressed vectors, idempotent group-committed
events, durability across kill -9, erasure (down to the file's bytes), schema."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import re
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import halflife
from halflife.storage import sqlite as sqlite_mod
from halflife.storage.base import (
    EventRecord, ItemRecord, ItemsChangedError, ProfileSnapshot, StoreDamagedError, StoreError, StoreUnavailableError,
)
from halflife.storage.sqlite import DB_NAME, SCHEMA_VERSION, SqliteStore, stored_vectors
from tests.fakes import full_disk, process_limit, stored_history
from tests.serving import serve_once, start_cli_server

DIM = 16
RNG = np.random.default_rng(1234)


def vec() -> np.ndarray:
    v = RNG.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def item(id_: str, vector: np.ndarray | None = None, **kw) -> ItemRecord:
    return ItemRecord(
        id=id_,
        text=kw.get("text", f"text of {id_}"),
        categories=kw.get("categories", ("books", "sci-fi")),
        attributes=kw.get("attributes", {"author": "Le Guin", "lang": "en"}),
        create_time=kw.get("create_time", 1_700_000_000.5),
        vector=vec() if vector is None else vector,
        embedded_by=kw.get("embedded_by"),
    )


def event(event_id: str, user_id: str = "u1", vector: np.ndarray | None = None, **kw) -> EventRecord:
    return EventRecord(
        event_id=event_id,
        user_id=user_id,
        type=kw.get("type", 1),
        item_id=kw.get("item_id", "i1"),
        text=kw.get("text"),
        value=kw.get("value"),
        event_time=kw.get("event_time", 1_700_000_100.25),
        vector=vec() if vector is None else vector,
    )


def raw(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / DB_NAME)


def count(tmp_path: Path, sql: str, *args) -> int:
    with raw(tmp_path) as conn:
        return conn.execute(sql, args).fetchone()[0]


@pytest.fixture()
def store(tmp_path):
    s = SqliteStore(tmp_path)
    yield s
    s.close()


def hold_writer(store: SqliteStore):
    """Blocks the writer thread inside a job until the returned event is set."""
    gate, started = threading.Event(), threading.Event()

    def blocker(conn):
        started.set()
        assert gate.wait(10)

    t = threading.Thread(target=store._submit, args=(blocker,))
    t.start()
    assert started.wait(10)
    return gate, t


# --------------------------------------------------------------------------- open / schema

def test_open_sets_pragmas_and_schema(store, tmp_path):
    conn = store._writer
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 10_000
    assert conn.execute("PRAGMA cache_size").fetchone()[0] == -65_536  # KiB
    assert count(tmp_path, "PRAGMA user_version") == SCHEMA_VERSION


def test_sustained_writes_keep_the_wal_bounded(store, tmp_path):
    """The writer checkpoints as it goes: after ~12,500 pages of events the
    WAL holds less than the checkpoint interval plus one batch, and its file
    stays under journal_size_limit."""
    text = "x" * 4000  # about a page per event
    for b in range(25):
        store.record_events([event(f"w{b}-{j}", f"u{j % 7}", text=text) for j in range(500)])
    with raw(tmp_path) as conn:
        busy, wal_frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0
    assert 0 < wal_frames < 10_000 + 600
    assert (tmp_path / f"{DB_NAME}-wal").stat().st_size <= 64 << 20


def test_reopen_keeps_data(tmp_path):
    v = vec()
    with SqliteStore(tmp_path) as s:
        s.upsert_items([item("a", v)])
        s.record_events([event("e1", vector=v)])
    with SqliteStore(tmp_path) as s:
        assert np.array_equal(s.get_items(["a"])["a"].vector, v)
        assert [e.event_id for e in s.user_events("u1")] == ["e1"]
        assert s.record_events([event("e2")])[0].seq == 2


def test_newer_schema_is_refused(tmp_path):
    SqliteStore(tmp_path).close()
    with raw(tmp_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        SqliteStore(tmp_path)


def test_a_newer_halflifes_store_of_another_model_is_refused_as_newer(tmp_path):
    """A server reads a store's vectors before it opens it (`stored_vectors`):
    one a newer halflife wrote, bound to another model, was refused as
    another model's, where what it needs is a newer halflife."""
    with SqliteStore(tmp_path) as store:
        store.upsert_items([item("a", vector=np.ones(DIM, dtype=np.float32))])
        store.bind_vectors("other-space", "other/model")
    assert stored_vectors(tmp_path) == (DIM, ("other-space", "other/model"))
    with raw(tmp_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    assert stored_vectors(tmp_path) == (None, None)  # the open says why


def test_failed_migration_leaves_the_file_untouched(tmp_path, monkeypatch):
    SqliteStore(tmp_path).close()

    def add_table_then_fail(conn):
        conn.execute("CREATE TABLE half_done (x)")
        raise sqlite3.OperationalError("boom")

    monkeypatch.setattr(sqlite_mod, "MIGRATIONS", sqlite_mod.MIGRATIONS + [add_table_then_fail])
    monkeypatch.setattr(sqlite_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="boom"):
        SqliteStore(tmp_path)
    assert count(tmp_path, "PRAGMA user_version") == SCHEMA_VERSION
    assert count(tmp_path, "SELECT COUNT(*) FROM sqlite_master WHERE name = 'half_done'") == 0


@pytest.mark.parametrize("table", ["customers", "items"])
def test_a_sqlite_file_of_something_else_is_refused_untouched(tmp_path, table):
    """It was taken over (its tables kept, Halflife's added) or, where a table
    name clashed, refused after its journal mode had been switched to WAL."""
    with raw(tmp_path) as conn:
        conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute(f"INSERT INTO {table} (name) VALUES ('someone')")
    before = (tmp_path / DB_NAME).read_bytes()
    with pytest.raises(StoreError, match=f"is not a Halflife store .*tables: {table}"):
        SqliteStore(tmp_path)
    assert (tmp_path / DB_NAME).read_bytes() == before


def test_openers_of_one_new_store_at_once_all_get_it(tmp_path):
    """The switch to WAL takes the file's exclusive lock, which SQLite's busy
    handler does not wait for: 1 in ~9 of several processes (or threads)
    opening one new store at once failed with "database is locked"."""
    errors = []
    for trial in range(40):
        directory = tmp_path / str(trial)
        start = threading.Barrier(4)

        def open_it() -> None:
            start.wait()
            try:
                SqliteStore(directory).close()
            except StoreError as e:
                errors.append(e)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert errors == []


def test_corrupt_text_is_a_store_error(tmp_path):
    """Text that is not UTF-8 (a damaged page) raised AttributeError from the
    sqlite3 module's own error, which carries no SQLite code."""
    store = SqliteStore(tmp_path)
    store.upsert_items([item("a", vec())])
    with raw(tmp_path) as conn:
        conn.execute("UPDATE items SET text = CAST(X'FFFE41' AS TEXT) WHERE id = 'a'")
    with pytest.raises(StoreError):
        store.get_items(["a"])
    store.close()


def test_not_a_database(tmp_path):
    (tmp_path / DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        SqliteStore(tmp_path)


def test_closed_store_refuses_calls(tmp_path):
    s = SqliteStore(tmp_path)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.record_events([event("e1")])
    with pytest.raises(StoreError, match="closed"):
        s.event_count()


# --------------------------------------------------------------------------- items

def test_items_upsert_get_delete_iter(store, tmp_path):
    a, b = item("a"), item("b", create_time=None, categories=(), attributes={})
    assert store.upsert_items([a, b]) == (2, 0)
    a2 = item("a", text="new text", categories=("films",))
    assert store.upsert_items([a2, item("c")]) == (1, 1)

    got = store.get_items(["a", "b", "missing"])
    assert set(got) == {"a", "b"}
    assert got["a"].text == "new text" and got["a"].categories == ("films",)
    assert got["a"].attributes == {"author": "Le Guin", "lang": "en"}
    assert got["a"].create_time == 1_700_000_000.5
    assert got["b"].create_time is None and got["b"].categories == () and got["b"].attributes == {}
    assert np.array_equal(got["a"].vector, a2.vector)
    assert got["a"].vector.dtype == np.float32

    assert sorted(i.id for i in store.iter_items()) == ["a", "b", "c"]
    assert store.delete_items(["c", "nope", "a"]) == ["c", "a"]
    assert store.delete_items(["c"]) == []
    assert [i.id for i in store.iter_items()] == ["b"]
    # the replaced and the deleted items' vectors are collected
    assert count(tmp_path, "SELECT COUNT(*) FROM vectors") == 1


def test_list_items_pages_in_utf8_byte_order_from_the_id_after(store):
    # Code point order is UTF-8 byte order; UTF-16 order (and so a careless collation) would put
    # U+FF5E before U+1F600, Latin-1 or case folding would move "B" and "é".
    ids = ["b", "B", "a", "é", "\uff5e", "\U0001f600", "a b", "ab"]
    store.upsert_items([item(i) for i in ids])
    expected = sorted(ids, key=lambda i: i.encode())
    assert expected == ["B", "a", "a b", "ab", "b", "é", "\uff5e", "\U0001f600"]
    pages, after = [], ""
    while after is not None:
        page, after = store.list_items(after, 3)
        pages.append([i.id for i in page])
    assert pages == [expected[:3], expected[3:6], expected[6:]]
    # A page that ends the catalogue exactly says so: no empty page after it.
    assert store.list_items("", len(ids))[1] is None and store.list_items("", len(ids) - 1)[1] == expected[-2]
    assert [i.id for i in store.list_items("aa", 2)[0]] == ["ab", "b"]  # after an id that does not exist
    (got,), stored = store.list_items("a b", 1)[0], store.get_items(["ab"])["ab"]  # the whole item, as get_items
    assert dataclasses.replace(got, vector=None) == dataclasses.replace(stored, vector=None)
    assert np.array_equal(got.vector, stored.vector)
    assert store.list_items("\U0001f600", 5) == ([], None)


@pytest.mark.parametrize("newest_first", [False, True])
def test_a_ranged_page_reads_a_bounded_window_of_the_log_and_says_where_it_got_to(store, monkeypatch, newest_first):
    """A time range filtered rows as the index walked them: a page of a narrow
    range read the user's whole log. A page reads at most RANGED_PAGE_SCAN of
    the user's events: short or empty pages carry the place they got to, and
    following them lists exactly the range, in order."""
    monkeypatch.setattr(sqlite_mod, "RANGED_PAGE_SCAN", 3)
    times = [50.0, 10.0, 60.0, 20.0, 70.0, 30.0, 80.0, 40.0, 90.0, 15.0, 25.0]  # recorded in this order
    store.record_events([event(f"r{k}", user_id="r", event_time=t) for k, t in enumerate(times)]
                        + [event("other", user_id="o", event_time=20.0)])
    expected = [f"r{k}" for k, t in enumerate(times) if 15.0 <= t < 40.0]
    pages, after = [], 0
    while after is not None:
        page, after = store.list_user_events("r", after, 2, newest_first, start_time=15.0, end_time=40.0)
        pages.append([e.event_id for e in page])
        assert len(pages) <= len(times)  # bounded: each page moves on
    assert sum(pages, []) == (expected[::-1] if newest_first else expected)
    assert [] in pages and max(map(len, pages)) <= 2  # a window without any: an empty page, with a place
    assert store.list_user_events("r", 0, 2, newest_first)[0] == store.list_user_events(
        "r", 0, 2, newest_first, -math.inf, math.inf)[0]  # no range: no window


def test_list_user_events_pages_one_users_log_in_seq_order(store):
    store.record_events([event(f"e{k}", user_id=f"u{k % 3}", event_time=float(100 - k),
                               value=float(k) if k % 2 else None) for k in range(10)])
    pages, after = [], 0
    while after is not None:
        page, after = store.list_user_events("u1", after, 2)
        pages.append([(e.event_id, e.seq, e.value, e.event_time, e.vector) for e in page])
    assert pages == [[("e1", 2, 1.0, 99.0, None), ("e4", 5, None, 96.0, None)], [("e7", 8, 7.0, 93.0, None)]]
    full, more = store.list_user_events("u0", 0, 4)  # the page that ends the log says so
    assert [e.event_id for e in full] == ["e0", "e3", "e6", "e9"] and more is None
    assert store.list_user_events("u0", 0, 3)[1] == 7 and store.list_user_events("nobody", 0, 5) == ([], None)
    pages, after = [], 0  # newest first: the same log from its end, each page after the last one's seq
    while after is not None:
        page, after = store.list_user_events("u0", after, 3, newest_first=True)
        pages.append([(e.event_id, e.seq) for e in page])
    assert pages == [[("e9", 10), ("e6", 7), ("e3", 4)], [("e0", 1)]]
    assert store.list_user_events("u0", 7, 5, newest_first=True)[0] == full[1::-1]  # before seq 7, newest first
    assert store.list_user_events("nobody", 0, 5, newest_first=True) == ([], None)
    store.delete_user("u0")
    assert store.list_user_events("u0", 0, 5) == ([], None)
    assert store.list_user_events("u0", 0, 5, newest_first=True) == ([], None)


def test_ids_with_nul_are_refused_and_never_reach_another_row(store):
    # SQLite's json_each (3.40) cuts "a\0b" to "a": each lookup by a list of
    # ids would then read, update or delete item "a" instead.
    store.upsert_items([item("a")])
    store.record_events([event("e", item_id="a")])
    for call in (lambda: store.upsert_items([item("a\x00b")]), lambda: store.delete_items(["a\x00b"]),
                 lambda: store.get_items(["a\x00b"]), lambda: store.existing_event_ids(["e\x00x"]),
                 lambda: store.record_events([event("e\x00x", item_id="a")])):
        with pytest.raises(ValueError, match="NUL"):
            call()
    assert list(store.get_items(["a"])) == ["a"] and store.get_items(["a"])["a"].text == "text of a"
    assert [e.event_id for e in store.user_events("u1")] == ["e"]


def test_vectors_round_trip_bit_exactly(store):
    weird = np.array([0.0, -0.0, 1e-45, -1e-45, np.inf, -np.inf, 3.4028235e38, np.nan], dtype=np.float32)
    payload_nan = np.frombuffer(np.uint32(0x7FC0_1234).tobytes(), dtype=np.float32)
    vectors = {f"i{k}": RNG.standard_normal(384).astype(np.float32) for k in range(20)}
    vectors["weird"] = np.concatenate([weird, payload_nan])
    store.upsert_items([item(k, v) for k, v in vectors.items()])
    got = store.get_items(list(vectors))
    for k, v in vectors.items():
        assert got[k].vector.tobytes() == v.tobytes()
    store.record_events([event("e", vector=vectors["weird"]), event("e2", vector=vectors["i0"])])  # one batch
    assert [e.vector.tobytes() for e in store.user_events("u1")] == [vectors["weird"].tobytes(), vectors["i0"].tobytes()]


def test_event_keeps_the_vector_it_was_recorded_with(store, tmp_path):
    old, new = vec(), vec()
    store.upsert_items([item("i1", old)])
    store.record_events([event("e1", vector=old, item_id="i1")])
    assert store.upsert_items([item("i1", new)]) == (0, 1)
    assert np.array_equal(store.get_items(["i1"])["i1"].vector, new)
    assert np.array_equal(store.user_events("u1")[0].vector, old)
    assert count(tmp_path, "SELECT COUNT(*) FROM vectors") == 2
    assert store.delete_items(["i1"]) == ["i1"]
    assert np.array_equal(store.user_events("u1")[0].vector, old)
    assert count(tmp_path, "SELECT COUNT(*) FROM vectors") == 1  # `new` went with the item


def test_identical_vectors_are_stored_once(store, tmp_path):
    shared = vec()
    store.upsert_items([item("a", shared), item("b", shared.copy())])
    store.record_events([event(f"e{k}", vector=shared.copy()) for k in range(50)])
    assert count(tmp_path, "SELECT COUNT(*) FROM vectors") == 1


# --------------------------------------------------------------------------- events

def test_record_events_seq_and_readback(store, tmp_path):
    batch = [event(f"e{k}", user_id=f"u{k % 3}", value=k * 0.5 if k % 2 else None, text="hi" if k == 4 else None)
             for k in range(10)]
    stored = store.record_events(batch)
    assert [e.seq for e in stored] == list(range(1, 11))
    assert [e.event_id for e in stored] == [e.event_id for e in batch]
    more = store.record_events([event("f0", user_id="u1")])
    assert more[0].seq == 11

    u1 = store.user_events("u1")
    assert [e.event_id for e in u1] == ["e1", "e4", "e7", "f0"]
    assert [e.seq for e in u1] == sorted(e.seq for e in u1)
    e4 = u1[1]
    assert (e4.user_id, e4.type, e4.item_id, e4.text, e4.value, e4.event_time) == ("u1", 1, "i1", "hi", None, 1_700_000_100.25)
    assert np.array_equal(e4.vector, batch[4].vector)
    assert u1[0].value == 0.5
    assert store.user_events("nobody") == []
    assert count(tmp_path, "SELECT COUNT(DISTINCT user_id) FROM events") == 3 and store.event_count() == 11


@pytest.mark.skipif(not hasattr(sqlite3.Connection, "setlimit"), reason="Connection.setlimit needs Python 3.11")
def test_writes_split_into_statements_under_a_small_parameter_limit(store, tmp_path):
    # Rows go in as multi-row INSERTs sized to SQLite's bound-parameter limit;
    # with room for 2 event rows (8 parameters each) per statement a batch
    # takes many statements and every row must still land once, exactly.
    store._writer.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 17)
    items = [item(f"i{k}") for k in range(7)]
    store.upsert_items(items)
    texts = ["", "nul\x00inside", "astral \U0001F600", "quote ' \" ;", None]
    batch = [event(f"e{k}", user_id=f"u{k % 3}", item_id=f"i{k % 7}", vector=items[k % 7].vector if k % 2 else None,
                   text=texts[k % 5], value=None if k % 4 else k / 3, event_time=1_700_000_000 + k / 7)
             for k in range(41)]
    stored = store.record_events(batch[:30] + batch[:5] + batch[30:])  # re-sent ones are skipped
    assert [e.seq for e in stored] == list(range(1, 42))
    again = {e.event_id: e for u in ("u0", "u1", "u2") for e in store.user_events(u)}
    assert len(again) == 41
    for sent in batch:
        got = again[sent.event_id]
        assert got[:7] == sent[:7] and np.array_equal(got.vector, sent.vector)
    got_items = store.get_items([i.id for i in items])
    for i in items:
        got = got_items[i.id]
        assert (got.text, got.categories, got.attributes, got.create_time) == (i.text, i.categories, i.attributes, i.create_time)
        assert np.array_equal(got.vector, i.vector)
    # item vectors are shared, each other event's vector is its own
    assert count(tmp_path, "SELECT COUNT(*) FROM vectors") == 7 + 21
    assert count(tmp_path, "SELECT SUM(events) FROM vector_refs") == 41
    assert count(tmp_path, "SELECT COUNT(*) FROM changes WHERE item_id IS NOT NULL") == 7


def test_record_events_is_idempotent(store, tmp_path):
    batch = [event(f"e{k}") for k in range(5)]
    assert len(store.record_events(batch)) == 5
    assert store.record_events(batch) == []  # re-sent: nothing new
    # duplicates inside a batch: the first one wins; stored ones are skipped
    dup = [event("n1", value=1.0), event("e0"), event("n1", value=2.0), event("n2")]
    stored = store.record_events(dup)
    assert [(e.event_id, e.seq) for e in stored] == [("n1", 6), ("n2", 7)]
    assert stored[0].value == 1.0
    assert store.event_count() == 7
    assert [e.value for e in store.user_events("u1") if e.event_id == "n1"] == [1.0]
    assert count(tmp_path, "SELECT COUNT(*) FROM vectors") == 7  # skipped events left no vectors
    assert store.record_events([]) == []


def test_failing_batch_leaves_nothing(store, tmp_path):
    store.record_events([event("before")])
    bad = [event(f"b{k}") for k in range(10)]
    bad[6] = event("b6", user_id=None)  # NOT NULL violation after six rows went in
    with pytest.raises(StoreError, match="NOT NULL"):
        store.record_events(bad)
    assert store.event_count() == 1
    assert count(tmp_path, "SELECT COUNT(*) FROM vectors") == 1
    # the ids of the failed batch are still free
    assert len(store.record_events([e for e in bad if e.user_id])) == 9


def test_a_full_disk_is_unavailable_and_stores_nothing_while_a_bad_row_is_a_plain_error(store):
    store.record_events([event("before")])
    full_disk(store, True)
    batch = [event(f"f{k}", text="x" * 4000) for k in range(50)]
    with pytest.raises(StoreUnavailableError, match="full"):
        store.record_events(batch)
    assert store.event_count() == 1 and store.existing_event_ids(["f0"]) == set()  # reads still work
    full_disk(store, False)
    assert len(store.record_events(batch)) == 50  # the retry succeeds
    with pytest.raises(StoreError) as caught:
        store.record_events([event("b", user_id=None)])  # NOT NULL: our bug, not the disk's
    assert not isinstance(caught.value, StoreUnavailableError)


@pytest.mark.parametrize("gone", [DB_NAME, DB_NAME + "-wal"])
def test_files_deleted_under_the_store_refuse_writes_and_readers_create_none(tmp_path, gone):
    """An audit deleted them under a running server: writes still answered OK
    into the deleted file (or a WAL SQLite no longer reads) and were gone at
    the next start, and a new reader made an empty database, which that start
    took for a new store."""
    store = SqliteStore(tmp_path)
    try:
        assert len(store.record_events([event("before")])) == 1
        os.remove(tmp_path / gone)
        with pytest.raises(StoreDamagedError, match="deleted or replaced while the server ran"):
            store.record_events([event("after")])
        if gone == DB_NAME:
            with pytest.raises(sqlite3.OperationalError, match="unable to open"):
                sqlite_mod._connect(tmp_path / DB_NAME, readonly=True)
            assert not (tmp_path / DB_NAME).exists()
            # A read that must open a reader says so too (it was a plain StoreError: INTERNAL and a traceback).
            store._readers.clear()
            with pytest.raises(StoreDamagedError, match="deleted or replaced while the server ran"):
                store.event_count()
    finally:
        store.close()


def in_thread(fn, *args, timeout: float = 10):
    """fn(*args) on a daemon thread: its result, or its exception raised
    here; AssertionError when it has not returned within `timeout` (a hung
    call must fail the test, not hang the run)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as e:  # noqa: BLE001 - raised again below
            outcome.append((False, e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"{getattr(fn, '__name__', fn)} did not return within {timeout} s"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def test_files_that_cannot_be_looked_at_refuse_writes_until_they_can(tmp_path, monkeypatch):
    """A data directory made unreadable under a running server (chmod 000)
    failed the writer's check of its files with a PermissionError, which
    ended the writer thread: that write and every later one waited forever,
    the permissions given back or not, while health said SERVING. Faked:
    tests run as root, whom no permission stops."""
    store = SqliteStore(tmp_path)
    stat, denied = os.stat, [True]

    def unreadable_directory(path, *args, **kwargs):
        if denied[0] and Path(path).parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    try:
        assert len(store.record_events([event("before")])) == 1
        monkeypatch.setattr(os, "stat", unreadable_directory)
        with pytest.raises(StoreUnavailableError, match=rf"cannot check that {re.escape(str(store.path))} is still "
                           r"the file the server opened \(\[Errno 13\] Permission denied: .*\); writes are refused"):
            in_thread(store.record_events, [event("while")])
        assert store.event_count() == 1  # reads go on
        denied[0] = False
        retried = in_thread(store.record_events, [event("while"), event("after")])
        assert [e.event_id for e in retried] == ["while", "after"]
    finally:
        monkeypatch.undo()
        store.close()


@pytest.mark.parametrize("damage, named", [
    ("UPDATE items SET categories = 'not json'", "item 'i1': its categories or attributes are not the JSON stored"),
    ("UPDATE events SET type = 99", "an event of type 99, which this server does not know"),
    ("UPDATE events SET event_time = 'noon'", "events 1..1: a type, value or time is not a number"),
])
def test_a_row_damaged_on_disk_stops_serve_in_one_line(model_dir, tmp_path, damage, named):
    """They were 44-59 lines of traceback (JSONDecodeError, IndexError, ValueError; an audit)."""
    store = SqliteStore(tmp_path / "data")
    v = np.eye(384, dtype=np.float32)[0]
    store.upsert_items([item("i1", vector=v)])
    store.record_events([event("e1", vector=v)])
    store.close()
    with sqlite3.connect(tmp_path / "data" / DB_NAME) as conn:
        conn.execute(damage)
    result = serve_once(model_dir, tmp_path / "data", timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"halflife serve: error: {named}" in result.stderr.splitlines()[-1], result.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_a_store_with_damaged_pages_stops_serve_naming_the_file_and_the_way_back(model_dir, tmp_path, workers):
    """It said only "database disk image is malformed" (an operations review)."""
    with SqliteStore(tmp_path / "data") as store:
        store.upsert_items([item(f"i{n}", text="x" * 2000) for n in range(50)])  # pages past the schema's
    path = tmp_path / "data" / DB_NAME
    with open(path, "r+b") as db:  # every page after the first two overwritten: the b-trees are garbage
        db.seek(2 * 4096)
        db.write(b"\xff" * (path.stat().st_size - 2 * 4096))
    result = serve_once(model_dir, tmp_path / "data", workers=workers, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith("halflife serve: error: ") and result.stderr.splitlines()[-1].endswith(
        f'({path}: restore it from a backup, docs/interest.md "Storage")'), result.stderr


@pytest.mark.parametrize("damage", ["header overwritten", "truncated"])
def test_a_store_damaged_where_it_opens_is_store_damage_naming_the_way_back(model_dir, tmp_path, damage):
    """A header overwritten ("file is not a database") or a file cut in half
    ("malformed", found by the open's own reads) failed the open as a plain
    StoreError: serve said "cannot open ...: file is not a database" without
    the file's way back that damage found later gets (an operations review)."""
    with SqliteStore(tmp_path / "data") as store:
        store.upsert_items([item(f"i{n}", text="x" * 2000) for n in range(50)])
    path = tmp_path / "data" / DB_NAME
    with open(path, "r+b") as db:
        if damage == "truncated":
            db.truncate(path.stat().st_size // 2)
        else:
            db.write(b"\xa5" * 100)
    with pytest.raises(StoreDamagedError, match=f"cannot open {path}: "):
        SqliteStore(tmp_path / "data")
    if damage == "header overwritten":  # the whole command once: the line serve prints
        result = serve_once(model_dir, tmp_path / "data", timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.splitlines()[-1] == (f"halflife serve: error: cannot open {path}: file is not a database "
                                                  f'({path}: restore it from a backup, docs/interest.md "Storage")')


@pytest.mark.parametrize("what", ["items", "events only"])
def test_a_store_built_with_a_model_of_another_size_stops_serve_in_one_line(model_dir, tmp_path, what):
    """A data directory served with another model: a ValueError's traceback
    from deep in the catalogue (a review), or, with no item left, a profile
    read that failed INTERNAL later."""
    with SqliteStore(tmp_path / "data") as store:
        store.upsert_items([item("i1")])  # DIM-dimensional: not the model's 384
        store.record_events([event("e1")])
        if what == "events only":
            store.delete_items(["i1"])
        assert store.vector_size() == DIM
    result = serve_once(model_dir, tmp_path / "data", timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert (f"halflife serve: error: the store holds {DIM}-dimensional vectors, where this model's have 384"
            in result.stderr.splitlines()[-1]), result.stderr
    # The way to keep the data with this model, not only an empty directory (a config-change review).
    assert "halflife reembed --data-dir OLD --out NEW --model-dir DIR" in result.stderr.splitlines()[-1]


def test_a_store_of_another_size_names_the_model_it_came_from(tmp_path):
    """A model change's store served with the new model said "it was built
    with another model; serve it with that one", not which, where the store
    records it: the one to roll back to (a model-upgrade review). A store from
    before the record is still told by its size."""
    from halflife.config import Config
    from halflife.interest.engine import InterestEngine
    from tests.fakes import fake_embed

    def serve_with_another_model() -> None:
        with SqliteStore(tmp_path) as store:
            InterestEngine(Config(), store, 384, fake_embed, vector_space=("new-space", "new/model (384-d)"))

    with SqliteStore(tmp_path) as store:
        store.upsert_items([item("i1")])  # DIM-dimensional
    with pytest.raises(StoreError, match=f"^the store holds {DIM}-dimensional vectors, where this model's have 384: "):
        serve_with_another_model()
    with SqliteStore(tmp_path) as store:
        assert store.bound_vectors() is None  # the refusal bound nothing
        store.bind_vectors("old-space", f"old/model ({DIM}-d)")
    with pytest.raises(StoreError, match=rf"^the store's vectors come from old/model \({DIM}-d\) .*, and this model is "
                       r"new/model \(384-d\) .*halflife reembed --data-dir OLD --out NEW"):
        serve_with_another_model()
    with SqliteStore(tmp_path) as store:
        assert store.bound_vectors() == ("old-space", f"old/model ({DIM}-d)")


def test_the_store_records_the_vector_space_it_was_first_bound_to(tmp_path):
    with SqliteStore(tmp_path) as store:
        assert store.bound_vectors() is None
        assert store.bind_vectors("space-a", "model a (16-d)") == ("space-a", "model a (16-d)")
        store.upsert_items([item("i1")])
        assert store.bind_vectors("space-b", "model b (16-d)") == ("space-a", "model a (16-d)")
    with SqliteStore(tmp_path) as store:  # for good
        assert store.bind_vectors("space-b", "model b (16-d)") == ("space-a", "model a (16-d)")


def test_a_store_that_holds_no_vector_takes_the_model_that_serves_it(tmp_path):
    """`make serve` started once on an empty var/data bound it to the bundled
    model, and every other model was refused it, told to take "a data
    directory of its own: empty" (a model-upgrade review). Nothing in a store
    without vectors is in any model's space; one with a vector stays its
    model's, its last vector deleted or not."""
    from halflife.config import Config
    from halflife.interest.engine import InterestEngine
    from tests.fakes import fake_embed

    def serve(model: str) -> None:
        with SqliteStore(tmp_path) as store:
            InterestEngine(Config(), store, DIM, fake_embed, vector_space=(f"{model}-space", f"{model} ({DIM}-d)"))

    serve("bundled")
    serve("mine")  # refused before
    with SqliteStore(tmp_path) as store:
        assert store.bound_vectors() == ("mine-space", f"mine ({DIM}-d)")
        store.upsert_items([item("i1")])
    with pytest.raises(StoreError, match=rf"^the store's vectors come from mine \({DIM}-d\) "):
        serve("bundled")
    with SqliteStore(tmp_path) as store:
        store.delete_items(["i1"])
        assert store.vector_size() is None
    serve("bundled")


def test_a_vector_space_is_named_by_the_weights_loaded_not_by_their_file_names(model_dir):
    """The same weights from a directory that also holds pytorch_model.bin
    (or training_args.bin), or under another file name, were another model."""
    from halflife.embedding.engine import vector_space
    from halflife.embedding.manifest import load_manifest

    manifest = load_manifest(model_dir)
    ((name, digest),) = manifest.source["weights_sha256"].items()

    def with_files(files: dict) -> str:
        return vector_space(dataclasses.replace(manifest, source={**manifest.source, "weights_sha256": files}))

    same = vector_space(manifest)
    assert with_files({name: digest, "pytorch_model.bin": "1" * 64, "training_args.bin": "2" * 64}) == same
    assert with_files({"model-renamed.safetensors": digest}) == same
    assert with_files({name: "3" * 64}) != same  # other weights


def test_a_store_built_with_another_model_of_the_same_size_stops_serve_and_another_variant_serves(model_dir, tmp_path):
    """Same size, other weights: it served silently, ranking the new model's
    queries and items against the old one's vectors (an operations review)."""
    from halflife.api.server import ServerConfig
    from halflife.embedding.engine import CPU, vector_space
    from halflife.embedding.manifest import load_manifest
    from tests.serving import ServerThread

    manifest = json.loads((model_dir / "manifest.json").read_text())
    with SqliteStore(tmp_path / "data") as store:
        store.upsert_items([item("i1", vector=np.full(384, 384**-0.5, dtype=np.float32))])  # one held: bound for good
        store.bind_vectors(vector_space(load_manifest(model_dir)), f"{manifest['model_id']} (384-d)")
    other = tmp_path / "other-model"  # the same files, said to come from other weights
    other.mkdir()
    for path in model_dir.iterdir():
        if path.name != "manifest.json":
            (other / path.name).symlink_to(path.resolve())
    manifest["model_id"] = "someone/fine-tuned"
    manifest["source"]["weights_sha256"] = {"model.safetensors": "0" * 64}
    (other / "manifest.json").write_text(json.dumps(manifest))
    result = serve_once(other, tmp_path / "data", timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert ("the store's vectors come from sentence-transformers/all-MiniLM-L6-v2 (384-d)" in result.stderr
            and "this model is someone/fine-tuned (384-d)" in result.stderr.splitlines()[-1]), result.stderr
    assert "halflife reembed --data-dir OLD --out NEW --model-dir DIR" in result.stderr.splitlines()[-1]
    variant = next(v["name"] for v in manifest["variants"] if v["name"] != manifest["default_variants"][CPU])
    with ServerThread(ServerConfig(port=0, model_dir=model_dir, data_dir=tmp_path / "data", variant=variant)):
        pass  # another variant of the same model: the same space


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("bound", [True, False])
def test_a_start_refused_for_another_models_store_leaves_it_as_it_was(model_dir, tmp_path, workers, bound):
    """It was opened first: migrated from an older schema (an older
    halflife, the way back, then refused it) and its change feed pruned,
    with --workers too (its parent prepares the store). A schema 7 store
    bound to another model of the same size, and one of schema 6 of another
    size, which only its size tells."""
    data = tmp_path / "data"
    with SqliteStore(data) as store:
        size = 384 if bound else DIM
        store.upsert_items([item(i, vector=np.full(size, size**-0.5, dtype=np.float32)) for i in ("i1", "i2")])
        store.delete_items(["i2"])  # a feed row the start prunes
        store.bind_vectors("other-space", "other/model (384-d)")
    with contextlib.closing(sqlite3.connect(data / DB_NAME)) as conn:  # closed: its WAL checkpointed
        conn.execute("ALTER TABLE changes DROP COLUMN vector_version")
        if not bound:
            conn.execute("DROP TABLE meta")
        conn.execute(f"PRAGMA user_version = {7 if bound else 6}")
        conn.commit()
    before = (data / DB_NAME).read_bytes()
    result = serve_once(model_dir, data, workers=workers, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    refusal = "the store's vectors come from other/model" if bound else f"the store holds {DIM}-dimensional vectors"
    assert refusal in result.stderr.splitlines()[-1], result.stderr
    assert (data / DB_NAME).read_bytes() == before


def test_ids_with_control_characters_stored_by_an_earlier_halflife_stay_readable_and_erasable(model_dir, tmp_path):
    """Halflife before 2026-12-05 (5efd287) stored ids holding control
    characters; after the upgrade every call naming such a user was
    INVALID_ARGUMENT, DeleteUser too (their log and texts could not be
    erased), and such an item, still recommended, could not be read or
    deleted (an upgrade review: a store written at 1ba644a). New ones stay
    refused."""
    import grpc

    from halflife.api.server import ServerConfig
    from halflife.v1 import catalog_pb2, catalog_pb2_grpc, interest_pb2, interest_pb2_grpc
    from tests.serving import ServerThread

    user, item_id, unit = "tab\tuser", "new\nline", np.full(384, 384**-0.5, dtype=np.float32)
    with SqliteStore(tmp_path / "data") as store:
        store.upsert_items([item(item_id, vector=unit)])
        store.record_events([event("e1", user, item_id=item_id, vector=unit),
                             event("e2", "nul\0user", item_id=item_id, vector=unit)])
    with ServerThread(ServerConfig(port=0, model_dir=model_dir, data_dir=tmp_path / "data")) as running:
        with grpc.insecure_channel(running.address) as channel:
            interest = interest_pb2_grpc.InterestServiceStub(channel)
            catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
            assert interest.GetProfile(interest_pb2.GetProfileRequest(user_id=user)).event_counts[0].count == 1
            listed = interest.ListEvents(interest_pb2.ListEventsRequest(user_id=user)).events
            assert [e.event_id for e in listed] == ["e1"]
            assert interest.DeleteUser(interest_pb2.DeleteUserRequest(user_id=user)).deleted_event_count == 1
            assert interest.DeleteUser(interest_pb2.DeleteUserRequest(user_id="nul\0user")).deleted_event_count == 1
            assert [i.id for i in catalog.GetItems(catalog_pb2.GetItemsRequest(ids=[item_id])).items] == [item_id]
            assert catalog.DeleteItems(catalog_pb2.DeleteItemsRequest(ids=[item_id])).deleted_count == 1
            for refused in (lambda: catalog.GetItems(catalog_pb2.GetItemsRequest(ids=["a\0b"])),  # JSON cuts it
                            lambda: interest.RecordEvents(interest_pb2.RecordEventsRequest(events=[interest_pb2.Event(
                                event_id="e3", user_id=user, type=interest_pb2.EVENT_TYPE_SEARCH, text="x")]))):
                with pytest.raises(grpc.RpcError) as error:
                    refused()
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "must not contain control characters" in error.value.details()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_store_bound_by_an_earlier_halflife_serves_with_its_model(model_dir, tmp_path, workers):
    """Until bed3b31 a vector space was named by every weights file, by name
    and content: a store that halflife bound to this very model was refused
    at start as another model's ("the store's vectors come from
    sentence-transformers/all-MiniLM-L6-v2 (384-d) ..., and this model is
    sentence-transformers/all-MiniLM-L6-v2 (384-d)"), told to reembed (an
    upgrade review: a store written at d4c12ea). A --workers group's parent
    checks it before its workers do."""
    from halflife.embedding.manifest import load_manifest

    m = load_manifest(model_dir)
    parts = (repr(sorted(m.source["weights_sha256"].items())), m.tokenizer_sha256, m.pooling, str(m.normalize),
             str(m.max_input_tokens), str(m.dimension))  # that halflife's vector_space, as it wrote it
    with SqliteStore(tmp_path / "data") as store:
        store.upsert_items([item("i1", vector=np.full(384, 384**-0.5, dtype=np.float32))])  # one held: bound for good
        store.bind_vectors(hashlib.sha256("\n".join(parts).encode()).hexdigest(), f"{m.model_id} (384-d)")
    process, _ = start_cli_server(model_dir, tmp_path / "data", workers=workers, drain=True)
    process.terminate()  # the parent stops its workers
    assert process.wait(timeout=60) == 0


def test_a_store_file_it_may_not_write_is_refused_at_open(tmp_path):
    """SQLite opens such a file (another owner's, an immutable one) read-only
    without a word: an up-to-date store passed its start, health said
    SERVING, and every write failed UNAVAILABLE "retry" (an operations
    review). Immutable stands in for another owner's: tests run as root."""
    SqliteStore(tmp_path).close()
    path = tmp_path / DB_NAME
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (needs root and a file system that supports it)")
    try:
        # What to do, too: it said "attempt to write a readonly database" alone (an operations review).
        with pytest.raises(StoreError, match=r"attempt to write a readonly database \(halflife writes a "
                           rf"store even to read it, .* write access to the file and to {re.escape(str(tmp_path))}, or copy"
                           ) as refused:
            SqliteStore(tmp_path)
        # Not "unavailable for now": a group's replacement worker was started again 3 times for it (a review).
        assert type(refused.value) is StoreError
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("name", [DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"])
def test_a_directory_where_a_file_of_the_store_belongs_is_named(tmp_path, name):
    """A container's volume mounted onto a file the host lacked makes such a
    directory: the start failed as "unable to open database file", and for
    the -shm as "attempt to write a readonly database ... give this user
    write access", which it had."""
    SqliteStore(tmp_path).close()
    (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / name).mkdir()
    with pytest.raises(StoreError) as refused:
        SqliteStore(tmp_path)
    assert str(refused.value) == (f"cannot open {tmp_path / DB_NAME}: {tmp_path / name} is a directory, where SQLite "
                                  "keeps a file of the store: move it away")


def test_a_store_that_cannot_open_on_a_full_disk_says_how_much_is_free(tmp_path, monkeypatch):
    """The -shm's 32 KiB, which a full disk refuses, failed the start as "disk I/O error" alone."""
    SqliteStore(tmp_path).close()

    def full(conn):
        error = sqlite3.OperationalError("disk I/O error")
        error.sqlite_errorcode, error.sqlite_errorname = 4874, "SQLITE_IOERR_SHMSIZE"
        raise error

    monkeypatch.setattr(sqlite_mod, "_switch_to_wal", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, (1 << 30) - 4096, 4096))
    with pytest.raises(StoreUnavailableError) as caught:
        SqliteStore(tmp_path)
    assert str(caught.value) == (f"cannot open {tmp_path / DB_NAME}: disk I/O error (SQLITE_IOERR_SHMSIZE on "
                                 f"{tmp_path / DB_NAME}: its disk has 4 KiB free)")


def test_a_write_past_a_file_size_limit_says_which_write_on_which_file_and_the_retry_succeeds(tmp_path):
    """A real I/O error at the commit: the WAL may not grow (RLIMIT_FSIZE,
    SIGXFSZ ignored, so the write fails with EFBIG as with a quota). Writes
    failed with "transaction aborted: disk I/O error" alone, naming neither
    the file, nor the operation, nor the disk's room (the open said the last)."""
    import resource

    store = SqliteStore(tmp_path)
    store.record_events([event(f"e{k}", text="x" * 1000) for k in range(50)])
    wal = os.path.getsize(str(store.path) + "-wal")
    with process_limit(resource.RLIMIT_FSIZE, wal):
        with pytest.raises(StoreUnavailableError, match=rf"disk I/O error \(SQLITE_IOERR_WRITE on "
                           rf"{re.escape(str(store.path))}: its disk has \d+ KiB free\)$"):
            store.record_events([event(f"f{k}", text="y" * 1000) for k in range(50)])
    assert store.event_count() == 50 and store.existing_event_ids(["f0"]) == set()  # nothing of it stored
    assert len(store.record_events([event(f"f{k}", text="y" * 1000) for k in range(50)])) == 50
    store.close()


def test_a_reader_that_cannot_open_for_want_of_file_descriptors_says_so(tmp_path):
    """Out of file descriptors (RLIMIT_NOFILE), a read that needed a new
    connection failed as "cannot open PATH: unable to open database file",
    sending an operator to a file that was fine (a server under load)."""
    import resource

    store = SqliteStore(tmp_path)
    store.record_events([event("e")])
    store._readers.clear()  # the next read opens a connection
    with process_limit(resource.RLIMIT_NOFILE, 3), pytest.raises(StoreUnavailableError) as caught:
        store.event_count()
    assert str(caught.value) == (f"cannot open {store.path}: unable to open database file "
                                 "([Errno 24] Too many open files)")
    assert store.event_count() == 1  # once it can
    store.close()


def test_damaged_pages_are_store_damage_not_a_bug():
    error = sqlite3.DatabaseError("database disk image is malformed")
    error.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
    assert isinstance(sqlite_mod._store_error(error), StoreDamagedError)
    error.sqlite_errorcode = sqlite3.SQLITE_BUSY
    assert isinstance(sqlite_mod._store_error(error), StoreUnavailableError)


def test_a_lock_another_process_holds_fails_the_waiting_group_at_once(tmp_path, monkeypatch):
    """Each job of a group tried the lock anew and waited out the busy timeout
    again: 10 s more a job, the writer stuck behind a full group for minutes
    (an audit)."""
    monkeypatch.setattr(sqlite_mod, "BUSY_TIMEOUT_MS", 1000)
    store = SqliteStore(tmp_path)
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    failed: dict[int, float] = {}

    def send(k: int) -> None:
        try:
            store.record_events([event(f"locked-{k}")])
        except StoreUnavailableError:
            failed[k] = time.monotonic()

    def wait_until(condition) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.001)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
    jobs_before = store.job_count
    try:
        # The groups are made deterministic (CI once caught two threads in the first group): the first job is
        # taken alone, and the other three are queued while it waits out the busy timeout.
        threads[0].start()
        wait_until(lambda: store.job_count > jobs_before)
        for t in threads[1:]:
            t.start()
        wait_until(lambda: len(store._queue) == 3)
        assert not failed, "the machine took longer than the busy timeout to queue three jobs"
        for t in threads:
            t.join(30)
    finally:
        other.execute("ROLLBACK")
        other.close()
    try:
        assert len(failed) == 4
        times = sorted(failed.values())
        # The first job waited alone; the three queued behind it failed together (they were 1 s apart each:
        # the bound leaves a loaded machine time to wake the three threads).
        assert times[-1] - times[1] < 1.0, times
        assert len(store.record_events([event("after-the-lock")])) == 1
    finally:
        store.close()


def test_failing_batch_fails_alone_inside_a_group(store):
    gate, blocker = hold_writer(store)
    results: dict[int, object] = {}

    def send(k: int, batch: list[EventRecord]) -> None:
        try:
            results[k] = store.record_events(batch)
        except Exception as e:  # noqa: BLE001
            results[k] = e

    batches = [[event(f"t{k}-{j}", user_id=f"u{k}") for j in range(5)] for k in range(4)]
    batches[2][3] = event("t2-3", user_id=None)
    threads = [threading.Thread(target=send, args=(k, b)) for k, b in enumerate(batches)]
    for t in threads:
        t.start()
    while len(store._queue) < 4:
        time.sleep(0.001)
    commits = store.commit_count
    gate.set()
    for t in threads + [blocker]:
        t.join(10)
    assert store.commit_count == commits + 2  # the blocker's group, then one group for all four
    assert isinstance(results[2], StoreError)
    assert all(len(results[k]) == 5 for k in (0, 1, 3))
    assert store.event_count() == 15 and store.user_events("u2") == []


def test_concurrent_record_events_land_once_and_group(store):
    threads_n, batches_n, size = 8, 25, 20
    returned: list[list[str]] = [[] for _ in range(threads_n)]
    barrier = threading.Barrier(threads_n)

    def worker(t: int) -> None:
        barrier.wait()
        for b in range(batches_n):
            # every batch also re-sends two events of the neighbouring thread's same batch
            batch = [event(f"c{t}-{b}-{j}", user_id=f"u{t}") for j in range(size)]
            batch += [event(f"c{(t + 1) % threads_n}-{b}-{j}", user_id=f"u{(t + 1) % threads_n}") for j in range(2)]
            returned[t] += [e.event_id for e in store.record_events(batch)]

    seen_counts: list[int] = []
    stop = threading.Event()

    def reader() -> None:  # reads run on their own connections while the writer writes
        while not stop.is_set():
            seen_counts.append(store.event_count())

    commits = store.commit_count
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    watcher.join(10)
    assert seen_counts and seen_counts == sorted(seen_counts)  # never a torn or reordered view
    everything = [eid for r in returned for eid in r]
    assert len(everything) == len(set(everything)) == threads_n * batches_n * size
    assert store.event_count() == threads_n * batches_n * size
    for t in range(threads_n):
        seqs = [e.seq for e in store.user_events(f"u{t}")]
        assert len(seqs) == batches_n * size and seqs == sorted(seqs)
    assert store.commit_count - commits < threads_n * batches_n  # callers shared commits


def test_a_long_read_of_the_log_comes_in_whole_chunks_and_sets_off_no_garbage_collection(store):
    n = 20_000
    for start in range(0, n, 5_000):
        store.record_events([event(f"e{k}", user_id=f"u{k % 7}", item_id=f"i{k % 13}", event_time=float(k))
                             for k in range(start, start + 5_000)])
    chunks = list(store.iter_events(chunk=1_200, through_seq=2_500))  # chunks made of several fetches
    assert [len(c.seqs) for c in chunks] == [1_200, 1_200, 100]
    assert np.concatenate([c.seqs for c in chunks]).tolist() == list(range(1, 2_501))
    assert [u for c in chunks for u in c.user_ids][1_199:1_202] == ["u2", "u3", "u4"]  # seqs 1,200 to 1,202: k % 7
    gc.collect()
    before = gc.get_stats()[0]["collections"]
    assert sum(len(c.item_ids) for c in store.iter_events()) == n
    # 50,000-row fetches set off one collection per 700 rows, ~30 here (2,800 at 1M events, 0.5-0.8 s of a start).
    assert gc.get_stats()[0]["collections"] - before <= 5


def test_iter_events_chunks(store):
    store.record_events([event(f"e{k}", user_id=f"u{k % 2}", type=k % 4, item_id=None if k == 3 else f"i{k}",
                               value=None if k == 1 else float(k), event_time=float(k)) for k in range(25)])
    chunks = list(store.iter_events(chunk=10))
    assert [len(c.item_ids) for c in chunks] == [10, 10, 5]
    seqs = np.concatenate([c.seqs for c in chunks])
    types = np.concatenate([c.types for c in chunks])
    times = np.concatenate([c.times for c in chunks])
    values = np.concatenate([c.values for c in chunks])
    items = [i for c in chunks for i in c.item_ids]
    users = [u for c in chunks for u in c.user_ids]
    assert seqs.tolist() == list(range(1, 26))
    assert types.tolist() == [k % 4 for k in range(25)]
    assert times.dtype == np.float64 and times.tolist() == [float(k) for k in range(25)]
    assert items[3] is None and items[4] == "i4"
    assert users[:3] == ["u0", "u1", "u0"]
    assert values[0] == 0.0 and np.isnan(values[1]) and values[2] == 2.0
    one = list(store.iter_events(chunk=5, through_seq=20, user_id="u1"))  # what an erasure takes back
    assert [c.seqs.tolist() for c in one] == [[2, 4, 6, 8, 10], [12, 14, 16, 18, 20]]
    assert {u for c in one for u in c.user_ids} == {"u1"} and list(store.iter_events(user_id="nobody")) == []
    rest = list(store.iter_events(after_seq=20, user_id="u1"))  # what arrived after that read
    assert [c.seqs.tolist() for c in rest] == [[22, 24]]
    assert store.event_count("u1") == 12
    assert store.event_count() == 25 and store.event_count("nobody") == 0


def test_a_pass_over_the_log_or_the_catalogue_lets_checkpoints_through_between_its_chunks(tmp_path, monkeypatch):
    """A pass read the whole log (or catalogue) in one statement, whose
    snapshot no checkpoint could pass: a rebuild of the blend at 5M events
    read for 30-50 s, the WAL grew with every write meanwhile and an
    erasure's truncation waited (a scale review; see docs/serving.md,
    "User erasure"). A read each chunk, from where the last one ended:
    between two, a checkpoint goes through; every row comes once, in order."""
    monkeypatch.setattr(sqlite_mod, "ITEMS_PER_READ", 400)
    store, other = SqliteStore(tmp_path), SqliteStore(tmp_path)
    store.upsert_items([item(f"i{k}") for k in range(1_200)])  # past a fetch (1,000 rows) of one statement
    store.record_events([event(f"e{k}", user_id=f"u{k % 3}", vector=vec()) for k in range(25)])
    checkpoint = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None, timeout=0.05)
    checkpoints = []

    def write_and_checkpoint() -> None:  # between two chunks: a write elsewhere, then a truncation
        other.record_events([event(f"w{len(checkpoints)}", vector=vec())])
        checkpoints.append(checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])

    seqs = []
    for chunk in store.iter_events(chunk=10, through_seq=25):
        seqs += chunk.seqs.tolist()
        write_and_checkpoint()
    ids = []
    for n, record in enumerate(store.iter_items()):
        ids.append(record.id)
        if n % 500 == 0:
            write_and_checkpoint()
    assert seqs == list(range(1, 26)) and ids == [f"i{k}" for k in range(1_200)]
    assert checkpoints == [0] * 6  # none busy
    assert (tmp_path / (DB_NAME + "-wal")).stat().st_size == 0
    checkpoint.close()
    store.close()
    other.close()


def test_created_seq_marks_each_incarnation_of_an_item_id(store):
    store.upsert_items([item("a", vec())])
    assert store.get_items(["a"])["a"].created_seq == 0
    store.record_events([event(f"e{k}", item_id="a") for k in range(3)])
    store.upsert_items([item("a", vec())])  # an update keeps its incarnation
    assert store.get_items(["a"])["a"].created_seq == 0
    store.delete_items(["a"])
    store.upsert_items([item("a", vec())])  # re-created after events 1..3
    assert store.get_items(["a"])["a"].created_seq == 3
    assert [i.created_seq for i in store.iter_items()] == [3]


# --------------------------------------------------------------------------- profile snapshots

def _history(store: SqliteStore, user_id: str) -> tuple:
    snapshot, events = stored_history(store, user_id)
    return snapshot, [(*e[:7], e.seq, e.vector.tobytes()) for e in events]


def _tail(store: SqliteStore, user_id: str, first: int) -> list[tuple]:
    """The user's events from the `first`-th on, as `_history` lists them."""
    return [(*e[:7], e.seq, e.vector.tobytes()) for e in store.user_events(user_id)[first:]]


def test_a_profile_snapshot_is_read_with_the_events_after_it_and_kept_while_it_is_the_latest(store, tmp_path):
    seqs = [e.seq for e in store.record_events([event(f"e{k}", event_time=1e9 + k) for k in range(5)])]
    store.record_events([event("other", user_id="u2")])
    assert _history(store, "u1") == (None, _tail(store, "u1", 0))
    assert stored_history(store, "nobody") == (None, [])

    third = ProfileSnapshot(seqs[2], "settings-a", b"through the third")
    assert store.save_profile_snapshot("u1", third)
    assert _history(store, "u1") == (third, _tail(store, "u1", 3))
    assert [e.seq for e in stored_history(store, "u1")[1]] == seqs[3:]

    assert not store.save_profile_snapshot("u1", ProfileSnapshot(seqs[1], "settings-a", b"older"))
    assert stored_history(store, "u1")[0] == third  # one covering fewer events never replaces it
    # One covering the same events does: the same profile, unless the stored one was damaged.
    as_old = ProfileSnapshot(seqs[2], "settings-a", b"as old")
    assert store.save_profile_snapshot("u1", as_old)
    assert stored_history(store, "u1")[0] == as_old
    other_settings = ProfileSnapshot(seqs[1], "settings-b", b"another config")
    assert store.save_profile_snapshot("u1", other_settings)  # built with other settings: replaced
    assert _history(store, "u1") == (other_settings, _tail(store, "u1", 2))
    # Only at one of the user's own stored events:
    assert not store.save_profile_snapshot("u1", ProfileSnapshot(seqs[-1] + 1, "settings-a", b"u2's event"))
    assert not store.save_profile_snapshot("u2", ProfileSnapshot(seqs[4], "settings-a", b"u1's event"))
    assert count(tmp_path, "SELECT COUNT(*) FROM profile_snapshots") == 1


def test_a_snapshot_damaged_into_text_is_read_as_bytes(store, tmp_path):
    """TEXT that is no UTF-8 failed the read itself, before the snapshot's own
    check could send the profile to a replay (an audit: INTERNAL for good)."""
    (recorded,) = store.record_events([event("e0")])
    assert store.save_profile_snapshot("u1", ProfileSnapshot(recorded.seq, "settings", b"fine"))
    with raw(tmp_path) as conn:
        conn.execute("UPDATE profile_snapshots SET data = CAST(X'FF00' AS TEXT)")
    assert stored_history(store, "u1")[0].data == b"\xff\x00"


@pytest.mark.parametrize("chunk", [10, 2], ids=["one chunk", "streamed"])
def test_a_history_of_one_chunk_ends_its_read_before_it_is_replayed(store, tmp_path, chunk):
    """A read transaction held while the caller replays keeps a WAL
    checkpoint (an erasure's truncation) waiting: a log of one chunk is read
    whole and its snapshot ended; a longer one is streamed in one snapshot."""
    store.upsert_items([item("i1")])
    store.record_events([event(f"e{k}", event_time=1e9 + k) for k in range(5)])
    checkpointer = raw(tmp_path)
    checkpointer.execute("PRAGMA busy_timeout = 0")
    with store.user_history("u1", chunk=chunk) as (_, chunks):
        busy, _, _ = checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == (chunk == 2)
        store.record_events([event("meanwhile", event_time=1e9 - 1)])  # not in this read, first as it is ordered
        assert [e.event_id for c in chunks for e in c] == [f"e{k}" for k in range(5)]
    checkpointer.close()


def test_a_snapshot_read_before_an_erasure_is_never_saved_after_it(store, tmp_path):
    """A replay that read the user's events before their erasure saves its
    snapshot after it: the store refuses it, also once the user id has
    events anew."""
    (stored,) = store.record_events([event("e0")])
    snapshot = ProfileSnapshot(stored.seq, "k", b"the erased user's profile")
    store.delete_user("u1")
    assert not store.save_profile_snapshot("u1", snapshot)
    store.record_events([event("e1")])
    assert not store.save_profile_snapshot("u1", snapshot)
    assert stored_history(store, "u1")[0] is None
    assert count(tmp_path, "SELECT COUNT(*) FROM profile_snapshots") == 0


# --------------------------------------------------------------------------- delete_user

def store_bytes(directory) -> bytes:
    """The store's files' bytes (database, WAL, shm, erasure marks), end to end."""
    return b"".join(p.read_bytes() for p in directory.iterdir() if p.name.startswith(DB_NAME))


def test_delete_user_erases_rows_vectors_and_bytes(store, tmp_path):
    marker = "zebra-privacy-marker-91723"
    user = "user-privacy-7f3a9c"
    shared, own = vec(), vec()
    store.upsert_items([item("i1", shared)])
    store.record_events([event(f"p{k}", user_id=user, vector=own if k % 2 else shared,
                               text=f"{marker} review {k}") for k in range(40)])
    store.record_events([event(f"o{k}", user_id="other", vector=shared) for k in range(20)])
    (last,) = store.record_events([event("p-last", user_id=user, vector=vec(), text=marker)])
    assert store.save_profile_snapshot(user, ProfileSnapshot(last.seq, "k", f"profile of {marker}".encode()))
    store.checkpoint()

    before = store_bytes(tmp_path)
    assert marker.encode() in before and user.encode() in before and own.tobytes() in before

    assert store.delete_user(user) == 41
    assert store.user_events(user) == [] and stored_history(store, user) == (None, [])
    assert count(tmp_path, "SELECT COUNT(*) FROM profile_snapshots") == 0
    assert count(tmp_path, "SELECT COUNT(*) FROM events WHERE user_id = ?", user) == 0
    assert count(tmp_path, "SELECT COUNT(*) FROM vectors") == 1  # only `shared` survives
    assert len(store.user_events("other")) == 20
    assert np.array_equal(store.get_items(["i1"])["i1"].vector, shared)
    assert count(tmp_path, "SELECT COUNT(DISTINCT user_id) FROM events") == 1 and store.event_count() == 20

    after = store_bytes(tmp_path)  # db and -wal, as delete_user left them (it checkpoints itself)
    assert marker.encode() not in after
    assert user.encode() not in after
    assert own.tobytes() not in after
    assert store.delete_user(user) == 0


def test_vacuum_rewrites_the_store_without_what_deletes_left_in_its_unused_space(tmp_path):
    """SQLite's secure_delete zeroes the rows a delete takes, but a page
    rebalanced keeps old copies of the cells it moved in its unused space: a
    review found an erased user's id (index events(user_id, seq)) in the
    file's bytes after DeleteUser in 5 of 9 rounds. `vacuum` rewrites the
    file with only its live rows. Here a delete without secure_delete leaves
    the bytes for certain; erasures of interleaved users, whatever this
    SQLite leaves of them, go too."""
    marker = "left-behind-marker-4c2e"
    store = SqliteStore(tmp_path)
    vectors = [vec() for _ in range(20)]
    store.upsert_items([item(f"i{k}", vectors[k]) for k in range(20)])
    users = [f"{k:04x}-{hashlib.sha256(str(k).encode()).hexdigest()[:16]}" for k in range(30)]
    rng = np.random.default_rng(3)
    for batch in range(12):  # users interleave in the log, so their index entries move as pages split
        store.record_events([event(f"e{batch}-{j}", user_id=users[rng.integers(30)], item_id=f"i{j % 20}",
                                   vector=vectors[j % 20], text=f"query {j}") for j in range(500)])
    erased = users[:6]
    for user in erased:
        store.delete_user(user)
    store.record_events([event(f"m{k}", user_id="leaver", vector=vec(), text=marker) for k in range(50)])
    kept = {u: [(e.event_id, e.event_time, e.text) for e in store.user_events(u)] for u in users[6:]}
    store.close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("PRAGMA secure_delete = OFF")
    conn.execute("DELETE FROM events WHERE user_id = 'leaver'")
    conn.commit()
    conn.close()
    assert marker.encode() in store_bytes(tmp_path)

    before, after = sqlite_mod.vacuum(tmp_path)

    assert after < before  # the erasures' free pages went
    assert sorted(p.name for p in tmp_path.iterdir()) == [DB_NAME]  # no copy, no WAL left beside it
    data = store_bytes(tmp_path)
    assert marker.encode() not in data
    assert [u for u in erased if u.encode() in data] == []
    with SqliteStore(tmp_path) as reopened:  # a store as before: schema, WAL, rows, the log's high-water mark
        assert {u: [(e.event_id, e.event_time, e.text) for e in reopened.user_events(u)] for u in kept} == kept
        assert reopened.event_count() == sum(map(len, kept.values()))
        assert reopened.head().event_seq == 12 * 500 + 50
        assert reopened._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert reopened._writer.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_vacuum_keeps_the_stores_mode_and_owner(tmp_path):
    """SQLite created the vacuumed copy 0644 and its process's: a store kept
    0600, the whole log of every user, became readable by every local user,
    and one vacuumed by root (sudo) was then unwritable by its server."""
    SqliteStore(tmp_path).close()
    path = tmp_path / DB_NAME
    os.chmod(path, 0o600)
    owner = (12345, 23456) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(path, *owner)

    sqlite_mod.vacuum(tmp_path)

    status = path.stat()
    assert (oct(status.st_mode & 0o777), status.st_uid, status.st_gid) == ("0o600", *owner)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DB_NAME]


def test_vacuum_of_a_store_linked_from_elsewhere_rewrites_the_file_and_keeps_the_link(tmp_path):
    """A store whose halflife.sqlite3 is a link to a file on another disk was
    replaced by a file in the data directory, on its disk."""
    elsewhere, data = tmp_path / "big-disk", tmp_path / "data"
    elsewhere.mkdir()
    data.mkdir()
    (data / DB_NAME).symlink_to(elsewhere / "store.sqlite3")
    with SqliteStore(data) as store:
        store.record_events([event(f"e{k}") for k in range(30)])
    sqlite_mod.vacuum(data)
    assert (data / DB_NAME).is_symlink() and sorted(p.name for p in elsewhere.iterdir()) == ["store.sqlite3"]
    with SqliteStore(data) as store:
        assert store.event_count() == 30


def test_vacuum_refuses_a_store_another_process_has_open_even_with_its_wal_empty(tmp_path):
    """A process with the store open (`reembed` reads its source without
    the directory's lock) left commits in the WAL, which vacuum took as the
    sign; but an erasure's owed WAL truncation, done by vacuum's own open,
    emptied it: the file was renamed under that process, whose next reads
    took the copy's pages from the WAL beside it ("the store is damaged")."""
    with SqliteStore(tmp_path) as store:
        store.upsert_items([item(f"i{k}") for k in range(20)])
        store.record_events([event(f"e{k}", user_id=f"u{k % 7}", item_id=f"i{k % 20}") for k in range(3000)])
    other = SqliteStore(tmp_path)
    try:
        before = [(e.event_id, e.item_id) for e in other.user_events("u3")]
        (tmp_path / f"{DB_NAME}-erased-elsewhere-1").touch()  # a truncation owed: vacuum's open empties the WAL
        with pytest.raises(StoreError, match="open in another process"):
            sqlite_mod.vacuum(tmp_path)
        assert [(e.event_id, e.item_id) for e in other.user_events("u3")] == before
        assert other.event_count() == 3000
        assert not (tmp_path / f"{DB_NAME}{sqlite_mod.VACUUM_SUFFIX}").exists()
    finally:
        other.close()
    assert sqlite_mod.vacuum(tmp_path)  # once it is closed
    with SqliteStore(tmp_path) as reopened:
        assert reopened.event_count() == 3000 and reopened.item_count() == 20


def test_a_store_opened_while_vacuum_replaces_it_says_so(tmp_path, monkeypatch):
    """An open that waits on vacuum's lock (`reembed` reading its source)
    goes on in the file vacuum then renamed away, which SQLite refuses to
    write (SQLITE_READONLY_DBMOVED): that read as a permissions problem,
    "give this user write access to the file"."""
    with SqliteStore(tmp_path) as store:
        store.record_events([event(f"e{k}") for k in range(10)])
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:  # as vacuum's lock leaves the file
        conn.execute("PRAGMA journal_mode = DELETE")
    connect = sqlite_mod._connect

    def replaced_meanwhile(path, *, readonly):
        conn = connect(path, readonly=readonly)
        shutil.copy(path, tmp_path / "copy")
        os.replace(tmp_path / "copy", path)  # as vacuum's rename, once its lock let the open go on
        return conn

    monkeypatch.setattr(sqlite_mod, "_connect", replaced_meanwhile)
    with pytest.raises(StoreUnavailableError, match="replaced while it was opened") as refused:
        SqliteStore(tmp_path)
    assert "write access" not in str(refused.value)
    monkeypatch.undo()
    with SqliteStore(tmp_path) as reopened:  # opened again, as the error says
        assert reopened.event_count() == 10


def test_a_vacuum_stopped_removes_its_copy_and_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    """SIGTERM or Ctrl-C after `VACUUM INTO` (a signal waits for it to
    return) left the copy, the store's size, beside it until the next vacuum."""
    from halflife.signals import SignalExit

    with SqliteStore(tmp_path) as store:
        store.record_events([event(f"e{k}", text=f"text {k}") for k in range(500)])

    def stopped(fd):
        raise SignalExit(signal.SIGTERM)

    monkeypatch.setattr(sqlite_mod.os, "fsync", stopped)  # the copy's, before the rename
    with pytest.raises(SignalExit):
        sqlite_mod.vacuum(tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / f"{DB_NAME}{sqlite_mod.VACUUM_SUFFIX}").exists()
    with SqliteStore(tmp_path) as reopened:
        reopened.check_intact()
        assert reopened.event_count() == 500


def test_the_vacuum_command_refuses_a_directory_in_use_or_without_a_store(tmp_path, capsys):
    from halflife.locks import claim_data_dir
    from halflife.cli import main

    SqliteStore(tmp_path / "data").close()
    with claim_data_dir(tmp_path / "data", "pid 1, a server"):
        assert main(["vacuum", "--data-dir", str(tmp_path / "data")]) == 1
    assert "in use by another halflife process (pid 1, a server)" in capsys.readouterr().err
    assert main(["vacuum", "--data-dir", str(tmp_path / "none")]) == 1
    assert "holds no store" in capsys.readouterr().err
    assert main(["vacuum", "--data-dir", str(tmp_path / "data")]) == 0
    assert "only its live rows" in capsys.readouterr().out


def copies_on_disk(directory, marker: bytes) -> int:
    """Copies of `marker` in the store's files (database, WAL, erasure mark).
    A file may go while they are read: the store's retry thread removes the
    erasure mark once its checkpoint completes (a flaky full run)."""
    copies = 0
    for path in directory.iterdir():
        if path.name.startswith(DB_NAME):
            try:
                copies += path.read_bytes().count(marker)
            except FileNotFoundError:
                pass
    return copies


def long_read(directory: Path) -> sqlite3.Connection:
    """Another connection in the middle of a long read transaction (a
    replay's read of a long log); close() ends it. No checkpoint passes it
    meanwhile. (A pass of iter_events no longer holds one: a read each chunk.)"""
    conn = sqlite3.connect(directory / DB_NAME, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM events").fetchone()
    return conn


def test_an_erasure_blocked_by_another_process_reading_is_finished_when_the_read_ends(tmp_path):
    """Another process in the middle of a long read (a replay of a long log)
    blocks the WAL truncation after DeleteUser: the erased
    texts stayed in the WAL until the next automatic checkpoint (up to 10,000
    pages later), and the erasure, and every write queued behind it, waited
    the 10 s busy timeout."""
    marker = b"erased-marker-5e1c"
    writer = SqliteStore(tmp_path)
    writer.record_events([event(f"o{k}", user_id=f"other{k % 7}", vector=vec()) for k in range(400)])
    writer.record_events([event(f"v{k}", user_id="victim", vector=vec(), text=f"{marker.decode()} {k}")
                          for k in range(5)])

    def on_disk() -> int:
        return copies_on_disk(tmp_path, marker)

    passing = long_read(tmp_path)  # the reader holds its snapshot
    began = time.monotonic()
    assert writer.delete_user("victim") == 5
    writer.record_events([event("after", user_id="other0", vector=vec())])
    assert time.monotonic() - began < 0.8 * sqlite_mod.BUSY_TIMEOUT_MS / 1000  # it did not wait out the busy timeout
    passing.close()  # the read ends
    deadline = time.monotonic() + 10 * sqlite_mod.TRUNCATE_RETRY_S
    while on_disk() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert on_disk() == 0
    writer.close()


ERASE_THEN_DIE = textwrap.dedent(
    """
    import os, signal, sqlite3, sys
    import numpy as np
    from halflife.storage.base import EventRecord
    from halflife.storage.sqlite import SqliteStore

    store = SqliteStore(sys.argv[1])
    rng = np.random.default_rng(0)
    vec = lambda: rng.standard_normal(32).astype(np.float32)
    store.record_events([EventRecord(f"o{k}", f"other{k % 7}", 1, None, None, None, 1.0, vec()) for k in range(400)])
    store.record_events([EventRecord(f"v{k}", "victim", 1, None, sys.argv[2] + f" {k}", None, 1.0, vec())
                         for k in range(5)])
    passing = sqlite3.connect(store.path, isolation_level=None)  # a read held, as a replay's of a long log
    passing.execute("BEGIN")
    passing.execute("SELECT count(*) FROM events").fetchone()
    assert store.delete_user("victim") == 5
    os.kill(os.getpid(), signal.SIGKILL)  # before the retry in memory could finish it
    """
)


def test_an_erasures_wal_truncation_owed_at_a_crash_is_done_by_the_next_store(tmp_path):
    """A SIGKILL while the truncation after DeleteUser waited for a reader
    lost the retry, which lived in memory: the erased texts stayed in the
    WAL for as long as the restarted server ran (a crash audit)."""
    marker = "erased-before-a-crash-93b1"

    def on_disk() -> int:
        return copies_on_disk(tmp_path, marker.encode())

    child = subprocess.run([sys.executable, "-c", ERASE_THEN_DIE, str(tmp_path), marker], timeout=120)
    assert child.returncode == -signal.SIGKILL
    assert on_disk() > 0 and len(list(tmp_path.glob(DB_NAME + sqlite_mod.ERASED_MARK + "*"))) == 1
    store = SqliteStore(tmp_path)
    deadline = time.monotonic() + 10 * sqlite_mod.TRUNCATE_RETRY_S
    while on_disk() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert on_disk() == 0
    assert store.user_events("victim") == [] and len(store.user_events("other0")) > 0
    assert not list(tmp_path.glob(DB_NAME + sqlite_mod.ERASED_MARK + "*"))  # settled
    store.close()


def test_an_erasure_owes_its_truncation_on_disk_from_before_its_commit(tmp_path, monkeypatch):
    """A crash between the commit and the truncation after it (here: one that
    never runs) left the erased rows in the WAL and no mark to say so (a review)."""
    store = SqliteStore(tmp_path)
    store.record_events([event(f"e{k}", user_id="victim", vector=vec()) for k in range(3)])
    marks = lambda: list(tmp_path.glob(DB_NAME + sqlite_mod.ERASED_MARK + "*"))
    monkeypatch.setattr(store, "_truncate_wal", lambda conn: None)
    assert store.delete_user("victim") == 3 and len(marks()) == 1
    assert store.delete_user("nobody") == 0 and len(marks()) == 1  # nothing erased, nothing owed
    monkeypatch.undo()
    store.checkpoint()
    assert marks() == []
    store.close()


def test_an_erasure_that_committed_returns_its_count_whatever_its_truncation_raises(tmp_path, monkeypatch):
    """The truncation after the commit caught only sqlite3.Error: an OSError
    there (its mark files) failed the erasure as "writer failed" though the
    events were gone, and so a retry found nothing to take back (a review)."""
    store = SqliteStore(tmp_path)
    store.record_events([event(f"e{k}", user_id="victim", vector=vec()) for k in range(3)])

    def truncation_fails(conn):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(store, "_truncate_wal", truncation_fails)
    assert store.delete_user("victim") == 3
    assert store.user_events("victim") == []
    store.record_events([event("after", user_id="other", vector=vec())])  # the writer goes on
    assert [e.event_id for e in store.user_events("other")] == ["after"]
    monkeypatch.undo()
    store.close()


def test_an_erasures_truncation_retried_out_of_file_descriptors_leaves_the_writer_running(tmp_path, monkeypatch,
                                                                                          caplog):
    """The retry listed the erasure marks before its try: out of file
    descriptors (RLIMIT_NOFILE), the OSError ended the writer thread, and
    every write after it waited forever, descriptors freed or not. Each
    retry's mark, which cannot be made then, was a warning line a retry."""
    import resource

    from halflife.logs import RepeatedWarning

    monkeypatch.setattr(sqlite_mod, "TRUNCATE_RETRY_S", 0.05)
    monkeypatch.setattr(sqlite_mod, "_mark_failures", RepeatedWarning(sqlite_mod.log))  # none held back
    store = SqliteStore(tmp_path)
    store.record_events([event(f"e{k}", user_id=f"u{k % 2}", vector=vec()) for k in range(20)])
    passing = long_read(tmp_path)  # blocks the truncation: it is retried
    assert store.delete_user("u1") == 10 and store._truncate_pending
    with process_limit(resource.RLIMIT_NOFILE, 3), caplog.at_level(logging.WARNING, logger="halflife.storage.sqlite"):
        time.sleep(0.3)  # retries fail
    assert caplog.text.count("cannot mark the WAL truncation") == 1, caplog.text
    passing.close()
    assert [e.event_id for e in in_thread(store.record_events, [event("after", vector=vec())])] == ["after"]
    deadline = time.monotonic() + 5
    while list(tmp_path.glob(DB_NAME + sqlite_mod.ERASED_MARK + "*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(tmp_path.glob(DB_NAME + sqlite_mod.ERASED_MARK + "*"))  # the truncation completed
    store.close()


def test_an_erasures_truncation_that_fails_on_the_disk_says_why_and_completes_once_it_can(tmp_path, monkeypatch,
                                                                                          caplog):
    """The checkpoint copies the WAL into the database file, which may not
    grow here (RLIMIT_FSIZE, SIGXFSZ ignored: EFBIG, as a quota): the line
    said "disk I/O error" alone, naming neither the file nor the cause."""
    import resource

    from halflife.logs import RepeatedWarning

    monkeypatch.setattr(sqlite_mod, "TRUNCATE_RETRY_S", 0.05)
    monkeypatch.setattr(sqlite_mod, "_checkpoint_failures", RepeatedWarning(sqlite_mod.log))  # none held back
    store = SqliteStore(tmp_path)
    store.record_events([event(f"e{k}", user_id=f"u{k % 2}", vector=vec(), text="x" * 1000) for k in range(40)])
    passing = long_read(tmp_path)  # blocks the truncation after the commit
    assert store.delete_user("u1") == 20 and store._truncate_pending
    with (process_limit(resource.RLIMIT_FSIZE, store.path.stat().st_size),
          caplog.at_level(logging.WARNING, logger="halflife.storage.sqlite")):
        passing.close()
        deadline = time.monotonic() + 5
        while "checkpoint after an erasure failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert re.search(rf"checkpoint after an erasure failed \(disk I/O error \(SQLITE_IOERR_WRITE on "
                     rf"{re.escape(str(store.path))}: its disk has \d+ KiB free\)\)", caplog.text), caplog.text
    deadline = time.monotonic() + 5
    while list(tmp_path.glob(DB_NAME + sqlite_mod.ERASED_MARK + "*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(tmp_path.glob(DB_NAME + sqlite_mod.ERASED_MARK + "*"))  # completed once the file could grow
    store.close()


def test_a_store_that_owes_a_truncation_keeps_a_mark_whatever_other_stores_settle(tmp_path):
    """Another store's completed truncation removes the marks it found, and
    this one, still owing (pending) after a later blocked erasure, wrote no
    new one: a crash then lost that erasure's truncation (a review)."""
    a, b = SqliteStore(tmp_path), SqliteStore(tmp_path)
    a.record_events([event(f"o{k}", user_id=f"other{k % 7}", vector=vec()) for k in range(400)])
    for user in ("u1", "u2", "u3"):
        a.record_events([event(f"{user}-{k}", user_id=user, vector=vec(), text=f"{user} text") for k in range(5)])
    marks = lambda: list(tmp_path.glob(DB_NAME + sqlite_mod.ERASED_MARK + "*"))

    passing = long_read(tmp_path)
    assert a.delete_user("u1") == 5 and len(marks()) == 1  # blocked: a owes it
    passing.close()
    assert b.delete_user("u3") == 5 and marks() == []  # b's completed truncation settled it
    passing = long_read(tmp_path)
    assert a.delete_user("u2") == 5  # blocked again, while a still thinks itself owing
    assert len(marks()) == 1
    passing.close()
    for store in (a, b):
        store.close()
    assert marks() == []  # a's last try at close completed


# --------------------------------------------------------------------------- kill -9

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from halflife.storage.base import EventRecord
    from halflife.storage.sqlite import SqliteStore

    store = SqliteStore(sys.argv[1])
    rng = np.random.default_rng(0)
    b = 0
    while True:
        batch = [EventRecord(f"k{b}-{j}", f"u{j % 7}", 1, f"i{j}", None, None, 1.0,
                             rng.standard_normal(32).astype(np.float32)) for j in range(50)]
        store.record_events(batch)
        print(batch[-1].event_id, flush=True)
        b += 1
    """
)


def test_acknowledged_events_survive_kill_9(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(halflife.__path__[0]).parent), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    acked: list[str] = []
    try:
        for _ in range(8):
            line = child.stdout.readline()
            assert line, child.stderr.read()
            acked.append(line.strip())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    with SqliteStore(tmp_path) as s:
        present = {e.event_id for u in range(7) for e in s.user_events(f"u{u}")}
        for last in acked:
            b = int(last[1:].split("-")[0])
            assert {f"k{b}-{j}" for j in range(50)} <= present
        assert s.event_count() % 50 == 0  # whole batches only


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    import sqlite3

    from halflife.storage import sqlite as sqlite_store

    path = tmp_path / "halflife.sqlite3"
    conn = sqlite3.connect(path)
    sqlite_store.MIGRATIONS[0](conn)  # the schema as version 1 left it
    blob = vec().astype("<f4").tobytes()
    conn.execute("INSERT INTO vectors(id, hash, data) VALUES (1, ?, ?)", (hashlib.sha256(blob).digest(), blob))
    conn.execute("INSERT INTO items VALUES ('old', 'an item from v1', '[]', '{}', NULL, 1)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with SqliteStore(tmp_path) as s:
        (old,) = s.iter_items()
        assert old.id == "old" and old.created_seq == 0 and old.embedded_by is None  # schema 6: embedded again once
        assert s.record_events([event("e1", item_id="old")])[0].seq == 1
        assert s.save_profile_snapshot("u1", ProfileSnapshot(1, "k", b"profile"))  # a table of schema 5
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == sqlite_store.SCHEMA_VERSION


def test_an_items_embedding_model_is_kept_with_it_and_replaced_by_each_upsert(store, tmp_path):
    store.upsert_items([item("i1", embedded_by="model-a"), item("i2")])
    assert {i.id: i.embedded_by for i in store.iter_items()} == {"i1": "model-a", "i2": None}
    store.upsert_items([item("i1"), item("i2", embedded_by="model-b")])  # i1's vector now given, i2's embedded
    with SqliteStore(tmp_path) as reopened:
        assert {i: r.embedded_by for i, r in reopened.get_items(["i1", "i2"]).items()} == {"i1": None, "i2": "model-b"}


def _reference_check(tmp_path: Path) -> None:
    """vector_refs holds exactly each vector's events, every referenced vector
    exists and nothing else is kept."""
    with raw(tmp_path) as conn:
        counted = dict(conn.execute("SELECT id, events FROM vector_refs WHERE events != 0"))
        actual = dict(conn.execute("SELECT vector_id, COUNT(*) FROM events GROUP BY vector_id"))
        assert counted == actual
        assert conn.execute("SELECT COUNT(*) FROM vector_refs WHERE events < 0").fetchone()[0] == 0
        used = {r[0] for r in conn.execute("SELECT vector_id FROM events UNION SELECT vector_id FROM items")}
        assert {r[0] for r in conn.execute("SELECT id FROM vectors")} == used


def test_vector_references_stay_exact_through_writes_duplicates_erasures_and_item_changes(store, tmp_path):
    rng = np.random.default_rng(5)
    pool = [vec() for _ in range(6)]  # shared by items and events, so vectors are reused
    for step in range(40):
        action = rng.integers(4)
        if action == 0:
            store.upsert_items([item(f"i{rng.integers(8)}", pool[rng.integers(6)]) for _ in range(3)])
        elif action == 1:
            store.record_events([event(f"e{rng.integers(60)}", user_id=f"u{rng.integers(4)}",
                                       vector=pool[rng.integers(6)] if rng.random() < 0.7 else vec(),
                                       text=None if rng.random() < 0.7 else "a review")
                                 for _ in range(5)])  # ids repeat: duplicates are skipped
        elif action == 2:
            store.delete_user(f"u{rng.integers(4)}")
        else:
            store.delete_items([f"i{rng.integers(8)}"])
        _reference_check(tmp_path)


def test_a_version_7_database_counts_every_feed_row_as_a_vector_change(tmp_path):
    """What changed before schema 8 is not known: each row stands for a
    vector change then, so a read older than it is refused, as before."""
    with SqliteStore(tmp_path) as store:
        store.upsert_items([item("a"), item("b")])
        versions = {c.item_id: c.version for c in store.changes_since(0)}
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("ALTER TABLE changes DROP COLUMN vector_version")
        conn.execute("PRAGMA user_version = 7")
    with SqliteStore(tmp_path) as store:
        with sqlite3.connect(tmp_path / DB_NAME) as conn:
            assert dict(conn.execute("SELECT item_id, vector_version FROM changes")) == versions
        assert [e.event_id for e in store.record_events([event("e1", item_id="a")],
                                                        items_as_of=versions["b"])] == ["e1"]
        with pytest.raises(ItemsChangedError):
            store.record_events([event("e2", item_id="b")], items_as_of=versions["a"])


def test_a_version_3_database_moves_event_vector_references_to_counts(tmp_path):
    path = tmp_path / DB_NAME
    conn = sqlite3.connect(path, isolation_level=None)
    for migrate in sqlite_mod.MIGRATIONS[:3]:
        migrate(conn)
    conn.execute("PRAGMA user_version = 3")
    blobs = [vec().astype("<f4").tobytes() for _ in range(3)]
    conn.executemany("INSERT INTO vectors(id, hash, data) VALUES (?, ?, ?)",
                     [(k + 1, hashlib.sha256(b).digest(), b) for k, b in enumerate(blobs)])
    conn.execute("INSERT INTO items VALUES ('i1', 'an item', '[]', '{}', NULL, 1, 0)")
    rows = [(f"e{k}", "u1" if k < 4 else "gone", 1, "i1", None, None, 1.0 + k, 1 + k % 3) for k in range(6)]
    conn.executemany("""INSERT INTO events(event_id, user_id, type, item_id, text, value, event_time, vector_id)
                        VALUES (?, ?, ?, ?, ?, ?, ?, ?)""", rows)
    conn.execute("DELETE FROM events WHERE user_id = 'gone'")  # the newest seqs: AUTOINCREMENT must not reuse them
    conn.close()
    with SqliteStore(tmp_path) as s:
        assert s.head().event_seq == 6
        assert [e.event_id for e in s.user_events("u1")] == ["e0", "e1", "e2", "e3"]
        assert s.record_events([event("e-new", user_id="u2", item_id="i1")])[0].seq == 7
        assert s.delete_user("u1") == 4
    _reference_check(tmp_path)
    with raw(tmp_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA foreign_key_list(events)").fetchall() == []
        assert [r[1] for r in conn.execute("PRAGMA index_list(events)") if not r[1].startswith("sqlite_")] == \
            ["events_user_seq"]


@pytest.mark.parametrize("write, args", [
    ("upsert_items", [item("i1", text="new text"), item("i2")]),
    ("delete_items", ["i1"]),
    ("record_events", [event("e2")]),
    ("delete_user", "u1"),
])
def test_a_write_runs_its_guard_holding_the_write_lock_and_a_refusal_stores_nothing(tmp_path, write, args):
    store = SqliteStore(tmp_path)
    store.upsert_items([item("i1")])
    store.record_events([event("e1")])

    def state():
        items = {i.id: (i.text, i.vector.tobytes()) for i in store.get_items(["i1", "i2"]).values()}
        return store.head(), items, [e.event_id for e in store.user_events("u1")]

    before = state()
    other_writer_blocked = []

    def refuse() -> None:
        with sqlite3.connect(tmp_path / DB_NAME, timeout=0) as other:
            try:
                other.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                other_writer_blocked.append("locked" in str(error))
        raise TimeoutError("the caller gave up")

    with pytest.raises(TimeoutError):
        getattr(store, write)(args, guard=refuse)
    assert other_writer_blocked == [True]  # so a write that passes its guard commits before any later one
    assert state() == before
    getattr(store, write)(args, guard=lambda: None)
    assert store.head() != before[0]
    store.close()


def test_a_vector_damaged_on_disk_is_left_out_until_an_upsert_rewrites_it(tmp_path, caplog):
    store = SqliteStore(tmp_path)
    damaged, healthy = item("i1"), item("i2")
    store.upsert_items([damaged, healthy])
    store.record_events([event(f"e{n}", item_id="i1", vector=damaged.vector) for n in range(3)]
                        + [event("e3", item_id="i2", vector=healthy.vector)])
    with raw(tmp_path) as conn:  # bytes changed under an unchanged hash, as a bad disk page does
        conn.execute("UPDATE vectors SET data = ? WHERE id = (SELECT vector_id FROM items WHERE id = 'i1')",
                     (np.full(DIM, np.nan, dtype=np.float32).tobytes(),))
    assert set(store.get_items(["i1", "i2"])) == {"i2"}
    assert [i.id for i in store.iter_items()] == ["i2"]
    # Left out of a page too, and the next page still follows it: a page of damaged items alone is empty,
    # not the end, and not the same page again.
    assert store.list_items("", 1) == ([], "i1") and [i.id for i in store.list_items("i1", 1)[0]] == ["i2"]
    assert "of item 'i1'" in caplog.text and "damaged on disk" in caplog.text
    caplog.clear()
    events = store.user_events("u1")  # the events sharing the vector: still there, without it
    assert [(e.event_id, e.vector is None) for e in events] == [("e0", True), ("e1", True), ("e2", True), ("e3", False)]
    assert len(caplog.records) == 1  # once per read, not once per event
    store.upsert_items([damaged])  # the same vector again: its bytes are rewritten
    assert np.array_equal(store.get_items(["i1"])["i1"].vector, damaged.vector)
    assert all(np.array_equal(e.vector, damaged.vector) for e in store.user_events("u1")[:3])
    store.close()


def test_events_are_refused_only_when_an_item_their_new_events_name_changed_since_the_callers_read(store):
    from halflife.storage.base import ItemsChangedError

    store.upsert_items([item("a"), item("b")])
    store.record_events([event("old", item_id="b"), event("gone", user_id="someone", item_id="a")])
    read_at = store.head().change_version
    store.delete_user("someone")
    assert [c.item_id for c in store.changes_since(read_at)] == [None]  # an erasure names no item: no conflict
    store.upsert_items([item("b")])  # b changes after the read
    assert [e.event_id for e in store.record_events([event("e1", item_id="a"), event("e2", item_id=None, text="t")],
                                                    items_as_of=read_at)] == ["e1", "e2"]
    # A re-sent event is a duplicate, not a new use of b: nothing to refuse.
    assert store.record_events([event("old", item_id="b")], items_as_of=read_at) == []
    with pytest.raises(ItemsChangedError) as refused:
        store.record_events([event("e3", item_id="a"), event("e4", item_id="b")], items_as_of=read_at)
    assert refused.value.item_ids == ["b"]
    assert store.existing_event_ids(["e3", "e4"]) == set()  # all or nothing
    store.delete_items(["a"])
    with pytest.raises(ItemsChangedError):  # deleted counts as changed
        store.record_events([event("e5", item_id="a")], items_as_of=read_at)
    assert [e.event_id for e in store.record_events([event("e4", item_id="b")],
                                                    items_as_of=store.head().change_version)] == ["e4"]


def test_events_are_not_refused_for_item_changes_that_leave_their_vectors(store):
    """A hot item's stock or price updates (or a catalogue re-synced whole)
    refused its events three times running, ABORTED (a race review): only a
    new vector, a deletion or a new incarnation concerns them."""
    from halflife.storage.base import ItemsChangedError

    a = item("a")
    store.upsert_items([a, item("b")])
    read_at = store.head().change_version
    store.upsert_items([dataclasses.replace(a, attributes={"stock": "3"}, categories=("sale",))])  # same vector
    store.upsert_items([dataclasses.replace(a, attributes={"stock": "2"})])  # and again
    assert [e.event_id for e in store.record_events([event("e1", item_id="a")], items_as_of=read_at)] == ["e1"]
    store.upsert_items([dataclasses.replace(a, vector=vec())])  # a new vector
    store.upsert_items([dataclasses.replace(a, vector=store.get_items(["a"])["a"].vector, text="a sale")])  # then not
    with pytest.raises(ItemsChangedError):  # the vector changed after the read, whatever came later
        store.record_events([event("e2", item_id="a")], items_as_of=read_at)
    read_at = store.head().change_version
    store.delete_items(["b"])
    store.upsert_items([item("b")])  # a new incarnation
    with pytest.raises(ItemsChangedError):
        store.record_events([event("e3", item_id="b")], items_as_of=read_at)


def test_events_named_as_items_reference_their_items_vectors(store, tmp_path):
    """as_items: an event that carries its item's stored vector references
    that vector's row, as hashing it would; an index naming an event whose
    item is not stored (never expected) falls back to hashing its vector."""
    v1, v2, own = vec(), vec(), vec()
    store.upsert_items([item("i1", v1), item("i2", v2)])
    version = store.head().change_version
    vectors_before = count(tmp_path, "SELECT COUNT(*) FROM vectors")
    stored = store.record_events(
        [event("a", item_id="i1", vector=v1.copy()), event("b", item_id="i2", vector=v2.copy()),
         event("a", item_id="i2", vector=v2.copy()),  # a repeat: the first wins
         event("c", item_id="nowhere", vector=own.copy()), event("d", item_id="i1", vector=own.copy())],
        items_as_of=version, as_items={0, 1, 2, 3})
    assert [e.event_id for e in stored] == ["a", "b", "c", "d"]
    assert count(tmp_path, "SELECT COUNT(*) FROM vectors") == vectors_before + 1  # `own`, hashed once
    with raw(tmp_path) as conn:
        ids = dict(conn.execute("SELECT event_id, vector_id FROM events"))
        items = dict(conn.execute("SELECT id, vector_id FROM items"))
    assert ids["a"] == items["i1"] and ids["b"] == items["i2"] and ids["c"] == ids["d"] not in items.values()
    by_id = {e.event_id: e for e in store.user_events("u1")}
    for event_id, vector in (("a", v1), ("b", v2), ("c", own), ("d", own)):
        np.testing.assert_array_equal(by_id[event_id].vector, vector)
    assert count(tmp_path, "SELECT SUM(events) FROM vector_refs") == 4


def test_a_reader_whose_iteration_raised_serves_later_commits(store, monkeypatch):
    """A cursor left mid-statement by an exception the caller kept (its
    traceback holds the cursor) pinned the pooled reader's snapshot: later
    reads on it missed newer commits (a review)."""
    from halflife.storage import sqlite as sqlite_module
    from halflife.storage.base import StoreDamagedError

    store.upsert_items([item(f"i{n}", vec()) for n in range(2500)])
    item_from, seen = sqlite_module._item_from, []

    def failing(row, damaged):
        seen.append(row)
        if len(seen) == 1500:
            raise StoreDamagedError("a damaged row")
        return item_from(row, damaged)

    monkeypatch.setattr(sqlite_module, "_item_from", failing)
    with pytest.raises(StoreDamagedError) as kept:  # the exception, and its traceback, stay alive below
        list(store.iter_items())
    monkeypatch.undo()
    version = store.head().change_version
    store.upsert_items([item("new", vec())])
    assert "new" in store.get_items(["new"]) and store.head().change_version == version + 1
    assert kept.value is not None
