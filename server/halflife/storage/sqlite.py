"""The embedded SQLite store (`<data_dir>/halflife.sqlite3`).

Threads and connections
-----------------------
* One **writer thread** owns the only read-write connection. Every mutating
  call (upsert_items, delete_items, record_events, delete_user,
  save_profile_snapshot)
  becomes a job on a queue and its caller blocks on a `Future`.
* **Group commit**: the writer takes *everything* queued, opens one
  transaction (``BEGIN IMMEDIATE``), runs each job inside its own
  ``SAVEPOINT`` (a failing job is rolled back alone and its caller gets the
  exception), commits once (one fsync with ``synchronous=FULL``) and only then
  resolves the futures. There is no timer: a lone caller is committed at once;
  callers that arrive while a commit is in flight share the next one.
* **Reads** use a small pool of read-only connections (``query_only``), one
  per concurrent reader, handed out under a lock and never used by two threads
  at a time. WAL lets them read while the writer writes.

Schema
------
Versioned with ``PRAGMA user_version``; `MIGRATIONS` (sqlite_schema.py, where
each table's reasons are) is applied in order, in one transaction, at open. A
file stamped with a newer version raises `StoreError`.

Vectors are content-addressed (``vectors.hash`` = SHA-256 of the float32
little-endian bytes). Items and events reference vector ids; a vector
is garbage-collected when the last reference that a delete/update removed was
the last one anywhere. Items hold theirs by foreign key; events' are counted
in ``vector_refs`` (an index on events.vector_id cost half the ingest rate at
millions of events: see sqlite_schema's `_migration_4`).

Several processes may open the same file (``halflife serve --workers N``):
their writers take turns (``BEGIN IMMEDIATE`` waits up to the busy timeout)
and each follows the others through ``head``, ``changes_since`` (the
``changes`` table: one row per changed item id, one per writer for "a user was erased")
and ``events_between``.

Privacy: ``secure_delete=ON`` zeroes deleted content, and `delete_user`
checkpoints and truncates the WAL after its commit, so the erased rows are not
left in the database file's free pages nor in old WAL frames (old copies of
moved cells in a page's unused space can stay: `vacuum` takes them). Another
process's read transaction (a replay of a long log) blocks that checkpoint;
passes over the whole log or catalogue (`iter_events`, `iter_items`: a
start, a rebuild for an erasure elsewhere) read a chunk at a time, each in a
read of its own, so they hold it back for a chunk at most. Blocked, the
writer tries again every TRUNCATE_RETRY_S until it completes, and once
more at close (a process that stops first leaves it to the next automatic
checkpoint, or to the last connection's close). From before the erasure
commits until a truncation completes, a file
``halflife.sqlite3-erased-<origin>-<n>`` says a truncation is owed, so that a
store opened after a crash finishes it (the retry lived only in memory).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import shutil
import sqlite3
import stat
import threading
import time
import uuid
from concurrent.futures import Future
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

import numpy as np

from halflife.logs import RepeatedWarning
from halflife.storage.base import (
    Change,
    EventColumns,
    EventRecord,
    Guard,
    ItemRecord,
    ItemsChangedError,
    ProfileSnapshot,
    ResentEventsErasedError,
    StoreDamagedError,
    StoreError,
    StoreHead,
    StoreUnavailableError,
    as_vector,
    first_of_each_id,
)
from halflife.storage.sqlite_schema import MIGRATIONS, SCHEMA_VERSION

__all__ = ["DB_NAME", "MIGRATIONS", "SCHEMA_VERSION", "WRITER_PRAGMAS", "SqliteStore"]

log = logging.getLogger(__name__)
_checkpoint_failures = RepeatedWarning(log)
_mark_failures = RepeatedWarning(log)  # each retry of a truncation marks anew: a line a second while it fails

DB_NAME = "halflife.sqlite3"
BUSY_TIMEOUT_MS = 10_000
# A WAL truncation after an erasure waits this long for readers, then is tried
# again this often: waiting the busy timeout held every write queued behind a
# reader for 10 s.
TRUNCATE_BUSY_MS = 50
TRUNCATE_RETRY_S = 1.0
ERASED_MARK = "-erased-"  # DB_NAME + this + a store's origin-n: a WAL truncation it owes (see `_mark_erased`)
_MAX_GROUP = 256  # jobs per group commit, bounds one transaction's size and latency
_IN_CHUNK = 500  # rows or `IN (?, ...)` values per statement
_FETCH_ROWS = 500  # rows per fetch of a long read, under the GC's threshold: see _column_chunks
_MAX_SEQ = 2**63 - 1  # SQLite's largest integer: past every event's seq
# Items per read transaction of `iter_items` (~15 MB of 384-d vectors): a read held for the whole catalogue
# (6 s at 200k items, as a start indexes them) kept any checkpoint from passing it.
ITEMS_PER_READ = 10_000
RANGED_PAGE_SCAN = 10_000  # the most of a user's events one ListEvents page with a time range reads
_VECTOR_DTYPE = np.dtype("<f4")
# The writer connection's settings beyond durability. Once the log holds a few
# 100k events, each 500-event batch dirties pages all over events(user_id, seq),
# and SQLite's default checkpoint (every 1,000 WAL pages, on the committing
# thread) copied them into the file every other commit, re-reading what its 2 MiB
# cache had dropped. Checkpointing every 10,000 pages (a ~40 MiB WAL) writes a
# page that several batches dirtied once; 64 MiB of cache keeps the indexes' hot
# pages. Bare inserts at 500k stored events of 10k users: 39k -> 70k events/s,
# p99 commit 23 -> 33 ms (the batch that runs the checkpoint). A checkpointer
# thread of its own was tried too: under steady writes its PASSIVE checkpoints
# never caught up, so the WAL never rewound and grew past 120 MiB.
WRITER_PRAGMAS = ("wal_autocheckpoint = 10000", "cache_size = -65536")


# --------------------------------------------------------------------------- helpers

def _vector_bytes(vector: np.ndarray) -> bytes:
    return as_vector(vector).astype(_VECTOR_DTYPE, copy=False).tobytes()


def _vector_from(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=_VECTOR_DTYPE).astype(np.float32)


def _chunks(conn: sqlite3.Connection, seq: Sequence[Any], width: int = 1) -> Iterator[Sequence[Any]]:
    """`seq` in pieces of up to 500 whose `width` parameters each one
    statement can bind (SQLite's limit: 999 before 3.32, 32,766 since)."""
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if hasattr(conn, "getlimit") else 999  # 3.11+
    n = max(1, min(_IN_CHUNK, limit // width))
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _bound_vectors(conn: sqlite3.Connection) -> tuple[str, str] | None:
    """The (space, model) recorded in `meta` (Store.bind_vectors), None while none is."""
    recorded = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('vector_space', 'vector_model')"))
    return (recorded["vector_space"], recorded["vector_model"]) if recorded else None


def _holds_vectors(conn: sqlite3.Connection) -> bool:
    """Whether the store is in a model's space for good: it holds a vector,
    or a profile snapshot made of them (see `bind_vectors`)."""
    return conn.execute("SELECT EXISTS (SELECT 1 FROM vectors) OR EXISTS "
                        "(SELECT 1 FROM profile_snapshots)").fetchone()[0] == 1


def _vector_size(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT length(data) FROM vectors ORDER BY id DESC LIMIT 1").fetchone()
    return None if row is None else row[0] // 4  # float32


def stored_vectors(data_dir: str | Path) -> tuple[int | None, tuple[str, str] | None]:
    """The store's `vector_size()` and the model `bind_vectors` would keep
    (None: none, or one the next model replaces), read without opening it as
    a store, which migrates an older schema: a server refused the store for
    another model's vectors had migrated it (an older halflife, the way back,
    then refused it) and pruned its change feed. (None, None) where there is
    no store, it cannot be read so, or a newer halflife wrote it: opening it
    says why."""
    path = Path(data_dir) / DB_NAME
    if not path.is_file():
        return None, None
    try:
        conn = _connect(path, readonly=True)
    except sqlite3.Error:
        return None, None
    try:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        # A newer halflife's store: its open says to upgrade, not that its vectors are another model's.
        if "vectors" not in tables or conn.execute("PRAGMA user_version").fetchone()[0] > SCHEMA_VERSION:
            return None, None
        # meta (schema 7) comes after profile_snapshots (5); a store without it records no model.
        return _vector_size(conn), _bound_vectors(conn) if "meta" in tables and _holds_vectors(conn) else None
    except sqlite3.Error:
        return None, None
    finally:
        conn.close()


def _events_in(after_seq: int, through_seq: int | None, user_id: str | None) -> tuple[str, tuple]:
    """The WHERE clause ("" for none) and its arguments of the events with after_seq < seq
    <= through_seq (no upper bound where None), `user_id`'s only where given. Only the
    bounds given: COUNT(*) without a WHERE is SQLite's fast count (1 ms for 1M rows in
    memory, 12 with `WHERE 1`, 46 with `seq > 0`)."""
    bounds = {"seq > ?": after_seq or None, "seq <= ?": through_seq, "user_id = ?": user_id}
    given = {condition: value for condition, value in bounds.items() if value is not None}
    return (" WHERE " + " AND ".join(given) if given else ""), tuple(given.values())


def _ids_json(ids: Sequence[str]) -> str:
    """`ids` as a JSON array for `json_each`, which (SQLite 3.40) cuts a string
    at an escaped NUL: "a\\0b" would name row "a", so such an id is refused."""
    if any("\x00" in i for i in ids):
        raise ValueError("ids must not contain NUL characters")
    return json.dumps(ids)


def _item_vector_ids(conn: sqlite3.Connection, ids_json: str) -> dict[str, int]:
    """The vector row of each stored item of `ids_json` (`_ids_json`): one
    result row, as `_vector_ids`."""
    row = conn.execute("SELECT json_group_object(id, vector_id) FROM items WHERE id IN (SELECT value FROM json_each(?))",
                       (ids_json,)).fetchone()
    return json.loads(row[0])


def _stored_event_ids(conn: sqlite3.Connection, ids_json: str) -> set[str]:
    """Those of the event ids in `ids_json` (`_ids_json`) stored."""
    rows = conn.execute("SELECT event_id FROM events WHERE event_id IN (SELECT value FROM json_each(?))", (ids_json,))
    return {row[0] for row in rows}


def _hash(blob: bytes) -> bytes:
    # SHA-256: twice blake2b's speed on CPUs with SHA extensions (x86 SHA-NI, ARMv8).
    return sha256(blob).digest()


def _intern_vectors(conn: sqlite3.Connection, blobs: Sequence[bytes], hashes: Sequence[bytes] | None = None,
                    rewrite: bool = False) -> list[int]:
    """Vector ids for `blobs`, inserting the new ones; set-based: one `IN`
    query per 500 distinct vectors, then one insert for the missing.
    rewrite: also write the bytes of those already stored where they differ,
    which repairs a vector damaged on disk (see `_intact`)."""
    if hashes is None:
        hashes = [_hash(b) for b in blobs]
    unique = dict(zip(hashes, blobs))
    ids = _vector_ids(conn, list(unique))
    if rewrite and ids:
        _insert(conn, "INSERT INTO vectors(id, hash, data)", [(i, h, unique[h]) for h, i in ids.items()],
                "ON CONFLICT(id) DO UPDATE SET data = excluded.data WHERE data IS NOT excluded.data")
    if len(ids) < len(unique):
        missing = [h for h in unique if h not in ids]
        # The transaction holds the write lock, so the new rows get max(id)+1, +2, ... (rowid
        # allocation); checked below, with a lookup as the fallback.
        top = conn.execute("SELECT max(id) FROM vectors").fetchone()[0] or 0
        _insert(conn, "INSERT INTO vectors(hash, data)", [(h, unique[h]) for h in missing])
        if conn.execute("SELECT max(id) FROM vectors").fetchone()[0] == top + len(missing):
            ids.update(zip(missing, range(top + 1, top + 1 + len(missing))))
        else:
            ids.update(_vector_ids(conn, missing))
    return [ids[h] for h in hashes]


def _vector_ids(conn: sqlite3.Connection, hashes: Sequence[bytes]) -> dict[bytes, int]:
    """The stored ones of `hashes`, with their ids. One result row per query
    (a JSON object keyed by hex hash): see `_insert` on steps and the GIL."""
    ids: dict[bytes, int] = {}
    for chunk in _chunks(conn, hashes):
        sql = f"SELECT json_group_object(hex(hash), id) FROM vectors WHERE hash IN ({','.join('?' * len(chunk))})"
        found = json.loads(conn.execute(sql, chunk).fetchone()[0])
        if found:
            ids.update((h, found[k]) for h in chunk if (k := h.hex().upper()) in found)
    return ids


def _insert(conn: sqlite3.Connection, into: str, rows: Sequence[tuple], tail: str = "") -> None:
    """`into` ("INSERT INTO t(a, b)") `rows`, in multi-row VALUES statements
    (`_chunks`), each followed by `tail`.

    executemany runs one sqlite3_step per row, and the writer thread takes the
    GIL back after every step; while request threads run Python, each take
    waits for them (a 500-event insert: 2.6 ms alone, 4.4 ms under 4 callers).
    One statement is one step, and binding its rows is faster too."""
    if not rows:
        return
    width = len(rows[0])
    values = "(" + ", ".join("?" * width) + ")"
    for chunk in _chunks(conn, rows, width):
        sql = f"{into} VALUES {', '.join([values] * len(chunk))} {tail}"
        conn.execute(sql, [value for row in chunk for value in row])


def _refuse_changed_items(conn: sqlite3.Connection, version: int, item_ids: set[str | None]) -> None:
    """Raises ItemsChangedError when the vector or incarnation of an item of
    `item_ids` changed after change `version` (its other fields are no
    event's concern). The feed newer than a caller's read is short (usually
    empty), so it is read whole rather than joined with the ids."""
    item_ids = item_ids - {None}
    if not item_ids:
        return
    feed = conn.execute("SELECT item_id FROM changes WHERE version > ? AND vector_version > ? AND item_id IS NOT NULL",
                        (version, version))
    changed = [i for (i,) in feed if i in item_ids]
    if changed:
        raise ItemsChangedError(changed)


def _count_vector_uses(conn: sqlite3.Connection, vector_ids: Sequence[int]) -> None:
    """Adds newly stored events' vectors to vector_refs, one statement per batch
    (the delete trigger takes them off again)."""
    conn.execute(
        """INSERT INTO vector_refs(id, events)
           SELECT CAST(key AS INTEGER), value FROM json_each(?) WHERE true
           ON CONFLICT(id) DO UPDATE SET events = events + excluded.events""",
        (json.dumps(collections.Counter(vector_ids)),),
    )


def _gc_vectors(conn: sqlite3.Connection, candidates: Sequence[int]) -> int:
    """Deletes those of `candidates` that nothing references any more."""
    if not candidates:
        return 0
    ids = json.dumps(sorted(set(candidates)))
    conn.execute("DELETE FROM vector_refs WHERE id IN (SELECT value FROM json_each(?)) AND events = 0", (ids,))
    cur = conn.execute(
        """DELETE FROM vectors
           WHERE id IN (SELECT value FROM json_each(?))
             AND NOT EXISTS (SELECT 1 FROM vector_refs WHERE id = vectors.id)
             AND NOT EXISTS (SELECT 1 FROM items WHERE vector_id = vectors.id)""",
        (ids,),
    )
    return cur.rowcount


def _intact(data: bytes, digest: bytes, vector_id: int, damaged: set[int], what: str) -> bool:
    """Whether a vector's bytes still match their SHA-256. A page damaged on
    disk can pass SQLite's own checks and turn a vector into NaNs, which
    would poison every sum it joins, so the caller leaves a damaged one out.
    Logged once per read (`damaged`: the ids this read found so far)."""
    if _hash(data) == digest:
        return True
    if vector_id not in damaged:
        damaged.add(vector_id)
        log.error("vector %d (of %s, maybe others) no longer matches its SHA-256: damaged on disk, and left out "
                  "until an upsert of an item with this vector rewrites it", vector_id, what)
    return False


def _item_from(row: tuple, damaged: set[int]) -> ItemRecord | None:
    """An item from an `_ITEM_SELECT` row; None when its vector is damaged."""
    id_, text, categories, attributes, create_time, data, created_seq, digest, vector_id, embedded_by, _rowid = row
    if not _intact(data, digest, vector_id, damaged, f"item {id_!r}"):
        return None
    try:
        categories, attributes = tuple(json.loads(categories)), dict(json.loads(attributes))
    except (TypeError, ValueError) as e:  # a JSONDecodeError stopped the server's start in a traceback
        raise StoreDamagedError(f"item {id_!r}: its categories or attributes are not the JSON stored ({e}): "
                                "the store is damaged") from e
    return ItemRecord(
        id=id_,
        text=text,
        categories=categories,
        attributes=attributes,
        create_time=create_time,
        vector=_vector_from(data),
        created_seq=created_seq,
        embedded_by=embedded_by,
    )


_ITEM_SELECT = """SELECT i.id, i.text, i.categories, i.attributes, i.create_time, v.data, i.created_seq, v.hash, v.id,
                         i.embedded_by, i.rowid
                  FROM items i JOIN vectors v ON v.id = i.vector_id"""


# Primary result codes of a damaged file: no retry helps.
_DAMAGED_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
# Primary result codes of the files and locks, not of our SQL: a retry may succeed.
_UNAVAILABLE_CODES = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_BUSY,
                                sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_NOMEM,
                                sqlite3.SQLITE_PROTOCOL})


def _column_chunks(cur: sqlite3.Cursor, chunk: int) -> Iterator[list[list]]:
    """The cursor's rows as columns, a list each, `chunk` rows at a time.
    The rows come a few hundred at a time: each is a tuple the garbage
    collector tracks, and 50,000 alive at once set off collections of the
    whole heap, ~2,600 of them in a 1M-event log's read (0.5-0.8 s of a
    3 s start); below its threshold of 700 new objects, none runs."""
    while rows := cur.fetchmany(min(_FETCH_ROWS, chunk)):
        columns = [list(column) for column in zip(*rows)]
        while len(columns[0]) < chunk and (rows := cur.fetchmany(min(_FETCH_ROWS, chunk - len(columns[0])))):
            for column, more in zip(columns, zip(*rows)):
                column += more
        yield columns


def _in_order(conn: sqlite3.Connection, seqs: list[int]) -> list[EventRecord]:
    """The events of `seqs`, in that order (one without its vector row: not joined)."""
    events = {e.seq: e for e in _events_where(conn, "e.seq IN (SELECT value FROM json_each(?))", (json.dumps(seqs),))}
    return [events[seq] for seq in seqs if seq in events]


def _events_where(conn: sqlite3.Connection, where: str, params: tuple,
                  vectors_of: Callable[[str], bool] | None = None, limit: int = -1,
                  descending: bool = False) -> list[EventRecord]:
    """The first `limit` (-1: all) events matching `where` (over `events e`),
    in seq order (descending: newest first), with vectors: those of the
    users `vectors_of` picks where given (the others' None), read in a second
    statement: call inside a read transaction then."""
    # Each row: the event's columns, then its vector's data, hash and id.
    columns = "e.seq, e.event_id, e.user_id, e.type, e.item_id, e.text, e.value, e.event_time"
    order = "e.seq DESC" if descending else "e.seq"
    if vectors_of is None:
        rows = conn.execute(f"""SELECT {columns}, v.data, v.hash, v.id
                                FROM events e JOIN vectors v ON v.id = e.vector_id
                                WHERE {where} ORDER BY {order} LIMIT ?""", (*params, limit))
    else:
        rows = conn.execute(f"""SELECT {columns}, NULL, NULL, e.vector_id FROM events e
                                WHERE {where} ORDER BY {order} LIMIT ?""", (*params, limit)).fetchall()
        wanted = sorted({row[10] for row in rows if vectors_of(row[2])})
        vectors: dict[int, tuple[bytes, bytes]] = {}
        for chunk in _chunks(conn, wanted):
            sql = f"SELECT id, data, hash FROM vectors WHERE id IN ({', '.join('?' * len(chunk))})"
            vectors.update((vector_id, (data, digest)) for vector_id, data, digest in conn.execute(sql, chunk))
        rows = [(*row[:8], *vectors.get(row[10], (None, None)), row[10]) for row in rows]
    damaged: set[int] = set()
    events = []
    for seq, event_id, uid, type_, item_id, text, value, event_time, data, digest, vector_id in rows:
        # A damaged vector leaves out the vector alone: the event still counts where none is
        # needed (popularity, co-occurrence), as it does in iter_events.
        intact = data is not None and _intact(data, digest, vector_id, damaged, f"event seq {seq}")
        events.append(EventRecord(event_id, uid, type_, item_id, text, value, event_time,
                                  _vector_from(data) if intact else None, seq))
    return events


def _switch_to_wal(conn: sqlite3.Connection) -> str:
    """Sets WAL journal mode; returns the mode in effect. The switch takes the
    file's exclusive lock, which SQLite's busy handler does not wait for: with
    other processes opening the same new store at once, 1 in ~9 opens failed
    with "database is locked". It is retried for up to the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _primary_code(e: sqlite3.Error) -> int | None:
    """SQLite's primary result code of `e` (SQLITE_BUSY, ...): extended codes keep it in the low byte; errors of
    the sqlite3 module itself (text that is not UTF-8 on a damaged page) carry no code."""
    code = getattr(e, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _on_disk(e: BaseException, path: Path | None) -> str:
    """For an I/O error or a full disk, what names it: SQLite's extended
    code (which operation failed; the OS's errno is not exposed), the file
    and how much its disk has free, as " (SQLITE_IOERR_SHMSIZE on PATH: its
    disk has 0 KiB free)"; for a file SQLite could not open, why the OS
    refuses to open files there, where it does; "" for other errors. A full disk
    fails the -shm's growth as "disk I/O error", a write past a size limit
    too, and a process out of file descriptors a new reader as "unable to
    open database file": said alone, they named neither the file nor the
    cause (a review)."""
    primary = None if path is None else _primary_code(e)
    if primary == sqlite3.SQLITE_CANTOPEN:
        # SQLite keeps the errno to itself, so an open of our own asks the OS: of the directory, not the file,
        # whose close would drop every POSIX lock this process holds on it (SQLite's locks: "How To Corrupt").
        # Out of file descriptors, or without access to the directory, it fails as SQLite's open did.
        try:
            os.close(os.open(path.parent, os.O_RDONLY))
        except OSError as refused:
            return f" ([Errno {refused.errno}] {refused.strerror})"
        return ""
    if primary not in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL):
        return ""
    try:
        free = f": its disk has {shutil.disk_usage(path.parent).free >> 10} KiB free"
    except OSError:
        free = ""
    return f" ({getattr(e, 'sqlite_errorname', 'SQLITE_IOERR')} on {path}{free})"


def _store_error(e: BaseException, context: str = "", path: Path | None = None) -> BaseException:
    """SQLite errors become StoreError (with the cause kept), those of the
    files or locks (disk full, I/O error, read-only, busy)
    StoreUnavailableError, those of a damaged file StoreDamagedError; others
    pass as they are. `path`: the file the failed statement worked on, named
    with a disk's failure (`_on_disk`)."""
    if isinstance(e, sqlite3.Error):
        primary = _primary_code(e)
        kind = (StoreUnavailableError if primary in _UNAVAILABLE_CODES
                else StoreDamagedError if primary in _DAMAGED_CODES else StoreError)
        err = kind(f"{context}{e}{_on_disk(e, path)}")
        err.__cause__ = e
        return err
    return e


class _Job:
    __slots__ = ("fn", "future", "after_commit", "guard")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], after_commit: Callable[[sqlite3.Connection], None] | None,
                 guard: Guard | None = None):
        self.fn = fn
        self.future: Future = Future()
        self.after_commit = after_commit
        self.guard = guard


