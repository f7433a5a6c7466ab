"""Item co-occurrence ("people who consumed i also consumed j"), pure NumPy.

`Cooccurrence` keeps the user × item incidence X (a pair is present once,
however often it recurs) in growable arrays and computes co-occurrence on
demand from it, C[i, j] = #users who consumed both i and j, so nothing of
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

import itertools

import numpy as np

SIMILARITIES = ("count", "jaccard", "cosine", "lift")
_ITEM_BITS = 32  # a pair's key: user << 32 | item (items < 2**32, users < 2**31)


def _gather(ptr: np.ndarray, values: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every CSR entry of each key, vectorized: (position of the key in `keys`,
    value) as two (m,) int64 arrays. ptr: (n + 1,) row pointers into values."""
    starts, ends = ptr[keys], ptr[keys + 1]
    lengths = ends - starts
    which = np.repeat(np.arange(keys.shape[0]), lengths)
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return which, values[np.repeat(starts, lengths) + offsets]


class Cooccurrence:
    """User × item incidence with on-demand co-occurrence.

    Users and items are dense int rows (callers map ids to rows). `add` is
    idempotent per (user, item) pair and order-independent; reads build a
    CSR/CSC view lazily after writes.
    """

    def __init__(self, n_items: int = 0):
        self.n_items = int(n_items)
        # pair key (user << 32 | item) -> time it first happened; int keys take
        # about half the memory of (user, item) tuples
        self._pairs: dict[int, float] = {}
        self._users = np.zeros(0, dtype=np.int64)
        self._items = np.zeros(0, dtype=np.int64)
        self._times = np.zeros(0, dtype=np.float64)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # new pairs' (users, items, times)
        self._retimed = False
        self.newest = -np.inf
        self._dirty = False
        self._item_counts = np.zeros(self.n_items, dtype=np.float64)

    def resize(self, n_items: int) -> None:
        """Grows the item space (new items have no users)."""
        if n_items > self.n_items:
            self._item_counts = np.concatenate([self._item_counts, np.zeros(n_items - self.n_items)])
            self.n_items = int(n_items)
            self._dirty = True

    def add(self, user_rows, item_rows, times=None) -> int:
        """Adds (user, item) pairs: user_rows, item_rows (n,) ints (negative
        items are skipped); times (n,) seconds (default 0): a pair keeps its
        earliest time, for `as_of` reads. Returns how many pairs were new.
        Vectorized: the batch is reduced to one entry per pair, then looked up
        in the pair map at C speed (`map`), with no Python loop per event."""
        users = np.asarray(user_rows, dtype=np.int64).reshape(-1)
        items = np.asarray(item_rows, dtype=np.int64).reshape(-1)
        times = np.zeros(users.shape[0]) if times is None else np.asarray(times, dtype=np.float64).reshape(-1)
        ok = items >= 0
        users, items, times = users[ok], items[ok], times[ok]
        if not users.size:
            return 0
        self.newest = max(self.newest, float(times.max()))
        keys = (users << _ITEM_BITS) | items
        order = np.lexsort((times, keys))  # by pair, earliest first
        firsts = order[np.r_[True, keys[order][1:] != keys[order][:-1]]]
        firsts.sort()  # keep arrival order
        users, items, times, keys = users[firsts], items[firsts], times[firsts], keys[firsts]
        known = np.fromiter(map(self._pairs.get, keys.tolist(), itertools.repeat(np.nan, keys.size)),
                            dtype=np.float64, count=keys.size)
        new = np.isnan(known)
        earlier = new | (times < known)  # a late event: the pair happened earlier than thought
        self._pairs.update(zip(keys[earlier].tolist(), times[earlier].tolist()))
        if (earlier & ~new).any():
            self._retimed = self._dirty = True
        if not new.any():
            return 0
        self.resize(int(items[new].max()) + 1)
        self._pending.append((users[new], items[new], times[new]))
        self._item_counts += np.bincount(items[new], minlength=self.n_items)
        self._dirty = True
        return int(new.sum())

    def as_of(self, t: float) -> "Cooccurrence":
        """This index restricted to pairs that had happened by t (itself when
        every pair had). A look into the past costs one pass over all pairs."""
        if t >= self.newest:
            return self
        self._index()
        keep = self._times <= t
        past = Cooccurrence(self.n_items)
        past.add(self._users[keep], self._items[keep], self._times[keep])
        return past

    def remove_user(self, user_row: int) -> int:
        """Forgets every pair of one user (e.g. an erasure); returns how many."""
        self._index()
        mine = self._users == user_row
        gone = int(mine.sum())
        if gone:
            np.subtract.at(self._item_counts, self._items[mine], 1.0)
            self._pairs = {p: t for p, t in self._pairs.items() if p >> _ITEM_BITS != user_row}
            self._users, self._items, self._times = self._users[~mine], self._items[~mine], self._times[~mine]
            self._dirty = True
        return gone

    def remove_items(self, item_rows) -> int:
        """Forgets every pair of some items (e.g. deleted ones); returns how many."""
        rows = np.asarray(item_rows, dtype=np.int64)
        rows = rows[rows >= 0]
        if not rows.size:
            return 0
        self._index()
        mine = np.isin(self._items, rows)
        gone = int(mine.sum())
        if gone:
            self._item_counts[rows] = 0.0
            doomed = set(rows.tolist())
            mask = (1 << _ITEM_BITS) - 1
            self._pairs = {p: t for p, t in self._pairs.items() if p & mask not in doomed}
            self._users, self._items, self._times = self._users[~mine], self._items[~mine], self._times[~mine]
            self._dirty = True
        return gone

    def __len__(self) -> int:
        return len(self._pairs)

    def item_counts(self) -> np.ndarray:
        """C[i, i]: users per item. Returns (N,) float64 (a view: do not modify)."""
        return self._item_counts

    def _index(self) -> None:
        if not self._dirty:
            return
        if self._pending:
            users, items, times = zip(*self._pending)
            self._users = np.concatenate([self._users, *users])
            self._items = np.concatenate([self._items, *items])
            self._times = np.concatenate([self._times, *times])
            self._pending = []
        if self._retimed:
            keys = ((self._users << _ITEM_BITS) | self._items).tolist()
            self._times = np.fromiter(map(self._pairs.__getitem__, keys), dtype=np.float64, count=len(keys))
            self._retimed = False
        n_users = int(self._users.max()) + 1 if self._users.size else 0
        by_user = np.argsort(self._users, kind="stable")
        self._user_items = self._items[by_user]
        self._user_ptr = np.concatenate([[0], np.cumsum(np.bincount(self._users, minlength=n_users))])
        by_item = np.argsort(self._items, kind="stable")
        self._item_users = self._users[by_item]
        self._item_ptr = np.concatenate([[0], np.cumsum(np.bincount(self._items, minlength=self.n_items))])
        self._dirty = False

    def _co_users(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(h index, user) for every user of every query item: two (m,) int64 arrays."""
        return _gather(self._item_ptr, self._item_users, items)

    def _expand(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in `users`, item) for every item of each user: two (m,) int64 arrays."""
        return _gather(self._user_ptr, self._user_items, users)

    def rows(self, items) -> np.ndarray:
        """C[items, :]: (h, N) float64 co-occurrence counts (diagonal included)."""
        items = np.asarray(items, dtype=np.int64)
        out = np.zeros((items.shape[0], self.n_items))
        self._index()
        if not self._users.size or not items.size:
            return out
        h, users = self._co_users(items)
        pos, js = self._expand(users)
        out.reshape(-1)[:] = np.bincount(h[pos] * self.n_items + js, minlength=out.size)
        return out

    def user_weighted(self, items, weights) -> np.ndarray:
        """Σ_i weights_i · C[i, :] without materialising the rows: each co-user
        v adds (Σ of the weights of the query items v consumed) to every item
        of v. items, weights: (h,). Returns (N,) float64 (diagonal included)."""
        items = np.asarray(items, dtype=np.int64)
        weights = np.asarray(weights, dtype=np.float64)
        self._index()
        if not self._users.size or not items.size:
            return np.zeros(self.n_items)
        h, users = self._co_users(items)
        per_user = np.bincount(users, weights=weights[h])
        co_users = np.flatnonzero(per_user)
        pos, js = self._expand(co_users)
        return np.bincount(js, weights=per_user[co_users][pos], minlength=self.n_items).astype(np.float64)


def cooccurrence_scores(index: Cooccurrence, items, affinity, similarity: str = "jaccard") -> np.ndarray:
    """Σ_i affinity_i · sim(i, j) for every item j (the diagonal term left out).

    items: (h,) distinct item rows the user consumed; affinity: (h,) >= 0
    (e.g. decayed, weighted event counts). "cosine", "lift" and "count" are
    separable and cost one pass over the co-users' items; "jaccard" needs
    the (h, N) rows. Returns (N,) float64, >= 0.
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
    if similarity == "jaccard":
        c = index.rows(items)
        c[np.arange(items.size), items] = 0.0
        union = di[:, None] + d[None, :] - c
        sim = np.divide(c, union, out=np.zeros_like(c), where=union > 0)
        return a @ sim
    if similarity == "count":
        scaled, col = a, np.ones(n)
    elif similarity == "cosine":
        scaled, col = a / np.sqrt(np.maximum(di, 1.0)), 1.0 / np.sqrt(np.maximum(d, 1.0))
    else:  # lift
        scaled, col = a / np.maximum(di, 1.0), 1.0 / np.maximum(d, 1.0)
    scores = index.user_weighted(items, scaled) * col
    # C[i, i] · (scaled_i) · col_i is each query item's own term: remove it.
    scores[items] -= scaled * di * col[items]
    return np.maximum(scores, 0.0)
