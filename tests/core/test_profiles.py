"""Profiles: single vector with negative feedback, and the multi-interest state."""

from __future__ import annotations

import io

import numpy as np
import pytest

from halflife.core.decay import EventTypes, decay_rates
from halflife.core.profiles import (
    MultiInterestState,
    ProfileState,
    interest_scores,
    negative_fade,
)
from halflife.core.ranking import cosine_scores, normalize

HOUR = 3600.0
DAY = 24 * HOUR
YEAR = 365 * DAY
T0 = 1.7e9

# click, like, purchase, skip, dislike
TYPES = EventTypes.from_dict(
    {
        "click": (1.0, 14 * DAY),
        "like": (2.0, 30 * DAY),
        "purchase": (4.0, 90 * DAY),
        "skip": (-0.5, 1 * DAY),
        "dislike": (-2.0, 30 * DAY),
    }
)
POSITIVE = [0, 1, 2]


def _scores(state, items, t, beta=0.5, full_share=0.0):
    """cos(profile, item) − β·fade·cos(negative, item), the state read at t as
    the engine's single-profile signal reads it (its directions and fade)."""
    fade = _fade(state, t, full_share)
    return cosine_scores(state.direction(t), items) - np.float32(beta * fade) * cosine_scores(state.negative_direction(t), items)


def _fade(state, t, full_share):
    return negative_fade(state.strength(t), state.negative_strength(t), full_share)


def _topics(rng, n_topics, dim):
    return normalize(rng.normal(size=(n_topics, dim)))


def _near(rng, center, n, noise=0.15):
    return normalize(center + noise * rng.normal(size=(n, center.shape[0])) / np.sqrt(center.shape[0]) * 4)


def _brute(type_ids, times, vectors, t, sign):
    w = TYPES.weights[type_ids]
    keep = w > 0 if sign > 0 else w < 0
    c = np.where(keep, np.abs(w) * np.exp2(-(t - times) / TYPES.half_lives[type_ids]), 0.0)
    return c @ vectors, c.sum()


def _rel(a, b):
    return np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b)


# --- single profile -----------------------------------------------------------


def test_profile_matches_brute_force_and_splits_negative_events():
    rng = np.random.default_rng(0)
    n, dim = 3000, 16
    times = T0 + rng.uniform(0, 2 * YEAR, n)
    type_ids = rng.integers(0, 5, n)
    vectors = rng.normal(size=(n, dim))
    state = ProfileState.empty(TYPES, dim)
    perm = rng.permutation(n)
    landmarks = []
    for chunk in np.array_split(perm[np.argsort(times[perm] + rng.exponential(5 * DAY, n))], 40):
        state.add(TYPES, type_ids[chunk], times[chunk], vectors[chunk])
        landmarks.append(state.landmark)
    assert np.count_nonzero(np.diff(landmarks)) > 5
    for t in (times.max(), times.max() + 2 * DAY):
        pos, pos_mass = _brute(type_ids, times, vectors, t, +1)
        neg, neg_mass = _brute(type_ids, times, vectors, t, -1)
        assert _rel(state.vector(t), pos) < 1e-9
        assert _rel(state.negative_vector(t), neg) < 1e-9
        assert state.strength(t) == pytest.approx(pos_mass, rel=1e-9)
        assert state.negative_strength(t) == pytest.approx(neg_mass, rel=1e-9)


def test_empty_profile_reads_zero():
    state = ProfileState.empty(TYPES, 4)
    np.testing.assert_array_equal(state.vector(T0), np.zeros(4))
    assert state.strength(T0) == 0.0
    state.add(TYPES, [], [], np.zeros((0, 4)))
    assert np.isnan(state.landmark)


def test_mismatched_event_types_are_rejected():
    other = EventTypes(np.array([1.0]), np.array([3 * DAY]))
    with pytest.raises(ValueError):
        ProfileState.empty(TYPES, 4).add(other, [0], [T0], np.ones((1, 4)))
    with pytest.raises(ValueError):
        MultiInterestState.empty(TYPES, 4).add(other, [0], [T0], np.ones((1, 4)))
    with pytest.raises(ValueError):
        MultiInterestState.empty(TYPES, 4, max_clusters=0)


def test_a_profile_of_negative_events_only_has_no_positive_direction():
    state = ProfileState.empty(TYPES, 2)
    state.add(TYPES, [3, 4], [T0, T0 + 1], np.eye(2))
    assert state.direction(T0 + DAY).tolist() == [0.0, 0.0] and state.strength(T0 + DAY) == 0.0
    assert np.all(state.negative_direction(T0 + DAY) > 0)
    likes = ProfileState.empty(TYPES, 2)
    likes.add(TYPES, [1], [T0], np.eye(2)[:1])
    assert likes.dim == 2 and likes.negative_direction(T0).tolist() == [0.0, 0.0]


