import numpy as np
import pytest

from halflife.core.cooccurrence import Cooccurrence, cooccurrence_scores

# users: 0 -> {0, 1}, 1 -> {0, 1, 2}, 2 -> {2, 3}
PAIRS = ([0, 0, 1, 1, 1, 2, 2], [0, 1, 0, 1, 2, 2, 3])
DENSE = np.array([[2, 2, 1, 0], [2, 2, 1, 0], [1, 1, 2, 1], [0, 0, 1, 1]], dtype=float)


def index():
    c = Cooccurrence(4)
    assert c.add(*PAIRS) == 7
    assert c.add([0], [0]) == 0  # a pair counts once
    return c


def test_rows_and_counts_match_dense():
    c = index()
    assert np.array_equal(c.item_counts(), np.diag(DENSE))
    assert np.array_equal(c.rows([2, 0]), DENSE[[2, 0]])
    assert np.allclose(c.user_weighted([0, 3], [1.0, 2.0]), DENSE[0] + 2 * DENSE[3])


@pytest.mark.parametrize("kind", ["count", "jaccard", "cosine", "lift"])
def test_scores_match_hand_formula(kind):
    c = index()
    items, a = np.array([0, 2]), np.array([1.0, 0.5])
    d = np.diag(DENSE)
    sim = {
        "count": DENSE,
        "jaccard": DENSE / (d[:, None] + d[None, :] - DENSE),
        "cosine": DENSE / np.sqrt(d[:, None] * d[None, :]),
        "lift": DENSE / (d[:, None] * d[None, :]),
    }[kind].copy()
    sim[[0, 2], [0, 2]] = 0.0  # the diagonal is left out
    assert np.allclose(cooccurrence_scores(c, items, a, kind), a @ sim[items])


def test_growth_and_user_removal():
    c = index()
    c.add([3], [5])  # grows the item space
    assert c.n_items == 6 and c.rows([5])[0, 5] == 1
    assert c.remove_user(1) == 3
    assert np.array_equal(c.rows([0])[0, :4], [1, 1, 0, 0])
    assert c.item_counts()[2] == 1
    assert c.remove_items([0]) == 1 and c.item_counts()[0] == 0
    assert np.array_equal(c.rows([1])[0, :4], [0, 1, 0, 0])


def test_empty_and_unknown_similarity():
    assert np.array_equal(cooccurrence_scores(Cooccurrence(3), [], [], "cosine"), np.zeros(3))
    with pytest.raises(ValueError):
        cooccurrence_scores(index(), [0], [1.0], "euclid")


def test_as_of_keeps_only_pairs_that_had_happened():
    c = Cooccurrence(3)
    c.add([0, 0, 1, 1], [0, 1, 0, 1], [1.0, 2.0, 3.0, 9.0])
    assert c.as_of(100.0) is c
    past = c.as_of(5.0)
    assert np.array_equal(past.rows([0])[0], [2, 1, 0])  # user 1 had not consumed item 1 by t = 5
    c.add([1], [1], [4.0])  # a late event moves the pair earlier
    assert np.array_equal(c.as_of(5.0).rows([0])[0], [2, 2, 0])
