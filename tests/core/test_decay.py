"""Forward decay against brute force, and the Elasticsearch decay kernels."""

from __future__ import annotations

import numpy as np
import pytest

from halflife.core.decay import (
    ES_KERNELS,
    SAFE_EXPONENT,
    EventTypes,
    add_events,
    decay_rates,
    es_exp,
    es_gauss,
    es_kernel,
    es_linear,
    group_rates,
    half_life_kernel,
    kernel_sums,
    landmark_for,
    read_decayed,
    relative_read_factors,
)

HOUR = 3600.0
DAY = 24 * HOUR
YEAR = 365 * DAY
T0 = 1.7e9  # Unix-time scale, as the service stores

# Hours to months; types 1 and 2 share a half-life and so an accumulator.
TYPES = EventTypes(
    weights=np.array([1.0, 2.0, 0.5, 3.0, 1.5, 0.8]),
    half_lives=np.array([1 * HOUR, 1 * DAY, 1 * DAY, 7 * DAY, 30 * DAY, 90 * DAY]),
)


def _events(rng, n, span, dim):
    times = T0 + np.sort(rng.uniform(0, span, n))
    type_ids = rng.integers(0, len(TYPES.weights), n)
    vectors = rng.normal(size=(n, dim))
    return type_ids, times, vectors


def _brute(type_ids, times, vectors, t, rate_mask=None):
    w = TYPES.weights[type_ids] * np.exp2(-(t - times) / TYPES.half_lives[type_ids])
    if rate_mask is not None:
        w = np.where(rate_mask, w, 0.0)
    return w @ vectors


def _feed(type_ids, times, vectors, batches, rng, dim):
    """Adds events in `batches` random-size chunks; returns sums, landmark, landmarks seen."""
    sums, landmark = np.zeros((TYPES.rates.shape[0], dim)), float("nan")
    cuts = np.sort(rng.choice(np.arange(1, len(times)), batches - 1, replace=False))
    seen = []
    for chunk in np.split(np.arange(len(times)), cuts):
        sums, landmark = add_events(
            sums, landmark, TYPES.rates, TYPES.rate_index[type_ids[chunk]],
            TYPES.weights[type_ids[chunk]], times[chunk], vectors[chunk],
        )
        seen.append(landmark)
    return sums, landmark, seen