def test_a_batch_longer_than_one_product_and_weights_below_1_sum_exactly():
    types = EventTypes.from_dict({"glance": (0.25, DAY), "like": (1.0, 7 * DAY), "skip": (-0.5, DAY)})
    rng = np.random.default_rng(12)
    n = 5000  # more events than one float64 product takes
    type_ids, times, vecs = rng.integers(0, 3, n), T0 + rng.uniform(0, 30 * DAY, n), rng.normal(size=(n, 3))
    state = ProfileState.empty(types, 3)
    state.add(types, type_ids, times, vecs)
    t = T0 + 31 * DAY
    w = types.weights[type_ids] * np.exp2(-(t - times) / types.half_lives[type_ids])
    assert _rel(state.vector(t), np.where(w > 0, w, 0) @ vecs) < 1e-9
    assert _rel(state.negative_vector(t), np.where(w < 0, -w, 0) @ vecs) < 1e-9
    assert state.negative_strength(t) == pytest.approx(-w[w < 0].sum(), rel=1e-9)


def test_clusters_worth_nothing_go_and_the_live_ones_keep_their_sums():
    """Two clusters of 1-minute events die at one re-base, beside a live one
    of 1-day events after them: the dead ones go, the live one stays whole."""
    types = EventTypes.from_dict({"glance": (1.0, 60.0), "like": (1.0, DAY)})
    state = MultiInterestState.empty(types, 4, max_clusters=4, threshold=0.5)
    state.add(types, [0, 0, 1], [T0, T0 + 1, T0 + 2], np.eye(4)[:3])
    state.add(types, [1], [T0 + 20 * HOUR], np.eye(4)[3:])
    assert state.n_clusters == 2 and state.counts.tolist() == [1, 1]
    np.testing.assert_allclose(state.centroids(T0 + DAY), np.eye(4)[[2, 3]], atol=1e-6)


def test_events_of_a_type_weighing_0_are_ignored():
    types = EventTypes.from_dict({"view": (0.0, DAY), "like": (1.0, DAY)})
    profile, interests = ProfileState.empty(types, 2), MultiInterestState.empty(types, 2)
    for state in (profile, interests):
        state.add(types, [0, 0], [T0, T0 + 1], np.eye(2))
    assert profile.strength(T0 + 1) == 0.0 and profile.negative_strength(T0 + 1) == 0.0
    assert interests.n_clusters == 0 and interests.counts.shape == (0,) and interests.last_time.shape == (0,)
    assert interests.trend.shape == (0, 2)
    interests.add(types, [1, 0], [T0 + 2, T0 + 3], [[1.0, 0.0], [1.0, 0.0]])  # a like, then a view of the same
    assert interests.counts.tolist() == [1]


def test_negative_feedback_pushes_down_items_near_disliked_ones():
    rng = np.random.default_rng(1)
    dim = 32
    liked, disliked, other = _topics(rng, 3, dim)
    state = ProfileState.empty(TYPES, dim)
    # Likes on one topic, with some clicks that drift towards the disliked one.
    state.add(TYPES, np.zeros(20, int), T0 + np.arange(20) * HOUR, _near(rng, liked, 20))
    state.add(TYPES, np.zeros(5, int), T0 + np.arange(5) * HOUR, _near(rng, 0.5 * liked + 0.5 * disliked, 5))
    state.add(TYPES, np.full(10, 4), T0 + np.arange(10) * HOUR, _near(rng, disliked, 10))
    near_disliked = _near(rng, disliked, 50)
    near_liked = _near(rng, liked, 50)
    t = T0 + DAY
    plain = _scores(state, near_disliked, t, beta=0.0)
    pushed = _scores(state, near_disliked, t, beta=0.5)
    assert np.all(pushed < plain - 0.3)
    # Items far from the disliked topic barely move.
    liked_drop = _scores(state, near_liked, t, beta=0.0) - _scores(state, near_liked, t, beta=0.5)
    assert np.all(np.abs(liked_drop) < 0.15)
    # And the disliked items fall below unrelated ones.
    unrelated = _scores(state, _near(rng, other, 50), t, beta=0.5)
    assert pushed.mean() < unrelated.mean()


def test_negative_feedback_fades_as_it_decays_and_as_likes_outweigh_it():
    rng = np.random.default_rng(3)
    dim = 32
    liked, disliked = _topics(rng, 2, dim)
    near_disliked = _near(rng, disliked, 20)
    state = ProfileState.empty(TYPES, dim)
    state.add(TYPES, [4], [T0], _near(rng, disliked, 1))  # one dislike (weight 2, 30-day half-life)
    state.add(TYPES, [0], [T0 + HOUR], _near(rng, liked, 1))  # one click (weight 1, 14 days)
    full_share = 0.2

    def penalty(t):
        return _scores(state, near_disliked, t, beta=0.0) - _scores(state, near_disliked, t, beta=1.0, full_share=full_share)

    soon = T0 + 2 * HOUR
    assert _fade(state, soon, full_share) == 1.0  # its share, 2/3, is above full_share
    first = penalty(soon)
    assert np.all(first > 0.4)
    # More likes since: the same dislike's share, ~2/20, is half of full_share.
    state.add(TYPES, np.zeros(18, int), soon + np.arange(18) * HOUR, _near(rng, liked, 18))
    later = soon + DAY
    fade = _fade(state, later, full_share)
    assert 0.4 < fade < (2 / 19) / full_share
    np.testing.assert_allclose(penalty(later), first * fade, rtol=1e-4, atol=1e-6)
    # A year on, a new like against the dislike's 12 half-lives: it barely counts (it counted in full before).
    state.add(TYPES, [0], [T0 + YEAR], _near(rng, liked, 1))
    assert _fade(state, T0 + YEAR, full_share) < 5e-3
    assert np.all(penalty(T0 + YEAR) < 5e-3)
    # With full_share 0 it never fades.
    np.testing.assert_allclose(_scores(state, near_disliked, T0 + YEAR, beta=1.0, full_share=0.0),
                               _scores(state, near_disliked, T0 + YEAR, beta=0.0) - first, rtol=1e-4, atol=1e-6)


