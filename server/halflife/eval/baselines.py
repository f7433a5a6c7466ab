"""Baselines in NumPy, all reading only events before the query time.

`History` is the event prefix before t (ratings and texts), kept up to date
by the runner as t moves forward, with the rated (user, item) pairs indexed
by user and by item: co-occurrence rows are counted on demand, so memory
grows with the events, not with N² (a dense N × N count took 380 MB for
ml-latest-small, 15-30 GB for ml-25m's or ml-32m's items). Each baseline
maps (history, user, t) to (N,) scores.

- popularity: ratings per item (all values: a rating is a consumption).
- trending: the same, decayed with a 7-day half-life.
- last_item: cosine with the user's last positively rated item.
- static_profile: cosine with Σ of positively rated item vectors (λ = 0).
- item_knn: Σ over positively rated items of cosine co-occurrence similarity.
- sar: SAR (Microsoft Recommenders): affinity = Σ rating · 2^(−age/30 d)
  over every rated item, times jaccard co-occurrence similarity.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from halflife.core.cooccurrence import spans
from halflife.core.ranking import cosine_scores
from halflife.eval.data import POSITIVE_MIN, RATING, EvalData, run_starts

DAY = 86400.0
ROW_BUDGET = 1 << 23  # co-occurrence pairs (and counts) per pass of History._count_rows: ~64 MB of int64
ROW_CACHE = 256 << 20  # bytes of co-occurrence rows History keeps for reuse at one t


class History:
    """Events strictly before a moving time t (advance only)."""

    def __init__(self, data: EvalData, vectors: np.ndarray):
        self.data = data
        self.vectors = vectors
        self.n = 0
        # Each distinct rated (user, item) pair, in the order of its first rating, indexed by item and by
        # user (CSR, each run in that order): the pairs before t are the first `raters[i]` of item i's run
        # and the first `rated[u]` of user u's.
        rated = np.flatnonzero(data.kinds == RATING)
        n_users, user_rows = len(data.by_user.code), data.by_user.codes[rated]
        _, first = np.unique(user_rows.astype(np.int64) * data.n_items + data.items[rated], return_index=True)
        first.sort()
        self._pair_events = rated[first]
        self._pair_users, self._pair_items = user_rows[first].astype(np.int64), data.items[rated][first]
        self._item_users = self._pair_users[np.argsort(self._pair_items, kind="stable")]
        self._user_items = self._pair_items[np.argsort(self._pair_users, kind="stable")]
        self._item_start = run_starts(self._pair_items, data.n_items)
        self._user_start = run_starts(self._pair_users, n_users)
        self.raters = np.zeros(data.n_items, dtype=np.int64)  # C[i, i]: users who rated i before t
        self._rated = np.zeros(n_users, dtype=np.int64)  # items each user rated before t
        self._pairs = 0
        self._popularity = np.zeros(data.n_items)  # ratings per item before t (rating_counts)
        self._rows: dict[int, np.ndarray] = {}  # item -> C[item, :] at the current pairs (see cooccurrence)

    def advance(self, t: float) -> None:
        n = self.data.before(t)
        if n < self.n:
            raise ValueError("History only moves forward")
        pairs = int(np.searchsorted(self._pair_events, n))
        self.raters += np.bincount(self._pair_items[self._pairs : pairs], minlength=self.raters.size)
        rated = self.n + np.flatnonzero(self.data.kinds[self.n : n] == RATING)
        if rated.size:  # a new array: one handed out before stays as it was
            self._popularity = self._popularity + np.bincount(self.data.items[rated], minlength=self.data.n_items)
        self._rated += np.bincount(self._pair_users[self._pairs : pairs], minlength=self._rated.size)
        if pairs != self._pairs:
            self._rows.clear()
        self.n, self._pairs = n, pairs

    def cooccurrence(self, items: np.ndarray) -> np.ndarray:
        """C[items, :] before t, C[i, j] = users who rated both i and j (C[i, i]
        = raters[i]): (k, N) float32, exact counts. Rows counted since the
        last new pair are reused (ROW_CACHE): the baselines of one query, and
        a split's queries at one t, share most of theirs."""
        rows = [self._rows.get(i) for i in items.tolist()]
        missing = [k for k, row in enumerate(rows) if row is None]
        if missing:
            counted = self._count_rows(items[missing])
            for k, row in zip(missing, counted):
                rows[k] = row
            capacity = ROW_CACHE // (4 * self.data.n_items)
            if len(self._rows) + len(missing) > capacity:
                self._rows.clear()
            if len(missing) <= capacity:
                self._rows.update(zip(items[missing].tolist(), counted))
        return np.stack(rows) if rows else np.zeros((0, self.data.n_items), dtype=np.float32)

    def _count_rows(self, items: np.ndarray) -> np.ndarray:
        """C[items, :] counted from the items' users and their items, rows at a
        time whose pairs (and counts, rows × N) fit ROW_BUDGET: bounded, however
        many items a user rated. (k, N) float32."""
        n_items = self.data.n_items
        out = np.empty((items.size, n_items), dtype=np.float32)
        which, at = spans(self._item_start[items], self.raters[items])
        co_users = self._item_users[at]
        spent = np.cumsum(np.bincount(which, weights=self._rated[co_users], minlength=items.size) + n_items)
        start = 0
        while start < items.size:
            before = spent[start - 1] if start else 0.0
            stop = max(start + 1, int(np.searchsorted(spent, before + ROW_BUDGET, side="right")))
            lo, hi = np.searchsorted(which, [start, stop])
            lengths = self._rated[co_users[lo:hi]]
            _, at = spans(self._user_start[co_users[lo:hi]], lengths)
            flat = self._user_items[at] + np.repeat((which[lo:hi] - start) * n_items, lengths)
            out[start:stop] = np.bincount(flat, minlength=(stop - start) * n_items).reshape(stop - start, n_items)
            start = stop
        return out

    def similarity_scores(self, items: np.ndarray, affinity: np.ndarray, kind: str) -> np.ndarray:
        """Σ_i affinity_i · sim(i, ·) (diagonal left out), the same definitions
        as halflife.core.cooccurrence. (N,) float64."""
        if items.size == 0:
            return np.zeros(self.data.n_items)
        c = self.cooccurrence(items)
        c[np.arange(items.size), items] = 0.0
        d = self.raters.astype(np.float32)
        if kind == "jaccard":
            denom = d[items][:, None] + d[None, :] - c
        else:  # cosine
            denom = np.sqrt(d[items][:, None] * d[None, :])
        return (affinity.astype(np.float32) @ np.divide(c, denom, out=np.zeros_like(c), where=denom > 0)).astype(np.float64)

    def user_ratings(self, user: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items, values, times) of the user's ratings before t, in time order."""
        d = self.data
        mine = d.user_events(user, self.n)
        mine = mine[d.kinds[mine] == RATING]
        return d.items[mine], d.values[mine], d.times[mine]

    def rating_counts(self, t: float, half_life_days: float = np.inf) -> np.ndarray:
        """Ratings per item before t, each weighing 2^(−age / half-life): (N,) float64."""
        if half_life_days == np.inf:  # every weight 1: counted as t moves (per query t, the prefix was summed again)
            return self._popularity
        key = (self.n, t, half_life_days)
        if getattr(self, "_counts_key", {}).get(half_life_days) == key:
            return self._counts[half_life_days]
        counts = self._rating_counts(t, half_life_days)
        self.__dict__.setdefault("_counts_key", {})[half_life_days] = key
        self.__dict__.setdefault("_counts", {})[half_life_days] = counts
        return counts

    def _rating_counts(self, t: float, half_life_days: float) -> np.ndarray:
        d = self.data
        rated = d.kinds[: self.n] == RATING
        w = np.exp2(-(t - d.times[: self.n][rated]) / (half_life_days * DAY))
        return np.bincount(d.items[: self.n][rated], weights=w, minlength=d.n_items)


