"""The storage interface: records and the `Store` protocol.

The embedded default is SQLite (`halflife.storage.sqlite`); a shared store for
multi-replica deployments implements the same protocol.

Vectors are float32 and content-addressed inside a store: an item update or a
deleted item never changes the vector an already-recorded event used, so
replaying a user's events always rebuilds exactly the profile that was served.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Collection, ContextManager, Iterable, Iterator, Mapping, NamedTuple, Protocol, Sequence

import numpy as np


class StoreError(Exception):
    """The store cannot do what was asked (corrupt file, newer schema, I/O error)."""


class StoreDamagedError(StoreError):
    """The store's files are damaged (corrupt pages, not a database) or were
    deleted or replaced under the running server: writes are refused, so that
    none is acknowledged and then lost; an operator must restore or restart."""


class StoreUnavailableError(StoreError):
    """The store's files cannot be written or read right now (disk full, I/O
    error, read-only file, lock timeout), or a write failed with another one
    in its group commit: nothing of the call was stored, and a retry may
    succeed."""


class ResentEventsErasedError(Exception):
    """`record_events` stored nothing: events the caller had found stored
    (re-sent ones, whose texts it did not embed) were erased since. They are
    new again: embed them and retry."""

    def __init__(self, event_ids: Sequence[str]):
        self.event_ids = list(event_ids)
        super().__init__(f"re-sent events erased since: {', '.join(map(repr, self.event_ids[:3]))}")


class ItemsChangedError(Exception):
    """`record_events` stored nothing: an item that its new events name was
    upserted or deleted after the change version at which the caller read
    the items' vectors. Read them again and retry."""

    def __init__(self, item_ids: Sequence[str]):
        self.item_ids = list(item_ids)
        super().__init__(f"items changed while their events were recorded: {', '.join(map(repr, self.item_ids[:3]))}")


@dataclasses.dataclass(frozen=True)
class ItemRecord:
    id: str
    text: str
    categories: tuple[str, ...]
    attributes: Mapping[str, str]
    create_time: float | None  # unix seconds; None when unknown
    vector: np.ndarray  # (dim,) float32, L2-normalised
    # Set by the store when the id is created (not on updates): the last event
    # seq at that moment. Events at or below it concern an earlier item that
    # had this id and was deleted, so they must not count for this one.
    created_seq: int = 0
    # The model that embedded `vector` from `text` (InterestEngine's
    # embedder_id); None when the vector was given with the item.
    embedded_by: str | None = None


# A NamedTuple, not a frozen dataclass: one is built per event, and a tuple
# is built 3-4x faster (0.4 vs 1.4 us), immutable all the same.
class EventRecord(NamedTuple):
    event_id: str
    user_id: str
    type: int  # halflife.v1.EventType value
    item_id: str | None
    text: str | None
    value: float | None
    event_time: float  # unix seconds
    # (dim,) float32: what the event contributed (item's and/or text's embedding); None when a
    # store read it back damaged (see SqliteStore): such an event adds no direction to a profile.
    vector: np.ndarray | None
    seq: int = 0  # arrival order, assigned by the store; replays follow it


@dataclasses.dataclass(frozen=True)
class EventColumns:
    """A chunk of the event log as parallel columns, n events."""

    seqs: np.ndarray  # (n,) int64
    types: np.ndarray  # (n,) int64, API EventType values
    item_ids: list[str | None]
    user_ids: list[str]
    values: np.ndarray  # (n,) float64, NaN where none
    times: np.ndarray  # (n,) float64 unix seconds


class ProfileSnapshot(NamedTuple):
    """A user's profile as built from their events with seq <= `through_seq`,
    serialised by whoever built it (the interest engine); `key` says with
    what settings, so that a reader can tell one it cannot use. The store
    keeps one per user and interprets neither."""

    through_seq: int
    key: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class StoreHead:
    """How far a store's two logs reach: the newest event seq and change version issued."""

    event_seq: int
    change_version: int


@dataclasses.dataclass(frozen=True)
class Change:
    """An entry of the change feed: an item was upserted or deleted (`item_id`),
    or a user was erased (`item_id` None: the feed keeps no user id)."""

    version: int
    item_id: str | None
    origin: str  # the `Store.origin` of the instance that wrote it


# Called by a store just before a write, inside its transaction: raising
# refuses the write (nothing stored) and the caller gets the exception.
Guard = Callable[[], None]