def test_negative_fade_is_the_share_of_the_weight_up_to_a_full_share():
    assert negative_fade(3.0, 1.0, 1.0) == 0.25  # the share itself
    assert negative_fade(3.0, 1.0, 0.5) == 0.5
    assert negative_fade(3.0, 1.0, 0.25) == 1.0
    assert negative_fade(3.0, 1.0, 0.0) == 1.0
    assert negative_fade(0.0, 2.0, 0.5) == 1.0
    assert negative_fade(5.0, 0.0, 0.5) == 0.0
    assert negative_fade(0.0, 0.0, 0.0) == 0.0


def test_profile_arrays_roundtrip_through_npz():
    rng = np.random.default_rng(2)
    state = ProfileState.empty(TYPES, 8)
    state.add(TYPES, rng.integers(0, 5, 50), T0 + rng.uniform(0, 10 * DAY, 50), rng.normal(size=(50, 8)))
    buf = io.BytesIO()
    np.savez(buf, **state.to_arrays())
    buf.seek(0)
    back = ProfileState.from_arrays(np.load(buf))
    t = T0 + 11 * DAY
    np.testing.assert_array_equal(back.vector(t), state.vector(t))
    np.testing.assert_array_equal(back.negative_vector(t), state.negative_vector(t))
    assert back.landmark == state.landmark
    assert state.nbytes == 8 * (4 + 1 + 4 * 8 * 2 + 4 * 2)


# --- multi-interest -----------------------------------------------------------


def _topic_stream(rng, centers, per_topic, span, start=T0, noise=0.15):
    vecs, times, topic = [], [], []
    for k, c in enumerate(centers):
        vecs.append(_near(rng, c, per_topic, noise))
        times.append(start + rng.uniform(0, span, per_topic))
        topic.append(np.full(per_topic, k))
    return np.concatenate(vecs), np.concatenate(times), np.concatenate(topic)


def test_two_separated_topics_make_two_clusters():
    rng = np.random.default_rng(3)
    dim = 32
    centers = _topics(rng, 2, dim)
    vecs, times, topic = _topic_stream(rng, centers, 60, 30 * DAY)
    state = MultiInterestState.empty(TYPES, dim, max_clusters=8, threshold=0.5)
    perm = rng.permutation(len(times))
    for chunk in np.array_split(perm, 7):
        state.add(TYPES, rng.choice(POSITIVE, len(chunk)), times[chunk], vecs[chunk])
    assert state.n_clusters == 2
    assert sorted(state.counts) == [60, 60]
    cent = state.centroids(times.max())
    assert cent.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cent, axis=1), 1.0, atol=1e-6)
    sim = cent @ centers.T
    assert np.all(sim.max(axis=1) > 0.95)
    assert set(np.argmax(sim, axis=1)) == {0, 1}
    assert state.last_time.max() == times.max()


def test_a_threshold_of_one_joins_identical_events():
    """float32 centroids put cos(v, v) a few ulps under 1: five likes of one
    item made 3 interests with one centroid at cluster_threshold = 1."""
    rng = np.random.default_rng(5)
    vector = normalize(rng.standard_normal((1, 384)))
    state = MultiInterestState.empty(TYPES, 384, max_clusters=8, threshold=1.0)
    for k in range(5):
        state.add(TYPES, np.array([POSITIVE[0]]), np.array([T0 + k * HOUR]), vector)
    assert state.n_clusters == 1 and state.counts.tolist() == [5]


def test_more_topics_than_k_merge():
    rng = np.random.default_rng(4)
    dim = 32
    centers = _topics(rng, 5, dim)
    vecs, times, _ = _topic_stream(rng, centers, 20, 10 * DAY)
    state = MultiInterestState.empty(TYPES, dim, max_clusters=3, threshold=0.5)
    state.add(TYPES, np.zeros(len(times), int), times, vecs)
    assert state.n_clusters == 3
    assert state.counts.sum() == 100
    # Merging adds sums, so the totals are still the exact decayed sums.
    t = times.max()
    want = (np.exp2(-(t - times) / (14 * DAY))[:, None] * vecs).sum(0)
    assert _rel(state.total_vector(t), want) < 1e-10
    assert state.total_mass(t) == pytest.approx(np.exp2(-(t - times) / (14 * DAY)).sum(), rel=1e-10)


def test_a_merged_interest_holds_both_counts_and_the_later_last_time():
    state = MultiInterestState.empty(TYPES, 2, max_clusters=1, threshold=0.5)
    state.add(TYPES, [0, 0], [T0 + HOUR, T0], np.eye(2))  # unlike events: the second one forces a merge
    assert state.n_clusters == 1 and state.counts.tolist() == [2] and state.last_time.tolist() == [T0 + HOUR]


