"""Ranking primitives, pure NumPy: cosine scores (split into row blocks on
threads for one query), masked top-k, freshness, MMR diversity and
decayed popularity.

Item matrices are (N, d) float32 with L2-normalised rows, so a cosine is a
dot product and a whole catalogue is scored with one pass over its rows
(one query) or one GEMM (several).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from halflife.core.decay import LN2, SAFE_EXPONENT, decay_factors, forward_weights, landmark_for, read_factors


def normalize(vectors, eps: float = 1e-12, dtype=np.float32) -> np.ndarray:
    """Scales to unit L2 norm along the last axis; all-zero rows stay zero.

    Decayed sums can be tiny (1e-200 is a fine direction), so rows are first
    divided by their largest entry: squaring them would underflow to 0.
    vectors: (d,) or (..., d). Returns `dtype` (float32 by default), same shape.
    """
    v = np.asarray(vectors)
    if v.dtype not in (np.float32, np.float64):  # float16's own norm is off by ~1e-4
        v = v.astype(np.float64)
    peak = np.abs(v).max(axis=-1, keepdims=True)
    v = v / np.where(peak > 0, peak, 1)
    # einsum rather than np.linalg.norm: a third less overhead on the small
    # arrays that profile replays normalise once per event.
    norms = np.sqrt(np.einsum("...d,...d->...", v, v))[..., None]
    return (v / np.maximum(norms, eps)).astype(dtype, copy=False)


def row_dots(items: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """items @ vector, as NumPy's vecdot rather than BLAS's GEMV: OpenBLAS's
    sgemv read 384-d float32 rows at ~11 GB/s on one core of this AMD EPYC
    machine, vecdot at ~26 GB/s, as fast as FAISS's own loop (one core, 1M
    rows: 131-143 ms against 59-60; 100k: 13.2 against 5.6).
    items: (N, d); vector: (d,). Returns (N,) float32 for float32 inputs."""
    return np.vecdot(items, vector)


def clip_cosines(values: np.ndarray) -> np.ndarray:
    """values within [-1, 1], which the API promises of a cosine: float32
    products of unit vectors land just past it (1.0000002 for two equal
    rows). Clip before a top k, so that equal rows tie. Returns a new array
    of values' dtype (0.14 ms per 1M float32)."""
    return np.clip(values, -1, 1)


def cosine_scores(queries, items: np.ndarray) -> np.ndarray:
    """Cosine of each query with every item: one pass over the rows for a
    single query (`row_dots`), one GEMM for several, in float32.

    queries: (d,) or (B, d), any norm (normalised here; zero queries score 0);
    items: (N, d) float32, rows already normalised. Returns (N,) or (B, N).
    """
    items = np.asarray(items, dtype=np.float32)
    queries = normalize(queries)
    return row_dots(items, queries) if queries.ndim == 1 else queries @ items.T


# Several blocks per thread, taken in turn: a thread the scheduler holds up
# leaves its blocks to the others (at 1M items, 2 blocks on 2 cores measured
# 87-135 ms, 8 blocks 81-89).
_BLOCKS_PER_THREAD = 4


