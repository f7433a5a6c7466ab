import math

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
    assert np.allclose(c.user_weighted([0, 3], [1.0, 2.0], np.sqrt), (DENSE[0] + 2 * DENSE[3]) * np.sqrt(np.diag(DENSE)))


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


@pytest.mark.parametrize("kind", ["count", "jaccard", "cosine", "lift"])
def test_an_item_that_co_occurs_with_nothing_scores_exactly_zero(kind):
    """Three users consumed item 0 alone: its own term must leave no rounding
    behind (with it subtracted afterwards, affinity 0.9 left ~1e-16, which the
    blend's division by the maximum made a full-weight signal)."""
    c = Cooccurrence(3)
    c.add([0, 1, 2, 3, 3], [0, 0, 0, 1, 2])
    for affinity in (0.9, 0.1, 1 / 3, 7.3):
        scores = cooccurrence_scores(c, [0], [affinity], kind)
        assert scores.tolist() == [0.0, 0.0, 0.0]
    # a query item another query item shares a user with keeps that share
    assert cooccurrence_scores(c, [1, 2], [0.9, 0.3], "count").tolist() == pytest.approx([0.0, 0.3, 0.9])


def test_run_sums_equal_a_bincount_whatever_the_order():
    """Runs of one group (a query item's pairs), the same group in several
    runs, singletons, and no groups at all."""
    from halflife.core.cooccurrence import _run_sums

    rng = np.random.default_rng(3)
    for groups in (np.repeat([0, 4, 2, 4, 0], [5, 1, 3, 2, 1]), rng.integers(0, 7, 50), np.arange(6)[::-1],
                   np.empty(0, dtype=np.int64)):
        values = rng.random(groups.size)
        assert np.allclose(_run_sums(groups, values, 8), np.bincount(groups, weights=values, minlength=8))
        assert _run_sums(groups, values, 8).shape == (8,)


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


def _assert_matches_dense(c: Cooccurrence, first: dict, rng, n_users: int, t: float = np.inf) -> None:
    """Every read of c (as of t) equals the dense incidence of the pairs in
    `first` ((user, item) -> earliest time) that had happened by t."""
    live = {p: s for p, s in first.items() if s <= t}
    x = np.zeros((n_users, c.n_items))
    for u, i in live:
        x[u, i] = 1.0
    dense = x.T @ x
    view = c.as_of(t)
    assert len(view) == len(live)
    assert np.array_equal(view.item_counts(), np.diag(dense))
    query = rng.choice(c.n_items, min(6, c.n_items), replace=False)
    weights = rng.random(query.size)
    assert np.array_equal(view.rows(query), dense[query])
    assert np.allclose(view.user_weighted(query, weights), weights @ dense[query])
    assert np.allclose(view.user_weighted(query, weights, np.sqrt), weights @ dense[query] * np.sqrt(np.diag(dense)))
    off_diagonal = dense.copy()
    np.fill_diagonal(off_diagonal, 0.0)
    assert np.allclose(view.user_weighted(query, weights, np.sqrt, diagonal=False),
                       weights @ off_diagonal[query] * np.sqrt(np.diag(dense)))
    d = np.diag(dense)
    union = d[:, None] + d[None, :] - dense
    jaccard = np.divide(dense, union, out=np.zeros_like(dense), where=union > 0)
    np.fill_diagonal(jaccard, 0.0)  # the diagonal is left out
    assert np.allclose(cooccurrence_scores(view, query, weights, "jaccard"), weights @ jaccard[query])