def _rel_err(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_decay_rates_and_grouping():
    rates = decay_rates([HOUR, np.inf])
    assert rates[0] == pytest.approx(np.log(2) / HOUR) and rates[1] == 0.0
    assert TYPES.rates.shape == (5,)  # six types, five distinct half-lives
    assert TYPES.rate_index[1] == TYPES.rate_index[2]
    np.testing.assert_array_equal(TYPES.rates[TYPES.rate_index], decay_rates(TYPES.half_lives))
    unique, index = group_rates([DAY, HOUR, DAY])
    np.testing.assert_array_equal(index, [0, 1, 0])
    with pytest.raises(ValueError):
        decay_rates([0.0])
    with pytest.raises(ValueError):
        decay_rates([np.nan])
    assert decay_rates([0.5]).tolist() == [2 * np.log(2)]  # any positive half-life, below a second too
    for bad in ([HOUR, 0.0], [np.nan, HOUR], [HOUR, -DAY]):  # any one non-positive half-life
        with pytest.raises(ValueError):
            decay_rates(bad)


def _arrival_order(rng, times, mode):
    if mode == "shuffled":
        return rng.permutation(len(times))
    # Mostly in order, with delivery delays of about a day and 10% of events
    # arriving up to a year late.
    delay = rng.exponential(DAY, len(times))
    late = rng.random(len(times)) < 0.1
    delay[late] += rng.uniform(0, YEAR, late.sum())
    return np.argsort(times + delay)


@pytest.mark.parametrize("seed,mode,min_moves", [(0, "shuffled", 1), (1, "shuffled", 1), (2, "late", 20)])
def test_forward_decay_matches_brute_force_over_years_out_of_order(seed, mode, min_moves):
    rng = np.random.default_rng(seed)
    dim = 8
    type_ids, times, vectors = _events(rng, 4000, 3 * YEAR, dim)
    perm = _arrival_order(rng, times, mode)
    sums, landmark, seen = _feed(type_ids[perm], times[perm], vectors[perm], 60, rng, dim)
    assert np.count_nonzero(np.diff(seen)) >= min_moves, "re-basing should have moved the landmark"
    assert 0 <= TYPES.rates.max() * (times.max() - landmark) <= SAFE_EXPONENT
    for t in (times.max(), times.max() + 3 * HOUR, times.max() + 20 * DAY):
        # Each rate on its own, so the slow rates cannot hide errors in the fast ones.
        for r in range(TYPES.rates.shape[0]):
            mask = TYPES.rate_index[type_ids] == r
            want = _brute(type_ids, times, vectors, t, mask)
            got = read_decayed(sums[r : r + 1], TYPES.rates[r : r + 1], landmark, t)
            assert _rel_err(got, want) < 1e-9, (t, r)
        total = read_decayed(sums, TYPES.rates, landmark, t)
        assert _rel_err(total, _brute(type_ids, times, vectors, t)) < 1e-9


def test_in_order_stream_rebases_often_and_stays_exact():
    rng = np.random.default_rng(7)
    dim = 4
    type_ids, times, vectors = _events(rng, 3000, 2 * YEAR, dim)
    sums, landmark, seen = _feed(type_ids, times, vectors, 300, rng, dim)
    moves = np.count_nonzero(np.diff(seen))
    # λ_max = ln2/1h: the landmark must move about every 72 h of event time.
    assert moves > 100
    assert np.all(np.diff(seen) >= 0), "the landmark only moves forward"
    t = times.max() + HOUR
    assert _rel_err(read_decayed(sums, TYPES.rates, landmark, t), _brute(type_ids, times, vectors, t)) < 1e-9


def test_result_does_not_depend_on_arrival_order():
    rng = np.random.default_rng(3)
    dim = 6
    type_ids, times, vectors = _events(rng, 2000, YEAR, dim)
    t = times.max() + DAY
    reads = []
    for _ in range(3):
        p = rng.permutation(len(times))
        sums, landmark, _ = _feed(type_ids[p], times[p], vectors[p], 25, rng, dim)
        reads.append(read_decayed(sums, TYPES.rates, landmark, t))
    for r in reads[1:]:
        assert _rel_err(r, reads[0]) < 1e-12


def test_no_exponent_passes_the_bound():
    rng = np.random.default_rng(11)
    type_ids, times, vectors = _events(rng, 500, YEAR, 3)
    sums, landmark = np.zeros((TYPES.rates.shape[0], 3)), float("nan")
    for chunk in np.array_split(np.arange(500), 50):
        sums, landmark = add_events(
            sums, landmark, TYPES.rates, TYPES.rate_index[type_ids[chunk]],
            TYPES.weights[type_ids[chunk]], times[chunk], vectors[chunk],
        )
        assert TYPES.rates.max() * (times[chunk].max() - landmark) <= SAFE_EXPONENT
    assert np.all(np.isfinite(sums))


def test_add_events_is_pure_and_late_events_keep_the_landmark():
    rates = decay_rates([DAY])
    sums = np.ones((1, 2))
    before = sums.copy()
    new, landmark = add_events(sums, T0, rates, [0], [1.0], [T0 - 400 * DAY], [[1.0, 0.0]])
    np.testing.assert_array_equal(sums, before)
    assert landmark == T0  # a late event never moves the landmark back
    assert landmark_for(T0, [T0 - 10 * YEAR], rates.max()) == T0
    assert landmark_for(float("nan"), [T0, T0 + 5], rates.max()) == T0 + 5
    np.testing.assert_allclose(new, [[1.0 + 2.0**-400, 1.0]], rtol=1e-15)


def test_an_empty_batch_changes_nothing():
    rates = decay_rates([DAY])
    sums = np.array([[1.0, 2.0]])
    assert landmark_for(T0, [], rates.max()) == T0
    assert np.isnan(landmark_for(float("nan"), np.zeros(0), rates.max()))
    new, landmark = add_events(sums, T0, rates, [], [], [], np.zeros((0, 2)))
    assert landmark == T0
    np.testing.assert_array_equal(new, sums)


def test_event_types_hold_float_arrays_and_reject_mismatched_lengths():
    types = EventTypes([1, -2], [HOUR, np.inf], ("like", "skip"))  # plain lists, as a caller may pass
    assert types.weights.dtype == np.float64 and types.weights.tolist() == [1.0, -2.0]
    assert types.half_lives.dtype == np.float64 and types.half_lives.tolist() == [HOUR, np.inf]
    with pytest.raises(ValueError, match="same length"):
        EventTypes(np.array([1.0, 2.0]), np.array([HOUR]))
    with pytest.raises(ValueError, match="names"):
        EventTypes(np.array([1.0, 2.0]), np.array([HOUR, DAY]), ("like",))


def test_relative_read_factors_are_zero_where_no_rate_holds_anything():
    rates = decay_rates([HOUR, DAY])
    none = np.zeros(2, dtype=bool)
    np.testing.assert_array_equal(relative_read_factors(rates, T0, T0 + DAY, none), [0.0, 0.0])
    np.testing.assert_array_equal(relative_read_factors(rates, float("nan"), T0, np.ones(2, dtype=bool)), [0.0, 0.0])
    # The largest held factor reads 1, the others relative to it; a rate holding nothing reads 0.
    got = relative_read_factors(rates, T0, T0 + DAY, np.array([True, True]))
    np.testing.assert_allclose(got, [2.0**-24 / 0.5, 1.0], rtol=1e-12)
    np.testing.assert_array_equal(relative_read_factors(rates, T0, T0 + DAY, np.array([True, False])), [1.0, 0.0])


def test_infinite_half_life_is_a_plain_sum():
    rates = decay_rates([np.inf])
    rng = np.random.default_rng(5)
    times = T0 + rng.uniform(0, 5 * YEAR, 100)
    vecs = rng.normal(size=(100, 3))
    sums, landmark = add_events(np.zeros((1, 3)), float("nan"), rates, np.zeros(100, int), np.ones(100), times, vecs)
    np.testing.assert_allclose(read_decayed(sums, rates, landmark, T0 + 10 * YEAR), vecs.sum(0), rtol=1e-12)


# --- Elasticsearch kernels ----------------------------------------------------


@pytest.mark.parametrize("fn", [es_exp, es_gauss, es_linear])
def test_es_kernels_decay_at_scale_and_one_within_offset(fn):
    origin, scale, offset, decay = 1000.0, 50.0, 10.0, 0.3
    t = origin + np.array([0.0, 5.0, -10.0, 10.0, 60.0, -60.0])
    got = fn(t, origin, scale, offset, decay)
    np.testing.assert_allclose(got[:4], 1.0)  # within the offset
    np.testing.assert_allclose(got[4:], decay, rtol=1e-12)  # distance - offset == scale, both sides
    far = fn(origin + np.array([100.0, 1000.0]), origin, scale, offset, decay)
    assert np.all(far < decay) and far[1] <= far[0]


@pytest.mark.parametrize("fn", [es_exp, es_gauss, es_linear])
@pytest.mark.parametrize("scale", [1e160, 1e300, np.inf])
def test_es_kernels_take_any_scale_a_config_passes(fn, scale):
    """gauss squared a Python float: past ~1e154 days' worth it raised
    OverflowError, and every personalised call of such a server failed."""
    got = fn(np.array([0.0, 1e9, -1e9]), 0.0, scale)
    assert np.all(np.isfinite(got)) and np.all(got > 0.99)


def test_es_kernels_hand_computed():
    # origin 0, scale 10, offset 0, decay 0.5, at distance 5 and 20.
    d = np.array([5.0, 20.0])
    np.testing.assert_allclose(es_exp(d, 0.0, 10.0, 0.0, 0.5), [2**-0.5, 0.25], rtol=1e-12)
    # σ² = -100 / (2 ln 0.5); at 5: e^{-25/(2σ²)} = 0.5^{1/4}; at 20: 0.5^4.
    np.testing.assert_allclose(es_gauss(d, 0.0, 10.0, 0.0, 0.5), [0.5**0.25, 0.5**4], rtol=1e-12)
    # s = 10 / 0.5 = 20: at 5: 0.75, at 20: 0 (and stays 0 past s).
    np.testing.assert_allclose(es_linear(np.array([5.0, 20.0, 35.0]), 0.0, 10.0, 0.0, 0.5), [0.75, 0.0, 0.0])
    # linear with offset 3, decay 0.2: s = 12.5, reaches 0 at distance 15.5.
    np.testing.assert_allclose(es_linear(np.array([15.5, 9.25]), 0.0, 10.0, 3.0, 0.2), [0.0, 0.5], atol=1e-15)


@pytest.mark.parametrize("kind", ["exp", "gauss", "linear"])
def test_kernel_defaults_are_elasticsearchs_no_offset_and_half_weight_at_scale(kind):
    times = np.array([0.0, 1.0, 10.0, -10.0])
    np.testing.assert_allclose(ES_KERNELS[kind](times, 0.0, 10.0)[[0, 2, 3]], [1.0, 0.5, 0.5], rtol=1e-12)
    np.testing.assert_allclose(es_kernel(kind, 0.0, 10.0)(times)[[0, 2, 3]], [1.0, 0.5, 0.5], rtol=1e-12)
    assert ES_KERNELS[kind](times, 0.0, 10.0)[1] < 1.0  # no offset: it decays from the origin on


def test_a_linear_kernel_of_infinite_scale_does_not_decay():
    """scale = inf (a half-life the config accepts) gave (inf - d)/inf: NaN, and no recommendations."""
    times = np.array([0.0, -1e6, -1e9])
    assert es_linear(times, 0.0, np.inf, 0.0, 0.5).tolist() == [1.0, 1.0, 1.0]
    assert es_linear(times, 0.0, 1e308, 0.0, 0.5).tolist() == [1.0, 1.0, 1.0]  # s overflows to inf


@pytest.mark.parametrize("fn", [es_exp, es_gauss, es_linear])
def test_each_kernel_checks_its_own_parameters(fn):
    for scale, offset, decay in ((0.0, 0.0, 0.5), (1.0, -1.0, 0.5), (1.0, 0.0, 1.0), (1.0, 0.0, -0.1)):
        with pytest.raises(ValueError):
            fn(np.zeros(1), 0.0, scale, offset, decay)


def test_a_kernel_decay_of_0_is_allowed_for_linear_only():
    """docs/configuration.md: kernel_decay "above 0 for exp and gauss, 0 allowed for linear"."""
    times = np.array([0.0, 5.0, 10.0, 20.0])
    np.testing.assert_allclose(es_linear(times, 0.0, 10.0, 0.0, 0.0), [1.0, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(es_kernel("linear", 0.0, 10.0, 0.0, 0.0)(times), [1.0, 0.5, 0.0, 0.0])
    for fn, kind in ((es_exp, "exp"), (es_gauss, "gauss")):
        with pytest.raises(ValueError):
            fn(times, 0.0, 10.0, 0.0, 0.0)
        with pytest.raises(ValueError):
            es_kernel(kind, 0.0, 10.0, 0.0, 0.0)


def test_es_kernel_validation():
    np.testing.assert_allclose(es_exp(np.array([0.5]), 0.0, 0.5), [0.5])  # any positive scale, below 1 too
    with pytest.raises(ValueError):
        es_kernel("exp", 0.0, 0.0)  # when bound, not at the first read
    with pytest.raises(ValueError):
        es_exp(np.zeros(1), 0.0, 0.0)
    with pytest.raises(ValueError):
        es_gauss(np.zeros(1), 0.0, 1.0, decay=1.0)
    with pytest.raises(ValueError):
        es_kernel("cosine", 0.0, 1.0)
    with pytest.raises(ValueError):
        es_exp(np.zeros(1), 0.0, 1.0, offset=-1.0)


def test_kernel_sums_are_the_weighted_sums_by_sign_and_match_forward_decay():
    rng = np.random.default_rng(2)
    type_ids, times, vectors = _events(rng, 300, 60 * DAY, 5)
    weights = TYPES.weights[type_ids] * rng.choice([1.0, 0.0, -1.0], 300)  # liked, weighing nothing, disliked
    now = times.max() + HOUR
    kernel = es_kernel("gauss", now, 7 * DAY, DAY, 0.5)
    sums, strengths = kernel_sums(vectors, times, weights, kernel)
    for side, sign in enumerate((1.0, -1.0)):
        coeffs = [abs(w) * kernel(np.array([t]))[0] for w, t in zip(weights, times) if np.sign(w) == sign]
        manual = sum(c * v for c, v in zip(coeffs, vectors[np.sign(weights) == sign]))
        np.testing.assert_allclose(sums[side], manual, rtol=1e-10)
        assert strengths[side] == pytest.approx(sum(coeffs), rel=1e-12)
    # A log's sums are its chunks' (the engine reads a long log a chunk at a time).
    chunked = [kernel_sums(vectors[part], times[part], weights[part], kernel) for part in (slice(0, 123), slice(123, None))]
    np.testing.assert_allclose(chunked[0][0] + chunked[1][0], sums, rtol=1e-12)
    np.testing.assert_allclose(chunked[0][1] + chunked[1][1], strengths, rtol=1e-12)
    # The log recomputation with half-life kernels equals the forward-decay read.
    decayed, landmark = add_events(
        np.zeros((5, 5)), float("nan"), TYPES.rates, TYPES.rate_index[type_ids], weights, times, vectors
    )
    positive, negative = kernel_sums(vectors, times, weights, half_life_kernel(now, TYPES.half_lives[type_ids]))[0]
    assert _rel_err(read_decayed(decayed, TYPES.rates, landmark, now), positive - negative) < 1e-12
