"""Ranking metrics over a full ranking, coverage and bootstrap confidence intervals.

A query's ranking is the whole catalogue minus the items the user already
consumed (the same filter for every method); `ranks` are the 1-based
positions of the relevant items in it (np.inf when absent, e.g. cut off by a
server's result limit).

    HR@k     1 if any relevant item is in the top k
    NDCG@k   Σ_{relevant r <= k} 1/log2(r + 1) / Σ_{i=1..min(|rel|, k)} 1/log2(i + 1)
    Recall@k (#relevant in the top k) / |rel|
    MRR      1 / (rank of the first relevant item)
"""

from __future__ import annotations

import math

import numpy as np

METRICS = ("HR@10", "NDCG@10", "Recall@20", "MRR")


def hit_rate(ranks, k: int) -> float:
    return float(np.any(np.asarray(ranks, dtype=np.float64) <= k))


def ndcg(ranks, k: int) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        return 0.0
    dcg = float(np.sum(1.0 / np.log2(ranks[ranks <= k] + 1.0)))
    ideal = float(np.sum(1.0 / np.log2(np.arange(1, min(ranks.size, k) + 1) + 1.0)))
    return dcg / ideal


def recall(ranks, k: int) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.count_nonzero(ranks <= k) / ranks.size) if ranks.size else 0.0


def reciprocal_rank(ranks) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(1.0 / ranks.min()) if ranks.size else 0.0


def query_metrics(ranks) -> dict[str, float]:
    """Every metric in METRICS for one query's relevant ranks."""
    return {
        "HR@10": hit_rate(ranks, 10),
        "NDCG@10": ndcg(ranks, 10),
        "Recall@20": recall(ranks, 20),
        "MRR": reciprocal_rank(ranks),
    }


def ranks_of(order: np.ndarray, relevant: np.ndarray, n_items: int) -> np.ndarray:
    """1-based positions of `relevant` item rows in `order` ((m,) item rows,
    best first, already filtered); np.inf for those not in it."""
    position = np.full(n_items, np.inf)
    position[order] = np.arange(1, order.shape[0] + 1)
    return position[np.asarray(relevant, dtype=np.int64)]


def ranking_from_scores(scores: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Item rows best first, seen rows and -inf scores removed; ties by row
    (deterministic), NaN scores last. (Cutting as many rows off the end as
    there were -inf scores cut NaN ones instead, and kept a seen row.)"""
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    return order[~np.asarray(seen, dtype=bool)[order] & ~np.isneginf(s[order])]


def coverage(top_lists, n_items: int) -> float:
    """Share of the catalogue that appears in at least one top list."""
    shown = set()
    for top in top_lists:
        shown.update(int(i) for i in top)
    return len(shown) / n_items if n_items else 0.0


def bootstrap_ci(per_user: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over users (resampled with replacement)."""
    x = np.asarray(per_user, dtype=np.float64)
    if x.size == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    a = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def bootstrap_ratio_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """(ratio, low, high) of mean(a)/mean(b) over the same users, paired
    resampling. Where mean(b) is 0 the ratio is inf (0 where mean(a) is 0
    too), and a bound among those is inf: dividing by 1e-12 printed bounds
    like 1.2e11 instead (a review, on a test period of 10 users)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    ratios = np.sort(_ratio(a[idx].mean(axis=1), b[idx].mean(axis=1)))
    q = (1 - level) / 2
    return float(_ratio(a.mean(), b.mean())), _quantile(ratios, q), _quantile(ratios, 1 - q)


def _ratio(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / b, np.where(a > 0, np.inf, 0.0))


def _quantile(x: np.ndarray, p: float) -> float:
    """np.quantile(x, p) of sorted x, inf where it reaches x's infinite
    values (numpy's interpolation makes NaN of them)."""
    h = (x.size - 1) * p
    k = int(h)
    if h == k or np.isinf(x[k]):
        return float(x[k])
    return math.inf if np.isinf(x[k + 1]) else float(np.quantile(x, p))