class Store(Protocol):
    """Durable storage. Every mutating call is atomic (all or nothing) and
    durable on return (the commit reached the disk).

    Every mutating call takes a `guard` (e.g. `Deadline.check`): the store
    calls it holding the write lock, right before it writes, so a write that
    passed its guard commits before any write that starts after that moment
    (in this process or another one sharing the store), and one refused by it
    stores nothing.

    Several processes may share one store (`halflife serve --workers N`); each
    follows the others' writes through `head`, `changes_since` and
    `events_between`, skipping the changes its own `origin` wrote."""

    origin: str  # unique per open instance

    def upsert_items(self, items: Sequence[ItemRecord], guard: Guard | None = None) -> tuple[int, int]:
        """Inserts or replaces items by id; returns (created, updated)."""

    def delete_items(self, ids: Sequence[str], guard: Guard | None = None) -> list[str]:
        """Deletes items; returns the ids that existed. Events keep their vectors."""

    def get_items(self, ids: Sequence[str]) -> dict[str, ItemRecord]:
        """The items among `ids` that exist."""

    def iter_items(self) -> Iterator[ItemRecord]:
        """Every item, for building the in-memory catalogue at start; read
        in parts, as iter_events, so that items changed meanwhile may come
        as they were or as they are (a start catches up from the change
        feed)."""

    def list_items(self, after_id: str, limit: int) -> tuple[list[ItemRecord], str | None]:
        """A page of the catalogue in order of id (by UTF-8 bytes): the first
        `limit` items whose ids follow `after_id` ("": from the first), less
        any whose vector is damaged, and the id the next page follows (None
        when no item is left)."""

    def record_events(self, events: Sequence[EventRecord], guard: Guard | None = None,
                      items_as_of: int | None = None, stored_before: Collection[str] = (),
                      as_items: Collection[int] = ()) -> list[EventRecord]:
        """Stores the events whose event_id is new (also within the batch: the
        first one wins); returns those, with `seq` set, in arrival order. One
        call's events get consecutive seqs and commit atomically.

        items_as_of: the change version (`head().change_version`) at which the
        caller read the vectors of the items the events name. When one that a
        new event names changed after it, raises ItemsChangedError and stores
        nothing: the event would carry one version's vector and count for
        another (say, the item deleted and created anew meanwhile).

        stored_before: ids of `events` the caller found stored already (their
        vectors are placeholders). When one is not stored any more (erased
        since), raises ResentEventsErasedError and stores nothing.

        as_items: indexes of `events` whose vector is, bit for bit, the stored
        vector of the item they name as of `items_as_of` (ignored without it):
        the store may reference that vector instead of hashing the event's."""

    def existing_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        """Those of `event_ids` already stored."""

    def user_events(self, user_id: str) -> list[EventRecord]:
        """A user's events in arrival (`seq`) order."""

    def list_user_events(self, user_id: str, after_seq: int, limit: int, newest_first: bool = False,
                         start_time: float = -math.inf, end_time: float = math.inf) -> tuple[list[EventRecord], int | None]:
        """A page of the user's log in seq order (newest_first: the reverse):
        their first `limit` events after `after_seq` in that order (0: from
        the start) whose event_time lies in [start_time, end_time), without
        vectors (each None), and the seq the next page follows (None when no
        such event is left)."""

    def user_history(self, user_id: str, from_snapshot: bool = True, through_time: float = math.inf,
                     chunk: int = 10_000) -> ContextManager[tuple[ProfileSnapshot | None, Iterator[list[EventRecord]]]]:
        """The user's profile snapshot, if one is stored and `from_snapshot`,
        and their events after it (all of them without one) stamped up to
        `through_time`, in replay order (by time, ties by seq), in lists of up
        to `chunk`: what a replay reads, a chunk in memory at a time. Read
        together within the block: an erasure happens before every read or
        after all of them."""

    def save_profile_snapshot(self, user_id: str, snapshot: ProfileSnapshot) -> bool:
        """Stores the user's snapshot in place of theirs, unless that one
        covers more events with the same key, or the user's event at
        `through_seq` is gone (erased since the events were read). Returns
        whether it was stored. `delete_user` erases it with the events."""

    def iter_events(self, chunk: int = 50_000, through_seq: int | None = None,
                    user_id: str | None = None, after_seq: int = 0) -> Iterator[EventColumns]:
        """All events (after `after_seq` and up to `through_seq`; `user_id`'s
        only, where given) in seq order, in chunks, without vectors: what
        rebuilding popularity and co-occurrence needs, and taking a user's
        share of them back. Each chunk may be read apart (a long pass must
        not hold one snapshot: see SqliteStore): events erased meanwhile
        may be in the chunks read before and not in those after."""

    def events_between(self, after_seq: int, through_seq: int,
                       vectors_of: Callable[[str], bool] | None = None) -> list[EventRecord]:
        """Events with after_seq < seq <= through_seq, in seq order, with
        vectors: only those of the users `vectors_of` picks, where given (a
        vector is most of an event's read: a follower catching up needs them
        for its cached profiles alone)."""

    def head(self) -> StoreHead:
        """The newest event seq and change version issued so far."""

    def changes_since(self, version: int) -> list[Change]:
        """Feed entries newer than `version`, oldest first; an item appears once, at its latest change."""

    def prune_change_feed(self) -> int:
        """Drops the feed entries nothing can need once no process follows
        the feed (those of deleted items, the erasure entries), versions
        staying monotonic; returns how many. Only while no other process
        has the store open: one behind them would miss those changes."""

    def delete_user(self, user_id: str, guard: Guard | None = None) -> int:
        """Erases a user's events, their profile snapshot and the vectors only
        they referenced; returns the event count."""

    def bind_vectors(self, space: str, model: str) -> tuple[str, str]:
        """Records that the store's vectors live in `space` (a model's
        `EmbeddingEngine.vector_space`; `model` names it for people) unless
        one is recorded already and the store holds a vector, and returns
        the recorded (space, model)."""

    def bound_vectors(self) -> tuple[str, str] | None:
        """The recorded (space, model) of `bind_vectors`, None while none is."""

    def vector_size(self) -> int | None:
        """The length of the newest stored vector (every one has the length
        of the model that made it), or None while none is stored."""

    def item_count(self) -> int:
        """How many items are stored."""

    def event_count(self, user_id: str | None = None) -> int:
        """How many events are stored (`user_id`'s only, where given)."""

    def close(self) -> None: ...


def first_of_each_id(events: Iterable[EventRecord]) -> dict[str, int]:
    """Event id -> the index of its first event in `events`: of events
    sharing an id, the one `Store.record_events` keeps. Takes anything with
    an `event_id` (EventInput too)."""
    first: dict[str, int] = {}
    for i, event in enumerate(events):
        first.setdefault(event.event_id, i)
    return first


def as_vector(values: Iterable[float] | np.ndarray) -> np.ndarray:
    """(dim,) float32 contiguous copy."""
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(-1))
