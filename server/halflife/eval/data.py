"""The evaluation's view of a dataset and its temporal splits.

Events are ratings (value) and user-written texts (tags), merged and sorted
by time. A *query point* is (user, t, relevant items): the method must rank
the whole catalogue for that user at time t knowing only events strictly
before t; relevant items are the user's positive ratings (value >=
`POSITIVE_MIN`) at or after t in the target window, minus what they consumed
before t. Splits never look at the future: `events_before(t)` is the only
view any method gets.

- `global_cut`: one time t for everyone (e.g. the 90% quantile of event
  times); targets are the window [t, end).
- `leave_last_out`: per user, their last n ratings by time are held out
  (with any tied with the first of them) and t is the time of the first.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from halflife.config import RatingConfig
from halflife.datasets.interactions import MOVIELENS, DatasetFormat, load_dataset

RATING, TEXT = 0, 1
# A rating the user liked, in the targets and the baselines: what the server takes as positive by default.
POSITIVE_MIN = RatingConfig.positive_min


def run_starts(rows: np.ndarray, n: int) -> np.ndarray:
    """Where each of rows 0..n-1 starts in `rows` sorted (stably), and where
    the last ends: (n + 1,) int64, row r's run at [starts[r], starts[r + 1])."""
    return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])


@dataclasses.dataclass(frozen=True)
class UserIndex:
    code: dict[str, int]  # user -> a number, 0.. in the order of their first event
    codes: np.ndarray  # (n,) int64, each event's user's number
    order: np.ndarray  # (n,) int64 event rows by user, each user's in time order
    starts: np.ndarray  # (users + 1,) int64: user k's rows are order[starts[k] : starts[k + 1]]


@dataclasses.dataclass(frozen=True)
class EvalData:
    item_ids: list[str]
    item_texts: list[str]
    item_categories: list[tuple[str, ...]]
    item_create_times: list[float | None]
    users: np.ndarray  # (n,) str, events sorted by time (ties: ratings before texts, then file order)
    items: np.ndarray  # (n,) int64 item rows
    values: np.ndarray  # (n,) float64, NaN for texts
    times: np.ndarray  # (n,) float64 unix seconds
    kinds: np.ndarray  # (n,) RATING or TEXT
    texts: np.ndarray  # (n,) object: the user's text for TEXT events, "" otherwise

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def before(self, t: float) -> int:
        """Number of events strictly before t (they are a prefix)."""
        return int(np.searchsorted(self.times, t, side="left"))

    def user_events(self, user: str, stop: int | None = None) -> np.ndarray:
        """(k,) int64: the rows of the user's events in time order (those
        before row `stop` where given), from `by_user`: a scan of every event
        per user or query took ~a week for ml-25m's splits."""
        index = self.by_user
        code = index.code.get(user)
        if code is None:
            return np.zeros(0, dtype=np.int64)
        mine = index.order[index.starts[code] : index.starts[code + 1]]
        return mine if stop is None else mine[: np.searchsorted(mine, stop)]

    @functools.cached_property
    def by_user(self) -> UserIndex:
        """The events grouped by user, built once: the ids hashed, not sorted (0.3 s per million events)."""
        code: dict[str, int] = {}
        codes = np.fromiter((code.setdefault(u, len(code)) for u in self.users.tolist()), dtype=np.int64,
                            count=self.users.size)
        order = np.argsort(codes, kind="stable")
        return UserIndex(code, codes, order, run_starts(codes, len(code)))

    def without_texts(self) -> "EvalData":
        keep = self.kinds == RATING
        return dataclasses.replace(self, **{f: getattr(self, f)[keep] for f in ("users", "items", "values", "times", "kinds", "texts")})


