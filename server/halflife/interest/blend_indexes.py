"""What the blend keeps besides profiles: co-occurrence and popularity,
built from the event log (at start, and after another process erased a
user) and kept up to date event by event (`InterestEngine`)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from halflife.core.cooccurrence import Cooccurrence
from halflife.core.horizon import Entries, Horizon
from halflife.core.ranking import DecayedCounts, EntryLog

# The popularity log (the past's events, for looks into the past) drops erased
# events with their taking-back (EntryLog.net) once the takings-back number
# this many and 1/64 of its entries: until then each erased event costs 32 B,
# which only a restart gave back. Under the lock: 0.05 s at 1M entries, 0.5 s
# at 10M (a quarter taken back at once took 3.7 s there: more pairs to sort).
NET_LOG_MIN_TAKEN_BACK = 65_536
NET_LOG_SHARE = 1 / 64


class RowChange(NamedTuple):
    """A change of the catalogue's item rows that the blend follows: `dropped`
    rows (items deleted, or deleted and created anew under a new row), or
    every row r renumbered to `new_row[r]` (-1: dropped), as a compacted
    catalogue (`CatalogIndex.compact`) numbers them."""

    dropped: np.ndarray | None = None
    new_row: np.ndarray | None = None


@dataclasses.dataclass(eq=False)
class BlendIndexes:
    """Who consumed what (`cooccurrence`, users numbered by `user_rows`) and
    a decayed popularity prior (`popularity`, with the same events as a log,
    `popularity_log`, so that a look into the past counts only what had
    happened), which also answers for users without a profile (cold start).

    Entries stamped after the clock (clients whose clocks run ahead) wait in
    `ahead` until the clock reaches their time, so that reads at the clock
    keep the fast path of both indexes (see core/horizon.py); a read after
    the clock counts them on a copy. At most 1M (~32 MB) wait.

    An erased user's row is never handed out again: a new user given it
    would inherit the rest's pairs."""

    cooccurrence: Cooccurrence
    popularity: DecayedCounts
    popularity_log: EntryLog
    ahead: Horizon
    user_rows: dict[str, int]
    next_user_row: Iterator[int]

    @classmethod
    def empty(cls, n_items: int, popularity_half_life: float) -> BlendIndexes:
        """No events yet; popularity_half_life in seconds."""
        indexes = cls(Cooccurrence(0), DecayedCounts.empty(0, popularity_half_life), EntryLog(),
                      Horizon(max_held=1_000_000), {}, itertools.count())
        indexes.resize(n_items)
        return indexes

    def resize(self, n_items: int) -> None:
        self.cooccurrence.resize(n_items)
        self.popularity.resize(n_items)

    def entries(self, rows: np.ndarray, weights: np.ndarray, times: np.ndarray, user_ids: Sequence[str]) -> Entries:
        """What events bring: co-occurrence takes every item event of a
        non-negative weight (a 3-star rating is still a consumption),
        popularity only positive ones. rows: (n,) catalogue rows (-1: none);
        weights: (n,) their types'; times: (n,). Returns (times, users,
        items, weights) of the events taken, each (m,) (see `apply`)."""
        consumed = np.flatnonzero((rows >= 0) & (weights >= 0))
        numbered, counter = self.user_rows, self.next_user_row
        # Every user is numbered at their first event, whatever it was: a rebuild from the log (a restart,
        # another worker) skips the events of items deleted since, and numbered at a first consumption, a
        # user whose first was on such an item came later there, which moved co-occurrence's sample of
        # each item's newest users (`max_co_users`). In one comprehension: a method call an event took
        # ~1 us, 2.1 s of a 2.2M-event rebuild.
        users = np.array([numbered[u] if u in numbered else numbered.setdefault(u, next(counter))
                          for u in user_ids], dtype=np.int64)
        return times[consumed], users[consumed], rows[consumed], weights[consumed]

    def admit(self, now: float, times: np.ndarray, users: np.ndarray, items: np.ndarray, weights: np.ndarray) -> None:
        """Entries as `apply` takes them; those stamped after `now` (the clock) wait in `ahead`."""
        self.apply(*self.ahead.admit(now, times, users, items, weights))

    def apply(self, times: np.ndarray, users: np.ndarray, items: np.ndarray, weights: np.ndarray) -> None:
        """Entries, each (n,), into the indexes: a co-occurrence pair (users,
        items) where users >= 0, a popularity weight where weights != 0."""
        pairs = users >= 0
        if pairs.any():
            self.cooccurrence.add(users[pairs], items[pairs], times[pairs])
        counted = weights != 0
        if counted.any():
            rows, times, weights = items[counted], times[counted], weights[counted]
            # Erasures subtract here (an item whose every event is erased is exactly 0 again, see
            # DecayedCounts); what an item keeps below ~1e-16 of the erased weight (events ~a year
            # older, at a 7-day half-life) can round to 0 until a restart.
            self.popularity.add(rows, times, weights)
            log = self.popularity_log
            log.append(rows, times, weights)
            if log.taken_back >= max(NET_LOG_MIN_TAKEN_BACK, NET_LOG_SHARE * len(log)):
                log.net()  # erased events and their taking-back leave the log, as after a restart

    def forget_held_pairs(self, drop) -> None:
        """Held co-occurrence pairs whose (users, items) `drop` marks become
        popularity-only entries, as Cooccurrence.remove_* forgets the indexed ones."""
        self.ahead.map_held(lambda t, u, i, w: (t, np.where(drop(u, i), -1, u), i, w))

    def change_rows(self, changes: Sequence[RowChange]) -> None:
        """Follows the catalogue's changes of item rows, in order; the rows
        dropped between two renumberings at once (each drop is a pass over
        every pair: 40 deletes made in a rebuilt blend one at a time held the
        lock 3.6 s at 4M pairs)."""
        dropped: list[np.ndarray] = []
        for change in changes:
            if change.dropped is not None:
                dropped.append(change.dropped)
                continue
            if dropped:
                self._drop_items(np.concatenate(dropped))
                dropped = []
            self._renumber(change.new_row)
        if dropped:
            self._drop_items(np.concatenate(dropped))

    def _drop_items(self, rows: np.ndarray) -> None:
        self.cooccurrence.remove_items(rows)
        self.forget_held_pairs(lambda users, items: np.isin(items, rows))

    def _renumber(self, new_row: np.ndarray) -> None:
        self.resize(new_row.size)  # a blend built for fewer rows (rows added since) takes their places first
        size = int(np.count_nonzero(new_row >= 0))
        self.cooccurrence = self.cooccurrence.renumbered(new_row, size)
        self.popularity.take(np.flatnonzero(new_row >= 0))
        self.popularity_log.renumber(new_row)

        def renumber_held(times, users, items, weights):
            gone = new_row[items] < 0  # these count for nothing now (fn must keep the lengths)
            return times, np.where(gone, -1, users), np.maximum(new_row[items], 0), np.where(gone, 0, weights)

        self.ahead.map_held(renumber_held)
