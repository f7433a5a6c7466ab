"""bench/ranking times the engine in-process over bench._memstore.MemoryStore
(no SQLite, no fsync): it must give the engine what SqliteStore gives it, or
the benchmark times something else than the server runs."""

from __future__ import annotations

from bench._memstore import MemoryStore
from halflife.config import Config
from halflife.interest.engine import InterestEngine
from halflife.interest.types import EventInput, ItemInput
from halflife.storage.sqlite import SqliteStore
from tests.fakes import DIM, fake_embed

T = 1_700_000_000.0
VIEW, LIKE = 1, 3


def _engine(store) -> InterestEngine:
    engine = InterestEngine(Config(), store, DIM, fake_embed, clock=lambda: T)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item number {n}") for n in range(12)])
    return engine


def _events(prefix: str, n: int) -> list[EventInput]:
    return [
        EventInput(f"{prefix}{k}", f"u{k % 3}", (VIEW, LIKE)[k % 2], f"i{(5 * k) % 12}", None, None, T - 3600.0 * k)
        for k in range(n)
    ]


def test_the_memory_store_gives_the_engine_what_sqlite_gives_it(tmp_path):
    memory, sqlite = _engine(MemoryStore()), _engine(SqliteStore(tmp_path))
    batches = [_events("a", 10), _events("a", 4) + _events("b", 6)]  # the second re-sends 4 events
    for batch in batches:
        assert memory.record_events(batch) == sqlite.record_events(batch)
    for user in ("u0", "u1", "u2"):
        assert [e.seq for e in memory.store.user_events(user)] == [e.seq for e in sqlite.store.user_events(user)]
        ranked = [(i.item_id, round(i.score, 6)) for i in memory.recommend(user, 5, as_of=T).items]
        assert ranked == [(i.item_id, round(i.score, 6)) for i in sqlite.recommend(user, 5, as_of=T).items]
    sqlite.store.close()
