"""The SQLite store's schema, as the migrations that build it.

A file records its version in ``PRAGMA user_version``; `SqliteStore` applies
``MIGRATIONS[version:]`` in order, in one transaction, when it opens one, and
refuses a file stamped with a newer version than `SCHEMA_VERSION`. Each
migration says why its change was made: the tables are the product of them all.
"""

from __future__ import annotations

import sqlite3
from typing import Callable

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]


def _migration_1(conn: sqlite3.Connection) -> None:
    for sql in (
        """CREATE TABLE vectors (
               id   INTEGER PRIMARY KEY,
               hash BLOB NOT NULL UNIQUE,
               data BLOB NOT NULL
           )""",
        """CREATE TABLE items (
               id          TEXT PRIMARY KEY,
               text        TEXT NOT NULL,
               categories  TEXT NOT NULL,          -- JSON array
               attributes  TEXT NOT NULL,          -- JSON object
               create_time REAL,
               vector_id   INTEGER NOT NULL REFERENCES vectors(id)
           )""",
        "CREATE INDEX items_vector ON items(vector_id)",
        """CREATE TABLE events (
               seq        INTEGER PRIMARY KEY AUTOINCREMENT,
               event_id   TEXT NOT NULL UNIQUE,
               user_id    TEXT NOT NULL,
               type       INTEGER NOT NULL,
               item_id    TEXT,
               text       TEXT,
               value      REAL,
               event_time REAL NOT NULL,
               vector_id  INTEGER NOT NULL REFERENCES vectors(id)
           )""",
        "CREATE INDEX events_user_seq ON events(user_id, seq)",
        "CREATE INDEX events_vector ON events(vector_id)",
    ):
        conn.execute(sql)


def _migration_2(conn: sqlite3.Connection) -> None:
    # Which events belong to which incarnation of an item id (ItemRecord.created_seq);
    # rows from before the migration keep 0: all their events count, as before.
    conn.execute("ALTER TABLE items ADD COLUMN created_seq INTEGER NOT NULL DEFAULT 0")


def _migration_3(conn: sqlite3.Connection) -> None:
    # The change feed that worker processes sharing the file follow (Store.changes_since).
    # One row per item id (REPLACE moves it to a new version) and one per
    # writing instance for user erasure, which names no user. Deleted items'
    # rows and erasure rows are pruned when a server starts (prune_change_feed):
    # the table holds the catalogue plus what changed since.
    conn.execute(
        """CREATE TABLE changes (
               version INTEGER PRIMARY KEY AUTOINCREMENT,
               item_id TEXT UNIQUE,                -- NULL: a user was erased
               origin  TEXT NOT NULL
           )"""
    )


def _migration_4(conn: sqlite3.Connection) -> None:
    # Vector garbage collection asked "does any event use this vector?" through
    # the index events(vector_id), whose inserts land on a random page each
    # (one run per item vector): at 3M events that halved ingest (24k -> 11k
    # events/s). A narrow table now counts each vector's events: the one
    # insert path (record_events) adds a batch's counts in one statement (a
    # per-row trigger cost 5 us an event, the batch 1.2), and a trigger
    # subtracts on every delete, whatever the code path. The index and the
    # events -> vectors foreign key (which without the index would scan the
    # events on every vector delete) go. The events table is rebuilt without
    # the key; AUTOINCREMENT's high-water mark (Store.head) is kept.
    high = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    for sql in (
        """CREATE TABLE events_new (
               seq        INTEGER PRIMARY KEY AUTOINCREMENT,
               event_id   TEXT NOT NULL UNIQUE,
               user_id    TEXT NOT NULL,
               type       INTEGER NOT NULL,
               item_id    TEXT,
               text       TEXT,
               value      REAL,
               event_time REAL NOT NULL,
               vector_id  INTEGER NOT NULL           -- counted in vector_refs
           )""",
        """INSERT INTO events_new(seq, event_id, user_id, type, item_id, text, value, event_time, vector_id)
           SELECT seq, event_id, user_id, type, item_id, text, value, event_time, vector_id FROM events""",
        "DROP TABLE events",
        "ALTER TABLE events_new RENAME TO events",
        "CREATE INDEX events_user_seq ON events(user_id, seq)",
        """CREATE TABLE vector_refs (
               id     INTEGER PRIMARY KEY,           -- vectors.id
               events INTEGER NOT NULL               -- events that use it
           )""",
        "INSERT INTO vector_refs(id, events) SELECT vector_id, COUNT(*) FROM events GROUP BY vector_id",
        """CREATE TRIGGER events_uncount_vector AFTER DELETE ON events BEGIN
               UPDATE vector_refs SET events = events - 1 WHERE id = old.vector_id;
           END""",
    ):
        conn.execute(sql)
    if high is not None:
        conn.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'events'", high)
        conn.execute("INSERT INTO sqlite_sequence(name, seq) SELECT 'events', ? WHERE changes() = 0", high)


def _migration_5(conn: sqlite3.Connection) -> None:
    # Profile snapshots (Store.save_profile_snapshot): a heavy user's profile
    # rebuilt from the last snapshot and the events after it, not the whole
    # log (50k events: 3.2 s of replay).
    conn.execute(
        """CREATE TABLE profile_snapshots (
               user_id     TEXT PRIMARY KEY,
               through_seq INTEGER NOT NULL,  -- covers the user's events with seq <= it
               key         TEXT NOT NULL,     -- what built it (the engine's settings)
               data        BLOB NOT NULL
           )"""
    )


def _migration_6(conn: sqlite3.Connection) -> None:
    # Which model embedded an item's vector from its text (ItemRecord.embedded_by):
    # an upsert that repeats the text keeps the vector instead of embedding it
    # again. NULL for the items stored before: each is embedded once more.
    conn.execute("ALTER TABLE items ADD COLUMN embedded_by TEXT")


def _migration_7(conn: sqlite3.Connection) -> None:
    # What the store's vectors come from (Store.bind_vectors): items and
    # events keep their vectors, so a store served with another model ranked
    # in a mixture of two spaces, silently where the sizes matched.
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


def _migration_8(conn: sqlite3.Connection) -> None:
    # The feed version at which each item's vector or incarnation last changed:
    # a RecordEvents is refused (and retried) only for those, not for a change
    # of its attributes or an identical re-upsert (a race review: a hot item's
    # stock updates aborted its events). Rows from before count as changed then.
    conn.execute("ALTER TABLE changes ADD COLUMN vector_version INTEGER NOT NULL DEFAULT 0")
    conn.execute("UPDATE changes SET vector_version = version")


# Append only: MIGRATIONS[i] takes the schema from version i to i + 1.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _migration_1, _migration_2, _migration_3, _migration_4, _migration_5, _migration_6, _migration_7, _migration_8,
]
SCHEMA_VERSION = len(MIGRATIONS)
