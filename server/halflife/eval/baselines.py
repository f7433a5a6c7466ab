"""Baselines in NumPy, all reading only events before the query time.

`History` is the event prefix before t (ratings and texts), kept up to date
by the runner as t moves forward, with a dense item × item co-occurrence
count `C` of every rated (user, item) pair. Each baseline maps (history,
user, t) to (N,) scores.

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

from halflife.core.ranking import cosine_scores
from halflife.eval.data import POSITIVE_MIN, RATING, EvalData

DAY = 86400.0


class History:
    """Events strictly before a moving time t (advance only)."""

    def __init__(self, data: EvalData, vectors: np.ndarray):
        self.data = data
        self.vectors = vectors
        self.n = 0
        # Dense item × item co-occurrence (N² int32, 380 MB for ml-latest-small),
        # updated per new (user, item) pair: SAR's jaccard needs whole rows.
        self.C = np.zeros((data.n_items, data.n_items), dtype=np.int32)
        self._user_items: dict[str, list[int]] = {}

    def advance(self, t: float) -> None:
        n = self.data.before(t)
        if n < self.n:
            raise ValueError("History only moves forward")
        d = self.data
        rated = np.arange(self.n, n)[d.kinds[self.n : n] == RATING]
        for u, i in zip(d.users[rated].tolist(), d.items[rated].tolist()):
            mine = self._user_items.setdefault(u, [])
            if i in mine:
                continue
            if mine:
                self.C[i, mine] += 1
                self.C[mine, i] += 1
            self.C[i, i] += 1
            mine.append(i)
        self.n = n

    def similarity_scores(self, items: np.ndarray, affinity: np.ndarray, kind: str) -> np.ndarray:
        """Σ_i affinity_i · sim(i, ·) from the dense matrix (diagonal left out),
        the same definitions as halflife.core.cooccurrence. (N,) float64."""
        if items.size == 0:
            return np.zeros(self.data.n_items)
        c = self.C[items].astype(np.float32)
        c[np.arange(items.size), items] = 0.0
        d = np.diag(self.C).astype(np.float32)
        if kind == "jaccard":
            denom = d[items][:, None] + d[None, :] - c
        else:  # cosine
            denom = np.sqrt(d[items][:, None] * d[None, :])
        return (affinity.astype(np.float32) @ np.divide(c, denom, out=np.zeros_like(c), where=denom > 0)).astype(np.float64)

    def user_ratings(self, user: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items, values, times) of the user's ratings before t, in time order."""
        d = self.data
        mine = np.flatnonzero((d.users[: self.n] == user) & (d.kinds[: self.n] == RATING))
        return d.items[mine], d.values[mine], d.times[mine]

    def rating_counts(self, t: float, half_life_days: float = np.inf) -> np.ndarray:
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
