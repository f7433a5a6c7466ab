"""The bundled model's int8 variant (the CPU default) against its fp32 graph
on texts that neither its calibration nor its validation saw: MovieLens
titles and free-text tags, batched as the server batches them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from halflife.embedding.engine import EmbeddingEngine
from halflife.embedding.pooling import l2_normalize

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
TEXTS_PER_KIND = 300


def movielens_texts() -> list[str]:
    if not (MOVIELENS / "movies.csv").is_file():
        pytest.skip(f"the MovieLens development dataset is not at {MOVIELENS}")
    with open(MOVIELENS / "movies.csv", newline="", encoding="utf-8") as handle:
        titles = [f"{row['title']} {row['genres'].replace('|', ' ')}" for row in csv.DictReader(handle)]
    with open(MOVIELENS / "tags.csv", newline="", encoding="utf-8") as handle:
        tags = sorted({row["tag"] for row in csv.DictReader(handle)})
    return titles[:TEXTS_PER_KIND] + tags[:TEXTS_PER_KIND]


def embed(engine: EmbeddingEngine, texts: list[str], batch: int = 32) -> np.ndarray:
    """Like the dynamic batcher: inputs sorted by length, padded batches."""
    ids = engine.tokenize(texts, truncate=True).ids
    order = np.argsort([len(row) for row in ids], kind="stable")
    out = np.empty((len(texts), engine.dimension), dtype=np.float32)
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        out[rows] = engine.forward([ids[i] for i in rows])
    return l2_normalize(out)


def test_int8_stays_close_to_fp32_on_unseen_texts(model_dir):
    texts = movielens_texts()
    int8 = EmbeddingEngine.load(model_dir, variant="int8", provider="cpu")
    fp32 = EmbeddingEngine.load(model_dir, variant="fp32-o2", provider="cpu")
    cosine = np.einsum("nd,nd->n", embed(int8, texts), embed(fp32, texts))
    # The export's bar for making int8 the default, held on 600 other texts.
    assert cosine.min() >= 0.99, [texts[i] for i in np.argsort(cosine)[:5]]
    assert cosine.mean() >= 0.997
