"""Ranking primitives: cosine, masked top-k, freshness, MMR, blending, popularity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from halflife.core import ranking
from halflife.core.ranking import (
    DecayedCounts,
    batch_search,
    batch_top_k,
    clip_cosines,
    cosine_scores,
    decayed_sum,
    log2_freshness,
    mmr,
    normalize,
    top_k,
)

HOUR = 3600.0
DAY = 24 * HOUR
T0 = 1.7e9


def test_normalize_survives_tiny_vectors():
    v = np.array([[3e-200, 4e-200], [0.0, 0.0]])
    np.testing.assert_allclose(normalize(v), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    assert normalize(np.array([2.0, 0.0])).dtype == np.float32


def test_cosine_scores_single_and_batch():
    rng = np.random.default_rng(0)
    items = normalize(rng.normal(size=(100, 16)))
    q = rng.normal(size=(3, 16)) * 7.0
    want = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ items.T.astype(np.float64)
    got = cosine_scores(q, items)
    assert got.shape == (3, 100) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(cosine_scores(q[1], items), want[1], atol=1e-5)
    np.testing.assert_array_equal(cosine_scores(np.zeros(16), items), np.zeros(100, np.float32))


@pytest.mark.parametrize("k", [1, 10, 99, 100, 500])
def test_top_k_matches_full_argsort(k):
    rng = np.random.default_rng(k)
    s = rng.normal(size=100).astype(np.float32)
    idx, sc = top_k(s, k)
    want = np.argsort(-s)[:k]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(sc, s[want])


def test_top_k_respects_mask_and_returns_fewer():
    rng = np.random.default_rng(1)
    s = rng.normal(size=1000)
    allowed = rng.random(1000) < 0.3
    idx, sc = top_k(s, 50, allowed)
    eligible = np.flatnonzero(allowed)
    np.testing.assert_array_equal(idx, eligible[np.argsort(-s[eligible])][:50])
    assert allowed[idx].all()
    # Only 4 allowed: 4 come back, even though masked items score higher.
    allowed = np.zeros(1000, bool)
    allowed[[3, 500, 7, 999]] = True
    s[~allowed] += 100.0
    idx, sc = top_k(s, 10, allowed)
    assert sorted(idx) == [3, 7, 500, 999] and np.all(np.diff(sc) <= 0)
    assert top_k(s, 10, np.zeros(1000, bool))[0].size == 0
    assert top_k(s, 0)[0].size == 0


def test_top_k_never_returns_minus_inf_or_nan():
    s = np.array([0.5, -np.inf, np.nan, 0.1, -np.inf])
    idx, sc = top_k(s, 5)
    np.testing.assert_array_equal(idx, [0, 3])


@pytest.mark.parametrize("mask_kind", ["none", "shared", "per_row"])
def test_batch_top_k_equals_per_row(mask_kind):
    rng = np.random.default_rng(2)
    b, n, k = 7, 300, 20
    s = rng.normal(size=(b, n)).astype(np.float32)
    allowed = {"none": None, "shared": rng.random(n) < 0.5, "per_row": rng.random((b, n)) < 0.5}[mask_kind]
    if mask_kind == "per_row":
        allowed[3] = False
        allowed[3, :5] = True  # a row with fewer than k eligible items
    idx, sc = batch_top_k(s, k, allowed)
    assert idx.shape == (b, k)
    for row in range(b):
        row_mask = None if allowed is None else np.broadcast_to(allowed, s.shape)[row]
        want_idx, want_sc = top_k(s[row], k, row_mask)
        m = want_idx.size
        np.testing.assert_array_equal(idx[row, :m], want_idx)
        np.testing.assert_array_equal(sc[row, :m], want_sc)
        assert np.all(idx[row, m:] == -1) and np.all(sc[row, m:] == -np.inf)
    if mask_kind == "per_row":
        assert (idx[3] >= 0).sum() == 5


def test_log2_freshness():
    h = 10 * DAY
    created = np.array([T0, T0 - h, T0 - 3 * h, np.nan, T0 + DAY, T0 - 2000 * h])
    np.testing.assert_allclose(log2_freshness(created, T0, h), [0.0, -1.0, -3.0, 0.0, 0.0, -2000.0], rtol=1e-12)


def test_mmr_with_lambda_one_is_relevance_order():
    rng = np.random.default_rng(3)
    s = rng.normal(size=500)
    items = normalize(rng.normal(size=(500, 16)))
    cand, rel = top_k(s, 40)
    picks = mmr(rel, items[cand], 20, lam=1.0)
    np.testing.assert_array_equal(cand[picks], cand[:20])


def test_mmr_of_no_picks_is_empty_as_top_k():
    """A negative k was a ValueError (negative dimensions) where top_k picks nothing."""
    assert mmr(np.array([1.0, 2.0]), np.eye(2), -1).tolist() == mmr(np.array([1.0, 2.0]), np.eye(2), 0).tolist() == []


def test_mmr_diversifies_near_duplicates():
    rng = np.random.default_rng(4)
    a, b = normalize(rng.normal(size=(2, 32)))
    vecs = normalize(np.stack([a, a + 0.01 * rng.normal(size=32), a + 0.01 * rng.normal(size=32), b]))
    rel = np.array([1.0, 0.99, 0.98, 0.7])
    assert mmr(rel, vecs, 2, lam=1.0).tolist() == [0, 1]
    assert mmr(rel, vecs, 2, lam=0.5).tolist() == [0, 3]
    assert sorted(mmr(rel, vecs, 10, lam=0.5).tolist()) == [0, 1, 2, 3]  # at most M picks


def test_mmr_step_matches_definition():
    rng = np.random.default_rng(5)
    vecs = normalize(rng.normal(size=(30, 8)))
    rel = rng.random(30)
    lam = 0.6
    picks = mmr(rel, vecs, 10, lam)
    chosen = [int(np.argmax(rel))]
    sim = vecs.astype(np.float64) @ vecs.T.astype(np.float64)
    while len(chosen) < 10:
        rest = [i for i in range(30) if i not in chosen]
        gains = [lam * rel[i] - (1 - lam) * max(sim[i, j] for j in chosen) for i in rest]
        chosen.append(rest[int(np.argmax(gains))])
    assert picks.tolist() == chosen


def test_decayed_counts_match_brute_force():
    rng = np.random.default_rng(7)
    n_items, n = 50, 5000
    half_life = 6 * HOUR
    times = T0 + rng.uniform(0, 120 * DAY, n)
    items = rng.integers(0, n_items, n)
    weights = rng.uniform(0.5, 2.0, n)
    counter = DecayedCounts.empty(n_items, half_life)
    # Mostly in order, some a week late.
    order = np.argsort(times + rng.exponential(HOUR, n) + (rng.random(n) < 0.05) * 7 * DAY)
    landmarks = []
    for chunk in np.array_split(order, 200):
        counter.add(items[chunk], times[chunk], weights[chunk])
        landmarks.append(counter.landmark)
    assert np.count_nonzero(np.diff(landmarks)) >= 5  # every ~18 days of event time
    t = times.max() + HOUR
    want = np.bincount(items, weights * np.exp2(-(t - times) / half_life), n_items)
    np.testing.assert_allclose(counter.read(t), want, rtol=1e-9)
    back = DecayedCounts.from_arrays(counter.to_arrays())
    np.testing.assert_array_equal(back.read(t), counter.read(t))
    counter.resize(60)
    assert counter.read(t).shape == (60,) and counter.read(t)[50:].sum() == 0
    assert DecayedCounts.empty(3, DAY).read(T0).tolist() == [0.0, 0.0, 0.0]
    ones = DecayedCounts.empty(3, DAY)  # weights default to 1
    ones.add([0, 2, 2], [T0, T0, T0 - DAY])
    np.testing.assert_allclose(ones.read(T0), [1.0, 0.0, 1.5], rtol=1e-12)


def test_clip_cosines():
    values = np.array([1.0000002, -1.0000002, 0.5], dtype=np.float32)
    clipped = clip_cosines(values)
    assert clipped.dtype == np.float32 and clipped.tolist() == [1.0, -1.0, 0.5] and values[0] > 1


def test_an_item_whose_every_event_was_taken_back_counts_exactly_zero():
    """0.1 + 0.2 - 0.1 - 0.2 leaves 2.8e-17 in float64: an item whose every
    event an erasure took back must read 0, lest a reader dividing by the
    maximum rank it first; a partly erased item keeps the rest."""
    counter = DecayedCounts.empty(3, DAY)
    counter.add([0, 0, 1, 1], [T0] * 4, [0.1, 0.2, 0.1, 0.2])
    for weight in (-0.1, -0.2):
        counter.add([0], [T0], [weight])
    counter.add([1], [T0], [-0.1])
    assert counter.read(T0)[0] == 0.0 and counter.read(T0)[1] == pytest.approx(0.2)
    assert counter.entries.tolist() == [0, 1, 0]
    back = DecayedCounts.from_arrays(counter.to_arrays())
    back.add([0], [T0], [0.3])
    assert back.read(T0)[0] == pytest.approx(0.3) and back.entries.tolist() == [1, 1, 0]
    rows, times, weights = [0, 0, 1, 1, 0, 0, 1], [T0] * 7, [0.1, 0.2, 0.1, 0.2, -0.1, -0.2, -0.1]
    sums = decayed_sum(rows, times, weights, T0, DAY, 3)
    assert sums[0] == 0.0 and sums[1] == pytest.approx(0.2) and sums[2] == 0.0
    none = decayed_sum([], [], [], T0, DAY, 3)  # as its docstring says, even with no entries
    assert none.dtype == np.float64 and none.tolist() == [0.0, 0.0, 0.0]


def test_decayed_sums_and_counts_halve_every_half_life():
    sums = decayed_sum([0, 1, 1], [T0 - DAY, T0, T0 - 2 * DAY], [1.0, 2.0, 1.0], T0, DAY, 3)
    np.testing.assert_allclose(sums, [0.5, 2.25, 0.0], rtol=1e-12)
    counter = DecayedCounts.empty(2, DAY)
    versions = [counter.version]
    counter.add([1], [T0])
    versions.append(counter.version)
    counter.resize(3)  # one more item
    versions.append(counter.version)
    np.testing.assert_allclose(counter.read(T0 + DAY), [0.0, 0.5, 0.0], rtol=1e-12)
    counter.take([1, 2])
    versions.append(counter.version)
    assert counter.read(T0).tolist() == [1.0, 0.0] and len(set(versions)) == 4  # every change moves the version


def test_top_k_and_batch_top_k_keep_float32_scores_float32_and_leave_nan_out_of_long_rows():
    rng = np.random.default_rng(14)
    scores = rng.normal(size=5000).astype(np.float32)
    scores[rng.choice(5000, 5, replace=False)] = np.nan
    for k in (1, 10, 50):
        idx, got = top_k(scores, k)
        assert got.dtype == np.float32 and idx.tolist() == _reference_top_k(scores, k, None)
    assert batch_top_k(scores[None, :], 10)[1].dtype == np.float32


def _reference_top_k(s, k, allowed, ties=False):
    """The definition: eligible items (allowed, above -inf, not NaN) by score,
    ties by row; with `ties`, then every later one tied with the k-th."""
    eligible = [i for i in range(s.size) if s[i] > -np.inf and (allowed is None or allowed[i])]
    ranked = sorted(eligible, key=lambda i: (-s[i], i))
    if ties and len(ranked) > k:
        return ranked[:k] + [i for i in ranked[k:] if s[i] == s[ranked[k - 1]]]
    return ranked[:k]


@pytest.mark.parametrize("chunk", [None, 2])
def test_top_k_and_batch_top_k_match_the_definition_with_ties_nan_inf_and_masks(chunk, monkeypatch):
    """Random rows with many ties, NaN and -inf, long tails at the floor,
    masks excluding few or most items, and k up to past the eligible count:
    the chunk path (chunks of 2 make it run on most of these short rows), the
    candidate path (one argpartition, no masked copy) and its fallback must
    return exactly the definition (batch rows: the same scores; the same
    rows where no score ties). top_k narrows to the few allowed, by a bound
    from chunk maxima, or to the scores above the floor."""
    if chunk:
        monkeypatch.setattr(ranking, "_chunk_size", lambda n: chunk)
    # batch_top_k's and top_k's narrowing: each must answer often enough here to be checked
    narrowed = {"_near_top": [], "_at_least_kth": [], "_few_allowed": [], "_above_floor": []}
    for name, found in narrowed.items():
        narrow = getattr(ranking, name)
        monkeypatch.setattr(ranking, name, lambda *a, narrow=narrow, found=found: found.append(narrow(*a)) or found[-1])
    rng = np.random.default_rng(11)
    for trial in range(400):
        long = trial % 4 == 0  # long rows, small k: where chunks narrow the search
        b, n = int(rng.integers(1, 5)), int(rng.integers(1, 400 if long else 60))
        s = rng.integers(-4, 5, size=(b, n)).astype(np.float32) if trial % 2 else rng.normal(size=(b, n)).astype(np.float32)
        floor = trial % 5 == 1
        if floor:  # a long tail at the floor, as popularity's zeros
            s[rng.random((b, n)) < 0.85] = -5
        else:
            s[rng.random((b, n)) < (0.1 if trial % 8 else 0.002)] = np.nan
            s[rng.random((b, n)) < 0.1] = -np.inf
        allowed = None if trial % 3 == 0 else rng.random(n) < rng.choice([0.3, 0.95, 0.99])
        k = int(rng.integers(1, 12 if long else n + 3))
        idx, sc = batch_top_k(s, k, allowed)
        for row in range(b):
            want = _reference_top_k(s[row], k, allowed)
            got_idx, got_sc = top_k(s[row], k, allowed)
            assert got_idx.tolist() == want
            np.testing.assert_array_equal(got_sc, s[row, want])
            with_ties = _reference_top_k(s[row], k, allowed, ties=True)
            assert top_k(s[row], k, allowed, ties=True)[0].tolist() == with_ties
            m = len(want)
            np.testing.assert_array_equal(sc[row, :m], s[row, want])
            assert np.all(idx[row, m:] == -1) and np.all(sc[row, m:] == -np.inf)
            if trial % 2 == 0 and not floor:  # distinct scores: the same rows too
                assert idx[row, :m].tolist() == want
    for name, found in narrowed.items():
        assert sum(near is not None for near in found) >= 20 or (chunk is None and name in ("_near_top", "_at_least_kth"))


@pytest.mark.parametrize("positive", [100, 30])  # more than k above the floor, and fewer
def test_top_k_of_a_long_tail_past_what_chunks_bound_leaves_masked_items_out(positive):
    """A few positive scores in a long tail of zeros, k = 40, past half the
    chunks (ranked among the scores above the floor, or every eligible one),
    and a mask over some of the positive ones: no masked item comes back."""
    rng = np.random.default_rng(13)
    scores = np.zeros(1000, dtype=np.float32)
    scores[rng.choice(1000, positive, replace=False)] = rng.random(positive).astype(np.float32) + 0.1
    allowed = np.ones(1000, dtype=bool)
    allowed[rng.choice(np.flatnonzero(scores), 5, replace=False)] = False
    k = 40
    idx, got = top_k(scores, k, allowed)
    assert idx.tolist() == _reference_top_k(scores, k, allowed)
    assert allowed[idx].all()


def test_top_k_narrows_long_tails_of_equal_scores_and_narrow_filters_without_searching_every_score(monkeypatch):
    """Popularity-like scores, a few positive and the rest 0, and filters
    that leave a few items, whose search of every score is slow (argpartition
    of mostly equal values, or of a mask of mostly -inf: 13-14 ms at 100k):
    they are narrowed first, with a small k and a large one, and the answer
    is still the definition's, with and without ties."""
    searched = []
    search = ranking._candidates
    monkeypatch.setattr(ranking, "_candidates", lambda *a: searched.append(1) or search(*a))
    rng = np.random.default_rng(5)
    n = 5000
    for positives, span in ((0, n), (3, 100), (50, 100), (50, n), (400, n), (1500, n)):
        s = np.zeros(n, dtype=np.float32)
        s[rng.choice(span, positives, replace=False)] = rng.random(positives)
        few = np.zeros(n, dtype=bool)
        few[rng.choice(n, 5, replace=False)] = True
        top = np.ones(n, dtype=bool)
        top[np.argsort(-s, kind="stable")[:100]] = False  # the most popular excluded (seen)
        for allowed, k in [(None, 10), (rng.random(n) < 0.95, 10), (few, 10), (top, 10), (None, 300)]:
            assert top_k(s, k, allowed)[0].tolist() == _reference_top_k(s, k, allowed)
            assert top_k(s, k, allowed, ties=True)[0].tolist() == _reference_top_k(s, k, allowed, ties=True)
    assert searched == []
    for allowed in (None, np.zeros(0, dtype=bool)):  # no scores at all
        assert [a.size for a in top_k(np.zeros(0, dtype=np.float32), 5, allowed)] == [0, 0]