def test_centroids_and_shares_read_every_rate_any_interest_holds():
    """Each interest of its own event type (half-life): the centroids are
    the directions of the decayed cluster vectors, the shares their
    importances over their sum."""
    state = MultiInterestState.empty(TYPES, 3, max_clusters=4, threshold=0.9)
    state.add(TYPES, [0, 1, 2], [T0, T0 + HOUR, T0 + 2 * HOUR], np.eye(3) + 0.1)
    assert state.n_clusters == 3
    t = T0 + 5 * DAY
    vectors = state.cluster_vectors(t)
    np.testing.assert_allclose(state.centroids(t), vectors / np.linalg.norm(vectors, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(state.shares(t), state.importances(t) / state.importances(t).sum(), rtol=1e-12)


def test_shifted_interest_dominates_and_trends():
    rng = np.random.default_rng(5)
    dim = 32
    old, new = _topics(rng, 2, dim)
    days_old = np.arange(300) * DAY
    days_new = (300 + np.arange(30)) * DAY
    vecs = np.concatenate([_near(rng, old, 300), _near(rng, new, 30)])
    times = T0 + np.concatenate([days_old, days_new])
    state = MultiInterestState.empty(TYPES, dim, max_clusters=4, threshold=0.5)
    state.add(TYPES, np.zeros(len(times), int), times, vecs)  # clicks, 14-day half-life
    assert state.n_clusters == 2
    t = T0 + 330 * DAY
    which_new = int(np.argmax(state.centroids(t) @ new))
    which_old = 1 - which_new
    imp = state.importances(t)
    assert imp[which_new] > 3 * imp[which_old]
    trends = state.trends()
    labels = state.trend_labels()
    assert labels[which_new] == "rising" and labels[which_old] == "fading"
    assert trends[which_new] > 0.5 and trends.sum() == pytest.approx(0.0, abs=1e-12)
    # Before the shift, the old topic was the user's only interest and steady.
    before = MultiInterestState.empty(TYPES, dim, max_clusters=4, threshold=0.5)
    before.add(TYPES, np.zeros(300, int), times[:300], vecs[:300])
    assert list(before.trend_labels()) == ["steady"]
    # Scoring by interest: an item on the new topic beats one on the old.
    items = normalize(np.stack([new, old]))
    for mode in ("sum", "max"):
        s = interest_scores(items, state.centroids(t), imp, mode=mode)
        assert s[0] > s[1]


@pytest.mark.parametrize("gap_days,label", [(3, "rising"), (2, "steady")])
def test_trends_are_the_7_day_share_less_the_90_day_share(gap_days, label):
    """docs/interest.md: rising when an interest's share of the 7-day mass
    exceeds its 90-day share by 0.05, fading when below by 0.05."""
    state = MultiInterestState.empty(TYPES, 2, max_clusters=4, threshold=0.5)
    state.add(TYPES, [0, 0], [T0, T0 + gap_days * DAY], np.eye(2))  # two clicks, two interests
    short, long = 2.0 ** (-gap_days / 7), 2.0 ** (-gap_days / 90)  # the first one's masses beside the second's
    newer = 1 / (1 + short) - 1 / (1 + long)
    np.testing.assert_allclose(state.trends(), [-newer, newer], rtol=1e-9)
    assert 0.04 < newer < 0.07 and list(state.trend_labels()) == [{"rising": "fading"}.get(label, label), label]


def test_decayed_sums_do_not_depend_on_arrival_order():
    rng = np.random.default_rng(6)
    dim = 16
    centers = _topics(rng, 6, dim)
    vecs, times, _ = _topic_stream(rng, centers, 50, 2 * YEAR)
    type_ids = rng.choice([0, 1, 2, 3, 4], len(times))  # negatives are ignored here
    t = times.max() + DAY
    totals = []
    for seed in range(3):
        r = np.random.default_rng(100 + seed)
        state = MultiInterestState.empty(TYPES, dim, max_clusters=4, threshold=0.6)
        perm = r.permutation(len(times))
        for chunk in np.array_split(perm, 9):
            state.add(TYPES, type_ids[chunk], times[chunk], vecs[chunk])
        trend = state.trend.sum(0) * np.exp(-state.trend_rates * (t - state.landmark))
        totals.append((state.total_vector(t), state.total_mass(t), trend, state.counts.sum()))
    pos = np.isin(type_ids, POSITIVE)
    w = TYPES.weights[type_ids] * np.exp2(-(t - times) / TYPES.half_lives[type_ids]) * pos
    for vec, mass, trend, count in totals:
        assert _rel(vec, w @ vecs) < 1e-9
        assert mass == pytest.approx(w.sum(), rel=1e-9)
        assert _rel(trend, totals[0][2]) < 1e-9
        assert count == pos.sum()


def test_backfill_over_years_with_fast_decay_still_clusters():
    # A 1-hour half-life over three years: without chunked re-basing the early
    # events would underflow to zero and each would start its own cluster.
    types = EventTypes(np.array([1.0]), np.array([HOUR]))
    rng = np.random.default_rng(7)
    dim = 16
    centers = _topics(rng, 2, dim)
    vecs, times, _ = _topic_stream(rng, centers, 200, 3 * YEAR, noise=0.05)
    state = MultiInterestState.empty(types, dim, max_clusters=6, threshold=0.5)
    state.add(types, np.zeros(len(times), int), times, vecs)
    assert state.n_clusters == 2
    assert sorted(state.counts) == [200, 200]
    assert np.all(np.isfinite(state.sums))


@pytest.mark.parametrize("half_lives", [(HOUR, 365 * DAY), (365 * DAY, 3 * 365 * DAY)])
def test_a_backfill_over_years_keeps_every_rate_and_trend_exact(half_lives):
    """One batch over five years: the chunks re-base for the fastest rate,
    of the event types' and the 7-day trend's, so no exponent overflows."""
    types = EventTypes(np.array([1.0, 2.0]), np.array(half_lives))
    rng = np.random.default_rng(8)
    times = T0 + np.sort(rng.uniform(0, 5 * YEAR, 400))
    type_ids, vecs = rng.integers(0, 2, 400), rng.normal(size=(400, 4))
    state = MultiInterestState.empty(types, 4, max_clusters=3, threshold=0.3)
    state.add(types, type_ids, times, vecs)
    t = times.max() + DAY
    w = types.weights[type_ids] * np.exp2(-(t - times) / types.half_lives[type_ids])
    assert _rel(state.total_vector(t), w @ vecs) < 1e-9
    trend = state.trend.sum(0) * np.exp(-state.trend_rates * (t - state.landmark))
    want = [(types.weights[type_ids] * np.exp2(-(t - times) / h)).sum() for h in (7 * DAY, 90 * DAY)]
    # To 1e-6: a cluster of hour-long events is dropped with its trend masses once its importance underflows.
    np.testing.assert_allclose(trend, want, rtol=1e-6)


def test_negative_events_are_ignored_by_interests():
    state = MultiInterestState.empty(TYPES, 4)
    state.add(TYPES, [3, 4], [T0, T0 + 1], np.eye(4)[:2])
    assert state.n_clusters == 0 and np.isnan(state.landmark)
    assert state.centroids(T0).shape == (0, 4)
    scores = interest_scores(np.eye(4, dtype=np.float32), state.centroids(T0), state.importances(T0))
    assert scores.tolist() == [0.0] * 4
    assert state.trends().shape == (0,) and state.trend_labels().shape == (0,)
    assert state.shares(T0).shape == (0,)


def test_interest_state_arrays_roundtrip_and_nbytes():
    rng = np.random.default_rng(8)
    dim = 8
    vecs, times, _ = _topic_stream(rng, _topics(rng, 3, dim), 10, 5 * DAY)
    state = MultiInterestState.empty(TYPES, dim, max_clusters=5)
    state.add(TYPES, np.ones(len(times), int), times, vecs)
    buf = io.BytesIO()
    np.savez(buf, **state.to_arrays())
    buf.seek(0)
    back = MultiInterestState.from_arrays(np.load(buf))
    t = times.max()
    np.testing.assert_array_equal(back.centroids(t), state.centroids(t))
    np.testing.assert_array_equal(back.importances(t), state.importances(t))
    assert (back.max_clusters, back.threshold) == (5, state.threshold)
    k, r = state.n_clusters, TYPES.rates.shape[0]
    assert state.nbytes == 8 * (k * r * dim + k * r + 2 * k + k + k + r + 2 + 3)
    # Adding more after a round trip continues the same way.
    more_t = times.max() + np.arange(3) * HOUR
    state.add(TYPES, [0, 0, 0], more_t, vecs[:3])
    back.add(TYPES, [0, 0, 0], more_t, vecs[:3])
    np.testing.assert_allclose(back.total_vector(t + DAY), state.total_vector(t + DAY), rtol=1e-12)


def test_interest_scores_formulas():
    rng = np.random.default_rng(9)
    dim, n, k = 16, 40, 3
    items = normalize(rng.normal(size=(n, dim)))
    cent = normalize(rng.normal(size=(k, dim)))
    imp = np.array([3.0, 1.0, 0.5])
    share = imp / imp.sum()
    cos = items.astype(np.float64) @ cent.T.astype(np.float64)
    np.testing.assert_allclose(interest_scores(items, cent, imp, "sum"), cos @ share, atol=1e-5)
    max_scores = interest_scores(items, cent, imp, "max", alpha=0.5)
    np.testing.assert_allclose(max_scores, (cos * share**0.5).max(1), atol=1e-5)
    # α = 1 unless asked: the best share-weighted cosine.
    np.testing.assert_allclose(interest_scores(items, cent, imp, "max"), (cos * share).max(1), atol=1e-5)
    # Interests that all weigh 0 score nothing, in either mode (no NaN).
    for mode in ("sum", "max"):
        assert interest_scores(items, cent, np.zeros(k), mode).tolist() == [0.0] * n
    with pytest.raises(ValueError):
        interest_scores(items, cent, imp, "mean")
    for mode in ("sum", "max"):  # no interests: zeros
        none = interest_scores(items, np.zeros((0, dim), np.float32), np.zeros(0), mode)
        assert none.dtype == np.float32 and none.tolist() == [0.0] * n


def test_a_cluster_worth_nothing_gives_its_slot_to_live_ones():
    """With a 1-minute half-life, an event 20 hours old is worth e^-831 of
    its weight: 0 in float64. Its cluster used to keep one of the K slots
    (a zero vector no event can join), so two unlike live interests merged."""
    types = EventTypes(np.array([1.0]), np.array([60.0]))
    rng = np.random.default_rng(11)
    a, b = _topics(rng, 2, 16)
    across = rng.normal(size=16)
    across -= (across @ b) * b
    c = normalize(b + 2 * normalize(across))  # cos(b, c) = 1/sqrt(5): under the threshold, yet more than a zero vector's
    state = MultiInterestState.empty(types, 16, max_clusters=2, threshold=0.5)
    state.add(types, [0], [T0], a[None])
    state.add(types, [0, 0], [T0 + 20 * HOUR, T0 + 20 * HOUR + 1], np.stack([b, c]))
    assert state.counts.tolist() == [1, 1]
    assert np.all(state.importances(T0 + 20 * HOUR + 1) > 0)
    np.testing.assert_allclose(np.diag(state.centroids(T0 + 20 * HOUR + 1) @ np.stack([b, c]).T), 1, atol=1e-6)


def test_an_event_too_late_to_be_worth_anything_joins_no_cluster():
    types = EventTypes(np.array([1.0]), np.array([60.0]))
    rng = np.random.default_rng(12)
    a, b = _topics(rng, 2, 16)
    state = MultiInterestState.empty(types, 16, max_clusters=4, threshold=0.5)
    state.add(types, [0], [T0], a[None])
    state.add(types, [0], [T0 - 30 * DAY], b[None])  # worth e^-35000 of its weight at T0
    assert state.n_clusters == 1 and state.counts.tolist() == [1]


@pytest.mark.parametrize("state, n", [("multi", 3000), ("single", 20000)])
def test_adding_a_long_batch_takes_far_less_memory_than_its_vectors(state, n):
    """A replay adds a user's whole log as one batch: float64 copies of all its
    vectors (and, for the clusters, of their unit rows) took ~1.2 GB for 100k
    events. Rows are now taken one at a time, or a chunk of events at a time."""
    import tracemalloc

    from halflife.config import Config

    types = Config().decay_types()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 384)).astype(np.float32)
    times = np.sort(rng.uniform(0, 1e7, n)) + 1.7e9
    type_ids = rng.integers(0, len(types.weights), n)
    profile = (MultiInterestState if state == "multi" else ProfileState).empty(types, 384)
    tracemalloc.start()
    try:
        profile.add(types, type_ids, times, vectors)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < vectors.nbytes / 2  # before: 3.4x (clusters) and 2.1x (one profile) the float32 input


