"""bench/cooccurrence's sizes: what its table and plot call pairs."""

from __future__ import annotations

import numpy as np

import bench.cooccurrence as bench
from halflife.core.cooccurrence import Cooccurrence


def test_the_table_says_how_many_distinct_pairs_the_index_holds(monkeypatch):
    """A user draws some of its ~50 items twice, so 1M pairs drawn made an
    index of 830k: the table said "pairs" and the README "distinct pairs"."""
    drawn: list[tuple[int, int]] = []
    from_pairs = Cooccurrence.from_pairs.__func__

    def counting(cls, n_items, users, items, times):
        drawn.append((len(users), np.unique(np.asarray(users) * bench.ITEMS + np.asarray(items)).size))
        return from_pairs(cls, n_items, users, items, times)

    written = {}
    monkeypatch.setattr(Cooccurrence, "from_pairs", classmethod(counting))
    monkeypatch.setattr(bench, "QUERIES", 1)
    monkeypatch.setattr(bench, "save_plot", lambda *args: "")
    monkeypatch.setattr(bench, "write_results", lambda name, payload, table, notes: written.update(table=table))
    payload = bench.run(quick=True)

    assert [(r["pairs"], r["distinct_pairs"]) for r in payload["results"][::2]] == drawn
    assert all(distinct < 0.9 * pairs for pairs, distinct in drawn)
    header, _, *rows = written["table"].splitlines()[:6]
    assert header.startswith("| pairs drawn | distinct pairs (the index) |")
    assert [tuple(int(cell) for cell in row.split("|")[1:3]) for row in rows[::2]] == drawn