def test_row_blocks_split_a_lone_scan_over_threads_and_give_the_same_scores():
    import threading
    import time

    from halflife.core.ranking import RowBlocks

    rng = np.random.default_rng(12)
    items = normalize(rng.normal(size=(1000, 8)))
    q = rng.normal(size=8)
    blocks = RowBlocks(3, min_rows=100)
    seen: list[tuple[int, int]] = []
    caller, a_helper_ran = threading.get_ident(), threading.Event()

    def score(rows):
        seen.append((threading.get_ident(), rows.shape[0]))
        if threading.get_ident() != caller:
            a_helper_ran.set()
        else:  # a helper thread slow to be scheduled must not leave every block to the caller (bounded)
            a_helper_ran.wait(10)
        time.sleep(0.005)  # as a GEMV would, it lets go of the GIL
        return cosine_scores(q, rows)

    # BLAS may round a block's rows differently in the last bit.
    np.testing.assert_allclose(blocks(score, items), cosine_scores(q, items), rtol=1e-6, atol=1e-7)
    assert len(seen) == 10 and sum(n for _, n in seen) == 1000  # 3 threads x 4 blocks, at least 100 rows each
    threads = {ident for ident, _ in seen}
    assert len(threads) >= 2  # blocks ran on the pool's threads (and, mostly, the caller's)
    a_helper_ran.set()  # below, the caller may run blocks alone
    seen.clear()
    np.testing.assert_allclose(blocks(score, items[:250]), cosine_scores(q, items[:250]), rtol=1e-6, atol=1e-7)
    assert len(seen) == 2  # 250 rows: two blocks of at least min_rows
    seen.clear()
    assert blocks(score, items[:150]).shape == (150,) and len(seen) == 1