def _reference_cluster_sizes(types, type_ids, times, vectors, max_clusters, threshold):
    """Brute force of MultiInterestState's assignment: each positive event,
    in time order, joins the cluster whose decayed vector, summed from the
    cluster's own events and read at max(its time, the newest so far), has
    the highest cosine with it, if that reaches the threshold; else it starts
    one, and past K clusters the two most alike merge. Returns the sizes."""
    weights = types.weights[type_ids]
    rates = decay_rates(types.half_lives)[type_ids]
    clusters: list[list[int]] = []
    newest = -np.inf

    def direction(members, t_read):
        decayed = sum(weights[i] * np.exp(-rates[i] * (t_read - times[i])) * vectors[i] for i in members)
        return decayed / np.linalg.norm(decayed)

    for e in np.argsort(times, kind="stable"):
        if weights[e] <= 0:
            continue
        t_read = max(times[e], newest)
        unit = vectors[e] / np.linalg.norm(vectors[e])
        cosines = [direction(members, t_read) @ unit for members in clusters]
        if cosines and max(cosines) >= threshold - 1e-6:
            clusters[int(np.argmax(cosines))].append(e)
        else:
            clusters.append([e])
            if len(clusters) > max_clusters:
                directions = np.stack([direction(members, t_read) for members in clusters[:-1]] + [unit])
                similar = directions @ directions.T
                np.fill_diagonal(similar, -np.inf)
                a, b = sorted(np.unravel_index(int(np.argmax(similar)), similar.shape))
                clusters[a] += clusters.pop(b)
        newest = max(newest, times[e])
    return [len(members) for members in clusters]