def _random_steps(c: Cooccurrence, rng, steps: int, n_users: int = 40, n_items: int = 30, after_each=None):
    """Random batches (repeats, late events, new items) and now and then a
    user's or two items' removal, each followed by a check against the dense
    reference; `after_each(step)` runs between a step's write and its check."""
    first: dict[tuple[int, int], float] = {}
    for step in range(steps):
        if step % 15 == 14:
            user = int(rng.integers(0, n_users))
            assert c.remove_user(user) == sum(1 for u, _ in first if u == user)
            first = {p: s for p, s in first.items() if p[0] != user}
            doomed = rng.choice(c.n_items, 2, replace=False)
            assert c.remove_items(doomed) == sum(1 for _, i in first if i in doomed)
            first = {p: s for p, s in first.items() if p[1] not in doomed}
        else:
            n = int(rng.integers(1, 25))
            users = rng.integers(0, n_users, n)
            items = rng.integers(-1, min(n_items, 5 + step), n)  # -1: skipped; the item space grows
            times = rng.uniform(0, 100, n)
            expected_new = len({(u, i) for u, i in zip(users, items) if i >= 0} - first.keys())
            assert c.add(users, items, times) == expected_new
            for u, i, t in zip(users, items, times):
                if i >= 0:
                    first[(u, i)] = min(first.get((u, i), np.inf), t)
        if after_each is not None:
            after_each(step)
        _assert_matches_dense(c, first, rng, n_users)
        _assert_matches_dense(c, first, rng, n_users, t=50.0)


@pytest.mark.parametrize("dense_share", [0.0, math.inf], ids=["over every pair", "over the co-users' pairs"])
@pytest.mark.parametrize("merge_every", [1, 7, 10**9])
def test_matches_a_dense_reference_through_merges_late_events_and_removals(monkeypatch, merge_every, dense_share):
    """Waiting pairs merged into the sorted arrays after every batch, now and
    then, or never: every read equals the dense incidence built by hand
    (jaccard scores taken two query items at a time), user_weighted's two
    ways included."""
    from halflife.core import cooccurrence

    monkeypatch.setattr(cooccurrence, "_MIN_MERGE", merge_every)
    monkeypatch.setattr(cooccurrence, "_JACCARD_CHUNK", 2)
    monkeypatch.setattr(cooccurrence, "_DENSE_SHARE", dense_share)
    _random_steps(Cooccurrence(5), np.random.default_rng(merge_every), 60)


def test_background_merges_keep_what_changed_while_they_were_built(monkeypatch):
    """A merge begun before a step and built and ended after it (new pairs,
    late events for indexed and for taken pairs, removals, inline merges
    meanwhile) leaves every read equal to the dense reference."""
    from halflife.core import cooccurrence

    monkeypatch.setattr(cooccurrence, "_MIN_MERGE", 3)
    c = Cooccurrence(5)
    pending = []
    outcomes = []

    def end_then_begin(step):  # built at once, ended only after the next step's writes
        for merge in pending:
            outcomes.append(c.end_merge(merge))
        pending.clear()
        if (merge := c.begin_merge()) is not None:
            merge.build()
            pending.append(merge)

    _random_steps(c, np.random.default_rng(11), 90, after_each=end_then_begin)
    assert True in outcomes and False in outcomes  # taken in, and dropped after a removal or an inline merge


def test_a_view_reads_as_the_index_did_when_taken_whatever_it_took_since(monkeypatch):
    """The engine scores a view without its lock while the index takes
    writes (new pairs, late times, merges, removals) under it."""
    from halflife.core import cooccurrence

    monkeypatch.setattr(cooccurrence, "_MIN_MERGE", 3)
    c = Cooccurrence(5)
    taken = []

    def reads(index, n: int) -> list[np.ndarray]:
        query = np.arange(n)
        return [index.rows(query), index.item_counts()[:n].copy(), len(index),
                cooccurrence_scores(index, query, np.ones(n), "jaccard"),
                cooccurrence_scores(index, query, np.ones(n), "cosine")]

    def take(step: int) -> None:
        taken.append((c.view(), c.n_items, reads(c, c.n_items)))

    _random_steps(c, np.random.default_rng(5), 60, after_each=take)
    for view, n, then in taken:
        for got, expected in zip(reads(view, n), then):
            np.testing.assert_array_equal(got, expected)