def test_row_blocks_leave_a_scan_whole_while_another_one_runs():
    """Concurrent calls already keep the cores busy: the second one scans on
    its own thread instead of queueing blocks behind the first's."""
    import threading

    from halflife.core.ranking import RowBlocks

    items = normalize(np.random.default_rng(13).normal(size=(400, 4)))
    blocks = RowBlocks(2, min_rows=100)
    inside, release, calls = threading.Event(), threading.Event(), []

    def slow(rows):
        calls.append(rows.shape[0])
        inside.set()
        assert release.wait(10)
        return rows[:, 0]

    first = threading.Thread(target=blocks, args=(slow, items))
    first.start()
    assert inside.wait(10)
    sizes = []
    np.testing.assert_array_equal(blocks(lambda rows: sizes.append(rows.shape[0]) or rows[:, 0], items), items[:, 0])
    release.set()
    first.join(10)
    assert sizes == [400] and sum(calls) == 400 and len(calls) == 4


def test_batch_search_in_item_tiles_answers_as_one_score_matrix():
    """Tiles of 7 to all 300 items, masks and k past a tile's rows: the
    same scores as batch_top_k over the whole matrix, the same rows where
    no scores tie, -1 / -inf past the eligible items."""
    rng = np.random.default_rng(4)
    items = normalize(rng.standard_normal((300, 8)))
    queries = rng.standard_normal((6, 8))
    cases = [(6 * 7, 5, 1.0), (6 * 7, 12, 0.9), (6 * 50, 10, 0.5), (10**9, 10, 0.9), (6 * 7, 400, 0.02),
             (6 * 7, 12, 0.02)]  # the last: many tiles, fewer eligible items than k
    for (max_block, k, share), threads in itertools.product(cases, (1, 2, 4, 8)):  # 8: more than the 6 queries
        allowed = rng.random(300) < share
        want_idx, want = batch_top_k(cosine_scores(queries, items), k, allowed)
        got_idx, got = batch_search(queries, items, k, allowed, max_block=max_block, threads=threads)
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_array_equal(got_idx, want_idx)
    # No mask: every item competes.
    want_idx, want = batch_top_k(cosine_scores(queries, items), 5)
    got_idx, got = batch_search(queries, items, 5, max_block=6 * 7)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(got_idx, want_idx)


