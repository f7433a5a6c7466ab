"""Test doubles that need no model."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np

DIM = 16
# The team's development dataset, beside the checkout, or where HALFLIFE_MOVIELENS_DIR says (a checkout
# elsewhere skipped its tests with no way to point them at it); tests that need it skip where it is absent.
MOVIELENS_ENV = "HALFLIFE_MOVIELENS_DIR"
MOVIELENS = Path(os.environ.get(MOVIELENS_ENV)
                 or Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small")
MOVIELENS_MISSING = f"the MovieLens development dataset is not at {MOVIELENS} (set {MOVIELENS_ENV} to its directory)"


def fake_embed(texts, deadline=None):
    """Deterministic unit vectors per text (no model needed here)."""
    rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=DIM) for t in texts]
    rows = np.array(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def stored_history(store, user_id: str, **options) -> tuple:
    """store.user_history's snapshot and events, its chunks joined: (snapshot, [EventRecord...])."""
    with store.user_history(user_id, **options) as (snapshot, chunks):
        return snapshot, [e for chunk in chunks for e in chunk]


def compact_catalogues_at(monkeypatch, dead_rows: int) -> None:
    """Interest engines compact their catalogue index once `dead_rows` rows
    are dead, however many live: deletes renumber the rows often."""
    from halflife.interest import engine

    monkeypatch.setattr(engine, "COMPACT_MIN_DEAD_ROWS", dead_rows)
    monkeypatch.setattr(engine, "COMPACT_DEAD_SHARE", 0.0)


def run_in_threads(steps: int, *actions) -> list[BaseException]:
    """Runs each action(step) for step in range(steps) on a thread of its own,
    all at once; returns what they raised (bounded: joins with a timeout)."""
    import threading

    errors: list[BaseException] = []

    def loop(action) -> None:
        try:
            for step in range(steps):
                action(step)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return errors


def full_disk(store, full: bool) -> None:
    """A real SQLITE_FULL for a SqliteStore's writer: its file may not grow
    past the pages it has (full), or may again (not full)."""
    def limit(conn):
        pages = conn.execute("PRAGMA page_count").fetchone()[0] if full else 1 << 30
        conn.execute(f"PRAGMA max_page_count = {pages}")

    store._submit(limit)


class RecordingTokenizer:
    """A `tokenizers.Tokenizer` that records the texts of each encode_batch (or encode) in `batches`."""

    def __init__(self, tokenizer, batches: list | None = None):
        self._tokenizer = tokenizer
        self.batches = [] if batches is None else batches

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    @property
    def texts(self) -> list[str]:
        return [text for batch in self.batches for text in batch]

    def encode_batch(self, texts):
        self.batches.append(list(texts))
        return self._tokenizer.encode_batch(texts)

    def encode(self, text):
        self.batches.append([text])
        return self._tokenizer.encode(text)


def reads_fail_after_an_erasure(store, monkeypatch, meanwhile=lambda: None) -> None:
    """`store.delete_user` deletes, runs `meanwhile`, then has the store's
    next `head()` raise StoreError once: a disk error right after an
    erasure's commit, where the engine ends the erasure."""
    from halflife.storage.base import StoreError

    delete, head = store.delete_user, store.head

    def failing_head():
        monkeypatch.setattr(store, "head", head)
        raise StoreError("disk I/O error")

    def delete_then_fail(*args, **kwargs):
        deleted = delete(*args, **kwargs)
        meanwhile()
        monkeypatch.setattr(store, "head", failing_head)
        return deleted

    monkeypatch.setattr(store, "delete_user", delete_then_fail)


@contextlib.contextmanager
def process_limit(which: int, soft: int) -> Iterator[None]:
    """Lowers this process's soft limit `which` (resource.RLIMIT_*) to `soft`
    for the block, then gives it back. Under RLIMIT_FSIZE, SIGXFSZ is
    ignored meanwhile, so that a write past it fails with EFBIG (as on a
    quota) instead of ending the process. RLIMIT_NOFILE refuses a new
    descriptor to every thread of the process: keep the block short."""
    import resource
    import signal

    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN) if which == resource.RLIMIT_FSIZE else None
    old, hard = resource.getrlimit(which)
    resource.setrlimit(which, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(which, (old, hard))
        if handler is not None:
            signal.signal(signal.SIGXFSZ, handler)
