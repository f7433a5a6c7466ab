"""Item co-occurrence ("people who consumed i also consumed j"), pure NumPy.

`Cooccurrence` keeps the user × item incidence X (a pair is present once,
however often it recurs) as sorted 64-bit pair keys and computes co-occurrence
on demand from it, C[i, j] = #users who consumed both i and j, so nothing of
size N × N is ever held: a read touches only the users who share an item
with the query and their items.

`cooccurrence_scores` turns a user's decayed per-item affinity a (the SAR
"affinity", Microsoft Recommenders' Smart Adaptive Recommendations) into
item scores Σ_i a_i · sim(i, j) with sim one of

    "count":   C[i, j]
    "jaccard": C[i, j] / (C[i, i] + C[j, j] − C[i, j])     (SAR's default)
    "cosine":  C[i, j] / sqrt(C[i, i] · C[j, j])
    "lift":    C[i, j] / (C[i, i] · C[j, j])

The diagonal (an item with itself) is left out of every score: a consumed
item is filtered from recommendations anyway, and with it in, "count" and
"jaccard" would mostly echo the affinity itself.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

SIMILARITIES = ("count", "jaccard", "cosine", "lift")
_ITEM_BITS = 32  # a pair's key: user << 32 | item (items < 2**32, users < 2**31)
_LOW = (1 << _ITEM_BITS) - 1
# New pairs wait in a small dict until this many (or 1/64 of the indexed
# pairs, if more) have gathered, then merge into the sorted arrays in one
# O(pairs) pass: every read scans the waiting pairs, so they stay few, and
# the merge's cost spreads to a few microseconds per pair. A caller that runs
# merges in the background (begin_merge / Merge.build / end_merge, e.g.
# without its lock) starts one at this size; `add` merges by itself only at
# _INLINE_FACTOR times it, when no background merge kept up.
_MIN_MERGE = 256
_INLINE_FACTOR = 4
_JACCARD_CHUNK = 256  # query items per pass of `cooccurrence_scores`' jaccard: bounds its arrays
# `user_weighted` passes over every pair, not the co-users' own, once these hold this share of them: a
# pass over all costs ~4.5 ns a pair, gathering the co-users' ranges first ~20 (1M Zipf-distributed likes).
_DENSE_SHARE = 0.25


def _swap(keys: np.ndarray) -> np.ndarray:
    """user << 32 | item keys as item << 32 | user, and back. (n,) int64."""
    return ((keys & _LOW) << _ITEM_BITS) | (keys >> _ITEM_BITS)


def spans(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flattens ranges [starts[k], starts[k] + lengths[k]): (k, index) for every
    index in them, as two (sum(lengths),) int64 arrays."""
    which = np.repeat(np.arange(starts.shape[0]), lengths)
    # Output position p of range k holds starts[k] + (p - where range k begins):
    # one repeat of the per-range shift, not one each of starts and beginnings.
    shift = starts - (np.cumsum(lengths) - lengths)
    return which, np.arange(int(lengths.sum())) + np.repeat(shift, lengths)


def _pointers(sorted_keys: np.ndarray) -> np.ndarray:
    """Where each high half's run starts in `sorted_keys`: (max high + 2,) int64,
    so that run h is sorted_keys[ptr[h]:ptr[h + 1]] (CSR row pointers)."""
    heads = sorted_keys >> _ITEM_BITS
    return np.concatenate([[0], np.cumsum(np.bincount(heads, minlength=int(heads.max(initial=-1)) + 1))])