def test_empty_edges_answer_empty_arrays():
    """Found by an audit: no query rows through the chunk path, no items or
    k = 0 in batch_search, and MMR over a relevance of -inf."""
    idx, scores = batch_top_k(np.zeros((0, 4096), np.float32), 1, np.ones(4096, bool))
    assert idx.shape == scores.shape == (0, 1)
    for items, k, block in ((np.zeros((0, 4), np.float32), 3, 50_000_000), (np.eye(4, dtype=np.float32), 0, 1)):
        idx, scores = batch_search(np.ones((2, 4), np.float32), items, k, max_block=block)
        assert idx.shape == scores.shape == (2, 0)
    picks = mmr(np.array([-np.inf, -np.inf, 1.0]), np.eye(3), 3)
    assert sorted(picks.tolist()) == [0, 1, 2] and picks[0] == 2


@pytest.mark.parametrize("n", [40, 5000])  # sorted outright, and through the chunk bounds
def test_integer_and_bool_scores_rank_as_their_float_values(n):
    """Counts are scores too (popularity): top_k raised OverflowError on
    integers, casting -inf into their dtype."""
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 9, n)
    allowed = rng.random(n) < 0.8
    for scores in (counts, counts > 5, counts.astype(np.uint8)):
        for mask in (None, allowed):
            for ties in (False, True):
                idx, values = top_k(scores, 7, mask, ties=ties)
                expected_idx, expected_values = top_k(scores.astype(np.float64), 7, mask, ties=ties)
                assert np.array_equal(idx, expected_idx) and np.array_equal(values, expected_values)
                assert values.dtype == np.float64
            rows = np.stack([scores, scores[::-1]])
            idx, values = batch_top_k(rows, 7, mask)
            expected_idx, expected_values = batch_top_k(rows.astype(np.float64), 7, mask)
            assert np.array_equal(idx, expected_idx) and np.array_equal(values, expected_values)


