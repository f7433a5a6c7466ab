"""The bundled model's int8 variant (the CPU default) against its fp32 graph
on texts that neither its calibration nor its validation saw: MovieLens
titles and free-text tags, in length-sorted batches as the server makes them."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from halflife.embedding.engine import EmbeddingEngine
from halflife.embedding.offline import embed_sorted
from tests.fakes import MOVIELENS, MOVIELENS_MISSING

TEXTS_PER_KIND = 300


def movielens_texts() -> list[str]:
    if not (MOVIELENS / "movies.csv").is_file():
        pytest.skip(MOVIELENS_MISSING)
    with open(MOVIELENS / "movies.csv", newline="", encoding="utf-8") as handle:
        titles = [f"{row['title']} {row['genres'].replace('|', ' ')}" for row in csv.DictReader(handle)]
    with open(MOVIELENS / "tags.csv", newline="", encoding="utf-8") as handle:
        tags = sorted({row["tag"] for row in csv.DictReader(handle)})
    return titles[:TEXTS_PER_KIND] + tags[:TEXTS_PER_KIND]


def test_int8_stays_close_to_fp32_on_unseen_texts(model_dir):
    texts = movielens_texts()
    int8 = EmbeddingEngine.load(model_dir, variant="int8", provider="cpu")
    fp32 = EmbeddingEngine.load(model_dir, variant="fp32-o2", provider="cpu")
    cosine = np.einsum("nd,nd->n", embed_sorted(int8, texts), embed_sorted(fp32, texts))
    # The export's bar for making int8 the default, held on 600 other texts.
    assert cosine.min() >= 0.99, [texts[i] for i in np.argsort(cosine)[:5]]
    assert cosine.mean() >= 0.997