@pytest.mark.parametrize("seed", range(12))
def test_events_join_the_clusters_a_brute_force_reading_of_every_centroid_picks(seed):
    """The loop reads cosines from unnormalised centroids (2.7x faster an
    event when events join clusters); the choices must stay those of
    decayed vectors summed and normalised from scratch at every event."""
    rng = np.random.default_rng(seed)
    n, dim = int(rng.integers(20, 200)), 16
    topics = _topics(rng, int(rng.integers(1, 8)), dim)
    vectors = normalize(topics[rng.integers(0, len(topics), n)] + rng.choice([0.05, 0.2]) * rng.normal(size=(n, dim)))
    times = T0 + rng.uniform(0, float(rng.choice([DAY, 60 * DAY])), n)
    type_ids = rng.choice([0, 1, 2, 3], n)  # skips (weight < 0) are left out of the clusters
    k, threshold = int(rng.integers(1, 6)), float(rng.choice([0.5, 0.8]))
    state = MultiInterestState.empty(TYPES, dim, max_clusters=k, threshold=threshold)
    half = n // 2  # in two batches, as a cached profile takes events
    order = np.argsort(times)
    for part in (order[:half], order[half:]):
        state.add(TYPES, type_ids[part], times[part], vectors[part])
    assert state.counts.tolist() == _reference_cluster_sizes(TYPES, type_ids, times, vectors, k, threshold)