def load_eval_data(directory: str | Path, fmt: DatasetFormat = MOVIELENS, **window: float) -> EvalData:
    """window: load_dataset's earliest and latest times, where not any a date can hold."""
    ds = load_dataset(directory, fmt, **window)
    ids = [i.id for i in ds.items]
    row = {item_id: r for r, item_id in enumerate(ids)}
    r, x = ds.interactions, ds.texts
    r_keep = np.array([i in row for i in r.items], dtype=bool)
    x_keep = np.array([i in row for i in x.items], dtype=bool)
    users = np.concatenate([r.users[r_keep], x.users[x_keep]]).astype(object)
    items = np.array([row[i] for i in r.items[r_keep]] + [row[i] for i in x.items[x_keep]], dtype=np.int64)
    values = np.concatenate([r.values[r_keep], np.full(int(x_keep.sum()), np.nan)])
    times = np.concatenate([r.times[r_keep], x.times[x_keep]])
    kinds = np.concatenate([np.full(int(r_keep.sum()), RATING), np.full(int(x_keep.sum()), TEXT)])
    texts = np.concatenate([np.full(int(r_keep.sum()), "", dtype=object), x.texts[x_keep].astype(object)])
    order = np.lexsort((np.arange(times.size), kinds, times))
    return EvalData(
        ids, [i.text for i in ds.items], [i.categories for i in ds.items], [i.create_time for i in ds.items],
        users[order], items[order], values[order], times[order], kinds[order], texts[order],
    )


@dataclasses.dataclass(frozen=True)
class Query:
    user: str
    t: float
    relevant: np.ndarray  # (r,) item rows


def seen_before(data: EvalData, user: str, t: float) -> np.ndarray:
    """(N,) bool: items the user had any event with before t."""
    seen = np.zeros(data.n_items, dtype=bool)
    seen[data.items[data.user_events(user, data.before(t))]] = True
    return seen


def global_cut(data: EvalData, start: float, end: float, warm_only: bool = True) -> list[Query]:
    """One query per user with a positive rating in [start, end), at t = start.
    warm_only: only users with at least one rating before start."""
    n0, n1 = data.before(start), data.before(end)
    window = slice(n0, n1)
    positive = (data.kinds[window] == RATING) & (data.values[window] >= POSITIVE_MIN)
    warm = set(data.users[:n0][data.kinds[:n0] == RATING].tolist())
    queries = []
    for user in sorted(set(data.users[window][positive].tolist())):
        if warm_only and user not in warm:
            continue
        mine = data.user_events(user, n1)
        mine = mine[np.searchsorted(mine, n0):]
        mine = data.items[mine][(data.kinds[mine] == RATING) & (data.values[mine] >= POSITIVE_MIN)]
        seen = seen_before(data, user, start)
        relevant = np.unique(mine[~seen[mine]])
        if relevant.size:
            queries.append(Query(user, float(start), relevant))
    return queries


def leave_last_out(data: EvalData, n: int = 5, min_history: int = 5) -> list[Query]:
    """Per user: their last n ratings (by time) held out, and any other at
    the first one's time t: a history holds what came strictly before t, so
    a rating tied with t would be neither history nor target (nor seen). Everything at or after t (their own and other
    users') is unseen. Users with fewer than min_history earlier ratings, or
    no positive among the held-out ones, are skipped. Sorted by t."""
    is_rating = data.kinds == RATING
    queries = []
    for user in sorted(set(data.users[is_rating].tolist())):
        mine = data.user_events(user)
        first = mine[0]  # of any kind: a text before t is history too
        mine = mine[is_rating[mine]]
        if mine.size < n + min_history:
            continue
        t = float(data.times[mine[-n]])
        held = mine[data.times[mine] >= t]
        if mine.size - held.size < min_history:  # ties held out too: count the history again
            continue
        if first >= data.before(t):
            continue
        positive = held[data.values[held] >= POSITIVE_MIN]
        seen = seen_before(data, user, t)
        relevant = np.unique(data.items[positive][~seen[data.items[positive]]])
        if relevant.size:
            queries.append(Query(user, t, relevant))
    return sorted(queries, key=lambda q: (q.t, q.user))


def time_quantiles(data: EvalData, *qs: float) -> list[float]:
    """Event-time quantiles of the ratings (e.g. 0.8, 0.9 for train/valid/test)."""
    return [float(v) for v in np.quantile(data.times[data.kinds == RATING], qs)]
