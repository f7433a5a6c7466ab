"""Embedding a list of texts in this process, without the server's batcher:
what the evaluation and `halflife reembed` do."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from halflife.embedding.pooling import l2_normalize

BATCH = 64


def embed_sorted(engine, texts: Sequence[str], batches: Callable[[range], Iterable[int]] = iter) -> np.ndarray:
    """Unit embeddings of `texts` through an EmbeddingEngine, truncated to its
    limit, in batches of BATCH sorted by length, as the server's batcher
    sorts them (less padding); the order is restored. `batches` wraps the
    batches' start offsets (a progress bar). Returns (len(texts), dim) float32."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), engine.dimension), dtype=np.float32)
    for start in batches(range(0, len(texts), BATCH)):
        rows = order[start : start + BATCH]
        tokens = engine.tokenize([texts[i] for i in rows], truncate=True)
        out[rows] = l2_normalize(engine.forward(tokens.ids))
    return out