_STOP = object()


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    # Readers never create the file: with it deleted under the server, one made
    # an empty database, which the next start took for a new store.
    target = f"{Path(path).absolute().as_uri()}?mode=rw" if readonly else path
    conn = sqlite3.connect(
        target, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000, uri=readonly
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA temp_store = MEMORY")  # sorts and DISTINCTs never spill user data to temp files
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    return conn


# --------------------------------------------------------------------------- store


def sync_directory(path: Path) -> None:
    """Makes the files created in `path` so far survive a power loss: their
    directory entries are on disk once this returns. OSError where it cannot."""
    folder = os.open(path, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _hold_alone(conn: sqlite3.Connection, path: Path) -> None:
    """Takes the file's exclusive lock on `conn` and keeps it until `conn`
    closes, or raises StoreError where another connection has the file open:
    one renamed under it (`reembed` reads its source without the directory's
    lock) read the new file's pages through the WAL beside it ("the store is
    damaged"). Leaving WAL mode takes the lock and checkpoints the WAL away:
    SQLite would replay one left beside the new file onto it (a review)."""
    try:
        conn.execute("PRAGMA busy_timeout = 0")  # no other connection lets go of it
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
    except sqlite3.Error as e:
        if _primary_code(e) != sqlite3.SQLITE_BUSY:
            raise _store_error(e, f"vacuum of {path}: ") from e
        mode = None
    if str(mode).lower() != "delete":
        raise StoreError(f"{path} is open in another process: stop it, then vacuum")


VACUUM_SUFFIX = ".vacuum"  # DB_NAME + this: the copy `vacuum` writes, then swaps in


def vacuum(data_dir: str | Path) -> tuple[int, int]:
    """Rewrites the store in `data_dir` whole, with only its live rows: what
    SQLite's secure_delete does not reach goes. A page rebalanced keeps in its
    unused space the old copies of the cells it moved, so an erased user's id
    (the index events(user_id, seq)) could outlive DeleteUser in the file's
    bytes (a durability review: in 5 of 9 rounds). Freed pages go too: the
    file shrinks. No other process may have the store open (the caller holds
    the data directory's lock; one that has the file open all the same is
    refused, see `_hold_alone`): the copy is written beside the file by
    `VACUUM INTO` (needing its size free on that disk, and little memory)
    into a file of the store's mode and owner, made durable, then renamed
    over it, so an interruption leaves the store as it was. Returns the
    file's size before and after, in bytes. Raises StoreError
    (StoreDamagedError where the store is damaged)."""
    # The file itself where DB_NAME is a link to it (SQLite finds its WAL beside the file): the link stays.
    path = (Path(data_dir) / DB_NAME).resolve()
    copy = path.with_name(path.name + VACUUM_SUFFIX)
    copy.unlink(missing_ok=True)  # an earlier run's, interrupted
    store = SqliteStore(data_dir)  # migrated, its owed WAL truncations done
    try:
        store.check_intact()
    finally:
        store.close()
    before = path.stat().st_size
    conn = _connect(path, readonly=False)  # VACUUM INTO writes, if only the copy: query_only refuses it
    try:
        _hold_alone(conn, path)
        _create_like(copy, path)
        try:
            conn.execute("VACUUM INTO ?", (str(copy),))  # into the empty file: it keeps the mode and owner given
        except sqlite3.Error as e:
            raise _store_error(e, f"vacuum of {path} into {copy}: ", copy) from e
        with open(copy, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(copy, path)
    except BaseException:
        # Refused, failed or stopped (SIGTERM and Ctrl-C unwind): a copy of the store's size stayed beside it.
        copy.unlink(missing_ok=True)
        raise
    finally:
        conn.close()
    sync_directory(path.parent)
    SqliteStore(data_dir).close()  # back in WAL mode, and opens as a store
    return before, path.stat().st_size


def _create_like(copy: Path, original: Path) -> None:
    """Creates `copy` empty, with the mode and owner of the file `original`.
    SQLite creates a file 0644 (less the umask), its process's:
    a store kept 0600 became readable by every local user when vacuumed, and
    one vacuumed by root unwritable by its server's user. Raises StoreError
    where the owner cannot be given."""
    owner = original.stat()
    fd = os.open(copy, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.fchmod(fd, stat.S_IMODE(owner.st_mode))
        created = os.fstat(fd)
        if (created.st_uid, created.st_gid) != (owner.st_uid, owner.st_gid):
            os.fchown(fd, owner.st_uid, owner.st_gid)
    except OSError as e:  # the caller removes the copy
        raise StoreError(f"cannot give {copy} the owner of {original} (uid {owner.st_uid}, gid {owner.st_gid}): "
                         f"{e.strerror or e}; run vacuum as that user") from None
    finally:
        os.close(fd)


class SqliteStore:
    """`Store` on one SQLite file in WAL mode; see the module docstring."""

    def __init__(self, data_dir: str | Path):
        self.path = Path(data_dir) / DB_NAME
        self.origin = uuid.uuid4().hex
        self._closed = False
        self._lock = threading.Lock()  # guards _closed, the queue hand-off and the reader pool
        self._queue: collections.deque = collections.deque()
        self._wakeup = threading.Condition(self._lock)
        self._readers: list[sqlite3.Connection] = []  # idle read connections
        self._truncate_pending = False  # an erasure's WAL truncation a reader blocked (writer thread only)
        self._truncate_due = 0.0  # when to try it again, time.monotonic()
        self._marks_made = 0  # see _mark_erased
        self.commit_count = 0  # transactions committed by the writer
        self.job_count = 0  # write calls run by the writer
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._refuse_non_files()
            self._writer = _connect(self.path, readonly=False)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open {self.path}: {e}") from e
        try:
            self._configure_and_migrate(self._writer)
            self._files = self._identities()
        except BaseException:
            self._writer.close()
            raise
        if self._erased_marks():  # a store that owed an erasure's WAL truncation died: the writer does it first
            self._truncate_pending = True
        self._thread = threading.Thread(target=self._run_writer, name="halflife-sqlite-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ open

    def _configure_and_migrate(self, conn: sqlite3.Connection) -> None:
        try:
            self._check_version(self._refuse_foreign(conn))  # before changing anything
            mode = _switch_to_wal(conn)
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL journal mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            for pragma in WRITER_PRAGMAS:
                conn.execute(f"PRAGMA {pragma}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                self._check_version(version)
                for step in range(version, SCHEMA_VERSION):
                    MIGRATIONS[step](conn)
                # Written even when unchanged: SQLite opens a file it may not write (another owner's, an
                # immutable one) read-only without a word, and every write then failed UNAVAILABLE "retry"
                # while health said SERVING (an operations review).
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
                if version != SCHEMA_VERSION:  # after the commit: one that failed (a full disk) migrated nothing
                    log.info("migrated %s from schema %d to %d", self.path, version, SCHEMA_VERSION)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:  # a damaged file's names the way back in serve's line (`_start_refused`)
            error = _store_error(e, f"cannot open {self.path}: ", self.path)
            primary = _primary_code(e)
            if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY_DBMOVED:
                # An open that waited on `vacuum`'s lock reads the file renamed away, which SQLite will not
                # write: said as a permissions problem, "give this user write access" (a review).
                error = StoreUnavailableError(f"cannot open {self.path}: it was replaced while it was opened (as "
                                              "`halflife vacuum` does): open it again")
            elif primary == sqlite3.SQLITE_READONLY:
                # What to do, and that `reembed` must write its old store too: it read as only read (a review).
                # A StoreError, not "unavailable for now": it lasts until someone changes it, so a group's
                # replacement worker is not started again for it (workers.EXIT_TEMPORARY).
                error = StoreError(f"{error} (halflife writes a store even to read it, and its -wal and -shm beside "
                                   f"it: give this user write access to the file and to {self.path.parent}, or copy "
                                   "the directory to where it has it)")
            raise error from e

    def _refuse_non_files(self) -> None:
        """StoreError where the database, its -wal or its -shm is a directory
        (a container's volume mounted onto a file the host lacked makes one)
        or something else than a file: SQLite said "unable to open database
        file", and for the -shm "attempt to write a readonly database", whose
        advice (write access) did not help."""
        for path in (self.path, *(self.path.with_name(self.path.name + end) for end in ("-wal", "-shm"))):
            if path.exists() and not path.is_file():
                what = "a directory" if path.is_dir() else "not a regular file"
                raise StoreError(f"cannot open {self.path}: {path} is {what}, where SQLite keeps a file of the store: "
                                 "move it away")

    def _refuse_foreign(self, conn: sqlite3.Connection) -> int:
        """The file's schema version; StoreError for a SQLite file of
        something else (tables but no version: schema 1 and on set it in the
        transaction that makes their tables)."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            # Read again after the tables: another process may have just created the store.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if tables and version == 0:
                raise StoreError(
                    f"{self.path} is not a Halflife store (no schema version, but tables: {', '.join(tables[:5])}); "
                    "give halflife a data directory of its own"
                )
        return version

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this "
                f"halflife knows ({SCHEMA_VERSION}); upgrade halflife to open it"
            )

    def _identities(self) -> list[tuple[int, int]] | None:
        """(device, inode) of the database file and of its WAL, or None when
        one is gone: the writer holds both open, so neither changes while the
        store is left alone."""
        try:
            files = (self.path, self.path.with_name(self.path.name + "-wal"))
            return [(s.st_dev, s.st_ino) for s in map(os.stat, files)]
        except FileNotFoundError:
            return None

    def _files_problem(self) -> tuple[type[StoreError], str] | None:
        """Why the writer must refuse, as the error to raise and its message:
        its files were deleted or replaced under it (writes still went into
        the deleted file, or a WAL SQLite no longer reads, were acknowledged,
        and were gone at the next start), or they cannot be looked at now."""
        try:
            if self._identities() == self._files:
                return None
        except OSError as e:
            # The directory made unreadable, an I/O error: the OSError ended the writer thread, and every
            # write after it waited forever, the permissions given back or not.
            return StoreUnavailableError, (f"cannot check that {self.path} is still the file the server opened ({e}); "
                                           "writes are refused until it can be")
        return StoreDamagedError, (f"{self.path} or its -wal was deleted or replaced while the server ran; writes are "
                                   "refused so that none is acknowledged and lost: restore the files, or restart the "
                                   "server")

    # ------------------------------------------------------------------ writer

    def _submit(self, fn: Callable[[sqlite3.Connection], Any], after_commit=None, guard: Guard | None = None) -> Any:
        job = _Job(fn, after_commit, guard)
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            self._queue.append(job)
            self._wakeup.notify()
        return job.future.result()

    def _run_writer(self) -> None:
        conn = self._writer
        stop = False
        while not stop:
            with self._lock:
                while not self._queue:
                    wait = max(0.0, self._truncate_due - time.monotonic()) if self._truncate_pending else None
                    if not self._wakeup.wait(wait):
                        break  # time to try the truncation again
                jobs = []
                while self._queue and len(jobs) < _MAX_GROUP:
                    job = self._queue.popleft()
                    if job is _STOP:
                        stop = True
                        break
                    jobs.append(job)
            if self._truncate_pending and time.monotonic() >= self._truncate_due and not stop:
                self._truncate_wal(conn)  # never raises: the jobs taken above must still run
            if jobs and (problem := self._files_problem()) is not None:
                kind, message = problem
                for job in jobs:
                    job.future.set_exception(kind(message))
            elif jobs:
                try:
                    self._run_group(conn, jobs)
                except BaseException as e:  # never leave a caller waiting
                    log.exception("writer failed")
                    try:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(_store_error(e, "writer failed: ", self.path))
        if self._truncate_pending:  # a last try; past it, the next automatic checkpoint or last close does it
            self._truncate_wal(conn)
        conn.close()

    def _run_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        done: list[tuple[_Job, Any]] = []  # succeeded in the open transaction, not yet committed

        def fail_done(exc: BaseException) -> None:
            # These jobs did nothing wrong: the transaction they shared failed.
            for job, _ in done:
                job.future.set_exception(StoreUnavailableError(f"transaction aborted: {exc}{_on_disk(exc, self.path)}"))
            done.clear()

        for n, job in enumerate(jobs):
            self.job_count += 1
            try:
                if not conn.in_transaction:
                    try:
                        conn.execute("BEGIN IMMEDIATE")
                    except sqlite3.Error as e:
                        # The lock another process holds (or the file's error) fails the group at once: each
                        # job trying again waited out the busy timeout anew, 10 s more a job, the writer stuck.
                        fail_done(e)
                        for waiting in jobs[n:]:
                            waiting.future.set_exception(_store_error(e, path=self.path))
                        return
                conn.execute("SAVEPOINT job")
            except sqlite3.Error as e:
                fail_done(e)
                job.future.set_exception(_store_error(e, path=self.path))
                continue
            try:
                if job.guard is not None:
                    job.guard()  # holding the write lock, inside the transaction (see Store)
                result = job.fn(conn)
                conn.execute("RELEASE job")
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                try:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                except sqlite3.Error:
                    pass
                if not conn.in_transaction:  # SQLite aborted the whole transaction (I/O error, full disk)
                    fail_done(e)
                job.future.set_exception(_store_error(e, path=self.path))
                continue
            done.append((job, result))
        if not done:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            fail_done(e)
            return
        self.commit_count += 1
        for job, result in done:
            if job.after_commit is None:
                job.future.set_result(result)
        for job, result in done:  # after the others: a checkpoint must not delay them
            if job.after_commit is not None:
                try:
                    job.after_commit(conn)
                except Exception as e:  # noqa: BLE001 - the job committed: its caller gets its result
                    # Only sqlite3.Error was caught: an OSError (the erasure marks' files) reached the writer's
                    # catch-all, which failed an erasure that had committed, and the jobs after it (a review).
                    log.warning("post-commit step failed: %s", e)
                job.future.set_result(result)

    # ------------------------------------------------------------------ readers

    def _acquire_reader(self) -> sqlite3.Connection:
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            if self._readers:
                return self._readers.pop()
        try:
            conn = _connect(self.path, readonly=True)
        except sqlite3.Error as e:
            # Classified as every other SQLite error, so that the caller gets DATA_LOSS or UNAVAILABLE, not
            # INTERNAL and a traceback (a review deleted the file under a running server).
            if (problem := self._files_problem()) is not None:
                kind, message = problem
                raise kind(message) from e
            raise _store_error(e, f"cannot open {self.path}: ", self.path) from e
        return conn

    def _release_reader(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if not self._closed:
                self._readers.append(conn)
                return
        conn.close()

    def _read(self, fn: Callable[[sqlite3.Connection], Any], *, one_snapshot: bool = False) -> Any:
        """fn(a reader connection); one_snapshot: its statements in one read
        transaction, so that a write (an erasure) lands before all of them or after."""
        with self._reader() as conn:
            if not one_snapshot:
                return fn(conn)
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A reader connection for the block (a generator's whole iteration
        too); its SQLite errors raised as StoreError."""
        conn = self._acquire_reader()
        try:
            yield conn
        except sqlite3.Error as e:
            raise _store_error(e, path=self.path) from e
        finally:
            self._release_reader(conn)

    # ------------------------------------------------------------------ items

    def upsert_items(self, items: Sequence[ItemRecord], guard: Guard | None = None) -> tuple[int, int]:
        latest = {item.id: item for item in items}  # the last one of an id wins
        if not latest:
            return (0, 0)
        blobs = [_vector_bytes(item.vector) for item in latest.values()]
        rows = [
            (
                item.id,
                item.text,
                json.dumps(list(item.categories)),
                json.dumps(dict(item.attributes), sort_keys=True),
                None if item.create_time is None else float(item.create_time),
                item.embedded_by,
            )
            for item in latest.values()
        ]
        ids_json = _ids_json(list(latest))

        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            old = _item_vector_ids(conn, ids_json)
            vector_ids = _intern_vectors(conn, blobs, rewrite=True)
            last_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            _insert(
                conn,
                "INSERT INTO items(id, text, categories, attributes, create_time, embedded_by, vector_id, created_seq)",
                [row + (vid, last_seq) for row, vid in zip(rows, vector_ids)],
                """ON CONFLICT(id) DO UPDATE SET text = excluded.text, categories = excluded.categories,
                       attributes = excluded.attributes, create_time = excluded.create_time,
                       embedded_by = excluded.embedded_by, vector_id = excluded.vector_id""",
            )
            current = set(vector_ids)
            _gc_vectors(conn, [vid for vid in old.values() if vid not in current])
            moved = {i for i, vid in zip(latest, vector_ids) if old.get(i) != vid}  # new, or another vector
            self._log_item_changes(conn, list(latest), moved)
            return (len(latest) - len(old), len(old))

        return self._submit(job, guard=guard)

    def delete_items(self, ids: Sequence[str], guard: Guard | None = None) -> list[str]:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return []
        wanted_json = _ids_json(wanted)

        def job(conn: sqlite3.Connection) -> list[str]:
            found = _item_vector_ids(conn, wanted_json)
            conn.execute("DELETE FROM items WHERE id IN (SELECT value FROM json_each(?))", (wanted_json,))
            _gc_vectors(conn, list(found.values()))
            self._log_item_changes(conn, list(found), set(found))
            return [id_ for id_ in wanted if id_ in found]

        return self._submit(job, guard=guard)

    def get_items(self, ids: Sequence[str]) -> dict[str, ItemRecord]:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return {}
        wanted_json = _ids_json(wanted)

        def read(conn: sqlite3.Connection) -> dict[str, ItemRecord]:
            rows = conn.execute(
                _ITEM_SELECT + " WHERE i.id IN (SELECT value FROM json_each(?))", (wanted_json,)
            )
            damaged: set[int] = set()
            items = (_item_from(row, damaged) for row in rows)
            return {item.id: item for item in items if item is not None}

        return self._read(read)

    def list_items(self, after_id: str, limit: int) -> tuple[list[ItemRecord], str | None]:
        def read(conn: sqlite3.Connection) -> tuple[list[ItemRecord], str | None]:
            # One row past the page says whether another follows. SQLite's TEXT order (BINARY) is the
            # UTF-8 bytes', which is also Python's str order, and the id's own index serves it.
            rows = conn.execute(_ITEM_SELECT + " WHERE i.id > ? ORDER BY i.id LIMIT ?",
                                (after_id, limit + 1)).fetchall()
            page, damaged = rows[:limit], set()
            items = [item for item in (_item_from(row, damaged) for row in page) if item is not None]
            return items, page[-1][0] if len(rows) > limit else None

        return self._read(read)

    def iter_items(self) -> Iterator[ItemRecord]:
        # A read transaction per ITEMS_PER_READ items, from the rowid the last one ended at: see iter_events.
        # The items changed meanwhile are in the change feed, which a start catches up from (and reembed checks).
        after = 0
        damaged: set[int] = set()
        while True:
            # The cursor closes with the block: one an exception kept alive (in its traceback) held the
            # pooled reader's snapshot, and later reads on that reader missed newer commits (a review).
            with self._reader() as conn, contextlib.closing(conn.execute(
                    _ITEM_SELECT + " WHERE i.rowid > ? ORDER BY i.rowid LIMIT ?", (after, ITEMS_PER_READ))) as cur:
                rows = []
                while more := cur.fetchmany(1000):
                    rows.append([_item_from(row, damaged) for row in more])
                    after = more[-1][-1]  # i.rowid, _ITEM_SELECT's last column
            for items in rows:
                yield from filter(None, items)
            if sum(map(len, rows)) < ITEMS_PER_READ:
                return

    # ------------------------------------------------------------------ events

    def record_events(self, events: Sequence[EventRecord], guard: Guard | None = None,
                      items_as_of: int | None = None, stored_before: Collection[str] = (),
                      as_items: Collection[int] = ()) -> list[EventRecord]:
        first = first_of_each_id(events)  # the first of each id wins
        if not first:
            return []
        ids_json = _ids_json(list(first))
        unique = [events[i] for i in first.values()]
        # An event that carries its item's stored vector (as_items; _refuse_changed_items checks the
        # item is still as it was) references that vector's row: no bytes, hash and lookup by hash
        # each, a quarter of ingest's time from empty.
        via_item = set()
        if items_as_of is not None:  # (an id with NUL cannot go through json_each: see _ids_json)
            via_item = {j for j, i in enumerate(first.values()) if i in as_items and "\x00" not in events[i].item_id}
        # Everything per-row is prepared here, in the caller's thread; the
        # writer only filters, interns and runs the statements.
        blobs = {j: _vector_bytes(e.vector) for j, e in enumerate(unique) if j not in via_item}
        hashes = {j: _hash(blob) for j, blob in blobs.items()}
        rows = [
            (
                e.event_id,
                e.user_id,
                int(e.type),
                e.item_id,
                e.text,
                None if e.value is None else float(e.value),
                float(e.event_time),
            )
            for e in unique
        ]

        def vector_ids(conn: sqlite3.Connection, keep: Sequence[int]) -> list[int]:
            """The vector row of each event kept: its item's, else its own, interned by hash."""
            named = list({unique[j].item_id for j in keep if j in via_item})
            of_item = _item_vector_ids(conn, json.dumps(named)) if named else {}
            ids = {j: of_item[unique[j].item_id] for j in keep if j in via_item and unique[j].item_id in of_item}
            hashed = [j for j in keep if j not in ids]
            for j in hashed:
                if j not in blobs:  # its item is not stored (never expected): hashed after all
                    blobs[j] = _vector_bytes(unique[j].vector)
                    hashes[j] = _hash(blobs[j])
            ids.update(zip(hashed, _intern_vectors(conn, [blobs[j] for j in hashed], [hashes[j] for j in hashed])))
            return [ids[j] for j in keep]

        def job(conn: sqlite3.Connection) -> tuple[int, Sequence[int]]:
            seen = _stored_event_ids(conn, ids_json)
            if erased := [event_id for event_id in stored_before if event_id not in seen]:
                raise ResentEventsErasedError(erased)
            keep: Sequence[int] = range(len(rows))
            if seen:
                keep = [i for i, row in enumerate(rows) if row[0] not in seen]
                if not keep:
                    return 0, []
            if items_as_of is not None:
                _refuse_changed_items(conn, items_as_of, {rows[i][3] for i in keep})
            ids = vector_ids(conn, keep)
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            before = row[0] if row else 0
            _insert(
                conn,
                "INSERT INTO events(event_id, user_id, type, item_id, text, value, event_time, vector_id)",
                [rows[i] + (vid,) for i, vid in zip(keep, ids)],
            )
            _count_vector_uses(conn, ids)
            after = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()[0]
            if after - before != len(keep):  # AUTOINCREMENT hands one writer consecutive seqs
                raise StoreError(f"unexpected seq range {before}..{after} for {len(keep)} events")
            return before, keep

        before, keep = self._submit(job, guard=guard)
        # tuple.__new__ with the fields: a third cheaper than EventRecord(*e[:-1], seq), itself twice as fast
        # as e._replace(seq=seq).
        new = tuple.__new__
        return [new(EventRecord, unique[i][:-1] + (seq,)) for seq, i in enumerate(keep, start=before + 1)]

    def existing_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        """Those of `event_ids` already stored."""
        wanted = list(dict.fromkeys(event_ids))
        if not wanted:
            return set()
        wanted_json = _ids_json(wanted)

        return self._read(lambda conn: _stored_event_ids(conn, wanted_json))

    def user_events(self, user_id: str) -> list[EventRecord]:
        return self._read(lambda conn: _events_where(conn, "e.user_id = ?", (user_id,)))

    def list_user_events(self, user_id: str, after_seq: int, limit: int, newest_first: bool = False,
                         start_time: float = -math.inf, end_time: float = math.inf) -> tuple[list[EventRecord], int | None]:
        # One row past the page says whether another follows; the events(user_id, seq) index serves it, either way.
        after, bound = ("e.seq < ?", after_seq or _MAX_SEQ) if newest_first else ("e.seq > ?", after_seq)
        where, params = f"e.user_id = ? AND {after}", (user_id, bound)
        ranged = start_time > -math.inf or end_time < math.inf
        if start_time > -math.inf:
            where, params = f"{where} AND e.event_time >= ?", (*params, start_time)
        if end_time < math.inf:
            where, params = f"{where} AND e.event_time < ?", (*params, end_time)

        def page(conn: sqlite3.Connection) -> tuple[list[EventRecord], int | None]:
            # A range filters rows as the index walks them: a page of a narrow range in a long log read the whole
            # log (200k events: 21-46 ms a page, a review). It reads at most RANGED_PAGE_SCAN of the user's events
            # past the page's start, from the index alone, and a page that ends there says so (AIP-158: a page
            # may hold fewer than page_size, or none).
            edge = None
            if ranged:
                order, past = ("seq DESC", "e.seq >= ?") if newest_first else ("seq", "e.seq <= ?")
                row = conn.execute(f"SELECT e.seq FROM events e WHERE e.user_id = ? AND {after} ORDER BY {order} "
                                   "LIMIT 1 OFFSET ?", (user_id, bound, RANGED_PAGE_SCAN - 1)).fetchone()
                edge = None if row is None else row[0]
            window = where if edge is None else f"{where} AND {past}"
            events = _events_where(conn, window, params if edge is None else (*params, edge),
                                   vectors_of=lambda _: False, limit=limit + 1, descending=newest_first)
            if len(events) > limit:
                return events[:limit], events[limit - 1].seq
            return events, edge

        return self._read(page, one_snapshot=ranged)

    def events_between(self, after_seq: int, through_seq: int,
                       vectors_of: Callable[[str], bool] | None = None) -> list[EventRecord]:
        # One snapshot: the events, then (vectors_of) their vectors in a second statement.
        return self._read(lambda conn: _events_where(conn, "e.seq > ? AND e.seq <= ?", (after_seq, through_seq),
                                                     vectors_of), one_snapshot=True)

    @contextlib.contextmanager
    def user_history(self, user_id: str, from_snapshot: bool = True, through_time: float = math.inf,
                     chunk: int = 10_000) -> Iterator[tuple[ProfileSnapshot | None, Iterator[list[EventRecord]]]]:
        with self._reader() as conn:
            conn.execute("BEGIN")  # one snapshot for the block: see _read
            try:
                snapshot = None
                if from_snapshot:
                    # As a BLOB whatever it became on disk: TEXT that is no UTF-8 failed the read, and the
                    # user's every GetProfile and Recommend, where damaged bytes fall back to a replay.
                    row = conn.execute("SELECT through_seq, key, CAST(data AS BLOB) FROM profile_snapshots "
                                       "WHERE user_id = ?", (user_id,)).fetchone()
                    snapshot = None if row is None else ProfileSnapshot(row[0], row[1], bytes(row[2]))
                after = 0 if snapshot is None else snapshot.through_seq
                # The order comes from the seqs alone, then each chunk's rows with their vectors: sorted with
                # them, SQLite's sorter would copy every vector of the log (~1.6 KB an event) to its temp files.
                order = conn.execute("SELECT seq FROM events WHERE user_id = ? AND seq > ? AND event_time <= ? "
                                     "ORDER BY event_time, seq", (user_id, after, through_time))
                with contextlib.closing(order):
                    seqs = [seq for (seq,) in order.fetchmany(chunk)]
                    if len(seqs) < chunk:
                        # All of it in one chunk: the snapshot ends before the caller replays it. Held
                        # through replays (~100 ms for 3k events), reads kept an erasure's WAL truncation
                        # waiting while calls went on (2026-12-07: 7 s under a Recommend load).
                        events = _in_order(conn, seqs)
                        conn.execute("COMMIT")
                        yield snapshot, iter([events] if events else [])
                        return
                    chunks = self._replay_chunks(conn, order, seqs, chunk)
                    with contextlib.closing(chunks):  # its statements done before the COMMIT, read to the end or not
                        yield snapshot, chunks
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    @staticmethod
    def _replay_chunks(conn: sqlite3.Connection, order: sqlite3.Cursor, seqs: list[int],
                       chunk: int) -> Iterator[list[EventRecord]]:
        """`user_history`'s events of a long log: those of `seqs`, then of
        each next `chunk` of seqs `order` gives, a chunk in memory at a time."""
        while seqs:
            yield _in_order(conn, seqs)
            seqs = [seq for (seq,) in order.fetchmany(chunk)]

    def save_profile_snapshot(self, user_id: str, snapshot: ProfileSnapshot) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            # Only while the event it ends at is stored: a replay read before
            # an erasure must not bring the erased user back. One ending at the
            # same event replaces it: the same prefix of the log under the same
            # settings, so the same profile, unless the one stored was damaged
            # (kept, it sent every miss of the user to a full replay: a review).
            return conn.execute(
                """INSERT INTO profile_snapshots(user_id, through_seq, key, data)
                   SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM events WHERE seq = ? AND user_id = ?)
                   ON CONFLICT(user_id) DO UPDATE SET
                       through_seq = excluded.through_seq, key = excluded.key, data = excluded.data
                   WHERE excluded.through_seq >= through_seq OR excluded.key <> key""",
                (user_id, snapshot.through_seq, snapshot.key, snapshot.data, snapshot.through_seq, user_id),
            ).rowcount > 0

        return self._submit(job)

    def iter_events(self, chunk: int = 50_000, through_seq: int | None = None,
                    user_id: str | None = None, after_seq: int = 0) -> Iterator[EventColumns]:
        # Each chunk in a read transaction of its own, from the seq the last one ended at (seqs only grow): one
        # statement over the whole log kept its snapshot for the whole pass (a rebuild of the blend: 30-50 s at
        # 5M events), and no checkpoint could pass it meanwhile, so the WAL grew with every write and an
        # erasure's truncation waited for the pass to end (see the module's docstring).
        select = "SELECT seq, type, item_id, user_id, value, event_time FROM events"
        while True:
            where, args = _events_in(after_seq, through_seq, user_id)
            with self._reader() as conn, contextlib.closing(
                    conn.execute(select + where + " ORDER BY seq LIMIT ?", (*args, chunk))) as cur:
                # closed with the block: see iter_items
                read = next(_column_chunks(cur, chunk), None)
            if read is None:
                return
            seqs, types, item_ids, user_ids, values, times = read
            try:
                columns = EventColumns(
                    seqs=np.array(seqs, dtype=np.int64),
                    types=np.array(types, dtype=np.int64),
                    item_ids=item_ids,
                    user_ids=user_ids,
                    values=np.array([np.nan if v is None else v for v in values], dtype=np.float64),
                    times=np.array(times, dtype=np.float64),
                )
            except (TypeError, ValueError) as e:  # a row damaged on disk: it was a traceback at start
                raise StoreDamagedError(f"events {seqs[0]}..{seqs[-1]}: a type, value or time is not a number "
                                        f"({e}): the store is damaged") from e
            yield columns
            if len(seqs) < chunk:
                return
            after_seq = seqs[-1]

    def delete_user(self, user_id: str, guard: Guard | None = None) -> int:
        def job(conn: sqlite3.Connection) -> int:
            vector_ids = [
                row[0]
                for row in conn.execute("SELECT DISTINCT vector_id FROM events WHERE user_id = ?", (user_id,))
            ]
            count = conn.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
            conn.execute("DELETE FROM profile_snapshots WHERE user_id = ?", (user_id,))
            _gc_vectors(conn, vector_ids)
            if count:  # one erasure row per writing instance: another's must not be overwritten unseen
                conn.execute("DELETE FROM changes WHERE item_id IS NULL AND origin = ?", (self.origin,))
                conn.execute("INSERT INTO changes(item_id, origin) VALUES (NULL, ?)", (self.origin,))
                # Marked before the commit: a crash between it and the truncation after it left the
                # erased rows in the WAL with nothing owed on disk (a review). Settled by the truncation.
                self._mark_erased()
            return count

        return self._submit(job, after_commit=self._truncate_wal, guard=guard)

    def _log_item_changes(self, conn: sqlite3.Connection, item_ids: Sequence[str], moved: set[str]) -> None:
        """Moves each item's feed row to a new version; those in `moved` (a
        new vector or incarnation, a deletion) mark it as their vector's too,
        the others keep their vector's version."""
        kept = dict(conn.execute("SELECT item_id, vector_version FROM changes WHERE item_id IN "
                                 "(SELECT value FROM json_each(?))", (_ids_json([i for i in item_ids if i not in moved]),)))
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        _insert(conn, "INSERT OR REPLACE INTO changes(item_id, origin, vector_version)",
                [(i, self.origin, -1 if i in moved else kept.get(i, 0)) for i in item_ids])
        conn.execute("UPDATE changes SET vector_version = version WHERE version > ? AND vector_version = -1",
                     (row[0] if row else 0,))

    # ------------------------------------------------------------------ following other writers

    def head(self) -> StoreHead:
        def read(conn: sqlite3.Connection) -> StoreHead:
            seqs = dict(conn.execute("SELECT name, seq FROM sqlite_sequence WHERE name IN ('events', 'changes')"))
            return StoreHead(event_seq=seqs.get("events", 0), change_version=seqs.get("changes", 0))

        return self._read(read)

    def changes_since(self, version: int) -> list[Change]:
        def read(conn: sqlite3.Connection) -> list[Change]:
            rows = conn.execute(
                "SELECT version, item_id, origin FROM changes WHERE version > ? ORDER BY version", (version,)
            )
            return [Change(*row) for row in rows]

        return self._read(read)

    def prune_change_feed(self) -> int:
        # AUTOINCREMENT keeps the high-water mark in sqlite_sequence, so head()
        # and new versions go on from it. Without this, every item id ever
        # written kept its row (~77 B): a catalogue that turns over grew the
        # file without bound, restarts included (a workers review).
        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM changes WHERE item_id IS NULL OR item_id NOT IN (SELECT id FROM items)"
            ).rowcount

        pruned = self._submit(job)
        if pruned:
            log.info("pruned %d change feed rows of deleted items and erasures", pruned)
        return pruned

    def _truncate_wal(self, conn: sqlite3.Connection) -> None:
        """Copies the WAL into the database and truncates it, so that the
        pre-delete page images in old WAL frames are gone too. Waits at most
        TRUNCATE_BUSY_MS for readers; if one blocks it, the writer tries
        again (see `_run_writer`), and leaves a mark on disk until one
        completes (`_mark_erased`). Never raises. Writer thread."""
        failed = False
        try:
            # Listed in the try (out of file descriptors, it raised: the retry's OSError ended the writer thread,
            # and every write after it waited forever). A completed truncation settles what was committed before it.
            owed = self._erased_marks()
            conn.execute(f"PRAGMA busy_timeout = {TRUNCATE_BUSY_MS}")
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except Exception as e:  # noqa: BLE001 - a failed try is retried, never the writer's end
            # Every TRUNCATE_RETRY_S while a disk stays full: not a line each time, nor called a reader's block.
            _checkpoint_failures.log("WAL checkpoint after an erasure failed (%s); retried every %.0f s until it "
                                     "completes", _store_error(e, path=self.path), TRUNCATE_RETRY_S)
            busy = failed = True
        if busy:
            if not self._truncate_pending and not failed:
                log.warning("WAL checkpoint after an erasure is blocked by a reader; retried every %.0f s until "
                            "it completes", TRUNCATE_RETRY_S)
            self._mark_erased()  # before DeleteUser answers: this runs ahead of the job's result
        else:
            if self._truncate_pending:
                log.info("WAL checkpoint after an erasure completed")
            for mark in owed:
                with contextlib.suppress(OSError):  # kept (a directory made read-only): the next open truncates again
                    mark.unlink(missing_ok=True)
        self._truncate_pending = bool(busy)
        self._truncate_due = time.monotonic() + TRUNCATE_RETRY_S

    def _erased_marks(self, origin: str = "") -> list[Path]:
        """The marks of WAL truncations owed on the file: every store's, or those of `origin`'s."""
        return list(self.path.parent.glob(f"{self.path.name}{ERASED_MARK}{origin}*"))

    def _mark_erased(self) -> None:
        """Marks durably that this store owes a WAL truncation: one opened
        after a crash sees it and does it (an audit SIGKILLed a server whose
        retry was pending: the erased user's texts stayed in the WAL). A new
        mark at each try, then the older ones go: another store's completed
        truncation removes the marks it found before it began, and one of
        those, kept, left a later erasure here unmarked (a review)."""
        self._marks_made += 1
        mark = self.path.with_name(f"{self.path.name}{ERASED_MARK}{self.origin}-{self._marks_made}")
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_WRONLY, 0o600))
            sync_directory(self.path.parent)
        except OSError as e:
            _mark_failures.log("cannot mark the WAL truncation this erasure owes (%s): after a crash, the next "
                               "erasure or a clean stop does it", e)
            return
        with contextlib.suppress(OSError):  # an older mark kept only costs the next open a truncation
            for older in self._erased_marks(f"{self.origin}-"):
                if older != mark:
                    older.unlink(missing_ok=True)

    def check_intact(self) -> None:
        """Raises StoreDamagedError where SQLite's quick_check finds the file's
        b-trees damaged: a page damaged on disk can end a range read early
        without an error (a rowid raised by a flipped bit stopped a `halflife
        reembed` copy there, 149 of 300 events, reported complete). Reads
        every page: 0.3 s for a 227 MiB file in the page cache (100k events)."""
        try:
            problems = self._read(lambda conn: [row[0] for row in conn.execute("PRAGMA quick_check(5)")])
        except StoreDamagedError as e:  # damage the check itself trips on
            problems = [str(e)]
        if problems != ["ok"]:
            found = "; ".join(line for problem in problems for line in problem.splitlines()
                              if line != "*** in database main ***")
            raise StoreDamagedError(f"{self.path} is damaged ({found}): restore it from a backup")

    def checkpoint(self) -> None:
        """Checkpoints and truncates the WAL (on the writer thread)."""
        self._submit(lambda conn: None, after_commit=self._truncate_wal)

    def bind_vectors(self, space: str, model: str) -> tuple[str, str]:
        def job(conn: sqlite3.Connection) -> tuple[str, str]:
            # A store that holds no vector (none written yet, or all deleted since) is in no model's space: an
            # empty var/data that `make serve` once started with the bundled model refused every other, told to
            # take "a data directory of its own: empty" (a model-upgrade review).
            empty = not _holds_vectors(conn)
            conn.executemany(f"INSERT OR {'REPLACE' if empty else 'IGNORE'} INTO meta(key, value) VALUES (?, ?)",
                             [("vector_space", space), ("vector_model", model)])
            return _bound_vectors(conn)

        return self._submit(job)

    def bound_vectors(self) -> tuple[str, str] | None:
        return self._read(_bound_vectors)

    def vector_size(self) -> int | None:
        return self._read(_vector_size)

    def item_count(self) -> int:
        return self._read(lambda c: c.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def event_count(self, user_id: str | None = None) -> int:
        where, args = _events_in(0, None, user_id)
        return self._read(lambda c: c.execute("SELECT COUNT(*) FROM events" + where, args).fetchone()[0])

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.append(_STOP)  # after every job already queued
            self._wakeup.notify()
            idle, self._readers = self._readers, []
        self._thread.join()
        for conn in idle:
            conn.close()

    def __enter__(self) -> "SqliteStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