def _shifted(ptr: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """`ptr` (see _pointers) after inserting entries with these high halves
    (any order), without recounting the others: O(rows + inserted)."""
    n = max(ptr.shape[0] - 1, int(heads.max(initial=-1)) + 1)
    ptr = np.concatenate([ptr, np.full(n + 1 - ptr.shape[0], ptr[-1])])
    ptr[1:] += np.cumsum(np.bincount(heads, minlength=n))
    return ptr


def _runs(ptr: np.ndarray, heads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the runs of `heads` start in the keys `ptr` points into, and how
    long they are (beyond `ptr`: empty): two (h,) int64 arrays."""
    last = ptr.shape[0] - 1
    starts = ptr[np.minimum(heads, last)]
    return starts, ptr[np.minimum(heads + 1, last)] - starts


def _ranges(ptr: np.ndarray, sorted_keys: np.ndarray, heads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every entry of `sorted_keys` whose high half is one of `heads` (beyond
    `ptr`: none), vectorized: (position of its head in `heads`, low half) as
    two (m,) int64 arrays."""
    which, index = spans(*_runs(ptr, heads))
    return which, sorted_keys[index] & _LOW


def _level(lengths: np.ndarray, budget: int) -> int | None:
    """The largest L with Σ min(lengths, L) <= budget (water-filling: short
    runs whole, long ones cut to L), at least 1; None where all fit.
    lengths: (h,) ints."""
    if int(lengths.sum()) <= budget:
        return None
    s = np.sort(lengths)
    n = s.shape[0]
    shorter = np.concatenate([[0], np.cumsum(s)[:-1]])  # Σ of the runs before each
    k = int(np.argmax(shorter + s * (n - np.arange(n)) > budget))  # the first run that a cut at its length overflows
    return max(1, int((budget - shorter[k]) // (n - k)))


def _newest_per_run(h: np.ndarray, users: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Of each query item's (h, user) entries, the `level` highest users:
    two (m',) int64 arrays, by item, then user."""
    order = np.lexsort((users, h))
    h, users = h[order], users[order]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    ends = np.r_[starts[1:], h.size]
    keep = np.repeat(ends, ends - starts) - np.arange(h.size) <= level  # 1 for a run's last, its newest
    return h[keep], users[keep]


def _within_counts(scores: np.ndarray, d: np.ndarray, items: np.ndarray, weights: np.ndarray, column) -> np.ndarray:
    """`scores` of `user_weighted` each kept within the most the exact one can
    be, Σ_i weights_i · min(d_i, d_j) · column(d_j) (C[i, j] is at most either
    item's users): a sampled estimate scaled up past it for a rare item
    scored it as no count could. A bound per item, not per pair as
    `pair_counts` clamps (which costs a sort of the sample, 5-10x the
    call): with many query items a rare one can still score above its exact
    score, never above what all its users could give. weights >= 0 (the
    affinities are). d: (N,) users per item; items, weights: (h,). Only the
    items reached; in place, returned."""
    reached = np.flatnonzero(scores)
    di = d[items]
    order = np.argsort(di)
    ds, ws = di[order], weights[order]
    below = np.concatenate([[0.0], np.cumsum(ws * ds)])  # Σ w_i d_i of the first k (the fewest users)
    above = np.concatenate([np.cumsum(ws[::-1])[::-1], [0.0]])  # Σ w_i of the rest
    dj = d[reached]
    k = np.searchsorted(ds, dj, side="right")
    bound = below[k] + dj * above[k]
    scores[reached] = np.minimum(scores[reached], bound if column is None else bound * column(dj))
    return scores


def _matches(values: np.ndarray, heads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, k) with values[i] == heads[k], as two (m,) int64 arrays."""
    if not values.size:
        return values, values
    order = np.argsort(heads, kind="stable")
    ordered = heads[order]
    first = np.searchsorted(ordered, values, "left")
    which, index = spans(first, np.searchsorted(ordered, values, "right") - first)
    return which, order[index]


def _run_sums(groups: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Σ values per group, for groups that come in runs (a query item's pairs
    follow each other): each run summed at once (reduceat), then the runs
    into their groups. A bincount adds a run into its bin one dependent add
    at a time: 0.69 ms against 0.03 for 178k pairs of 13 items. groups,
    values: (m,); returns (n,) float64."""
    if not groups.size:
        return np.zeros(n)
    starts = np.flatnonzero(np.diff(groups, prepend=-1))
    return np.bincount(groups[starts], weights=np.add.reduceat(values, starts), minlength=n)


def _earliest_per_pair(keys: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One entry per distinct key, with its earliest time: (m,) keys sorted, (m,) times.
    A stable sort of the keys (timsort: linear over the sorted run of an
    index's own pairs, as `pairs_until` gives them), then each run's minimum:
    at 500k pairs 17 ms, where a lexsort by (key, time) took 127."""
    if not keys.size:
        return keys, times
    order = np.argsort(keys, kind="stable")
    keys, times = keys[order], times[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[starts], np.minimum.reduceat(times, starts)


def _merged(keys: np.ndarray, times: np.ndarray, item_keys: np.ndarray, user_ptr: np.ndarray,
            item_ptr: np.ndarray, new_keys: np.ndarray, new_times: np.ndarray) -> tuple[np.ndarray, ...]:
    """The sorted arrays and row pointers with the pairs `new_keys` (sorted,
    none present yet) and their times inserted: O(P + w). New arrays; the
    inputs are left as they were."""
    at = np.searchsorted(keys, new_keys)
    by_item = np.sort(_swap(new_keys))
    return (np.insert(keys, at, new_keys), np.insert(times, at, new_times),
            np.insert(item_keys, np.searchsorted(item_keys, by_item), by_item),
            _shifted(user_ptr, new_keys >> _ITEM_BITS), _shifted(item_ptr, by_item >> _ITEM_BITS))


@dataclasses.dataclass(eq=False)
class Merge:
    """A merge of the waiting pairs into the sorted arrays, whose O(P) part,
    `build`, may run while other threads read and add (see
    Cooccurrence.begin_merge)."""

    generation: int
    keys: np.ndarray  # (w,) the waiting pairs taken, sorted
    times: np.ndarray  # (w,)
    base: tuple[np.ndarray, ...]  # the indexed arrays when it began
    result: tuple[np.ndarray, ...] | None = None

    def build(self) -> None:
        self.result = _merged(*self.base, self.keys, self.times)


class _PairReads:
    """Co-occurrence reads over a user × item incidence held as sorted pair
    keys (see Cooccurrence): for the index itself and for its views."""

    n_items: int
    _keys: np.ndarray  # (P,) user << 32 | item, sorted
    _item_keys: np.ndarray  # (P,) item << 32 | user, sorted
    _user_ptr: np.ndarray  # CSR row pointers into _keys
    _item_ptr: np.ndarray  # ... into _item_keys
    _item_counts: np.ndarray  # (N,) users per item

    def _waiting_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) of the pairs not in the sorted arrays: two (w,) arrays."""
        raise NotImplementedError

    def item_counts(self) -> np.ndarray:
        """C[i, i]: users per item. Returns (N,) float64 (a view: do not modify)."""
        return self._item_counts

    def sample_level(self, items, max_co_users: int | None) -> int | None:
        """The most users each query item gives co-occurrence reads (see
        `_co_users`) for the users of all `items` to stay within
        `max_co_users`: None where all fit or no limit is given. Of all
        their users, merged or waiting alike (by the indexed ones alone, an
        answer changed when a merge ran, a review). items: (h,) rows."""
        if max_co_users is None:
            return None
        return _level(self._item_counts[np.asarray(items, dtype=np.int64)].astype(np.int64), max_co_users)

    def _co_users(self, items: np.ndarray, level: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position in `items`, user) for every user of every query item, or
        with a `level` for at most that many of each item's users, merged or
        waiting: the newest (users are numbered as they come, so the highest
        rows), a sample whose cost does not grow with the log. Also each query item's
        scale, its users per user read (1 where all were): two (m,) int64
        arrays and (h,) float64."""
        starts, lengths = _runs(self._item_ptr, items)
        if level is not None:
            starts, lengths = starts + np.maximum(lengths - level, 0), np.minimum(lengths, level)
        h, index = spans(starts, lengths)
        waiting_users, waiting_items = self._waiting_pairs()
        hit, where = _matches(waiting_items, items)
        h, users = np.concatenate([h, where]), np.concatenate([self._item_keys[index] & _LOW, waiting_users[hit]])
        if level is None:
            return h, users, np.ones(items.shape[0])
        if where.size:  # the newest `level` of indexed and waiting users alike: the same sample before a merge and after
            h, users = _newest_per_run(h, users, level)
        read = np.bincount(h, minlength=items.shape[0])
        return h, users, self._item_counts[items] / np.maximum(read, 1)

    def _expand(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in `users`, item) for every item of each user (users may
        repeat): two (m,) int64 arrays."""
        pos, items = _ranges(self._user_ptr, self._keys, users)
        waiting_users, waiting_items = self._waiting_pairs()
        hit, where = _matches(waiting_users, users)
        return np.concatenate([pos, where]), np.concatenate([items, waiting_items[hit]])

    def _over_every_pair(self, users: np.ndarray, weights: np.ndarray, column=None) -> np.ndarray:
        """Σ over the pairs (v, j) of users[k] = v of weights[k], times
        column(C[j, j]) where given, for every item j, in one pass over all
        the pairs (each other user's weight 0), not by gathering the users'
        ranges first: where they hold most pairs (a popular item's users are
        most users), 4x faster. users: (u,) distinct; weights: (u,). Returns
        (N,) float64. Its work grows with the pairs and the items that have
        any, not with N: the column factor of all N items took most of 9 ms
        at 1M items and 8k pairs (0.16 ms at 10k items)."""
        per_user = np.zeros(max(self._user_ptr.shape[0] - 1, int(users.max(initial=-1)) + 1))
        per_user[users] = weights
        factor = (lambda js: 1.0) if column is None else (lambda js: column(self._item_counts[js]))
        # In item order each item's sum is one run's (reduceat), where a bincount over the user-sorted pairs
        # scattered every pair's weight: 1.95 -> 1.28 ms at 665k pairs. reduceat misreads an empty run.
        ptr, scores = self._item_ptr, np.zeros(self.n_items)
        held = np.flatnonzero(ptr[1:] > ptr[:-1])
        if held.size:
            scores[held] = np.add.reduceat(per_user[self._item_keys & _LOW], ptr[held]) * factor(held)
        waiting_users, waiting_items = self._waiting_pairs()
        hit, where = _matches(waiting_users, users)
        if hit.size:  # the few waiting pairs (see _MIN_MERGE)
            js = waiting_items[hit]
            np.add.at(scores, js, weights[where] * factor(js))
        return scores

    def pair_counts(self, items, level: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The nonzero entries of C[items, :] (diagonal included), without the
        (h, N) rows: (position in `items`, item, count) as (m,) int64, int64
        and float64 arrays, by position, then item. items: (h,) distinct rows.
        With a `level` (see `_co_users`), estimated from that sample of each
        query item's users: counts scaled up by the item's users per user
        read, at most either item's users."""
        items = np.asarray(items, dtype=np.int64)
        if not len(self) or not items.size:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0)
        h, users, scale = self._co_users(items, level)
        pos, js = self._expand(users)
        keys, counts = np.unique(h[pos] * self.n_items + js, return_counts=True)
        which, js = keys // self.n_items, keys % self.n_items
        if level is None:
            return which, js, counts.astype(np.float64)
        d = self._item_counts
        return which, js, np.minimum(counts * scale[which], np.minimum(d[items][which], d[js]))

    def rows(self, items) -> np.ndarray:
        """C[items, :]: (h, N) float64 co-occurrence counts (diagonal included).
        items: (h,) distinct rows."""
        out = np.zeros((np.shape(items)[0], self.n_items))
        which, js, counts = self.pair_counts(items)
        out[which, js] = counts
        return out

    def user_weighted(self, items, weights, column=None, diagonal: bool = True, level: int | None = None) -> np.ndarray:
        """Σ_i weights_i · C[i, j] · column(C[j, j]) for every item j, without
        materialising the rows: each co-user v adds (Σ of the weights of the
        query items v consumed) to every item of v. items, weights: (h,),
        items distinct; column: a function of (m,) item counts, or None for 1
        (it is applied per reached item, not to all N). Without the `diagonal`
        (i = j left out of the sum), a query item's score is summed again
        over its own users, each adding the other query items' weights: one
        that shares no user with another gets exactly 0, not what subtracting
        its own term leaves (~1e-16, which a division by the maximum made a
        full-weight score). With a `level`, estimated from a sample of each
        query item's users (see `_co_users`), each scaled up by its item's
        users per user read, each score kept within what C allows
        (`_within_counts`). Returns (N,) float64."""
        items = np.asarray(items, dtype=np.int64)
        weights = np.asarray(weights, dtype=np.float64)
        if not len(self) or not items.size:
            return np.zeros(self.n_items)
        h, users, scale = self._co_users(items, level)
        at_item = (weights if level is None else weights * scale)[h]
        if users.size and users.max() < 64 * users.size:  # dense enough: counting beats sorting
            by_user = np.bincount(users, weights=at_item)
            co_users = np.flatnonzero(by_user)
            per_user, at_pair = by_user[co_users], by_user[users]
        else:
            co_users, inverse = np.unique(users, return_inverse=True)
            per_user = np.bincount(inverse, weights=at_item, minlength=co_users.size)
            at_pair = per_user[inverse]
        if _runs(self._user_ptr, co_users)[1].sum() >= _DENSE_SHARE * self._keys.size:  # their sorted pairs
            scores = self._over_every_pair(co_users, per_user, column)
        else:
            pos, js = self._expand(co_users)
            added = per_user[pos] if column is None else per_user[pos] * column(self._item_counts[js])
            scores = np.bincount(js, weights=added, minlength=self.n_items)  # float64 already
        if not diagonal and level is None:
            others = np.maximum(at_pair - at_item, 0.0)  # (a + b) - a can round below 0
            own = _run_sums(h, others, items.size)
            scores[items] = own if column is None else own * column(self._item_counts[items])
        elif not diagonal:
            # A co-user sampled for another query item counts for this one too, as for any item: its sum less
            # its own term (the sum over its own sample alone missed them). What rounding leaves of 0 is 0.
            own = (weights * scale * np.bincount(h, minlength=items.size)) * (
                1.0 if column is None else column(self._item_counts[items]))
            left = scores[items] - own
            scores[items] = np.where(left > 1e-9 * own, left, 0.0)
        if level is not None:
            scores = _within_counts(scores, self._item_counts, items, weights, column)
        return scores


@dataclasses.dataclass(frozen=True, eq=False)
class CooccurrenceView(_PairReads):
    """A Cooccurrence as it was when `Cooccurrence.view` took it: reads only."""

    n_items: int
    _keys: np.ndarray
    _item_keys: np.ndarray
    _user_ptr: np.ndarray
    _item_ptr: np.ndarray
    _item_counts: np.ndarray
    _waiting_users: np.ndarray
    _waiting_items: np.ndarray

    def _waiting_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        return self._waiting_users, self._waiting_items

    def __len__(self) -> int:
        return int(self._keys.size + self._waiting_users.size)


class Cooccurrence(_PairReads):
    """User × item incidence with on-demand co-occurrence.

    Users and items are dense int rows (callers map ids to rows). `add` is
    idempotent per (user, item) pair and order-independent. Each pair is held
    once, as a 64-bit key in two sorted arrays (by user, then by item) with
    its time (~24 bytes a pair), and CSR row pointers into both (8 bytes a
    user and an item) find a user's items or an item's users. New pairs
    gather in a small dict first, so a write never re-sorts everything and a
    read after a write pays only for the pairs still waiting.
    """

    def __init__(self, n_items: int = 0):
        self.n_items = int(n_items)
        self._keys = np.zeros(0, dtype=np.int64)  # (P,) user << 32 | item, sorted
        self._times = np.zeros(0, dtype=np.float64)  # (P,) when each pair first happened
        self._item_keys = np.zeros(0, dtype=np.int64)  # (P,) item << 32 | user, sorted
        self._user_ptr = self._item_ptr = np.zeros(1, dtype=np.int64)  # into _keys / _item_keys
        self._waiting: dict[int, float] = {}  # new pairs not merged yet: key -> time
        self._waiting_arrays: tuple[np.ndarray, np.ndarray] | None = None  # their (users, items), for reads
        self._generation = 0  # moves on every change of the sorted arrays
        self._in_flight: Merge | None = None
        self._retimed: list[tuple[np.ndarray, np.ndarray]] = []  # indexed pairs moved earlier meanwhile
        self.newest = -np.inf
        self._item_counts = np.zeros(self.n_items, dtype=np.float64)

    def resize(self, n_items: int) -> None:
        """Grows the item space (new items have no users)."""
        if n_items > self.n_items:
            self._item_counts = np.concatenate([self._item_counts, np.zeros(n_items - self.n_items)])
            self.n_items = int(n_items)

    def add(self, user_rows, item_rows, times=None) -> int:
        """Adds (user, item) pairs: user_rows, item_rows (n,) ints (negative
        items are skipped); times (n,) seconds (default 0): a pair keeps its
        earliest time, for `as_of` reads. Returns how many pairs were new.
        Vectorized: the batch is reduced to one entry per pair, then looked up
        by binary search and in the waiting dict at C speed (`map`)."""
        users = np.asarray(user_rows, dtype=np.int64).reshape(-1)
        items = np.asarray(item_rows, dtype=np.int64).reshape(-1)
        times = np.zeros(users.shape[0]) if times is None else np.asarray(times, dtype=np.float64).reshape(-1)
        ok = items >= 0
        users, items, times = users[ok], items[ok], times[ok]
        if not users.size:
            return 0
        self.newest = max(self.newest, float(times.max()))
        keys, times = _earliest_per_pair((users << _ITEM_BITS) | items, times)
        # Pairs already indexed: a late event may move one earlier.
        at = np.minimum(np.searchsorted(self._keys, keys), max(self._keys.size - 1, 0))
        indexed = self._keys[at] == keys if self._keys.size else np.zeros(keys.size, dtype=bool)
        self._times[at[indexed]] = np.minimum(self._times[at[indexed]], times[indexed])
        if self.merging and indexed.any():
            self._retimed.append((keys[indexed], times[indexed]))
        keys, times = keys[~indexed], times[~indexed]
        known = np.fromiter(map(self._waiting.get, keys.tolist(), itertools.repeat(np.nan, keys.size)),
                            dtype=np.float64, count=keys.size)
        new = np.isnan(known)
        earlier = new | (times < known)
        self._waiting.update(zip(keys[earlier].tolist(), times[earlier].tolist()))
        if not new.any():
            return 0
        items = keys[new] & _LOW
        self.resize(int(items.max()) + 1)
        self._item_counts += np.bincount(items, minlength=self.n_items)
        self._waiting_arrays = None
        if len(self._waiting) >= _INLINE_FACTOR * self._merge_size():
            self._merge()
        return int(new.sum())

    def _merge_size(self) -> int:
        return max(_MIN_MERGE, self._keys.size >> 6)

    def _waiting_keys_and_times(self) -> tuple[np.ndarray, np.ndarray]:
        """The waiting pairs' keys and times: two (w,) arrays."""
        n = len(self._waiting)
        return (np.fromiter(self._waiting.keys(), dtype=np.int64, count=n),
                np.fromiter(self._waiting.values(), dtype=np.float64, count=n))

    def _merge(self) -> None:
        """Moves the waiting pairs into the sorted arrays, here and now."""
        job = self._begin()
        job.build()
        self.end_merge(job)

    @property
    def merging(self) -> bool:
        """A merge has begun and not ended."""
        return self._in_flight is not None

    def begin_merge(self) -> Merge | None:
        """A merge of the waiting pairs, if enough wait and none is in flight.
        Call `build()` on it (the O(P) part: it only reads what it was given,
        so it may run without the caller's lock while others read and add),
        then `end_merge`. Call begin and end as any other method."""
        if self.merging or len(self._waiting) < self._merge_size():
            return None
        return self._begin()

    def _begin(self) -> Merge:
        keys, times = self._waiting_keys_and_times()
        order = np.argsort(keys)
        self._in_flight, self._retimed = Merge(
            self._generation, keys[order], times[order],
            (self._keys, self._times, self._item_keys, self._user_ptr, self._item_ptr)), []
        return self._in_flight

    def end_merge(self, job: Merge) -> bool:
        """Takes a built merge in, unless the arrays changed since it began (a
        removal or another merge): then it is dropped and its pairs keep
        waiting. Pairs moved earlier meanwhile keep their earlier times."""
        if job is not self._in_flight:
            return False
        self._in_flight = None
        if job.generation != self._generation or job.result is None:
            return False
        keys, times, item_keys, user_ptr, item_ptr = job.result
        for moved, earlier in self._retimed:
            at = np.searchsorted(keys, moved)
            times[at] = np.minimum(times[at], earlier)
        self._retimed = []
        # the taken pairs leave the dict, with any earlier time found meanwhile
        waited = np.fromiter(map(self._waiting.pop, job.keys.tolist()), dtype=np.float64, count=job.keys.size)
        at = np.searchsorted(keys, job.keys)
        times[at] = np.minimum(times[at], waited)
        self._keys, self._times, self._item_keys, self._user_ptr, self._item_ptr = keys, times, item_keys, user_ptr, item_ptr
        self._generation += 1
        self._waiting_arrays = None
        return True

    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Every pair's key and time (indexed, then waiting): two (P + w,) arrays."""
        waiting_keys, waiting_times = self._waiting_keys_and_times()
        return np.concatenate([self._keys, waiting_keys]), np.concatenate([self._times, waiting_times])

    def as_of(self, t: float) -> "Cooccurrence":
        """This index restricted to pairs that had happened by t (itself when
        every pair had). A look into the past costs one pass over all pairs."""
        if t >= self.newest:
            return self
        return Cooccurrence.from_pairs(self.n_items, *self.pairs_until(t))

    def pairs_until(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user rows, item rows, times) of the pairs that had happened by t:
        a copy, so a caller may build from it (`from_pairs`) while this index
        changes. Three (m,) arrays."""
        keys, times = self._pairs()
        keep = times <= t
        return keys[keep] >> _ITEM_BITS, keys[keep] & _LOW, times[keep]

    @classmethod
    def from_pairs(cls, n_items: int, user_rows, item_rows, times) -> "Cooccurrence":
        """A new index of these pairs (add's arguments), built in bulk: no
        waiting dict, whose million-entry updates hold the GIL for ~0.4 s."""
        users = np.asarray(user_rows, dtype=np.int64).reshape(-1)
        items = np.asarray(item_rows, dtype=np.int64).reshape(-1)
        times = np.asarray(times, dtype=np.float64).reshape(-1)
        ok = items >= 0
        index = cls(max(int(n_items), int(items[ok].max(initial=-1)) + 1))
        if not ok.any():
            return index
        index._keys, index._times = _earliest_per_pair((users[ok] << _ITEM_BITS) | items[ok], times[ok])
        index._item_keys = np.sort(_swap(index._keys))
        index._recount_pointers()
        index._item_counts = np.bincount(index._keys & _LOW, minlength=index.n_items).astype(np.float64)
        index.newest = float(index._times.max())
        return index

    def renumbered(self, new_item, n_items: int) -> "Cooccurrence":
        """A new index of these pairs with item i as new_item[i] ((N,) ints
        over this index's items, -1: dropped, increasing over the kept ones,
        as a compacted catalogue numbers them). Keeping the items' order keeps
        both key orders, so nothing is sorted again: O(pairs), where
        `from_pairs` of the same took 1.1 s at 5M pairs."""
        new_item = np.asarray(new_item, dtype=np.int64)

        def renamed(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """user << 32 | item keys: those of kept items, renamed, and which those are."""
            items = new_item[keys & _LOW]
            kept = items >= 0
            return ((keys[kept] >> _ITEM_BITS) << _ITEM_BITS) | items[kept], kept

        index = Cooccurrence(n_items)
        index._keys, kept = renamed(self._keys)
        index._times = self._times[kept]
        items = new_item[self._item_keys >> _ITEM_BITS]
        kept = items >= 0
        index._item_keys = (items[kept] << _ITEM_BITS) | (self._item_keys[kept] & _LOW)
        index._recount_pointers()
        keys, times = self._waiting_keys_and_times()  # pairs a merge in flight holds are still among them
        keys, kept = renamed(keys)
        index._waiting = dict(zip(keys.tolist(), times[kept].tolist()))
        old = np.flatnonzero(new_item[: self.n_items] >= 0)
        index._item_counts[new_item[old]] = self._item_counts[old]
        index.newest = float(max(index._times.max(initial=-np.inf), times[kept].max(initial=-np.inf)))
        return index

    def remove_user(self, user_row: int) -> int:
        """Forgets every pair of one user (e.g. an erasure); returns how many."""
        start, end = np.searchsorted(self._keys, [user_row << _ITEM_BITS, (user_row + 1) << _ITEM_BITS])
        waiting = [k for k in self._waiting if k >> _ITEM_BITS == user_row]
        if start == end and not waiting:
            return 0
        gone_keys = self._keys[start:end]
        self._keys = np.delete(self._keys, np.s_[start:end])
        self._times = np.delete(self._times, np.s_[start:end])
        self._item_keys = np.delete(self._item_keys, np.searchsorted(self._item_keys, _swap(gone_keys)))
        return self._forget(np.concatenate([gone_keys, np.array(waiting, dtype=np.int64)]), waiting)

    def remove_items(self, item_rows) -> int:
        """Forgets every pair of some items (e.g. deleted ones); returns how many."""
        rows = np.unique(np.asarray(item_rows, dtype=np.int64))
        rows = rows[rows >= 0]
        if not rows.size:
            return 0
        which, users = _ranges(self._item_ptr, self._item_keys, rows)
        rowset = set(rows.tolist())
        waiting = [k for k in self._waiting if k & _LOW in rowset]
        if not users.size and not waiting:
            return 0
        gone_keys = (users << _ITEM_BITS) | rows[which]  # by item, then user: as _item_keys holds them
        # Sorted as _keys holds them: the search then walks it in order (30k of 100k items at 2M pairs: 0.45 s
        # of random probes, a scaling review; here 2M Zipf pairs, 30k of 100k items: 0.25-0.30 s -> 0.12-0.13).
        doomed = np.searchsorted(self._keys, np.sort(gone_keys))
        self._keys, self._times = np.delete(self._keys, doomed), np.delete(self._times, doomed)
        self._item_keys = np.delete(self._item_keys, np.searchsorted(self._item_keys, _swap(gone_keys)))
        return self._forget(np.concatenate([gone_keys, np.array(waiting, dtype=np.int64)]), waiting)

    def _recount_pointers(self) -> None:
        self._user_ptr, self._item_ptr = _pointers(self._keys), _pointers(self._item_keys)

    def _forget(self, keys: np.ndarray, waiting: list[int]) -> int:
        """Drops `waiting` from the dict and `keys` (all removed pairs) from the
        counts, once they left the sorted arrays."""
        self._recount_pointers()
        self._generation += 1
        for key in waiting:
            del self._waiting[key]
        if waiting:
            self._waiting_arrays = None
        np.subtract.at(self._item_counts, keys & _LOW, 1.0)
        return int(keys.size)

    def __len__(self) -> int:
        return int(self._keys.size) + len(self._waiting)

    @property
    def nbytes(self) -> int:
        """Bytes of the indexed arrays (the waiting dict, at most 1/64 of them, aside)."""
        arrays = (self._keys, self._times, self._item_keys, self._user_ptr, self._item_ptr, self._item_counts)
        return sum(a.nbytes for a in arrays)

    def _waiting_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        if self._waiting_arrays is None:
            keys = np.fromiter(self._waiting.keys(), dtype=np.int64, count=len(self._waiting))
            self._waiting_arrays = (keys >> _ITEM_BITS, keys & _LOW)
        return self._waiting_arrays

    def view(self) -> "CooccurrenceView":
        """The index as it is now, for reads (`cooccurrence_scores`) without
        the owner's lock while this index takes writes: its sorted arrays are
        replaced on every change, never written in place (the times aside,
        which reads do not use), so the view shares them; the waiting pairs
        are taken as arrays and the item counts, updated in place, copied
        (O(N)). 2M pairs: a user whose items many others share reached most
        of them, 30 ms a read (0.8 s under "jaccard"), which the engine's
        lock held (a scaling review)."""
        users, items = self._waiting_pairs()
        return CooccurrenceView(self.n_items, self._keys, self._item_keys, self._user_ptr, self._item_ptr,
                                self._item_counts.copy(), users, items)


def cooccurrence_scores(index: _PairReads, items, affinity, similarity: str = "jaccard",
                        max_co_users: int | None = None) -> np.ndarray:
    """Σ_i affinity_i · sim(i, j) for every item j (the diagonal term left out).

    items: (h,) distinct item rows the user consumed; affinity: (h,) >= 0
    (e.g. decayed, weighted event counts). "cosine", "lift" and "count" are
    separable and cost one pass over the co-users' items; "jaccard" is not
    and passes over each query item's co-users' items (`pair_counts`).
    `max_co_users` bounds that work, which otherwise grows with the log (a
    popular item's users are most users): where the query items' users are
    more, C[i, j] is estimated from the newest users of each (`sample_level`:
    every item's users up to a common cut, ~max_co_users in all; at least
    one each). Returns (N,) float64, >= 0.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")
    items = np.asarray(items, dtype=np.int64)
    a = np.asarray(affinity, dtype=np.float64)
    n = index.n_items
    if items.size == 0:
        return np.zeros(n)
    d = index.item_counts()
    di = d[items]
    level = index.sample_level(items, max_co_users)
    if similarity == "jaccard":
        # Not separable: over the nonzero C[i, j] of a chunk of the query
        # items at a time, never (h, N) (a user of 1,000 items at 100k took
        # 605 ms that way, of 10k items 24 GB).
        scores = np.zeros(n)
        for start in range(0, items.size, _JACCARD_CHUNK):
            chunk = slice(start, start + _JACCARD_CHUNK)
            which, js, c = index.pair_counts(items[chunk], level)
            off_diagonal = js != items[chunk][which]
            which, js, c = which[off_diagonal], js[off_diagonal], c[off_diagonal]
            # The union holds both items' users: at least c, so never 0.
            sim = c / (di[chunk][which] + d[js] - c)
            scores += np.bincount(js, weights=a[chunk][which] * sim, minlength=n)
        return scores
    if similarity == "count":
        col = np.ones_like
    elif similarity == "cosine":
        def col(counts):
            return 1.0 / np.sqrt(np.maximum(counts, 1.0))
    else:  # lift
        def col(counts):
            return 1.0 / np.maximum(counts, 1.0)
    # The column factors go on each co-user's items, not on all N: at 100k
    # items, passes over the catalogue took most of the call.
    return index.user_weighted(items, a * col(di), col, diagonal=False, level=level)
