"""bench/erasure's reading of when a worker's rebuild after another's erasure is in."""

from __future__ import annotations

import time

import bench.erasure as bench


class _Worker:
    """An engine whose rebuild is in after its first call (one under the lock: the call ran it)."""

    def __init__(self) -> None:
        self._rebuilding = True

    def delete_user(self, user: str) -> None:
        pass

    def recommend(self, user: str, limit: int) -> None:
        time.sleep(0.002)
        self._rebuilding = False


def test_rebuilt_in_is_when_the_rebuild_was_in_not_the_end_of_the_watch(monkeypatch):
    """A rebuild of 0.17 s (100k events, under the lock) read as 0.50 s: the
    column gave the watch's minimum length, MIN_WATCH_S, for any shorter one."""
    monkeypatch.setattr(bench, "MIN_WATCH_S", 0.3)
    row = bench._after_an_erasure(_Worker(), _Worker(), "victim", ["u1", "u2"])
    assert row["until_rebuilt_s"] < 0.1
    assert row["calls"] > 10  # the calls still go on for the watch