class RowBlocks:
    """Scores a catalogue in row blocks on several threads.

    One query's pass is bound by what one core pulls from memory: 100k x 384
    float32 took 5.6 ms on one core of a 2-core AMD EPYC VM and 4.7 ms split
    over both (1M: 60 vs 47 ms; with the GEMV on an Intel Xeon, 15 vs 8.4 ms
    and 169 vs 88). NumPy's loops release the GIL, so blocks on
    separate threads run on separate cores. OpenBLAS's own threads are no
    substitute: they spin for a core after each call, and a server with 2
    of them ran 8 concurrent Recommends at 108 calls/s against ~400 with 1
    (cli.SERVER_BLAS_THREADS). Catalogues under 2 x
    `min_rows` rows stay on the calling thread, where a hand-off would cost
    more than it saves: through gRPC at 10k items, one caller's Recommend
    took 1.75-1.90 ms p50 and 1.6 ms of server CPU on one thread against
    1.98-2.34 and 2.0 split in two (at 20k and 40k, no difference beyond
    the noise); so does a call made while another one is scanning:
    the cores are taken then, and splitting only adds hand-offs (at 100k
    items and 8 concurrent Recommends on 2 cores: 72-79 calls/s split
    always, 84-88 on one thread each).

    threads: the most blocks one call runs at once, the caller's included.
    BLAS may round a row differently in the last bit (~1e-8) depending on
    the block it falls in.
    """

    def __init__(self, threads: int, min_rows: int = 8_192):
        self.threads = max(1, int(threads))
        self.min_rows = min_rows
        self._pool = ThreadPoolExecutor(self.threads - 1, "halflife-scan") if self.threads > 1 else None
        self._lock = threading.Lock()
        self._scanning = 0  # calls in progress

    def __call__(self, score: Callable[..., np.ndarray], items: np.ndarray, *aligned: np.ndarray) -> np.ndarray:
        """score(items, *aligned) computed block by block; `score` must score
        each row on its own (cosine_scores, interest_scores). items: (N, d);
        aligned: (N,) arrays, sliced with the rows (per-item terms that a
        block adds while its scores are in the cache). Returns (N,)."""
        n = items.shape[0]
        blocks = min(self.threads * _BLOCKS_PER_THREAD, n // self.min_rows)
        with self._lock:
            alone = self._scanning == 0
            self._scanning += 1
        try:
            if blocks <= 1 or self._pool is None or not alone:
                return score(items, *aligned)
            bounds = np.linspace(0, n, blocks + 1).astype(np.int64)
            parts: list = [None] * blocks
            taken = itertools.count()  # next() is atomic under the GIL

            def work() -> None:
                while (i := next(taken)) < blocks:
                    rows = slice(bounds[i], bounds[i + 1])
                    parts[i] = score(items[rows], *(column[rows] for column in aligned))

            helpers = [self._pool.submit(work) for _ in range(min(self.threads, blocks) - 1)]
            work()
            for helper in helpers:
                helper.result()
            return np.concatenate(parts)
        finally:
            with self._lock:
                self._scanning -= 1


def _real(scores) -> np.ndarray:
    """scores as an array of a float type, as the -inf masks need: integer
    (or bool) scores rank as float64, exact up to 2**53."""
    scores = np.asarray(scores)
    return scores if scores.dtype.kind == "f" else scores.astype(np.float64)


def _excluded(scores: np.ndarray, allowed) -> np.ndarray:
    # -inf and NaN scores count as excluded too, so a masked item (set to
    # -inf) can never tie with, and displace, a legitimately scored one.
    bad = ~(scores > -np.inf)
    if allowed is not None:
        bad |= ~np.asarray(allowed, dtype=bool)
    return bad


def _candidates(scores: np.ndarray, k: int, allowed) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The c = k + (masked items) best entries of each row of `scores`, found
    by one argpartition of the scores as they are: no masked copy, no full
    passes for the mask. When a row's c best hold at least k eligible items
    (allowed, neither -inf nor NaN, which argpartition ranks highest), its k
    best eligible items are among them. Returns (positions (..., c), their
    scores, eligible (..., c) bool), or None when c >= N or some row has
    fewer than k eligible among its candidates (callers then mask in full).
    scores: (N,) or (B, N); allowed: (N,) bool or None."""
    n = scores.shape[-1]
    c = k + (0 if allowed is None else n - int(np.count_nonzero(allowed)))
    if c >= n:
        return None
    positions = np.argpartition(scores, n - c, axis=-1)[..., n - c :]
    values = np.take_along_axis(scores, positions, axis=-1)
    eligible = values > -np.inf
    if allowed is not None:
        eligible &= allowed[positions]
    if (np.count_nonzero(eligible, axis=-1) < k).any():
        return None
    return positions, values, eligible


def _chunk_size(n: int) -> int:
    """How many scores top_k and batch_top_k rank as one chunk, by its
    maximum: the power of two at most sqrt(N) / 4, within 16..1024. The
    maxima take one pass over the scores whatever the size (see
    `_chunks_of`); the k best chunks' scores are gathered and ranked again,
    k x size per row. batch_top_k, k = 10, 50 excluded items: 500 rows of
    10k scores in chunks of 16 6.7 ms, 64 8.1, 128 15; 500 of 100k in 64
    31 ms, 256 60; 50 of 1M in 64-256 21-22 ms, 1024 33. top_k of one row
    changes by a few us between 16 and 256."""
    return 1 << min(10, max(4, int(np.log2(max(n, 1)) / 2) - 2))


def _chunks_of(n: int) -> tuple[int, int, int]:
    """How top_k and batch_top_k cut N scores into chunks, each ranked by its
    maximum: (chunk size, chunks, scores in them), the rest a tail past them.
    Chunk c holds every (chunks)-th score from c on (c, c + chunks, ...), so
    the maxima are an elementwise maximum of `size` contiguous runs: for 500
    rows of 10k scores 1.3 ms, where maxima over runs of 64 took 7.8 (a
    reduction of short runs; one row of 1M 0.15 ms against 0.22)."""
    size = _chunk_size(n)
    whole = n - n % size
    return size, whole // size, whole


def _near_top(scores: np.ndarray, k: int, allowed: np.ndarray | None) -> np.ndarray | None:
    """Per row, the positions of the scores that hold the row's k best
    eligible ones and every eligible one tied with the k-th: those of the k
    chunks (see `_chunks_of`) with the highest best allowed
    score (they hold k allowed scores at least the k-th such maximum, and a
    chunk left out holds none above it), then the tail past the last whole
    chunk. None when that would not save much
    (fewer than 4k chunks), when a chunk left out ties with the k-th
    maximum, or when an allowed score is NaN: callers then search every
    score. scores: (B, N); allowed: (N,) bool or None. Returns (B, m) int64.
    """
    b, n = scores.shape
    size, n_chunks, whole = _chunks_of(n)
    if n_chunks < 4 * k:
        return None
    chunked = scores[:, :whole].reshape(b, size, n_chunks)
    maxima = chunked.max(axis=1)
    if allowed is not None:
        inside = allowed[:whole].reshape(size, n_chunks)
        excluded = np.flatnonzero(~allowed[:whole])
        if excluded.size > n_chunks:  # a filter, say: mask every chunk in one pass
            maxima = np.where(inside, chunked, -np.inf).max(axis=1)
        elif excluded.size:
            # A chunk's best allowed score differs from its maximum only
            # where an excluded item holds the maximum: mask those chunks.
            rows, at = np.nonzero(scores[:, excluded] == maxima[:, excluded % n_chunks])
            chunks = excluded[at] % n_chunks
            maxima[rows, chunks] = np.where(inside[:, chunks].T, chunked[rows, :, chunks], -np.inf).max(axis=1)
    if np.isnan(maxima).any():
        return None
    chunks = np.argpartition(maxima, n_chunks - k, axis=1)[:, n_chunks - k :]
    cut = np.take_along_axis(maxima, chunks, axis=1).min(axis=1, keepdims=True)
    if (np.count_nonzero(maxima >= cut, axis=1) > k).any():
        return None
    steps = np.arange(size)[:, None] * n_chunks  # chunk c: c + steps
    inside = (chunks[:, None, :] + steps).reshape(b, -1)
    return np.concatenate([inside, np.broadcast_to(np.arange(whole, n), (b, n - whole))], axis=1)


def _sortable(k: int, n: int) -> int:
    """The most candidates of N scores worth sorting outright for a top k,
    rather than searching every score: at 100k, sorting N/32 took a tenth of
    an argpartition of all N."""
    return max(16 * k, n // 32)


def _at_least_kth(scores: np.ndarray, k: int, allowed: np.ndarray | None) -> np.ndarray | None:
    """Positions (ascending) of every eligible score at least a bound on the
    k-th best eligible one, the c-th highest chunk maximum: the c chunks that
    reach it hold c distinct items at least it. With c = k + the excluded
    count, k of those are eligible; a filter that excludes many maximises
    over allowed scores instead (c = k). One pass over the scores for the
    maxima and one for the positions: at 10k scores 20-30 µs, where a chunk
    gather and an argpartition took 85-125. None when the chunks are too few
    for a bound, a maximum is NaN, the bound is -inf, or more than
    `_sortable(c, N)` eligible scores lie above it. Many may tie at it:
    a popularity signal's few popular items in a long tail of zeros put 170
    of 10k and 315 of 100k scores there, or all of them; ties sort fast by
    position, where an argpartition of such scores took 13 ms at 100k, not 1
    (NumPy's introselect, with most values equal).
    scores: (N,); allowed: (N,) bool or None."""
    n = scores.shape[0]
    size, n_chunks, whole = _chunks_of(n)
    c = k + (0 if allowed is None else n - int(np.count_nonzero(allowed)))
    chunked = scores[:whole].reshape(size, n_chunks)
    if 2 * c <= n_chunks:
        maxima = chunked.max(axis=0)
    elif allowed is not None and 2 * k <= n_chunks:
        c = k
        floor = np.asarray(-np.inf, dtype=np.result_type(scores.dtype, np.float32))
        maxima = np.where(allowed[:whole].reshape(size, n_chunks), chunked, floor).max(axis=0)
    else:
        return None
    if np.isnan(maxima).any():
        return None
    bound = np.partition(maxima, n_chunks - c)[n_chunks - c]
    if bound == -np.inf:
        return None
    near = np.flatnonzero(scores >= bound)
    if allowed is not None:
        near = near[allowed[near]]
    most = _sortable(c, n)
    return near if near.size <= most or np.count_nonzero(scores[near] > bound) <= most else None


def _few_allowed(scores: np.ndarray, k: int, allowed: np.ndarray | None) -> np.ndarray | None:
    """Positions of the eligible scores when a filter allows at most
    `_sortable(k, N)` items (a category of a few): the search of every
    score masked the rest to -inf, and argpartition of mostly equal values
    took 14 ms at 100k. None otherwise."""
    if allowed is None or np.count_nonzero(allowed) > _sortable(k, scores.shape[0]):
        return None
    near = np.flatnonzero(allowed)
    return near[scores[near] > -np.inf]


def _above_floor(scores: np.ndarray, k: int, allowed: np.ndarray | None) -> np.ndarray | None:
    """Positions of the eligible scores above the lowest score, when at
    least k and at most `_sortable(k, N)` or a quarter of all are: then the
    k-th best and its ties are among them, and the rest, often three
    quarters at least, tie at the floor, argpartition's worst case.
    Popularity's long tail of zeros with a large k (100 at 10k items, 1,000
    at 100k, past what chunks can bound): argpartition of all the scores
    took 1.2 and 14 ms, sorting N/4 of them 0.05 and 2. With fewer than k
    above the floor, the k best end in ties at it, and every eligible
    position is returned: sorting ties by position took 3 ms at 100k and
    92 at 1M, where argpartition took 14 and 163. None otherwise (and where
    a score is NaN, or there is none)."""
    low = scores.min(initial=np.inf)
    if np.isnan(low) or low == np.inf:
        return None
    above = np.flatnonzero(scores > low)
    if allowed is not None:
        above = above[allowed[above]]
    if above.size < k:
        eligible = np.flatnonzero(scores > -np.inf)  # NaN and -inf are never eligible
        return eligible if allowed is None else eligible[allowed[eligible]]
    return above if above.size <= max(_sortable(k, scores.shape[0]), scores.shape[0] // 4) else None


def top_k(scores, k: int, allowed=None, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The k best items, best first.

    scores: (N,); allowed: (N,) bool or None. Items not allowed (and -inf/NaN
    scores) are never returned, so fewer than k come back when fewer remain.
    Every item tied with the k-th score competes for the last places, ties
    going to the lower row, so the result does not depend on argpartition's
    internals. ties: also return every item past the k-th tied with it, for
    callers that order exact ties by something other than row. Returns
    (indices (m,) int64, scores (m,)) with m = min(k, #eligible), plus those
    ties. Integer scores come back as float64.
    """
    scores = _real(scores)
    allowed = None if allowed is None else np.asarray(allowed, dtype=bool)
    k = int(k)
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=scores.dtype)
    for narrow in (_few_allowed, _at_least_kth, _above_floor):
        near = narrow(scores, k, allowed)
        if near is not None:
            # Eligible candidates that hold the k best and every tie with the k-th: sort them all.
            return _best_first(near, scores[near], k, ties)
    found = _candidates(scores, k, allowed)
    if found is not None:
        positions, values, eligible = found
        positions, values = positions[eligible], values[eligible]
        kth = np.partition(values, values.size - k)[values.size - k]
        tied = np.flatnonzero(scores == kth)  # tied items beyond the candidates compete too
        idx = np.concatenate([positions[values > kth], tied if allowed is None else tied[allowed[tied]]])
    else:
        bad = _excluded(scores, allowed)
        # Masked in the scores' own float type: a bare -np.inf would promote
        # float32 to float64, and partitioning doubles measured 2.5x slower at 100k.
        masked = np.where(bad, np.asarray(-np.inf, dtype=np.result_type(scores.dtype, np.float32)), scores)
        n = masked.shape[0]
        m = min(k, int(n - np.count_nonzero(bad)))
        if m <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=scores.dtype)
        if m < n:
            idx = np.argpartition(masked, n - m)[n - m :]  # the m largest sit after n - m: no negated copy
            kth = masked[idx].min()
            idx = np.concatenate([idx[masked[idx] > kth], np.flatnonzero(masked == kth)])
        else:
            idx = np.arange(n)
        k = m
    return _best_first(idx, scores[idx], k, ties)


