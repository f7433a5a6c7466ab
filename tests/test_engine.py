"""The interest engine in-process, over a real store, with a fake embedder."""

from __future__ import annotations

from halflife.config import Config
from halflife.interest.engine import EventInput, InterestEngine
from halflife.storage.sqlite import SqliteStore
from tests.fakes import DIM, fake_embed

DAY = 86400.0
T = 1_700_000_000.0
SEARCH = 8


def test_a_store_with_text_events_and_no_items_reopens(tmp_path):
    first = InterestEngine(Config(), SqliteStore(tmp_path), DIM, fake_embed, clock=lambda: T)
    first.record_events([EventInput("s1", "u", SEARCH, None, "cheap flights to lisbon", None, T - DAY)])
    first.store.close()
    again = InterestEngine(Config(), SqliteStore(tmp_path), DIM, fake_embed, clock=lambda: T)
    assert again.recommend("u", 5, as_of=T).strategy == "personalized"