@pytest.mark.parametrize("scale", [1e-170, 1e170], ids=["decayed", "huge"])
def test_an_event_joins_a_cluster_past_what_squares_can_hold(scale):
    """A cluster's entries near 1e-160 square to 0 in float64 (hundreds of
    half-lives of decay), near 1e160 to inf (a library caller's huge
    vectors): its cosines are then read from its normalised centroid, as
    before (divided by a zero norm, any event on its side joined it; by an
    infinite one, none did)."""
    rng = np.random.default_rng(13)
    a, c = _topics(rng, 2, 16)
    c = c if a @ c > 0 else -c  # unlike a (cosine well under the threshold), yet on its side
    state = MultiInterestState.empty(TYPES, 16, max_clusters=4, threshold=0.9)
    state.add(TYPES, [0], [T0], a[None])
    state.sums *= scale
    state.masses *= scale
    state.add(TYPES, [0], [T0 + 1], c[None])
    assert state.counts.tolist() == [1, 1]
    state.add(TYPES, [0], [T0 + 2], a[None])
    assert state.counts.tolist() == [2, 1]


@pytest.mark.parametrize("scale", [1e-170, 1e160], ids=["tiny", "huge"])
def test_events_cluster_by_direction_whatever_their_scale(scale):
    """A library caller's event vectors may be far from unit length: squared,
    1e-170 underflows to 0 and 1e160 overflows, which made every event
    alike (tiny) or none alike (huge). Directions are what cluster."""
    same, apart = np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 0.0], [1.0, 1.0]])  # cosines 1 and 0.71
    for vectors, counts in ((same, [2]), (apart, [1, 1])):
        state = MultiInterestState.empty(TYPES, 2, max_clusters=4, threshold=0.9)
        state.add(TYPES, [0, 0], [T0, T0 + 1], vectors * scale)
        assert state.counts.tolist() == counts


def test_directions_and_shares_outlive_the_importances_underflow():
    """Read ~1,074 half-lives after its events, a cluster's importance is
    near float64's floor (a 1-minute half-life: 18 hours): the interest
    signal, a share-weighted cosine, shrank to 0 there and the centroids
    turned to noise. Directions and shares ignore the decay all clusters
    share, so they read as they did 10 half-lives in."""
    rng = np.random.default_rng(21)
    a, c = _topics(rng, 2, 16)
    state = MultiInterestState.empty(TYPES, 16, max_clusters=4, threshold=0.9)
    state.add(TYPES, [0, 0, 0], [T0, T0 + 1, T0 + 2], np.stack([a, a, c]))
    assert state.counts.tolist() == [2, 1]
    half_life = TYPES.half_lives[0]  # slower types exist, which the user has no events of
    assert half_life < TYPES.half_lives.max()
    near = T0 + 10 * half_life
    items = _topics(rng, 50, 16)
    np.testing.assert_allclose(state.shares(near), [2 / 3, 1 / 3], rtol=1e-5)  # two events to one, a second apart
    for far in (T0 + 1074 * half_life, T0 + 1400 * half_life):
        assert state.importances(far).max() < 1e-300
        np.testing.assert_allclose(state.centroids(far), state.centroids(near), atol=1e-6)
        np.testing.assert_allclose(state.shares(far), state.shares(near), rtol=1e-12)
        np.testing.assert_allclose(interest_scores(items, state.centroids(far), state.shares(far)),
                                   interest_scores(items, state.centroids(near), state.shares(near)), atol=1e-6)
    far = T0 + 1074 * half_life  # interest_scores reads raw importances alike while they are above 0
    np.testing.assert_allclose(interest_scores(items, state.centroids(far), state.importances(far)),
                               interest_scores(items, state.centroids(near), state.shares(near)), atol=1e-6)


def test_a_profile_keeps_its_direction_long_after_its_strength_underflows():
    """The single-vector profile's direction, read as `shares` are: its
    vector underflows with its strength."""
    rng = np.random.default_rng(22)
    (a,) = _topics(rng, 1, 16)
    state = ProfileState.empty(TYPES, 16)
    state.add(TYPES, [0], [T0], a[None])  # a click, the fastest positive type
    unit = lambda v: v / np.linalg.norm(v)
    for far in (T0 + 1074 * TYPES.half_lives[0], T0 + 1400 * TYPES.half_lives[0]):
        assert state.strength(far) < 1e-300 and not state.vector(far).any()
        np.testing.assert_allclose(unit(state.direction(far)), a, atol=1e-9)
    assert not ProfileState.empty(TYPES, 16).direction(T0).any()