Baseline = Callable[[History, str, float], np.ndarray]


def popularity(h: History, user: str, t: float) -> np.ndarray:
    return h.rating_counts(t)


def trending(h: History, user: str, t: float, half_life_days: float = 7.0) -> np.ndarray:
    return h.rating_counts(t, half_life_days)


def _fallback(h: History, t: float, scores: np.ndarray) -> np.ndarray:
    """Adds popularity, scaled far below any real score, to break ties (and
    to rank at all for a user without usable history)."""
    pop = h.rating_counts(t)
    spread = float(np.abs(scores).max(initial=0.0))
    tiny = (spread if spread > 0 else 1.0) * 1e-6
    return scores + tiny * pop / max(float(pop.max(initial=0.0)), 1.0)


def last_item(h: History, user: str, t: float) -> np.ndarray:
    items, values, _ = h.user_ratings(user)
    liked = items[values >= POSITIVE_MIN]
    if liked.size == 0:
        return _fallback(h, t, np.zeros(h.data.n_items))
    return _fallback(h, t, cosine_scores(h.vectors[liked[-1]], h.vectors).astype(np.float64))


def static_profile(h: History, user: str, t: float) -> np.ndarray:
    items, values, _ = h.user_ratings(user)
    liked = items[values >= POSITIVE_MIN]
    if liked.size == 0:
        return _fallback(h, t, np.zeros(h.data.n_items))
    return _fallback(h, t, cosine_scores(h.vectors[liked].astype(np.float64).sum(axis=0), h.vectors).astype(np.float64))


def item_knn(h: History, user: str, t: float) -> np.ndarray:
    items, values, _ = h.user_ratings(user)
    liked = np.unique(items[values >= POSITIVE_MIN])
    return _fallback(h, t, h.similarity_scores(liked, np.ones(liked.size), "cosine"))


def sar(h: History, user: str, t: float, half_life_days: float = 30.0) -> np.ndarray:
    items, values, times = h.user_ratings(user)
    if items.size == 0:
        return _fallback(h, t, np.zeros(h.data.n_items))
    uniq, at = np.unique(items, return_inverse=True)
    affinity = np.bincount(at, weights=values * np.exp2(-(t - times) / (half_life_days * DAY)), minlength=uniq.size)
    return _fallback(h, t, h.similarity_scores(uniq, affinity, "jaccard"))


BASELINES: dict[str, Baseline] = {
    "popularity": popularity,
    "trending (7 d)": trending,
    "last-item similarity": last_item,
    "static embedding profile (λ=0)": static_profile,
    "item-kNN co-occurrence (cosine)": item_knn,
    "SAR (jaccard, 30 d)": sar,
}
