"""User profiles from forward-decayed events, pure NumPy.

`ProfileState`: one decayed profile vector per user plus a separate negative
one (dislikes, skips). `MultiInterestState`: up to K interest clusters per
user (PinnerSage-style), each with its own decayed vector, importance and
trend. Both keep their state as plain arrays (`to_arrays`/`from_arrays`), so
storage can persist them with np.savez or tobytes.

Methods that add events mutate the state in place. All sums are float64 and
stored against a shared landmark (see `halflife.core.decay`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from halflife.core.decay import (
    SAFE_EXPONENT,
    EventTypes,
    decay_factors,
    decay_rates,
    forward_weights,
    landmark_for,
    rate_one_hot,
    read_factors,
    relative_read_factors,
)
from halflife.core.ranking import normalize, row_dots

# float32 centroids put the cosine of two equal directions a few ulps under 1:
# cluster_threshold = 1 must still join identical events.
_COSINE_SLACK = 1e-6

DAY = 86400.0
TREND_HALF_LIVES = (7 * DAY, 90 * DAY)  # short and long horizon of a cluster's trend
TREND_BAND = 0.05  # |trend| above this is "rising"/"fading", else "steady"

_EPS = 1e-300
# A centroid whose squared norm is below this, or above its inverse, is
# normalised row by row (as `normalize` does, by its largest entry first):
# squares of entries near 1e-150 (a cluster hundreds of half-lives old)
# underflow, and of entries near 1e155 (library callers' huge vectors) overflow.
_TINY_SQUARE = 1e-250
# Events whose float64 rows, unit rows and read factors are made at once in
# the assignment loop: one NumPy call for many, at 64 x d x 16 bytes (0.4 MB at 384-d).
_ROWS_AT_ONCE = 64
_GEMM_EVENTS = 4096  # events per float64 product when a profile adds a batch


def _check_rates(types: EventTypes, rates: np.ndarray) -> None:
    if not np.array_equal(types.rates, rates):
        raise ValueError("event types' half-lives do not match the state's decay rates")


def _scalar(arrays, name: str) -> float:
    return float(np.asarray(arrays[name]))


@dataclass
class ProfileState:
    """One user's decayed profile, positive and negative, against one landmark.

    rates: (R,) distinct decay rates (EventTypes.rates); landmark: NaN while
    empty; sums / neg_sums: (R, d) float64 forward-decayed Σ|w|·e^{λ(t_i-L)}·v;
    masses / neg_masses: (R,) the same without v (decayed total weight).
    Events with negative type weight go to the negative side only, weight 0
    events are ignored.
    """

    rates: np.ndarray
    landmark: float
    sums: np.ndarray
    masses: np.ndarray
    neg_sums: np.ndarray
    neg_masses: np.ndarray

    @classmethod
    def empty(cls, types: EventTypes, dim: int) -> "ProfileState":
        r = types.rates.shape[0]
        return cls(
            types.rates.copy(),
            float("nan"),
            np.zeros((r, dim)),
            np.zeros(r),
            np.zeros((r, dim)),
            np.zeros(r),
        )

    @property
    def dim(self) -> int:
        return self.sums.shape[1]

    def _rebase(self, new_landmark: float) -> None:
        if not np.isnan(self.landmark) and new_landmark != self.landmark:
            f = decay_factors(self.rates, self.landmark, new_landmark)
            self.sums *= f[:, None]
            self.neg_sums *= f[:, None]
            self.masses *= f
            self.neg_masses *= f
        self.landmark = float(new_landmark)

    def add(self, types: EventTypes, type_ids, times, vectors, bound: float = SAFE_EXPONENT) -> None:
        """Adds a batch of events in any order (late ones included).

        type_ids: (n,) ints into `types`; times: (n,) seconds; vectors: (n, d).
        """
        _check_rates(types, self.rates)
        type_ids = np.asarray(type_ids, dtype=np.int64)
        if type_ids.size == 0:
            return
        times = np.asarray(times, dtype=np.float64)
        vectors = np.asarray(vectors)
        w = types.weights[type_ids]
        r_idx = types.rate_index[type_ids]
        self._rebase(landmark_for(self.landmark, times, float(self.rates.max()), bound))
        coeffs = forward_weights(times, self.rates[r_idx], np.abs(w), self.landmark)
        n_rates = self.rates.shape[0]
        # Positive and negative sides in one (2R, n) @ (n, d) GEMM, in float64,
        # a chunk of events at a time: a 100k-event replay's float64 copy of
        # all its vectors took 307 MB.
        one_hot = np.concatenate(
            [
                rate_one_hot(r_idx, np.where(w > 0, coeffs, 0.0), n_rates),
                rate_one_hot(r_idx, np.where(w < 0, coeffs, 0.0), n_rates),
            ]
        )
        both = sum(one_hot[:, s : s + _GEMM_EVENTS] @ vectors[s : s + _GEMM_EVENTS].astype(np.float64, copy=False)
                   for s in range(0, vectors.shape[0], _GEMM_EVENTS))
        self.sums += both[:n_rates]
        self.neg_sums += both[n_rates:]
        mass = one_hot.sum(axis=1)
        self.masses += mass[:n_rates]
        self.neg_masses += mass[n_rates:]

    def _factors(self, t: float) -> np.ndarray:
        return read_factors(self.rates, self.landmark, t)

    def vector(self, t: float) -> np.ndarray:
        """Decayed positive profile Σ w·2^{-(t-t_i)/h}·v at t. Returns (d,) float64."""
        return self._factors(t) @ self.sums

    def negative_vector(self, t: float) -> np.ndarray:
        """Decayed negative profile Σ |w|·2^{-(t-t_i)/h}·v at t. Returns (d,) float64."""
        return self._factors(t) @ self.neg_sums

    def direction(self, t: float) -> np.ndarray:
        """`vector`'s direction, read without the decay all of it shares (see
        `relative_read_factors`): (d,) float64, not normalised, zeros when empty."""
        return relative_read_factors(self.rates, self.landmark, t, self.masses != 0) @ self.sums

    def negative_direction(self, t: float) -> np.ndarray:
        """`negative_vector`'s direction, as `direction`, while its decayed
        weight at t is above 0; then zeros. Past that, it counted in full
        until a later event's re-base zeroed its sums, so whether old
        negative feedback sank items depended on the event history (a review)."""
        if not self.negative_strength(t) > 0:
            return np.zeros(self.dim)
        return relative_read_factors(self.rates, self.landmark, t, self.neg_masses != 0) @ self.neg_sums

    def strength(self, t: float) -> float:
        """Total decayed positive weight at t (how much we know right now)."""
        return float(self._factors(t) @ self.masses)

    def negative_strength(self, t: float) -> float:
        """Total decayed negative weight at t (Σ |w|·decay of the negative events)."""
        return float(self._factors(t) @ self.neg_masses)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "rates": self.rates,
            "landmark": np.array(self.landmark),
            "sums": self.sums,
            "masses": self.masses,
            "neg_sums": self.neg_sums,
            "neg_masses": self.neg_masses,
        }

    @classmethod
    def from_arrays(cls, arrays) -> "ProfileState":
        return cls(
            np.array(arrays["rates"], dtype=np.float64),
            _scalar(arrays, "landmark"),
            np.array(arrays["sums"], dtype=np.float64),
            np.array(arrays["masses"], dtype=np.float64),
            np.array(arrays["neg_sums"], dtype=np.float64),
            np.array(arrays["neg_masses"], dtype=np.float64),
        )

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.to_arrays().values())


def negative_fade(positive_strength: float, negative_strength: float, full_share: float) -> float:
    """How much of its weight negative feedback has: 1 while its share of
    the profile's decayed weight, N / (P + N) (P positive, N negative, each
    Σ |w|·decay), is at least `full_share`, else share / full_share, so it
    fades as its events decay and newer positive feedback outweighs it, as
    interest does; 0 without negative weight; full_share 0: never fades.
    Until 2026-12-07 a skip a year old (52 of its 7-day half-lives) sank
    similar items by the full β however many likes came after."""
    if not negative_strength > 0:
        return 0.0
    share = negative_strength / (positive_strength + negative_strength)
    return 1.0 if share >= full_share else share / full_share


@dataclass
class MultiInterestState:
    """Up to K interest clusters for one user (PinnerSage-style), online.

    A positive event joins the cluster whose centroid (its decayed vector read
    at the event's time, or at the newest event already seen if that is later,
    so a late event is never compared with up-weighted "future" events) has
    cosine >= `threshold` with it, else it starts a new cluster; past K
    clusters the two most similar merge (their sums add). Events are assigned
    in time order within a batch.

    The decayed sums are exact and order-independent *in total* (Σ over
    clusters of vectors, masses and trend masses is the same for any arrival
    order); only which cluster an event lands in depends on arrival order.
    Events with weight <= 0 are ignored here (see `ProfileState`), and so
    is a cluster once its importance underflows to 0 (some 1,075 half-lives
    after its last event): it is dropped, with its trend masses.

    Arrays (k <= K active clusters, R rates, d dims):
      rates (R,), trend_rates (2,) for the short/long trend half-lives,
      sums (k, R, d) float64, masses (k, R) decayed importance per rate,
      trend (k, 2) decayed mass under the trend half-lives, counts (k,) int64,
      last_time (k,) latest event time; landmark: NaN while empty.
    """

    rates: np.ndarray
    trend_rates: np.ndarray
    max_clusters: int
    threshold: float
    landmark: float
    sums: np.ndarray
    masses: np.ndarray
    trend: np.ndarray
    counts: np.ndarray
    last_time: np.ndarray

    @classmethod
    def empty(
        cls,
        types: EventTypes,
        dim: int,
        max_clusters: int = 8,
        threshold: float = 0.5,
        trend_half_lives: tuple[float, float] = TREND_HALF_LIVES,
    ) -> "MultiInterestState":
        if max_clusters < 1:
            raise ValueError("max_clusters must be at least 1")
        r = types.rates.shape[0]
        return cls(
            types.rates.copy(),
            decay_rates(np.asarray(trend_half_lives, dtype=np.float64)),
            int(max_clusters),
            float(threshold),
            float("nan"),
            np.zeros((0, r, dim)),
            np.zeros((0, r)),
            np.zeros((0, 2)),
            np.zeros(0, dtype=np.int64),
            np.zeros(0),
        )

    @property
    def n_clusters(self) -> int:
        return self.sums.shape[0]

    @property
    def dim(self) -> int:
        return self.sums.shape[2]

    def add(self, types: EventTypes, type_ids, times, vectors, bound: float = SAFE_EXPONENT) -> None:
        """Adds a batch of events (any order; assigned in time order).

        type_ids: (n,); times: (n,) seconds; vectors: (n, d). The decayed sums
        are vectorized per chunk; the assignment loop runs over the batch's
        events (each assignment depends on the ones before it), each step
        vectorized over the clusters.
        """
        _check_rates(types, self.rates)
        type_ids = np.asarray(type_ids, dtype=np.int64)
        w = types.weights[type_ids] if type_ids.size else np.zeros(0)
        keep = w > 0
        if not keep.any():
            return
        times = np.asarray(times, dtype=np.float64)[keep]
        order = np.argsort(times, kind="stable")
        t = times[order]
        w = w[keep][order]
        r_idx = types.rate_index[type_ids[keep]][order]
        # Rows are taken one at a time as the loop reaches them: float64 copies of
        # them all (and their unit rows) took 4 x 307 MB for a 100k-event replay.
        vectors = np.asarray(vectors)
        rows = np.flatnonzero(keep)[order]

        rates, trend_rates = self.rates, self.trend_rates
        max_rate = float(max(rates.max(), trend_rates.max()))
        n_rates, dim, cap = rates.shape[0], self.dim, self.max_clusters + 1
        # Working copies with one spare row for the cluster that forces a merge;
        # the state is only replaced once the whole batch went through.
        k = self.n_clusters
        sums = np.zeros((cap, n_rates, dim))
        masses = np.zeros((cap, n_rates))
        trend = np.zeros((cap, 2))
        counts = np.zeros(cap, dtype=np.int64)
        last_time = np.full(cap, -np.inf)
        sums[:k], masses[:k], trend[:k] = self.sums, self.masses, self.trend
        counts[:k], last_time[:k] = self.counts, self.last_time
        landmark = self.landmark
        newest = float(last_time[:k].max()) if k else -np.inf

        def drop(c: int, k: int) -> int:
            """Removes cluster c of the first k, the others keeping their order; returns k - 1."""
            for arr in (sums, masses, trend, counts, last_time):
                arr[c : k - 1] = arr[c + 1 : k]
            return k - 1

        def merge_closest(directions: np.ndarray, k: int) -> int:
            """Merges the two of the first k clusters whose unit `directions`
            (k, d) are closest into the earlier one; returns k - 1."""
            sim = directions @ directions.T
            np.fill_diagonal(sim, -np.inf)
            a, b = sorted(np.unravel_index(int(np.argmax(sim)), sim.shape))
            sums[a] += sums[b]
            masses[a] += masses[b]
            trend[a] += trend[b]
            counts[a] += counts[b]
            last_time[a] = max(last_time[a], last_time[b])
            return drop(b, k)

        def cosines(f: np.ndarray, k: int, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Unit row u's cosine with each cluster's vector read with the
            factors f (k,), and those vectors (k, d), not normalised: the
            cosines come from their dot products and squared norms, a few
            NumPy calls fewer an event than normalising them."""
            centroids = np.matmul(f, sums[:k])  # (R,) x (k, R, d): 2.7 us where einsum took 4.2
            squares = np.vecdot(centroids, centroids)  # inf past ~1e154: see the loop's errstate
            if _TINY_SQUARE < squares.min() and squares.max() < 1 / _TINY_SQUARE:
                return (centroids @ u) / np.sqrt(squares), centroids
            return normalize(centroids, dtype=np.float64) @ u, centroids

        i, n = 0, t.shape[0]
        while i < n:
            # Chunks keep every exponent within [-bound, bound]: a backfill that
            # spans years re-bases as it goes, so early events do not underflow
            # before they are compared with the clusters.
            if np.isnan(landmark) or max_rate * (t[i] - landmark) > bound:
                j = i + int(np.searchsorted(max_rate * (t[i:] - t[i]), bound, side="right"))
                new_landmark = float(t[j - 1])
                if not np.isnan(landmark):
                    f = decay_factors(rates, landmark, new_landmark)
                    sums[:k] *= f[:, None]
                    masses[:k] *= f
                    trend[:k] *= decay_factors(trend_rates, landmark, new_landmark)
                    # A cluster whose importance underflowed to 0 is worth
                    # nothing from now on and no event can join it: free its slot.
                    for c in np.flatnonzero(~masses[:k].any(axis=1))[::-1]:
                        k = drop(int(c), k)
                landmark = new_landmark
            else:
                j = i + int(np.searchsorted(max_rate * (t[i:] - landmark), bound, side="right"))
            coeffs = forward_weights(t[i:j], rates[r_idx[i:j]], w[i:j], landmark)
            trend_coeffs = w[i:j, None] * np.exp(trend_rates * (t[i:j, None] - landmark))
            for start in range(i, j, _ROWS_AT_ONCE):
                stop = min(j, start + _ROWS_AT_ONCE)
                v_rows = vectors[rows[start:stop]].astype(np.float64)
                unit_rows = normalize(v_rows, dtype=np.float64)  # by the peak first: any scale's direction
                # Clusters are read at the event's time, or at the newest event
                # seen if that is later (t is sorted: the newest before the rows).
                # Directions only, so the exponents are shifted: no overflow.
                expo = -rates * (np.maximum(t[start:stop], newest)[:, None] - landmark)
                row_factors = np.exp(expo - expo.max(axis=1, keepdims=True))
                block_coeffs = coeffs[start - i : stop - i].tolist()
                # A huge centroid's squared norm overflows to inf, read as such (`cosines`):
                # errstate once a block, where once an event cost ~1 us of the ~6.
                with np.errstate(over="ignore"):
                    for row, (coeff, t_e, rate) in enumerate(zip(block_coeffs, t[start:stop].tolist(),
                                                                 r_idx[start:stop].tolist())):
                        c = -1
                        if k:
                            cos, centroids = cosines(row_factors[row], k, unit_rows[row])
                            best = int(cos.argmax())
                            if cos[best] >= self.threshold - _COSINE_SLACK:
                                c = best
                        if coeff == 0:
                            # So late that its worth under its own half-life underflowed: it would start a
                            # cluster worth nothing. One it joins takes its count and trend masses (7 and 90
                            # days), as in time order: dropped, they depended on arrival order (a review).
                            if c >= 0:
                                trend[c] += trend_coeffs[start - i + row]
                                counts[c] += 1
                                last_time[c] = max(last_time[c], t_e)
                            continue
                        if c < 0:
                            c, k = k, k + 1
                            sums[c], masses[c], trend[c], counts[c], last_time[c] = 0.0, 0.0, 0.0, 0, -np.inf
                        sums[c, rate] += coeff * v_rows[row]
                        masses[c, rate] += coeff
                        trend[c] += trend_coeffs[start - i + row]
                        counts[c] += 1
                        last_time[c] = max(last_time[c], t_e)
                        newest = max(newest, t_e)
                        if k > self.max_clusters:
                            # Only a new cluster (this event alone) can push k past the
                            # cap, and `newest` is now the time the others were read
                            # at: their directions are `centroids`, the new one's is this event's.
                            k = merge_closest(np.vstack([normalize(centroids, dtype=np.float64), unit_rows[row]]), k)
            i = j

        self.landmark = landmark
        self.sums, self.masses, self.trend = sums[:k].copy(), masses[:k].copy(), trend[:k].copy()
        self.counts, self.last_time = counts[:k].copy(), last_time[:k].copy()

    # --- reads at time t ------------------------------------------------------

    def _factors(self, t: float) -> np.ndarray:
        return read_factors(self.rates, self.landmark, t)

    def _relative_factors(self, t: float) -> np.ndarray:
        """`relative_read_factors`: read with `_factors`, the centroids turned
        to noise and the interest signal shrank to 0 ~1,000 half-lives after
        the events, while the profile still ranked as personalised."""
        return relative_read_factors(self.rates, self.landmark, t, (self.masses != 0).any(axis=0))

    def cluster_vectors(self, t: float) -> np.ndarray:
        """Each cluster's decayed vector sum at t. Returns (k, d) float64."""
        return np.einsum("krd,r->kd", self.sums, self._factors(t))

    def centroids(self, t: float) -> np.ndarray:
        """L2-normalised cluster centroids at t. Returns (k, d) float32."""
        return normalize(np.einsum("krd,r->kd", self.sums, self._relative_factors(t)))

    def importances(self, t: float) -> np.ndarray:
        """Decayed importance Σ w·2^{-(t-t_i)/h} per cluster at t. Returns (k,) float64."""
        return self.masses @ self._factors(t)

    def shares(self, t: float) -> np.ndarray:
        """Each cluster's share of the importances at t, read without their
        common decay (see `_relative_factors`): (k,) float64 summing to 1,
        zeros where no cluster has any."""
        return _shares(self.masses @ self._relative_factors(t), dtype=np.float64)

    def total_vector(self, t: float) -> np.ndarray:
        """Σ over clusters of the decayed vectors (independent of assignment). (d,)"""
        return self.cluster_vectors(t).sum(axis=0) if self.n_clusters else np.zeros(self.dim)

    def total_mass(self, t: float) -> float:
        """Σ over clusters of the `importances` at t (independent of assignment)."""
        return float(self.importances(t).sum())

    def trends(self) -> np.ndarray:
        """Short-horizon share of the user's decayed mass minus long-horizon
        share, per cluster. Decay scales a horizon's masses by one factor for
        every cluster, so the shares hold from the newest event on, and are
        read from the stored masses, each horizon scaled by its largest: read
        at t, the 7-day masses underflowed to 0 some 20 years after the
        events, and every interest read as fading. Returns (k,) float64 in [-1, 1]."""
        if self.n_clusters == 0:
            return np.zeros(0)
        peak = self.trend.max(axis=0, keepdims=True)
        scaled = self.trend / np.where(peak > 0, peak, 1)
        shares = scaled / np.maximum(scaled.sum(axis=0, keepdims=True), _EPS)
        return shares[:, 0] - shares[:, 1]

    def trend_labels(self, band: float = TREND_BAND) -> np.ndarray:
        """"rising" above +band, "fading" below -band, else "steady". (k,) str."""
        trend = self.trends()
        return np.where(trend > band, "rising", np.where(trend < -band, "fading", "steady"))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "rates": self.rates,
            "trend_rates": self.trend_rates,
            "max_clusters": np.array(self.max_clusters, dtype=np.int64),
            "threshold": np.array(self.threshold),
            "landmark": np.array(self.landmark),
            "sums": self.sums,
            "masses": self.masses,
            "trend": self.trend,
            "counts": self.counts,
            "last_time": self.last_time,
        }

    @classmethod
    def from_arrays(cls, arrays) -> "MultiInterestState":
        return cls(
            np.array(arrays["rates"], dtype=np.float64),
            np.array(arrays["trend_rates"], dtype=np.float64),
            int(np.asarray(arrays["max_clusters"])),
            _scalar(arrays, "threshold"),
            _scalar(arrays, "landmark"),
            np.array(arrays["sums"], dtype=np.float64),
            np.array(arrays["masses"], dtype=np.float64),
            np.array(arrays["trend"], dtype=np.float64),
            np.array(arrays["counts"], dtype=np.int64),
            np.array(arrays["last_time"], dtype=np.float64),
        )

    @property
    def nbytes(self) -> int:
        """Memory of the state's arrays in bytes (what storage will hold)."""
        return sum(a.nbytes for a in self.to_arrays().values())


