"""Interests in words: nearest labels and items per cluster."""

from __future__ import annotations

import numpy as np
import pytest

from halflife.core.describe import describe_clusters
from halflife.core.ranking import RowBlocks, normalize


@pytest.mark.parametrize("scan", [None, RowBlocks(3, min_rows=100)])  # one product, or row blocks on threads
def test_describe_clusters_matches_brute_force(scan):
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(4, 24))
    labels = normalize(rng.normal(size=(200, 24)))
    items = normalize(rng.normal(size=(1000, 24)))
    seen = rng.random(1000) < 0.2
    d = describe_clusters(centroids, labels, items, n_labels=5, n_items=7, item_allowed=~seen, scan=scan)
    assert d.label_indices.shape == (4, 5) and d.item_indices.shape == (4, 7)
    c = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    for k in range(4):
        ls = labels.astype(np.float64) @ c[k]
        np.testing.assert_array_equal(d.label_indices[k], np.argsort(-ls)[:5])
        np.testing.assert_allclose(d.label_scores[k], ls[d.label_indices[k]], atol=1e-5)
        its = np.where(seen, -np.inf, items.astype(np.float64) @ c[k])
        np.testing.assert_array_equal(d.item_indices[k], np.argsort(-its)[:7])
        assert not seen[d.item_indices[k]].any()


def test_describe_topic_clusters_finds_their_labels():
    rng = np.random.default_rng(1)
    labels = normalize(rng.normal(size=(10, 32)))
    centroids = labels[[7, 2]] + 0.05 * rng.normal(size=(2, 32))
    items = normalize(np.concatenate([labels[[2]] + 0.1 * rng.normal(size=(5, 32)), rng.normal(size=(50, 32))]))
    d = describe_clusters(centroids, labels, items, n_labels=1, n_items=5)
    assert d.label_indices[:, 0].tolist() == [7, 2]
    assert sorted(d.item_indices[1].tolist()) == [0, 1, 2, 3, 4]
    empty = describe_clusters(np.zeros((0, 32)), labels, items)
    assert empty.label_indices.shape == (0, 5)
    scored = []
    labels_only = describe_clusters(centroids, labels, items, n_labels=1, n_items=0,
                                    scan=lambda score, rows: scored.append(rows) or score(rows))
    assert labels_only.label_indices[:, 0].tolist() == [7, 2]
    assert labels_only.item_indices.shape == (2, 0) and labels_only.item_scores.shape == (2, 0)
    assert scored == []  # no item is scored when none is asked for


def test_no_items_asked_gives_empty_item_columns_and_one_gives_the_nearest():
    rng = np.random.default_rng(1)
    centroids = rng.normal(size=(3, 8))
    labels, items = normalize(rng.normal(size=(10, 8))), normalize(rng.normal(size=(50, 8)))
    d = describe_clusters(centroids, labels, items, n_labels=2, n_items=0)
    assert d.label_indices.shape == (3, 2)
    assert d.item_indices.shape == (3, 0) and d.item_scores.shape == (3, 0)
    assert d.item_indices.dtype == np.int64
    one = describe_clusters(centroids, labels, items, n_labels=2, n_items=1)
    assert one.item_indices[:, 0].tolist() == np.argmax(normalize(centroids) @ items.T, axis=1).tolist()