def test_normalize_computes_float16_input_in_float64():
    """A float16 query is read as it is, but its norm is not taken in float16
    (off by ~1e-4 against ~1e-7 from float32)."""
    v = np.random.default_rng(3).normal(size=(8, 384)).astype(np.float16)
    exact = v.astype(np.float64) / np.linalg.norm(v.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(normalize(v), exact, atol=1e-6)


def test_normalize_scales_a_tiny_row_with_a_zero_entry_by_its_largest_entry():
    """A decayed sum of 1e-200 is a fine direction even where some entry is
    0: the row is scaled by its largest entry, not its smallest, before it
    is squared (a row scaled by its zero came back a 1e-188 vector)."""
    np.testing.assert_allclose(normalize(np.array([3e-200, 0.0, -4e-200])), [0.6, 0.0, -0.8], rtol=1e-6)


def test_row_blocks_of_one_thread_score_on_the_calling_thread():
    """threads = 1: the caller's thread alone, no pool to hand blocks to."""
    from halflife.core.ranking import RowBlocks

    rng = np.random.default_rng(3)
    items = normalize(rng.normal(size=(400, 8)))
    q = rng.normal(size=8)
    import threading

    threads = set()

    def score(rows):
        threads.add(threading.get_ident())
        return cosine_scores(q, rows)

    np.testing.assert_array_equal(RowBlocks(1, min_rows=10)(score, items), cosine_scores(q, items))
    assert threads == {threading.get_ident()}


@pytest.mark.parametrize("k", [1, 10, 40])
def test_top_k_of_a_long_row_of_mostly_minus_inf_returns_only_the_finite_scores(k):
    """Items scored -inf (masked) are never returned, also where fewer than
    k of a long row are finite (4096 scores: the chunk bounds apply)."""
    s = np.full(4096, -np.inf, dtype=np.float32)
    s[[7, 1000, 4000]] = [0.5, 0.9, 0.1]
    idx, scores = top_k(s, k)
    assert idx.tolist() == [1000, 7, 4000][:k]
    np.testing.assert_array_equal(scores, np.float32([0.9, 0.5, 0.1])[:k])


@pytest.mark.parametrize("n", [5, 4096])
def test_top_k_of_only_nan_scores_is_empty(n):
    """NaN scores are never returned: a row of nothing else answers none."""
    idx, scores = top_k(np.full(n, np.nan), 3)
    assert idx.shape == scores.shape == (0,)


def test_batch_top_k_with_a_mask_per_row_over_long_rows_and_leaves_its_scores_alone():
    """A (B, N) mask over rows long enough for the chunk bounds: each row
    keeps its own allowed items; the scores passed in are not changed (the
    masked copy is batch_top_k's own)."""
    rng = np.random.default_rng(4)
    b, n, k = 3, 4096, 5
    s = rng.normal(size=(b, n)).astype(np.float32)
    allowed = rng.random((b, n)) < 0.3
    before = s.copy()
    idx, scores = batch_top_k(s, k, allowed)
    for row in range(b):
        want_idx, want = top_k(s[row], k, allowed[row])
        np.testing.assert_array_equal(idx[row], want_idx)
        np.testing.assert_array_equal(scores[row], want)
    np.testing.assert_array_equal(s, before)


def test_batch_search_of_no_queries_answers_empty_rows():
    idx, scores = batch_search(np.zeros((0, 4), np.float32), np.eye(4, dtype=np.float32), 2, threads=2)
    assert idx.shape == scores.shape == (0, 2)


def test_batch_search_of_k_1_answers_each_querys_nearest_item():
    rng = np.random.default_rng(5)
    items, queries = normalize(rng.standard_normal((50, 8))), rng.standard_normal((4, 8))
    idx, scores = batch_search(queries, items, 1)
    want = cosine_scores(queries, items)
    assert idx[:, 0].tolist() == want.argmax(axis=1).tolist()
    np.testing.assert_allclose(scores[:, 0], want.max(axis=1), atol=1e-6)


def test_top_k_searching_every_score_matches_the_definition_with_masked_ties(monkeypatch):
    """The candidate path and its fallback, where none of top_k's narrowings
    answers: a disallowed item tied with the k-th best is still left out."""
    for name in ("_few_allowed", "_at_least_kth", "_above_floor"):
        monkeypatch.setattr(ranking, name, lambda *a: None)
    rng = np.random.default_rng(6)
    for trial in range(200):
        n = int(rng.integers(1, 80))
        s = rng.integers(-3, 4, n).astype(np.float32)
        s[rng.random(n) < 0.1] = -np.inf
        allowed = None if trial % 4 == 0 else rng.random(n) < rng.choice([0.3, 0.9])
        k = int(rng.integers(0, n + 3))
        idx, scores = top_k(s, k, allowed)
        assert idx.tolist() == _reference_top_k(s, k, allowed)
        assert scores.shape == idx.shape