INTEREST_MODES = ("sum", "max")


def interest_scores(
    items: np.ndarray, centroids: np.ndarray, importances, mode: str = "sum", alpha: float = 1.0
) -> np.ndarray:
    """Item scores from per-interest cosines weighted by importance share.

    items: (N, d) float32 normalised; centroids: (K, d) normalised;
    importances: (K,) >= 0. "sum": Σ_c share_c·cos_c (a smooth mix);
    "max": max_c share_c^α·cos_c (an item needs to fit one interest well;
    α < 1 flattens the shares so minor interests still surface).
    "sum" is linear in the centroids, so it is one pass over the rows
    against their share-weighted mix (Σ_c share_c·cos(c, x) = (Σ_c
    share_c·c)·x): the catalogue is read once, as for a single profile. "max"
    is one (N, d) @ (d, K) GEMM. Returns (N,) float32; zeros when K = 0.
    """
    if mode not in INTEREST_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {INTEREST_MODES}")
    items = np.asarray(items, dtype=np.float32)
    if np.shape(importances)[0] == 0:
        return np.zeros(items.shape[0], dtype=np.float32)
    if mode == "sum":
        return row_dots(items, interest_mix(centroids, importances))
    share = _shares(importances)
    return ((items @ np.asarray(centroids, dtype=np.float32).T) * share**np.float32(alpha)).max(axis=1)


def interest_mix(centroids: np.ndarray, importances) -> np.ndarray:
    """Σ_c share_c·c: the one vector that `interest_scores` "sum" scores
    rows against. centroids: (K, d); importances: (K,). Returns (d,) float32."""
    return _shares(importances) @ np.asarray(centroids, dtype=np.float32)


def _shares(importances, dtype=np.float32) -> np.ndarray:
    """importances divided by their sum, by their largest first: a sum below
    _EPS (decayed for ~1,000 half-lives) shrank every share."""
    imp = np.asarray(importances, dtype=np.float64)
    peak = float(imp.max(initial=0.0))
    imp = imp / peak if peak > 0 else imp
    return (imp / max(float(imp.sum()), _EPS)).astype(dtype)