def test_pairs_until_is_a_copy_that_builds_the_past():
    c = index()
    c.add([3, 0], [3, 2], [5.0, 6.0])
    users, items, times = c.pairs_until(5.0)
    assert sorted(zip(users.tolist(), items.tolist())) == sorted([*zip(*PAIRS), (3, 3)])
    want = c.as_of(5.0).rows([0, 1, 2, 3])
    c.add([4], [0], [1.0])  # the copy does not change with the index
    assert users.size == 8
    past = Cooccurrence.from_pairs(4, users, items, times)
    assert np.array_equal(past.rows([0, 1, 2, 3]), want)
    assert past.newest == 5.0 and len(past) == 8


@pytest.mark.parametrize("waiting", [False, True])
def test_renumbered_equals_the_index_built_anew_from_the_renumbered_pairs(monkeypatch, waiting):
    """A compacted catalogue renumbers items in their order; renumbering keeps
    both key orders, so no sort: the same index as from_pairs, whose two
    sorts took 1.1 s at 5M pairs. With pairs still waiting and a merge in
    flight (its pairs stay waiting until it ends) too."""
    from halflife.core import cooccurrence

    monkeypatch.setattr(cooccurrence, "_MIN_MERGE", 1 << 30 if waiting else 1)
    rng = np.random.default_rng(7)
    n_items, n = 60, 900
    index = Cooccurrence(n_items)
    for part in np.array_split(np.arange(n), 9):
        index.add(rng.integers(0, 40, part.size), rng.integers(0, n_items, part.size), rng.uniform(0, 100, part.size))
    if waiting:
        index._begin().build()  # in flight: begun and built, not ended
        assert len(index._waiting) > 100 and index.merging
    new_item = np.full(n_items, -1)
    kept = np.flatnonzero(rng.random(n_items) < 0.7)
    new_item[kept] = np.arange(kept.size)
    got = index.renumbered(new_item, kept.size)
    users, items, times = index.pairs_until(np.inf)
    want = Cooccurrence.from_pairs(kept.size, users, new_item[items], times)
    assert sorted(zip(*(c.tolist() for c in got.pairs_until(np.inf)))) == \
        sorted(zip(*(c.tolist() for c in want.pairs_until(np.inf))))
    np.testing.assert_array_equal(got.item_counts(), want.item_counts())
    assert got.newest == want.newest and got.n_items == want.n_items == kept.size
    affinity = rng.random(5)
    picked = rng.choice(kept.size, 5, replace=False)
    for kind in ("count", "jaccard", "cosine", "lift"):
        np.testing.assert_allclose(cooccurrence_scores(got, picked, affinity, kind),
                                   cooccurrence_scores(want, picked, affinity, kind), rtol=1e-12)
    if not waiting:
        for name in ("_keys", "_times", "_item_keys", "_user_ptr", "_item_ptr"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    known_user, known_item = (int(c[0]) for c in want.pairs_until(np.inf)[:2])
    assert got.add([1000, known_user], [0, known_item], [1.0, 1.0]) == 1  # one pair new, one known
    assert len(got) == len(want) + 1


def test_sample_level_is_the_largest_common_cut_within_the_budget():
    """Water-filling: short runs whole, long ones cut to one level L, the
    largest whose total stays within the budget (at least 1 each)."""
    from halflife.core.cooccurrence import _level

    rng = np.random.default_rng(5)
    for _ in range(300):
        lengths = rng.integers(0, 50, int(rng.integers(1, 12)))
        budget = int(rng.integers(0, 400))
        level = _level(lengths, budget)
        if lengths.sum() <= budget:
            assert level is None
            continue
        assert level >= 1
        if level > 1 or np.minimum(lengths, 1).sum() <= budget:
            assert np.minimum(lengths, level).sum() <= budget
        assert np.minimum(lengths, level + 1).sum() > budget
    assert _level(np.array([1, 5]), 6) is None  # all fit exactly: no cut


def test_a_merge_begins_only_when_enough_pairs_wait_and_none_is_in_flight():
    c = Cooccurrence(4)
    c.add([0, 0, 1], [0, 1, 2])
    assert c.begin_merge() is None  # a few wait: reads scan them
    users = np.arange(300)
    c.add(users, users % 4)
    merge = c.begin_merge()
    assert merge is not None and c.begin_merge() is None  # one at a time
    merge.build()
    assert c.end_merge(merge) and len(c) == 302 and not c.merging  # user 0 held item 0 already
    assert not c.end_merge(merge)  # no longer the one in flight
    np.testing.assert_array_equal(c.item_counts(), [75, 76, 76, 75])


def test_a_look_before_every_pair_holds_none_and_sparse_user_rows_score_as_dense_ones():
    c = index()
    c.add([0], [3], [50.0])
    assert len(c.as_of(-1.0)) == 0 and c.as_of(-1.0).n_items == 4
    # The same pairs with users numbered far apart (past 64 rows a co-user): the same scores.
    far = Cooccurrence(4)
    far.add(np.array(PAIRS[0]) * 10_000, PAIRS[1])
    for kind in ("count", "jaccard", "cosine", "lift"):
        np.testing.assert_allclose(cooccurrence_scores(far, [0, 3], [1.0, 2.0], kind),
                                   cooccurrence_scores(index(), [0, 3], [1.0, 2.0], kind), rtol=1e-12)


def test_an_index_built_from_pairs_holds_every_item_they_name():
    c = Cooccurrence.from_pairs(2, [0, 1, 1], [0, 5, 1], [0.0, 1.0, 2.0])
    assert c.n_items == 6 and c.item_counts().tolist() == [1, 1, 0, 0, 0, 1]
    assert c.rows([5])[0].tolist() == [0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("kind", ["count", "jaccard", "cosine", "lift"])
def test_an_index_without_pairs_scores_nothing(kind):
    empty = Cooccurrence(5)
    assert cooccurrence_scores(empty, [1, 2], [1.0, 1.0], kind).tolist() == [0.0] * 5
    which, js, counts = empty.pair_counts([1, 2])
    assert which.size == js.size == counts.size == 0


def _sampled_reference(pairs, n_users: int, n_items: int, query, level: int):
    """The dense estimate of C[query, :] from each query item's `level` newest
    (highest) users, scaled by its users per user read, at most either
    item's users: (h, N), and every item's users: (N,)."""
    x = np.zeros((n_users, n_items))
    x[pairs[0], pairs[1]] = 1.0
    d = x.sum(axis=0)
    rows = []
    for i in query:
        read = np.flatnonzero(x[:, i])[-level:]
        rows.append(np.minimum(d[i] / max(read.size, 1) * x[read].sum(axis=0), np.minimum(d[i], d)))
    return np.array(rows), d


@pytest.mark.parametrize("waiting", [False, True], ids=["merged", "some pairs waiting"])
def test_a_co_user_budget_reads_each_query_items_newest_users_scaled_up(waiting):
    """With max_co_users below the query items' users, every score is the
    estimate from the newest users of each item (indexed or still waiting
    to be merged alike), and without it or with room for all the exact one,
    bit for bit."""
    rng = np.random.default_rng(9)
    n_users, n_items = 60, 25
    users, items = rng.integers(0, n_users, 700), rng.integers(0, n_items, 700)
    c = Cooccurrence.from_pairs(n_items, users, items, np.zeros(users.size))
    indexed_users = c.item_counts().copy()
    if waiting:  # new users and old ones' new pairs
        late_users, late_items = rng.integers(n_users - 10, n_users + 5, 40), rng.integers(0, n_items, 40)
        assert c.add(late_users, late_items) and len(c._keys) == len(c) - len(c._waiting)
        users, items = np.concatenate([users, late_users]), np.concatenate([items, late_items])
    view = c.view()
    query = rng.choice(n_items, 6, replace=False)
    a = rng.random(query.size)
    budget = int(indexed_users[query].sum()) // 3
    level = view.sample_level(query, budget)
    assert level is not None and np.minimum(indexed_users[query], level).sum() <= budget
    estimate, d = _sampled_reference((users, items), n_users + 5, n_items, query, level)
    which, js, counts = view.pair_counts(query, level)
    got = np.zeros_like(estimate)
    got[which, js] = counts
    assert np.allclose(got, estimate)
    off = estimate.copy()
    off[np.arange(query.size), query] = 0.0  # the diagonal is left out
    others = np.setdiff1d(np.arange(n_items), query)  # a consumed query item is filtered from answers anyway
    col = 1.0 / np.sqrt(np.maximum(d, 1.0))
    cosine = cooccurrence_scores(view, query, a, "cosine", budget)
    assert np.allclose(cosine[others], ((a * col[query]) @ off * col)[others])
    union = d[query][:, None] + d[None, :] - off
    assert np.allclose(cooccurrence_scores(view, query, a, "jaccard", budget),
                       a @ np.divide(off, union, out=np.zeros_like(off), where=off > 0))
    for s in ("cosine", "jaccard"):
        exact = cooccurrence_scores(view, query, a, s)
        assert np.array_equal(cooccurrence_scores(view, query, a, s, len(c)), exact)
        assert not np.allclose(cooccurrence_scores(view, query, a, s, budget), exact)


def test_an_estimated_count_never_exceeds_either_items_users():
    """Item 0's newest user is item 1's only one: read alone, scaled by item
    0's 4 users, C[0, 1] would be 4, more than item 1 has (jaccard's union
    then 0 or below)."""
    c = Cooccurrence.from_pairs(2, [0, 1, 2, 3, 3], [0, 0, 0, 0, 1], np.zeros(5))
    which, js, counts = c.pair_counts([0], level=1)
    assert dict(zip(js.tolist(), counts.tolist())) == {0: 4.0, 1: 1.0}
    assert cooccurrence_scores(c, [0], [1.0], "jaccard", max_co_users=1)[1] == pytest.approx(1 / 4)


def test_a_sampled_estimate_stays_within_what_counts_allow_and_counts_for_the_users_own_items():
    """Item 0's 10 newest users (90-99) all took items 1 and 2: scaled by item
    0's 100 users per user read, C[0, 2] read 100, where item 2 has 10 users
    (a cosine above 1); and item 1, a query item too, got only what its own
    sample (users 190-199) gave: 0, not item 0's 100."""
    users = list(range(100)) + list(range(200)) + list(range(90, 100))
    items = [0] * 100 + [1] * 200 + [2] * 10
    c = Cooccurrence.from_pairs(3, users, items, np.zeros(len(users)))
    got = cooccurrence_scores(c, [0, 1], [1.0, 0.0], "count", max_co_users=20)
    assert c.sample_level([0, 1], 20) == 10
    assert got.tolist() == pytest.approx([0.0, 100.0, 10.0])  # here the exact counts, C[0, 1] and C[0, 2]
    cosine = cooccurrence_scores(c, [0], [1.0], "cosine", max_co_users=5)
    assert cosine[2] == pytest.approx(10 / np.sqrt(100 * 10))  # sim(0, 2) = C / sqrt(d0 d2): 3.16 scaled up


def test_a_sample_is_the_same_before_and_after_its_pairs_merge(monkeypatch):
    """An old user's new pair waits to be merged: read whole and scaled up
    there, it counted until the merge and not after (workers merge at their
    own times, so they answered alike requests differently)."""
    from halflife.core import cooccurrence

    monkeypatch.setattr(cooccurrence, "_MIN_MERGE", 10**9)  # merged only when told
    rng = np.random.default_rng(3)
    c = Cooccurrence.from_pairs(8, rng.integers(0, 50, 300), rng.integers(0, 8, 300), np.zeros(300))
    c.add([1, 2, 49], [0, 3, 5])  # old users' new pairs, and the newest user's
    query, a = np.array([0, 3, 5]), np.array([1.0, 0.5, 0.25])
    before = {s: cooccurrence_scores(c.view(), query, a, s, max_co_users=12) for s in ("cosine", "jaccard")}
    assert c._waiting
    c._merge()
    assert not c._waiting
    for s, scores in before.items():
        assert np.allclose(cooccurrence_scores(c.view(), query, a, s, max_co_users=12), scores), s


def test_a_sampled_user_weighted_sum_without_a_column_weighs_each_item_1():
    """user_weighted's column None is a factor of 1, sampled (`level`) as exact."""
    rng = np.random.default_rng(3)
    users, items = rng.integers(0, 40, 300), rng.integers(0, 12, 300)
    c = Cooccurrence.from_pairs(12, users, items, np.zeros(users.size))
    query, w = np.array([0, 3, 5]), np.array([1.0, 0.5, 2.0])
    level = c.sample_level(query, 10)
    assert level is not None
    for diagonal in (True, False):
        assert np.array_equal(c.user_weighted(query, w, diagonal=diagonal, level=level),
                              c.user_weighted(query, w, np.ones_like, diagonal=diagonal, level=level))
    assert np.array_equal(c.user_weighted(query, w, diagonal=False), c.user_weighted(query, w, np.ones_like, diagonal=False))


def test_edges_of_an_index_of_one_pair_or_none_and_removals_of_nothing():
    c = Cooccurrence.from_pairs(2, [0], [0], [0.0])
    assert c.add([1], [1]) == 1 and len(c) == 2  # looked up among the one indexed pair
    assert c.remove_items([]) == 0 and c.remove_items([-1]) == 0 and len(c) == 2
    assert Cooccurrence.from_pairs(0, [], [], []).n_items == 0


def test_a_sample_of_query_items_with_fewer_users_than_the_level_reads_them_all():
    """Item 0 has 4 users, item 1 has 60: at a level of 10 item 0's sample is
    its 4 users exactly (scale 1), item 1's its 10 newest (scale 6). Every
    estimate as the dense reference; the scores, the query items' own
    included, its sums kept within Σ_i w_i · min(d_i, d_j) per item j (see
    `user_weighted`)."""
    users = [0, 1, 2, 158] + list(range(100, 160)) + [0, 1, 150, 155, 159]  # 158 took both query items
    items = [0] * 4 + [1] * 60 + [2, 3, 2, 3, 3]
    c = Cooccurrence.from_pairs(4, users, items, np.zeros(len(users)))
    query, a = np.array([0, 1]), np.array([1.0, 0.5])
    level = c.sample_level(query, 14)
    assert level == 10
    estimate, d = _sampled_reference((np.array(users), np.array(items)), 160, 4, query, level)
    which, js, counts = c.pair_counts(query, level)
    got = np.zeros_like(estimate)
    got[which, js] = counts
    assert np.allclose(got, estimate)
    off = estimate.copy()
    off[np.arange(query.size), query] = 0.0
    col = 1.0 / np.sqrt(np.maximum(d, 1.0))
    x = np.zeros((160, 4))
    x[users, items] = 1.0
    scaled = np.array([d[i] / min(d[i], level) * x[np.flatnonzero(x[:, i])[-level:]].sum(axis=0) for i in query])
    scaled[np.arange(query.size), query] = 0.0
    w = a * col[query]
    bound = w @ np.minimum(d[query][:, None], d[None, :])
    want = np.minimum(w @ scaled, bound) * col
    assert np.allclose(cooccurrence_scores(c, query, a, "cosine", 14), want) and want[0] > 0 and want[1] > 0