def _best_first(idx: np.ndarray, values: np.ndarray, k: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """The k best of eligible positions `idx` (m,) with scores `values` (m,),
    which hold every score tied with the k-th best: best first, ties by
    position; with `ties`, then every later one tied with the k-th."""
    order = np.lexsort((idx, -values))
    cut = k
    if ties and order.size > k:
        cut += int(np.count_nonzero(values[order[k:]] == values[order[k - 1]]))
    order = order[:cut]
    return idx[order].astype(np.int64), values[order]


def batch_top_k(scores, k: int, allowed=None) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise `top_k` for (B, N) scores, vectorized (one argpartition),
    but exactly tied scores come back in any order, not the lower row first.

    allowed: (B, N), (N,) (same mask for every row) or None. Returns
    (indices (B, k') int64, scores (B, k')) with k' = min(k, N), best first;
    slots beyond a row's eligible items hold index -1 and score -inf
    (integer scores come back as float64).
    """
    scores = _real(scores)
    b, n = scores.shape
    kk = min(int(k), n)
    if kk <= 0 or b == 0:
        return np.empty((b, max(kk, 0)), dtype=np.int64), np.empty((b, max(kk, 0)), dtype=scores.dtype)
    shared = allowed is None or np.ndim(allowed) == 1
    allowed = None if allowed is None else np.asarray(allowed, dtype=bool)
    near = _near_top(scores, kk, allowed) if shared else None
    if near is not None:
        idx, out = batch_top_k(np.take_along_axis(scores, near, axis=1), kk, None if allowed is None else allowed[near])
        return np.where(idx >= 0, np.take_along_axis(near, np.maximum(idx, 0), axis=1), -1), out
    found = _candidates(scores, kk, allowed) if shared else None
    if found is not None:
        idx, part, eligible = found
        part = np.where(eligible, part, np.asarray(-np.inf, dtype=part.dtype))
    else:
        bad = _excluded(scores, None if allowed is None else np.broadcast_to(allowed, scores.shape))
        # In place where nothing is excluded or on our own copy: at (1000, 1M)
        # every extra (B, N) pass is seconds.
        masked = scores.copy() if bad.any() else scores
        masked[bad] = -np.inf
        if kk < n:
            # The k largest sit after position n - k: no negated copy needed.
            idx = np.argpartition(masked, n - kk, axis=1)[:, n - kk :]
        else:
            idx = np.broadcast_to(np.arange(n), (b, n))
        part = np.take_along_axis(masked, idx, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")[:, :kk]
    idx = np.take_along_axis(idx, order, axis=1).astype(np.int64)
    out = np.take_along_axis(part, order, axis=1)
    empty = ~(out > -np.inf)
    idx[empty] = -1
    out[empty] = -np.inf
    return idx, out


def batch_search(queries, items: np.ndarray, k: int, allowed=None, max_block: int = 50_000_000, threads: int = 1):
    """`batch_top_k(cosine_scores(queries, items), k, allowed)` without the
    whole (B, N) score matrix: all B queries go through each tile of items
    as one GEMM (a GEMM of few queries runs below the BLAS's speed), each
    tile keeps its k best, and the tiles' best are ranked last. max_block:
    the most scores one (B, tile) block holds (50M: 200 MB of float32).
    threads: groups of queries, each through a tile as a GEMM and top k of
    its own, on a thread of its own. Run the BLAS at one thread then (as the
    server does), or its spinning threads take the cores from these: at
    1,000 queries x 10k items on 2 cores, one group at 2 BLAS threads took
    73 ms (its single-threaded top k 21 of them), two groups at 1 BLAS
    thread 57, and two groups at 2 BLAS threads gained nothing.
    queries: (B, d); items: (N, d) unit rows; allowed: (N,) bool or None.
    Returns (indices (B, k') int64, scores (B, k')) as batch_top_k does
    (exactly tied items in any order, which may change with `threads`)."""
    queries = normalize(queries)
    items = np.asarray(items, dtype=np.float32)
    allowed = None if allowed is None else np.asarray(allowed, dtype=bool)
    n = items.shape[0]
    if n == 0 or int(k) <= 0:
        return batch_top_k(np.zeros((queries.shape[0], 0), dtype=np.float32), k)
    rows = max(int(k), max_block // max(queries.shape[0], 1))
    groups = max(1, min(int(threads), queries.shape[0]))
    picked, best = [], []
    with ThreadPoolExecutor(groups - 1, "halflife-batch") if groups > 1 else contextlib.nullcontext() as pool:
        for start in range(0, n, rows):
            tile = slice(start, min(n, start + rows))
            idx, scores = _tile_top_k(pool, groups, queries, items[tile], k, None if allowed is None else allowed[tile])
            picked.append(np.where(idx >= 0, idx + start, -1))
            best.append(scores)
    if len(best) == 1:
        return picked[0], best[0]
    order, scores = batch_top_k(np.concatenate(best, axis=1), k)
    rows_of = np.take_along_axis(np.concatenate(picked, axis=1), np.maximum(order, 0), axis=1)
    return np.where(order >= 0, rows_of, -1), scores


def _tile_top_k(pool, groups: int, queries: np.ndarray, items: np.ndarray, k: int, allowed) -> tuple[np.ndarray, np.ndarray]:
    """batch_top_k(queries @ items.T, k, allowed) with the queries in
    `groups` parts, each its own GEMM and top k: the first on this thread,
    the others on `pool`. allowed: (N,) or None."""
    def part(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return batch_top_k(group @ items.T, k, allowed)

    if groups == 1:
        return part(queries)
    bounds = np.linspace(0, queries.shape[0], groups + 1).astype(np.int64)
    later = [pool.submit(part, queries[a:b]) for a, b in zip(bounds[1:-1], bounds[2:])]
    parts = [part(queries[: bounds[1]])] + [f.result() for f in later]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def log2_freshness(create_times, t: float, half_life_seconds: float) -> np.ndarray:
    """log2 of the freshness multiplier 2^{-age/h} per item, -age/h: unknown
    (NaN) create times and items from the future (clock skew) get 0 (a
    multiplier of 1). In log2 because the multiplier itself leaves float32
    past 149 half-lives (see Blend.freshened). create_times: (N,).
    Returns (N,) float64, <= 0."""
    c = np.asarray(create_times, dtype=np.float64)
    age = np.maximum(0.0, t - c)
    return np.where(np.isnan(c), 0.0, -age / half_life_seconds)


def mmr(relevance, vectors, k: int, lam: float = 0.7) -> np.ndarray:
    """Maximal Marginal Relevance (Carbonell & Goldstein 1998) re-ranking.

    Picks k times argmax λ·rel_i − (1−λ)·max_{j chosen} cos(v_i, v_j), each
    step one GEMV against the last pick. relevance: (M,) finite, over
    candidates (e.g. a top_k result; not batch_top_k's -inf padding, which
    λ = 0 would turn into NaN); vectors: (M, d) normalised. The first pick is the
    most relevant; λ = 1 gives plain relevance order.
    Returns (max(0, min(k, M)),) int64 indices into the candidates, in pick order.
    """
    rel = np.asarray(relevance, dtype=np.float64)
    vecs = np.asarray(vectors, dtype=np.float32)
    m = rel.shape[0]
    k = max(0, min(int(k), m))  # as top_k: a negative k picks nothing (it was a ValueError)
    max_sim = np.full(m, -np.inf)  # no similarity yet; the first pick uses relevance alone
    taken = np.zeros(m, dtype=bool)
    picks = np.empty(k, dtype=np.int64)
    for step in range(k):
        gain = lam * rel - (1.0 - lam) * max_sim if step else rel
        left = np.flatnonzero(~taken)  # not a -inf mask: a -inf relevance would tie with it
        pick = int(left[np.argmax(gain[left])])
        picks[step] = pick
        taken[pick] = True
        np.maximum(max_sim, vecs @ vecs[pick], out=max_sim)
    return picks


def _net_entries(item_index: np.ndarray, weights, n_items: int) -> np.ndarray:
    """Per item, the entries with a positive weight less those with a
    negative one (an event taken back): (N,) int64."""
    signs = None if weights is None else np.sign(weights)
    return np.bincount(item_index, weights=signs, minlength=n_items).astype(np.int64)


def decayed_sum(item_index, times, weights, t: float, half_life: float, n_items: int) -> np.ndarray:
    """Σ weight · 2^(−(t − time)/half_life) per item, of (n,) entries stamped
    up to t. An item whose entries cancel, each event taken back by an entry
    of the opposite weight at its time, sums to exactly 0: not the rounding
    the subtraction leaves, which a reader dividing by the maximum would make
    the most popular item. Returns (N,) float64."""
    item_index = np.asarray(item_index, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    decayed = weights * np.exp2(-(t - np.asarray(times, dtype=np.float64)) / half_life)
    sums = np.bincount(item_index, weights=decayed, minlength=n_items).astype(np.float64, copy=False)  # int64 if empty
    sums[_net_entries(item_index, weights, n_items) == 0] = 0.0
    return sums


class EntryLog:
    """Weighted item entries (rows, times, weights), kept to sum any past
    window (`decayed_sum`): a look into the past counts only what had
    happened. Each entry takes 16 B (rows int32; weights float32 keep a type
    weight to 7 digits). Appends gather in chunks, the newest merging into
    the one before while that is no larger, so chunk sizes strictly decrease
    (one-entry appends carry as a binary counter: O(log n) chunks, each entry
    copied O(log n) times; a chunk per append held ~400 B for a one-event
    call). Chunks are never changed in place, so `chunks()` is a snapshot
    its reader may sum without the writer's lock. Negative weights take
    entries back (an erasure): once they are many, `net` drops each event
    with its taking-back.

    newest: the latest time of an entry (-inf while empty); taken_back: the
    negative entries appended since the last `net`.
    """

    def __init__(self) -> None:
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.newest = -np.inf
        self.taken_back = 0

    def __len__(self) -> int:
        return sum(rows.size for rows, _, _ in self._chunks)

    def append(self, rows, times, weights) -> None:
        """Entries (n,) each: item rows, times, non-zero weights."""
        rows, times = np.asarray(rows, dtype=np.int32), np.asarray(times, dtype=np.float64)
        weights = np.asarray(weights, dtype=np.float32)
        if not rows.size:
            return
        chunks = self._chunks
        chunks.append((rows, times, weights))
        while len(chunks) > 1 and chunks[-2][0].size <= chunks[-1][0].size:
            newer, older = chunks.pop(), chunks.pop()
            chunks.append(tuple(np.concatenate(pair) for pair in zip(older, newer)))  # new arrays: readers keep theirs
        self.newest = max(self.newest, float(times.max()))
        self.taken_back += int(np.count_nonzero(weights < 0))

    def chunks(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """A snapshot of the chunks, oldest first, each (rows (n,) int32,
        times (n,) float64, weights (n,) float32), to sum without the
        writer's lock (`joined`)."""
        return list(self._chunks)

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every entry: (rows, times, weights), each (n,)."""
        return self.joined(self._chunks)

    @staticmethod
    def joined(chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The entries of `chunks` (a `chunks()` snapshot) as (rows, times, weights), each (n,)."""
        if not chunks:
            return np.zeros(0, np.int32), np.zeros(0), np.zeros(0, np.float32)
        return tuple(np.concatenate(column) for column in zip(*chunks))

    def renumber(self, new_row: np.ndarray) -> None:
        """Rows r become new_row[r]; entries whose new_row is -1 go (a
        catalogue that dropped its deleted items)."""
        rows, times, weights = self.columns()
        kept = new_row[rows] >= 0
        weights = weights[kept]
        # Only those it keeps count: dropped ones would call for nets with nothing to net.
        taken_back = min(self.taken_back, int(np.count_nonzero(weights < 0)))
        self._replace(new_row[rows[kept]], times[kept], weights, taken_back)

    def net(self) -> None:
        """Drops each taking-back with an entry it took back: the same row,
        time and opposite weight (an erasure takes an event back at its
        time). What stays is as it was, so every past sum is a restart's,
        which never saw the erased events. One binary search per entry among
        the times something was taken back at, then a sort of the entries at
        those times only: O(n log m + m log m) for m takings-back."""
        rows, times, weights = self.columns()
        back_times = np.unique(times[weights < 0])
        if not back_times.size:
            self.taken_back = 0
            return
        at = np.minimum(np.searchsorted(back_times, times), back_times.size - 1)
        near = np.flatnonzero(back_times[at] == times)  # every pair lies among these
        w = weights[near]
        order = np.lexsort((w > 0, np.abs(w), times[near], rows[near]))  # takings-back first
        near, w = near[order], w[order]
        r, t, m = rows[near], times[near], np.abs(w)
        starts = np.flatnonzero(np.r_[True, (r[1:] != r[:-1]) | (t[1:] != t[:-1]) | (m[1:] != m[:-1])])
        sizes = np.diff(np.r_[starts, r.size])
        back = np.add.reduceat((w < 0).astype(np.int64), starts)
        # A group's q takings-back and the first q of its events go (every taking-back follows its event).
        dropped = np.where(2 * back <= sizes, 2 * back, 0)
        keep = np.ones(rows.size, dtype=bool)
        keep[near[np.arange(r.size) - np.repeat(starts, sizes) < np.repeat(dropped, sizes)]] = False
        self._replace(rows[keep], times[keep], weights[keep], 0)  # those left cannot be netted: not counted again

    def _replace(self, rows: np.ndarray, times: np.ndarray, weights: np.ndarray, taken_back: int) -> None:
        """The entries become these, as one chunk."""
        self._chunks, self.newest = [], -np.inf
        self.append(rows, times, weights)
        self.taken_back = taken_back


@dataclass
class DecayedCounts:
    """Forward-decayed per-item counter ("trending"): counts_j = Σ w·e^{λ(t_i-L)}
    over item j's events; read at t as e^{-λ(t-L)}·counts. Exact and
    arrival-order independent like `decay.add_events`; methods mutate in place.
    A negative weight takes an event back (an erasure): an item whose every
    event was taken back reads exactly 0, as in `decayed_sum`. A taking-back
    must come with or after its event, as the engine's do (the horizon
    releases both together; an erasure takes back applied events): one that
    came first could zero the count of its item's other events (an audit).

    rate: λ = ln2/h; landmark: NaN while empty; counts: (N,) float64;
    entries: (N,) int64, the events each count holds (see `_net_entries`);
    version: bumped by every add, resize and take (rebase only rescales), so callers
    can cache what they derive from the counts' proportions.
    """

    rate: float
    landmark: float
    counts: np.ndarray
    entries: np.ndarray
    version: int = 0

    @classmethod
    def empty(cls, n_items: int, half_life_seconds: float) -> "DecayedCounts":
        return cls(LN2 / half_life_seconds, float("nan"), np.zeros(n_items, dtype=np.float64),
                   np.zeros(n_items, dtype=np.int64))

    def rebase(self, new_landmark: float) -> None:
        """Moves the landmark (forward): counts *= e^{-λ(L'-L)}."""
        if not np.isnan(self.landmark):
            self.counts *= float(decay_factors(np.array([self.rate]), self.landmark, new_landmark)[0])
        self.landmark = float(new_landmark)

    def add(self, item_index, times, weights=None, bound: float = SAFE_EXPONENT) -> None:
        """Adds events (item_index, times, weights: (n,); weights default 1)."""
        item_index = np.asarray(item_index, dtype=np.int64)
        times = np.asarray(times, dtype=np.float64)
        if item_index.size == 0:
            return
        new_landmark = landmark_for(self.landmark, times, self.rate, bound)
        if new_landmark != self.landmark:
            self.rebase(new_landmark)
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
        coeffs = forward_weights(times, self.rate, 1.0 if weights is None else weights, self.landmark)
        n = self.counts.shape[0]
        self.counts += np.bincount(item_index, weights=coeffs, minlength=n)
        self.entries += _net_entries(item_index, weights, n)
        self.counts[item_index[self.entries[item_index] == 0]] = 0.0
        self.version += 1

    def resize(self, n_items: int) -> None:
        """Grows the catalogue (new items start at 0)."""
        grow = n_items - self.counts.shape[0]
        if grow > 0:
            self.counts = np.concatenate([self.counts, np.zeros(grow)])
            self.entries = np.concatenate([self.entries, np.zeros(grow, dtype=np.int64)])
            self.version += 1

    def take(self, rows) -> None:
        """Keeps the counts of `rows` ((m,) ints), renumbered 0..m-1 in that
        order (e.g. a catalogue that dropped its deleted items)."""
        rows = np.asarray(rows, dtype=np.int64)
        self.counts, self.entries = self.counts[rows], self.entries[rows]
        self.version += 1

    def read(self, t: float) -> np.ndarray:
        """Decayed counts at time t. Returns (N,) float64."""
        return self.counts * read_factors(self.rate, self.landmark, t)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"rate": np.array(self.rate), "landmark": np.array(self.landmark), "counts": self.counts,
                "entries": self.entries}

    @classmethod
    def from_arrays(cls, arrays) -> "DecayedCounts":
        return cls(float(arrays["rate"]), float(arrays["landmark"]), np.array(arrays["counts"], dtype=np.float64),
                   np.array(arrays["entries"], dtype=np.int64))