def test_negative_feedback_counts_until_its_weight_is_0_whatever_events_came_later():
    """A skip (1-day half-life) 1,100 days old weighs 0 in float64: its
    direction read as the skip's until a later event re-based the profile,
    and zeros after, so the same skip sank items or not by history."""
    rng = np.random.default_rng(23)
    a, b = _topics(rng, 2, 16)
    state = ProfileState.empty(TYPES, 16)
    state.add(TYPES, [1, 3], [T0, T0], np.stack([a, b]))  # a like (30 days) keeps the profile alive
    unit = lambda v: v / np.linalg.norm(v)
    assert state.negative_strength(T0 + 1000 * DAY) > 0
    np.testing.assert_allclose(unit(state.negative_direction(T0 + 1000 * DAY)), b, atol=1e-9)
    far = T0 + 1100 * DAY
    assert state.negative_strength(far) == 0 and state.strength(far) > 0
    assert not state.negative_direction(far).any()
    state.add(TYPES, [1], [far - DAY], a[None])  # moves the landmark past the skip
    assert not state.negative_direction(far).any()


def test_an_event_so_late_its_worth_underflowed_still_counts_in_the_cluster_it_joins():
    """A click (1-minute half-life) a day late weighs 0 against the landmark:
    it was dropped, its count and trend masses with it, where in time order
    it had joined a cluster another type keeps alive (a core review)."""
    minute, day, t0 = 60.0, 86400.0, 1.7e9
    types = EventTypes.from_dict({"click": (1.0, minute), "like": (3.0, 90 * day)})
    v, u = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])

    def state(batches):
        s = MultiInterestState.empty(types, 2, max_clusters=8, threshold=0.6)
        for type_, t, vector in batches:
            s.add(types, [type_], [t], vector)
        return s

    like, click, later = (1, t0, v), (0, t0, v), (1, t0 + day, u)
    in_order, click_late = state([like, click, later]), state([like, later, click])
    np.testing.assert_array_equal(in_order.counts, click_late.counts)
    np.testing.assert_allclose(in_order.trend.sum(axis=0), click_late.trend.sum(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(in_order.last_time, click_late.last_time)


def test_late_events_worth_nothing_count_in_their_cluster_as_in_time_order_whatever_their_batch():
    """Three clicks a day late, in one batch, of two clusters: each adds its
    own trend masses and count to its own, and a cluster's last time stays
    its newest event's."""
    minute, day, t0 = 60.0, 86400.0, 1.7e9
    types = EventTypes.from_dict({"click": (1.0, minute), "like": (3.0, 90 * day)})
    v, u = [1.0, 0.0], [0.0, 1.0]
    batches = {"likes": ([1, 1], [t0 + 1, t0 + 2], [v, u]), "later": ([1], [t0 + day], [u]),
               "clicks": ([0, 0, 0], [t0, t0 + 0.05 * day, t0 + 0.1 * day], [v, u, v])}  # 20+ hours late
    states = []
    for order in (("likes", "clicks", "later"), ("likes", "later", "clicks")):
        state = MultiInterestState.empty(types, 2, max_clusters=8, threshold=0.6)
        for name in order:
            state.add(types, *batches[name])
        states.append(state)
    in_order, late = states
    assert late.counts.tolist() == in_order.counts.tolist() == [3, 3]
    np.testing.assert_allclose(late.trend, in_order.trend, rtol=1e-12)
    assert late.last_time.tolist() == in_order.last_time.tolist() == [t0 + 0.1 * day, t0 + day]


def test_a_late_event_is_compared_with_clusters_read_at_the_newest_event_seen_in_every_batch():
    """A late event meets each cluster read at the newest event already seen
    (the class docstring), also after other late events of its batch: read at
    its own time, a fast-decaying part of a cluster that has long faded would
    still pull it in. Many late events go first, so it is read in a later
    block of rows than they are."""
    day = 86400.0
    types = EventTypes.from_dict({"click": (3.0, 1 * day), "like": (1.0, 1000 * day)})
    x, y, z = np.eye(3)
    state = MultiInterestState.empty(types, 3, max_clusters=8, threshold=0.5)
    # One interest: a like along x and a click mostly along y (cosine 0.6 with x): read then, its
    # direction is 2.8x + 2.4y (cosine 0.65 with y); a month on, the click has faded to 2^-30: x.
    state.add(types, [1, 0], [T0, T0 + 1], np.stack([x, 0.6 * x + 0.8 * y]))
    state.add(types, [1], [T0 + 30 * day], z[None])  # the newest event: another interest
    assert state.counts.tolist() == [2, 1]
    n_late = 200
    late_times = T0 + 2 + np.arange(n_late + 1, dtype=np.float64)
    late = np.vstack([np.tile(z, (n_late, 1)), y])  # ... the last of them along y, 3 minutes after the click
    state.add(types, np.ones(n_late + 1, dtype=np.int64), late_times, late)
    # Read a month on, the first interest is x alone: y starts its own.
    assert state.counts.tolist() == [2, 1 + n_late, 1]
