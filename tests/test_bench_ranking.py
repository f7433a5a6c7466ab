"""bench/ranking's memory per item: what its table calls the arrays the engine holds."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")  # bench.ranking's baseline, in the bench extra only (as is threadpoolctl)
pytest.importorskip("threadpoolctl")

from bench._memstore import MemoryStore  # noqa: E402
from bench.common import zero_embedder  # noqa: E402
from bench.ranking import DIM, array_bytes, unit_rows  # noqa: E402
from halflife.config import Config  # noqa: E402
from halflife.interest.engine import InterestEngine  # noqa: E402
from halflife.storage.base import ItemRecord  # noqa: E402


def test_array_bytes_count_every_per_row_array_of_the_catalogue():
    """The count named the matrix, alive, create times and sequences: the
    catalogue's last-rewrite versions (8 bytes a row) went uncounted."""
    engine = InterestEngine(Config(), MemoryStore(), DIM, embed=zero_embedder(DIM))
    X = unit_rows(3000)
    engine.catalog.upsert([ItemRecord(f"i{j}", "", (), {}, None, X[j]) for j in range(len(X))])
    engine._resize_blend()  # as the benchmark loads it
    catalogue = engine.catalog
    capacity = catalogue._matrix.shape[0]
    per_row = [a for a in vars(catalogue).values() if isinstance(a, np.ndarray) and a.shape[:1] == (capacity,)]
    blend = engine._blend.popularity.counts.nbytes + engine._blend.cooccurrence.item_counts().nbytes
    assert capacity > len(X) and len(per_row) >= 5
    assert array_bytes(engine) == sum(a.nbytes for a in per_row) + blend
