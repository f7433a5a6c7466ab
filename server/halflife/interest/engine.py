"""The interest engine: catalogue, events, profiles and recommendations.

Coordinates the store (durable truth), the in-memory catalogue index, the
popularity counters and a bounded cache of user profiles, and calls the pure
numerical core for every computation. Knows nothing of gRPC; all methods are
blocking and thread-safe (the gRPC layer calls them from worker threads).
One lock guards the in-memory state; `recommend`, `similar_items` and
`profile` hold it to read what they need and to confirm their picks, but run
their products over the catalogue without it (`blend.CatalogueScan`), so
concurrent calls run on every core; a missing profile is replayed without it
too (`_cache_profile`).

Profiles are a deterministic function of a user's event log: a cached profile
is built by replaying the log (events sorted by time, ties by arrival), and
new events are applied to it on the next read. Events that arrive in time
order extend the cached profile; a late event (older than the newest applied)
makes the next read rebuild from the log, so the profile is always what a
replay after a restart would give, to rounding: events added a batch at a
time sum in another order than one replay (a strength's last digit; float32
similarities within ~1e-6; counts are exact). A long replay saves its profile
as a snapshot in the store, and a later miss replays only the events after it
where a replay of the whole log would pass through the snapshot (`_restore`).

Several server processes may share one store (`halflife serve --workers N`).
With `follow_store`, every call first catches up with what the others wrote
(`_catch_up`): changed items from the store's change feed, then new events
by seq, so any process answers as one that had taken every write itself.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import heapq
import itertools
import logging
import math
import threading
import time
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence, TypeVar

import numpy as np

from halflife import deadlines
from halflife.config import Config
from halflife.core.cooccurrence import Cooccurrence, cooccurrence_scores
from halflife.core.decay import es_kernel, half_life_kernel, kernel_sums
from halflife.core.describe import describe_clusters
from halflife.core.horizon import Entries
from halflife.core.profiles import negative_fade
from halflife.core.ranking import (
    EntryLog,
    RowBlocks,
    clip_cosines,
    cosine_scores,
    decayed_sum,
    log2_freshness,
    mmr,
    normalize,
    row_dots,
    top_k,
)
from halflife.cpu import physical_cores
from halflife.deadlines import Deadline
from halflife.interest.blend import Blend, CatalogueScan, Later, unit_max
from halflife.interest.blend_indexes import BlendIndexes, RowChange
from halflife.interest.catalog import CatalogIndex, CatalogRows
from halflife.interest.snapshot_saver import SnapshotSaver
from halflife.interest.explain import explanations, per_row, ranked_interests
from halflife.interest.replay import ProfileBuilder, Replayed
from halflife.interest.state import UserState
from halflife.interest.types import (
    EventInput,
    Explanation,
    InterestView,
    ItemFilter,
    ItemInput,
    Recommendation,
    ScoredItem,
    UnknownItemError,
    UnknownItemsError,
    UserProfile,
)
from halflife.interest.watermark import EventWatermark
from halflife.logs import Progress
from halflife.storage.base import (
    EventColumns,
    EventRecord,
    Guard,
    ItemRecord,
    ItemsChangedError,
    ResentEventsErasedError,
    Store,
    StoreDamagedError,
    StoreError,
    StoreHead,
    first_of_each_id,
)

log = logging.getLogger(__name__)

DAY = 86400.0
MMR_CANDIDATES_PER_RESULT = 5  # MMR re-ranks this many times `limit` candidates
# Replays of at least this many events run one at a time (InterestEngine._replay_turn):
# ~40 ms each and up, where shorter ones would wait behind a longer one for little gain.
LONG_REPLAY_EVENTS = 2000
# A replay reads and applies the log this many events at a time (Store.user_history),
# ~16 MB of them with their vectors: all at once, a 1M-event user's took 4.1 GiB.
# So do a kernel profile and an explanation (InterestEngine._directed_chunks).
# At least LONG_REPLAY_EVENTS, so that the first chunk tells a long replay (`_replay`).
REPLAY_CHUNK = 10_000
# A cached profile applies the events recorded for it at its next read
# (UserState.pending), each held with its vector (~1.6 KB) meanwhile, or
# once this many wait, as that read would have: a user written to and not
# read held every one (40k events: +74 MB, then a first read of 1.08 s under
# the lock; a soak). Dropping the profile there instead made each read of a
# user written to steadily replay the log since their snapshot (10k events:
# 7.5 -> 76 ms a read; a review), sometimes under the lock.
MAX_PENDING_EVENTS = 64
# Tries of record_events when items change between the read of their vectors
# and the commit: each later try reads them again and writes within a few ms.
RECORD_ATTEMPTS = 3
# The catalogue index drops its deleted items' rows (CatalogIndex.compact) once
# they number this many and this share of the live ones: until then every
# scan reads them and they hold their memory, which a catalogue that turns
# over (news, listings) grew without bound until a restart. Renumbering moves
# the live rows and renumbers the co-occurrence pairs and the popularity log
# under the lock (100k items, 1M events: 0.13 s), once per that many deletes.
COMPACT_MIN_DEAD_ROWS = 4096
COMPACT_DEAD_SHARE = 0.25
# Tries of a read that scores without the lock when a compaction renumbers the
# rows, or an upsert rewrites a pick, meanwhile; the last one holds the lock throughout.
STABLE_ROWS_ATTEMPTS = 2
# Another process's erasure names no user, so the blend's indexes are rebuilt
# from the whole log (~4.5 us an event: 2.2M events, 10-12 s). From this many
# events on that runs off the lock, the indexes as they were answering
# meanwhile, and the rebuilt ones are swapped in with the events applied since.
BACKGROUND_REBUILD_EVENTS = 100_000
# Rebuilds off the lock that this process's erasure meanwhile made stale, before one is built under the
# lock (others' erasures and item rows dropped or renumbered meanwhile do not: see `_rebuild_in_background`).
BACKGROUND_REBUILD_ATTEMPTS = 3
# A rebuild that raised (a read of the log failed), or an erasure's end, is
# tried again at a call this long after: each try is a pass over the whole log.
REBUILD_RETRY_S = 5.0
# How long a batch waits, without the locks, for one this process committed before it to be applied by its own
# thread (about to, unless that thread failed: then the batch reads it back from the log).
APPLY_ORDER_WAIT_S = 0.5
# The way out where a store's vectors come from another model (`_check_vectors`), which it said nothing of: a
# new data directory alone looked like the only one, losing every item and event (a config-change review).
REEMBED_HINT = ("empty, or this one's items and events copied for it by `halflife reembed --data-dir OLD --out NEW "
                "--model-dir DIR` (docs/interest.md, Storage)")


def refuse_other_models_store(stored: int | None, recorded: tuple[str, str] | None, dim: int,
                              space: tuple[str, str] | None, former: Sequence[str] = ()) -> None:
    """StoreError where a store of `stored`-dimensional vectors (None: it
    holds none) whose vectors come from `recorded` (`Store.bound_vectors`;
    None: not recorded) cannot serve a model of `dim`-d vectors in `space`
    (EmbeddingEngine.named_vector_space; None: unchecked), which earlier
    halflifes named `former` (EmbeddingEngine.former_vector_spaces): its
    items and events keep their vectors, so the new model's queries and
    items were ranked against the old one's, silently where the sizes
    matched, and a ValueError's traceback from the catalogue where they did
    not (reviews).
    A store from before the record is told by its size. A recorded model is
    named whatever its size: "another model" left a model change's operator
    to guess which one to roll back to (a model-upgrade review). Pure: a
    server checks what it reads of a store before opening it (which
    migrates it, `stored_vectors`), then again as its engine binds it."""
    same_space = recorded is not None and space is not None and (recorded[0] == space[0] or recorded[0] in former)
    if stored not in (None, dim) and (recorded is None or space is None or same_space):
        raise StoreError(f"the store holds {stored}-dimensional vectors, where this model's have {dim}: "
                         "it was built with another model; serve it with that one, or give this model a "
                         f"data directory of its own: {REEMBED_HINT}")
    if recorded is not None and space is not None and not same_space:
        (bound_space, bound_model), (space, model) = recorded, space
        raise StoreError(f"the store's vectors come from {bound_model} (vector space {bound_space[:12]}), and this "
                         f"model is {model} (vector space {space[:12]}): serve the store with its model, or give "
                         f"this one a data directory of its own: {REEMBED_HINT}")


# (texts, the caller's deadline or None) -> (n, dim) float32 unit rows
Embedder = Callable[[Sequence[str], Deadline | None], np.ndarray]


def _relative(popularity: np.ndarray, alive: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """The live items' popularity divided by its maximum: (size,) `dtype` in
    [0, 1] (deleted items 0; all 0 while none is positive). Below 0 is only
    an erasure's rounding (see DecayedCounts): 0."""
    return unit_max(np.where(alive & (popularity > 0), popularity, 0.0), dtype)


def _cosines(items: np.ndarray, rows, direction: np.ndarray) -> np.ndarray:
    """Cosines of `items`' `rows` (indices, or a slice) with the unit
    `direction`, row by row (the same for a row wherever it sits). float32."""
    return clip_cosines(row_dots(items[rows], direction))


def _nearest(items: np.ndarray, allowed: np.ndarray, picked: np.ndarray, direction: np.ndarray,
             limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The `limit` allowed rows of `items` nearest the unit `direction`, best
    first with every tie at the cut (as top_k(ties=True) gives them to
    `InterestEngine._best_by_id`), from `picked` (a GEMM's best, one more
    than `limit`; -1 pads). Their cosines are taken again row by row: a
    GEMM's rounding depends on where a row sits, which differs between
    workers, so equal vectors scored apart in the last bit. Where the cut
    falls in a tie, every allowed row is scored. Returns (rows, cosines)."""
    rows = picked[picked >= 0]
    scores = _cosines(items, rows, direction)
    order = np.argsort(-scores, kind="stable")
    rows, scores = rows[order], scores[order]
    if len(rows) > limit > 0 and scores[limit] == scores[limit - 1]:
        return top_k(_cosines(items, slice(None), direction), limit, allowed[: items.shape[0]], ties=True)
    return rows[:limit], scores[:limit]


def _guard(deadline: Deadline | None) -> Guard | None:
    """A write's guard (see Store): refused once the caller stopped waiting."""
    return None if deadline is None else deadline.check


_UNIT_WEIGHTS = dict.fromkeys(("interest", "negative", "cooccurrence", "popularity"), 1.0)  # signals as they are


class _Explained(NamedTuple):
    """What an explanation reads of the profile a list was ranked for, taken
    with it: read later, the profile could have taken new events meanwhile,
    and a list ranked with one was explained with another (a race review)."""

    shares: np.ndarray  # (K,) the interests' shares
    centroids: np.ndarray  # (K, d)
    max_seq: int  # the events it holds: seq <= this
    events: int  # how many: an explanation reads them all (see InterestEngine._explain)


class _Ranked(NamedTuple):
    """Recommend's candidates, best first, named (see InterestEngine._rank)."""

    ids: list[str]
    scores: np.ndarray  # (m,)
    vectors: np.ndarray | None  # (m, dim) copies, where asked for
    parts: dict[str, np.ndarray]  # the blend's terms, each (m,), where asked for
    explained: _Explained | None  # the profile they were ranked for, where personalised and asked for
    strategy: str  # "personalized" | "trending"


_Read = TypeVar("_Read")


class _RowsChanged(Exception):
    """Catalogue rows read in one hold of the lock were renumbered
    (CatalogIndex.compact), or a picked one's vector rewritten in place (an
    upsert), before the next: the read starts again."""


_NO_ROWS = np.empty(0, dtype=np.int64)


def _peek(chunks: Iterator[list[EventRecord]]) -> tuple[int, float, Iterator[list[EventRecord]]]:
    """The first chunk's size and oldest event time (inf: none), and the
    chunks again, that one first: not held here for the rest of a replay."""
    first = next(chunks, [])
    # An iterator over it, which lets it go once read: chain would hold a list of it to the end.
    return len(first), first[0].event_time if first else np.inf, itertools.chain(iter([first]), chunks)


def _derived(state: UserState, name: str, key, compute: Callable[[], object]):
    """`compute()`, kept in the profile while `key` holds: the catalogue's
    version and the length of what it derives from, since a profile's sets
    and lists only grow (a late event or an erasure replaces the profile).
    Per call, a user of 10k events rebuilt ~3 ms of them, their Recommend
    3.9 ms against 0.7 for a user of 5."""
    cached = state.derived.get(name)
    if cached is None or cached[0] != key:
        cached = state.derived[name] = (key, compute())
    return cached[1]


class _SingleProfile(NamedTuple):
    """A user's single-vector profile at some time (InterestEngine._single_profile)."""

    positive: np.ndarray  # (d,) the direction of Σ w · decay · v over positive events (any length)
    negative: np.ndarray  # (d,) the same over negative ones, |w|
    weight: float  # Σ w · decay over positive events: 0 means no interest (trending)
    negative_strength: float  # Σ |w| · decay over negative ones


@dataclasses.dataclass(eq=False)
class _Replay:
    """A missing profile being replayed from the log without the engine lock
    (`_cache_profile`), and what happened to its user meanwhile."""

    applied: list[EventRecord] = dataclasses.field(default_factory=list)  # the user's events applied meanwhile
    erased: bool = False  # the user was erased meanwhile: the replay is stale
    done: threading.Event = dataclasses.field(default_factory=threading.Event)  # set when it ends, cached or not
    failed: bool = False  # it raised: no profile came of it


@dataclasses.dataclass(eq=False)
class _Erasure:
    """A DeleteUser in flight (`InterestEngine.delete_user`) and what the
    engine had counted when it began: while it runs, the user's events are
    applied to nothing (`_apply_events`)."""

    counted: EventWatermark  # the events applied when it began: those it takes back
    head: int  # the newest event seq then: of the user's events up to it, those counted are taken back
    blend: BlendIndexes  # the indexes it takes back from: others (a rebuild meanwhile) are rebuilt again
    done: threading.Event = dataclasses.field(default_factory=threading.Event)  # set when it ends, erased or not
    # The seq of the user's first event in each batch applied meanwhile -> the user row `blend` numbered it
    # with, in the log's order (`_number_users`): the user's row if the delete leaves that batch.
    rows: dict[int, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _WrittenItems:
    """Items this process just wrote, as read back from the store once the
    change feed stood at `version`: what the index should hold for them,
    unless a later change to one of them shows up in the feed."""

    version: int
    ids: Sequence[str]
    stored: Mapping[str, ItemRecord]


class InterestEngine:
    def __init__(
        self,
        config: Config,
        store: Store,
        dim: int,
        embed: Embedder,
        clock: Callable[[], float] = time.time,
        follow_store: bool = False,
        scan_threads: int | None = None,
        embedder_id: str | None = None,
        vector_space: tuple[str, str] | None = None,
        former_vector_spaces: Sequence[str] = (),
    ):
        self.config = config
        self.store = store
        self.dim = dim
        self._embed = embed
        # What `embed` is (EmbeddingEngine.identity): an item whose text it embedded
        # keeps that vector while its text stays the same. None: always embed.
        self._embedder_id = embedder_id
        # (EmbeddingEngine.vector_space, a name for people): the store must hold that space's vectors. None: unchecked.
        self._vector_space = vector_space
        self._former_vector_spaces = former_vector_spaces  # what earlier halflifes named that space
        self._clock = clock
        self._follow_store = follow_store  # other processes write to the store too
        self._blocks = RowBlocks(scan_threads or physical_cores())  # one call's passes over the catalogue
        self._builder = ProfileBuilder(config, dim)  # profiles from event logs
        self.snapshots = SnapshotSaver(store)
        self._lock = threading.RLock()  # guards everything in memory below
        self._catalog_write = threading.Lock()  # this process's catalogue writes: store, read back, index
        self._batch_applied = threading.Condition(threading.Lock())  # notified as this process applies a batch
        self._long_replay = threading.Lock()  # one long replay at a time (`_replay_turn`); never taken under _lock
        # Sized for the stored items at once: growing to them, 1.5x at a time, copied and faulted in the rows
        # over and over (200k items: the catalogue's load 2.1-3.1 s, 1.2 s sized).
        self.catalog = CatalogIndex(dim, capacity=store.item_count())
        self._users: collections.OrderedDict[str, UserState] = collections.OrderedDict()
        self._replays: dict[str, list[_Replay]] = {}  # user id -> replays in flight
        self._erasing: dict[str, _Erasure] = {}  # user id -> its erasure in flight
        self._labels: list[str] = []
        self._label_rows: dict[str, int] = {}  # label -> its row of _label_means
        self._label_means = np.zeros((0, dim), dtype=np.float32)  # each label's items' mean
        self._label_vectors = np.zeros((0, dim), dtype=np.float32)
        self._labels_version = -1
        self._label_categories = -1  # the catalogue's categories_version when _labels were listed
        # dtype -> (popularity counts, their version, the catalogue's, the relative popularity read from them)
        self._relative_popularity_cache: dict[type, tuple[object, ...]] = {}
        # What makes a blend built from the log before them stale: this process's erasures, which it took
        # back from the blend it had, and other processes', which only a blend built after them leaves out.
        self._erasures_here = 0
        self._erasures_elsewhere = 0
        # While a rebuild of the blend reads the log off the lock: the changes of item rows made to the blend
        # since, which the rebuilt one takes too before it is swapped in.
        self._row_changes: list[RowChange] | None = None
        self._rebuilding = False  # a rebuild of the blend runs off the lock (_rebuild_in_background)
        self._rebuild_failed_at: float | None = None  # time.monotonic() when the last one raised (see REBUILD_RETRY_S)
        self._load()

    def now(self) -> float:
        """The engine's clock: unix seconds."""
        return self._clock()

    # ------------------------------------------------------------------ start

    def _load(self) -> None:
        started = time.perf_counter()
        head = self.store.head()  # before reading: what lands after it is caught up later
        self._changes_seen = head.change_version
        self._events = EventWatermark(head.event_seq)
        self._check_vectors()
        items = Progress(log, "loading the store", self.store.item_count(), "items")
        self.catalog.upsert(items.counted(self.store.iter_items()))
        events = Progress(log, "loading the store", self.store.event_count(), "events", following=items)
        self._rebuild_blend(events)
        log.info("loaded %d items and popularity from %d events in %.1f s", len(self.catalog), events.done,
                 time.perf_counter() - started)

    def _check_vectors(self) -> None:
        """`refuse_other_models_store` for this engine's store, bound to this
        model where it fits (a store from before the record included)."""
        stored, space = self.store.vector_size(), self._vector_space
        fits = stored in (None, self.dim) and space is not None
        refuse_other_models_store(stored, self.store.bind_vectors(*space) if fits else self.store.bound_vectors(),
                                  self.dim, space, self._former_vector_spaces)

    def _rebuild_blend(self, progress: Progress | None = None) -> None:
        """The blend's indexes anew from every event up to the watermark. Lock held (or not yet shared)."""
        self._blend = self._built_blend(self._events.through, self.catalog, progress)

    def _built_blend(self, through: int, catalog: CatalogIndex | CatalogRows,
                     progress: Progress | None = None) -> BlendIndexes:
        """The blend's indexes (see BlendIndexes) from every event up to
        `through`, joined to `catalog`'s rows, each chunk read counted in
        `progress`; touches nothing of the engine's."""
        indexes = BlendIndexes.empty(catalog.size, self.config.blend.popularity_half_life_days * DAY)
        # The pairs in bulk, sorted once (Cooccurrence.from_pairs), not merged
        # into the index in ever larger passes: at start, and for each erasure
        # another worker makes (2.2M events: 2.8 s of the rebuild, 0.55 this way).
        pairs = []
        for chunk in self.store.iter_events(through_seq=through):
            rows, weights, times, user_ids = self._joined(chunk, catalog=catalog)
            times, users, items, weights = indexes.ahead.admit(self._clock(), *indexes.entries(rows, weights, times,
                                                                                              user_ids))
            paired = users >= 0
            pairs.append((users[paired], items[paired], times[paired]))
            indexes.apply(times, np.full(times.size, -1), items, weights)  # popularity
            if progress is not None:
                progress.advance(chunk.seqs.size)
        if pairs:
            indexes.cooccurrence = Cooccurrence.from_pairs(catalog.size, *map(np.concatenate, zip(*pairs)))
        return indexes

    def _catch_up(self, written: _WrittenItems | None = None) -> None:
        """Applies what other processes sharing the store wrote since the last
        look: item changes first (so their events find their items, as after a
        restart), then events in seq order. Another process's user erasure
        names no user, so it rebuilds the blend and drops cached profiles.
        `written`: items this process wrote, indexed among the item changes
        without reading them again. Lock held."""
        if not self._follow_store:
            return
        head = self.store.head()
        if not self._catch_up_changes(head, written):
            self._apply_committed(head.event_seq)

    def _catch_up_changes(self, head: StoreHead, written: _WrittenItems | None = None) -> bool:
        """The change-feed half of `_catch_up`: item changes and other
        processes' erasures up to `head`. This process's own item changes are
        synced too: one whose index update is still in flight must not leave
        events committed after it to be applied against the old index
        (`written`, if given, is such an update: its ids come from what it
        read unless the feed has a later change to them). Returns True when
        an erasure made it rebuild the blend from the log through head
        (events included); a long log is rebuilt off the lock instead
        (`_rebuild_in_background`). Lock held."""
        retry = self._rebuild_failed_at is not None and time.monotonic() - self._rebuild_failed_at >= REBUILD_RETRY_S
        if head.change_version <= self._changes_seen and not retry:
            if written is not None:
                self._apply_written(written, newer=set())
            return False
        changes = self.store.changes_since(self._changes_seen)
        self._changes_seen = max((c.version for c in changes), default=max(head.change_version, self._changes_seen))
        changed = [c.item_id for c in changes if c.item_id is not None]
        if written is not None:
            done = self._apply_written(written, {c.item_id for c in changes if c.version > written.version})
            changed = [i for i in changed if i not in done]
        self._sync_items(changed)
        erased = any(c.item_id is None and c.origin != self.store.origin for c in changes)
        if not erased and not retry:
            return False
        self._rebuild_failed_at = None
        if erased:  # (a rebuild tried again has no profile to drop: they do not depend on the blend)
            self._erasures_elsewhere += 1
            self._users.clear()
            for replay in (r for replays in self._replays.values() for r in replays):
                replay.erased = True
        return self._rebuild_through(head.event_seq)

    def _rebuild_through(self, event_seq: int) -> bool:
        """Rebuilds the blend from the log through `event_seq` (the store's
        head), under the lock, or off it for a long log (a rebuild in flight
        sees the erasure the caller counted). True when it was
        rebuilt here, the events through `event_seq` applied. Lock held."""
        if self._rebuilding or (event_seq >= BACKGROUND_REBUILD_EVENTS and self._start_background_rebuild()):
            return False  # the indexes answer, and take events, as they are until the rebuilt ones are in
        try:
            self._events.advance(event_seq)
            self._rebuild_blend()
        except BaseException:
            self._rebuild_failed_at = time.monotonic()  # the erasure is marked seen, the watermark at head: try again
            raise
        return True

    def _start_background_rebuild(self) -> bool:
        """Starts `_rebuild_in_background`; False where no thread could be. Lock held."""
        self._rebuilding = True
        try:
            threading.Thread(target=self._rebuild_in_background, name="halflife-blend-rebuild", daemon=True).start()
        except RuntimeError:
            self._rebuilding = False
            log.warning("no thread for a rebuild of the blend; it runs under the lock", exc_info=True)
            return False
        return True

    def _change_rows(self, change: RowChange) -> None:
        """Applies a change of item rows to the blend, and to the one a rebuild
        is building (once it is built, see `_rebuild_in_background`). Lock held."""
        self._blend.change_rows([change])
        if self._row_changes is not None:
            self._row_changes.append(change)

    def _rebuild_in_background(self) -> None:
        """Rebuilds the blend for another process's erasure without the lock:
        reads the log through the watermark against a copy of the catalogue's
        rows, then, under the lock, makes the changes of item rows made
        meanwhile (items deleted, a compaction), adds the events applied
        since and swaps it in. Until then the indexes answer as they were,
        the erased user's pairs and popularity still in them (their profile
        is gone at once): 2.2M events held every other call up for 10-12 s.
        Other processes' erasures meanwhile: it is swapped in all the same
        (it may hold their users' events, as the one it replaces does), and
        read again for them. One of this process's: it starts again (the
        blend it replaces had that user taken back); after
        BACKGROUND_REBUILD_ATTEMPTS of those, it rebuilds under the lock.
        Each of those, and each change of rows, started it again: a catalogue
        turning over (an item deleted a second, 1M events) or erasures one
        after another had it built under the lock, every call held up 5-9 s."""
        try:
            attempts = 0
            while attempts < BACKGROUND_REBUILD_ATTEMPTS:
                with self._lock:
                    through, rows = self._events.through, self.catalog.frozen_rows()
                    here, elsewhere = self._erasures_here, self._erasures_elsewhere
                    self._row_changes = []
                indexes = self._built_blend(through, rows, Progress(
                    log, "rebuilding popularity and co-occurrence after an erasure", self.store.event_count(),
                    "events"))
                with self._lock:
                    changes, self._row_changes = self._row_changes, None
                    if self._erasures_here != here:
                        attempts += 1
                        continue
                    indexes.change_rows(changes)
                    self._swap_in(indexes, through)
                    if self._erasures_elsewhere == elsewhere:
                        self._rebuilding = False
                        return
            with self._lock:  # the same, held throughout
                through = self._events.through
                self._swap_in(self._built_blend(through, self.catalog), through)
                self._rebuilding = False
        except BaseException:
            with self._lock:
                self._rebuilding, self._rebuild_failed_at, self._row_changes = False, time.monotonic(), None
            log.exception("rebuilding the blend failed; a call tries again in %g s", REBUILD_RETRY_S)

    def _swap_in(self, indexes: BlendIndexes, through: int) -> None:
        """Puts a blend built from the log through `through` in place, with
        the events applied since (the watermark's) added. Lock held."""
        indexes.resize(self.catalog.size)
        for chunk in self.store.iter_events(after_seq=through):
            applied = self._events.applied_mask(chunk.seqs)
            if applied.any():
                indexes.admit(self._clock(), *indexes.entries(*self._joined(chunk, applied)))
        self._blend = indexes
        self._start_cooccurrence_merge()  # the pairs added since, if due (else at the next event)

    def _apply_committed(self, through_seq: int) -> None:
        """Applies the committed events up to `through_seq` that are not applied
        yet, read back from the log: other processes' batches, and this
        process's whose writer thread has not applied them yet (it will find
        them applied and skip them). Lock held."""
        if through_seq > self._events.through:
            # Vectors only for the profiles that take the events (`_apply_events`): reading every
            # event's took a follower ~18 us an event under the lock, ~4 without (a scaling review).
            events = self.store.events_between(self._events.through, through_seq,
                                               vectors_of=lambda user: user in self._users or user in self._replays)
            applied = self._events.applied_mask(np.array([e.seq for e in events], dtype=np.int64))
            fresh = [e for e, done in zip(events, applied.tolist()) if not done]
            self._events.advance(through_seq)
            self._apply_events(fresh)

    def _current_item_rows(self, item_ids: Sequence[str | None], seqs: np.ndarray,
                           catalog: CatalogIndex | CatalogRows | None = None) -> np.ndarray:
        """Catalogue rows of events' items, -1 where there is none or where the
        event predates its id's current item (it concerned a deleted namesake
        and must not count for the new one). (n,) int64. catalog: the
        engine's (lock held), or rows taken from it (`CatalogIndex.frozen_rows`)."""
        catalog = self.catalog if catalog is None else catalog
        rows = catalog.rows(item_ids)
        known = np.flatnonzero(rows >= 0)
        rows[known[seqs[known] <= catalog.created_seq[rows[known]]]] = -1
        return rows

    def _joined(self, chunk: EventColumns, keep: np.ndarray | None = None,
                catalog: CatalogIndex | CatalogRows | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """A chunk of the log's events (those `keep` marks, (n,) bool, where
        given) joined to the catalogue's rows (`_current_item_rows`) and
        weighed by type: (rows, weights, times, user ids), each (m,)."""
        if keep is None or keep.all():  # (an erasure's chunks, all counted: 1M events, ~0.1 s less under the lock)
            item_ids, user_ids, seqs, types, values, times = (
                chunk.item_ids, chunk.user_ids, chunk.seqs, chunk.types, chunk.values, chunk.times)
        else:
            picked = np.flatnonzero(keep).tolist()
            item_ids, user_ids = [chunk.item_ids[i] for i in picked], [chunk.user_ids[i] for i in picked]
            seqs, types, values, times = chunk.seqs[keep], chunk.types[keep], chunk.values[keep], chunk.times[keep]
        weights = self._builder.types.weights[self._builder.internal_types(types, values)]
        return self._current_item_rows(item_ids, seqs, catalog), weights, times, user_ids

    def _resize_blend(self) -> None:
        self._blend.resize(self.catalog.size)

    def _add_to_blend(self, rows: np.ndarray, weights: np.ndarray, times: np.ndarray, user_ids: Sequence[str]) -> None:
        """Events into the blend (see BlendIndexes.entries); weights: (n,), their types'. Lock held."""
        entries = self._blend.entries(rows, weights, times, user_ids)
        if entries[0].size:
            self._admit_to_blend(*entries)

    def _take_back_popularity(self, rows: np.ndarray, weights: np.ndarray, times: np.ndarray) -> None:
        """Takes erased events' weights ((n,), their types') back from
        popularity (their pairs go with Cooccurrence.remove_user). Lock held."""
        liked = (rows >= 0) & (weights > 0)
        if liked.any():
            self._admit_to_blend(times[liked], np.full(int(liked.sum()), -1), rows[liked], -weights[liked])

    def _admit_to_blend(self, times: np.ndarray, users: np.ndarray, items: np.ndarray, weights: np.ndarray) -> None:
        """Blend entries, each (n,): a co-occurrence pair (users, items) where
        users >= 0, a popularity weight where weights != 0. Those stamped after
        the clock wait (BlendIndexes.ahead). Lock held."""
        self._blend.admit(self._clock(), times, users, items, weights)

    def _release_blend(self, t: float) -> Entries | None:
        """Before a read of the blend at t: applies the held entries stamped up
        to t, or to the clock if t is later; returns those between the clock
        and t, which such a read counts without applying them, so that reads
        at the clock keep their fast path. Lock held."""
        due = self._blend.ahead.release(min(t, self._clock()))
        if due is not None:
            self._blend.apply(*due)
            self._start_cooccurrence_merge()
        return self._blend.ahead.peek(t)

    def _popularity_at(self, t: float, dtype: type = np.float32) -> Later:
        """Decayed popularity at t of the live items, from events up to t
        (deleted items count 0, as after a restart), divided by its maximum,
        as a function returning (size,) `dtype` in [0, 1]: the present is
        read now (at the clock, from a cache: see `_relative_popularity`), a
        look into the past sums a copy of the log when called (see
        CatalogueScan). Lock held."""
        # Each read sums at its newest entry's time, not at t: divided by the maximum, the factor between
        # the two cancels, and summed at t every count underflowed to 0 past ~1,075 half-lives.
        ahead = self._release_blend(t)
        half_life, size = self.config.blend.popularity_half_life_days * DAY, self.catalog.size
        if t >= self._blend.popularity_log.newest:
            if ahead is None:
                present = self._relative_popularity(dtype)
            else:
                times, _, rows, weights = ahead  # stamped after the clock, so after every applied entry
                at = float(times.max())
                popularity = self._blend.popularity.read(at) + decayed_sum(rows, times, weights, at, half_life, size)
                present = _relative(popularity, self.catalog.alive, dtype)
            return lambda: present
        log, alive = self._blend.popularity_log.chunks(), self.catalog.alive.copy()

        def past() -> np.ndarray:
            rows, times, weights = EntryLog.joined(log)
            keep = times <= t
            at = float(times[keep].max(initial=-np.inf))
            return _relative(decayed_sum(rows[keep], times[keep], weights[keep], at, half_life, size), alive, dtype)
        return past

    def _relative_popularity(self, dtype: type) -> np.ndarray:
        """The live items' popularity at any time from the newest event on,
        divided by its maximum: (size,) `dtype` (zeros while none is
        positive). From then on decay scales every count alike, and every
        reader divides by the maximum, so this changes only with the counts or
        the catalogue: it is cached by their versions (at 100k items, 0.14 ms
        of each Recommend under the lock, 1.4 ms at 1M). Lock held."""
        counts, version, catalog_version, relative = self._relative_popularity_cache.get(dtype, (None, -1, -1, None))
        if counts is not self._blend.popularity or version != self._blend.popularity.version \
                or catalog_version != self.catalog.version:
            relative = _relative(self._blend.popularity.counts, self.catalog.alive, dtype)
            self._relative_popularity_cache[dtype] = (self._blend.popularity, self._blend.popularity.version,
                                                      self.catalog.version, relative)
        return relative

    def _label_space(self) -> tuple[list[str], np.ndarray]:
        """Category labels as directions in item space: (names, (L, d) unit
        vectors). Lock held.

        A label is the mean of its items' vectors, centred on the catalogue
        mean and normalised. Measured on MovieLens, embedding the bare word
        ("Film-Noir") lands far from item texts and names every interest
        alike; member centroids name them by what they hold. An interest's
        unit centroid meets them as it is, not centred (`_describe`).
        Recomputed only when the catalogue changed, and then only the means
        of the labels whose items changed (the catalogue's running sums),
        unless labels came or went: every label's mean in Python took 120 ms
        under the lock at 20k labels after any catalogue write, the centring
        and normalising of all, one (L, d) pass, takes ~10. At 192k labels (64
        categories an item, each new) a change of labels took 3.3-4.5 s and
        any other write's refresh 0.4, most of it faulting in float64
        temporaries (`normalize`'s, the means'); means a chunk at a time and
        centring in place: 0.7-1.8 and 0.16-0.2 s."""
        if self._labels_version != self.catalog.version:
            catalog = self.catalog
            changed = catalog.take_changed_categories()
            if self._label_categories != catalog.categories_version:  # labels came or went
                self._labels = catalog.all_categories
                self._label_rows = {name: row for row, name in enumerate(self._labels)}
                self._label_means = catalog.means(self._labels)
                self._label_categories = catalog.categories_version
            else:  # the same labels
                for name in changed:
                    self._label_means[self._label_rows[name]] = catalog.mean(name)
            # Means of unit vectors, so no tiny rows: `normalize`'s float64 pass is not needed. The catalogue
            # mean from running sums: O(dim), however large the catalogue.
            vectors = np.subtract(self._label_means, catalog.mean().astype(np.float32))
            vectors /= np.maximum(np.sqrt(np.vecdot(vectors, vectors)), 1e-12)[:, None]
            self._label_vectors = vectors
            self._labels_version = catalog.version
        return self._labels, self._label_vectors

    # ---------------------------------------------------------------- catalog

    def upsert_items(self, items: Sequence[ItemInput], deadline: Deadline | None = None) -> tuple[int, int]:
        """Embeds items without a vector (but those whose text this model
        embedded before: `_embedded_before`), stores all durably, then indexes
        them. Writes nothing, and raises DeadlineExpiredError, once `deadline`
        says the caller stopped waiting before the store's writer took it
        (the same for every write here)."""
        vectors: list[np.ndarray | None] = [None if item.vector is None else normalize(item.vector) for item in items]
        to_embed = [i for i, item in enumerate(items) if item.vector is None]
        for i, vector in self._embedded_before(items, to_embed).items():
            vectors[i] = vector  # as stored: normalised once, when embedded
        to_embed = [i for i in to_embed if vectors[i] is None]
        if to_embed:
            embedded = self._embed([items[i].text for i in to_embed], deadline)
            for i, vector in zip(to_embed, embedded):
                vectors[i] = normalize(vector)
        records = [
            ItemRecord(
                id=item.id,
                text=item.text,
                categories=tuple(dict.fromkeys(item.categories)),  # a repeat would count twice in its mean
                attributes=dict(item.attributes),
                create_time=item.create_time,
                vector=vector,
                embedded_by=None if item.vector is not None else self._embedder_id,
            )
            for item, vector in zip(items, vectors)
        ]
        with self._catalog_write:
            created, updated = self.store.upsert_items(records, _guard(deadline))
            # A growth's allocation, without the lock (see CatalogIndex.reserve): 10k new items at ~100k
            # held it 0.84 s, 2-5 s expected at 1M (a scaling review).
            self.catalog.reserve(sum(1 for i in dict.fromkeys(r.id for r in records) if i not in self.catalog.row_of))
            self._index_written([r.id for r in records])
        return created, updated

    def _embedded_before(self, items: Sequence[ItemInput], to_embed: list[int]) -> dict[int, np.ndarray]:
        """{i: stored vector} for the items at `to_embed` whose stored version
        has the same text and a vector this engine's model embedded from it:
        a re-sent upsert, or a catalogue re-synced whole, embeds only what
        changed (embedding is an upsert's costliest part). Safe against a
        concurrent write of the item: the vector is a function of the text."""
        if not to_embed or self._embedder_id is None:
            return {}
        try:
            stored = self.store.get_items([items[i].id for i in to_embed])
        except StoreDamagedError:  # a damaged item: embed them all, and the upsert rewrites it
            return {}
        kept = {}
        for i in to_embed:
            old = stored.get(items[i].id)
            if old is not None and old.embedded_by == self._embedder_id and old.text == items[i].text:
                kept[i] = old.vector
        return kept

    def delete_items(self, ids: Sequence[str], deadline: Deadline | None = None) -> int:
        with self._catalog_write:
            deleted = self.store.delete_items(ids, _guard(deadline))
            # Every id asked for, not only those this call deleted: where the read after a commit failed (out of
            # file descriptors), the items stayed recommended, and the retry, deleting nothing, left them so.
            self._index_written(list(dict.fromkeys(ids)))
        return len(deleted)

    def _index_written(self, ids: Sequence[str]) -> None:
        """Brings the index up to date after this process wrote `ids`. They
        are read back outside the engine lock (1,000 items take ~10 ms that
        recommendations would otherwise wait for); `_catalog_write` keeps this
        process's writers in store order. Sharing the store, the read joins
        the catch-up's item changes, ahead of the events it applies; if
        another thread's catch-up already went past the read, the read is
        redone under the lock. Call with `_catalog_write` held."""
        seen = self.store.head().change_version
        stored = self.store.get_items(ids)
        with self._lock:
            if not self._follow_store:
                self._apply_items(ids, stored)
                return
            if self._changes_seen > seen:
                seen, stored = self._changes_seen, self.store.get_items(ids)
            self._catch_up(_WrittenItems(seen, ids, stored))

    def _apply_written(self, written: _WrittenItems, newer: set[str]) -> set[str]:
        """Indexes the written ids that have no later change (`newer`) from
        what was read; returns them. Lock held."""
        current = [i for i in written.ids if i not in newer]
        self._apply_items(current, {i: written.stored[i] for i in current if i in written.stored})
        return set(current)

    def _sync_items(self, ids: Sequence[str]) -> None:
        """Makes the index hold what the store holds now for `ids`. Lock held."""
        if ids:
            self._apply_items(ids, self.store.get_items(ids))

    def _apply_items(self, ids: Sequence[str], stored: Mapping[str, ItemRecord]) -> None:
        """Makes the index hold `stored` (the store's state) for `ids`: current
        versions with the store's created_seq; a deleted id, or one deleted
        and created again, loses its row and who consumed it, as a restart
        (which joins events by item id) would. Lock held."""
        if not ids:
            return
        rows = self.catalog.rows(ids)
        stale = [
            item_id for item_id, row in zip(ids, rows)
            if row >= 0 and (item_id not in stored or stored[item_id].created_seq != self.catalog.created_seq[row])
        ]
        if stale:
            stale_rows = self.catalog.rows(stale)
            self._change_rows(RowChange(dropped=stale_rows))
            self.catalog.delete(stale)
        if stored:
            self.catalog.upsert(stored[i] for i in dict.fromkeys(ids) if i in stored)
            self._resize_blend()
        if self.catalog.dead_rows >= max(COMPACT_MIN_DEAD_ROWS, COMPACT_DEAD_SHARE * len(self.catalog)):
            self._compact()

    def _compact(self) -> None:
        """Drops the deleted items' rows from the catalogue and renumbers what
        the blend keeps per row: co-occurrence pairs, popularity counts and
        log, and entries held for the clock. What a deleted item had goes, as
        after a restart. Lock held."""
        new_row = self.catalog.compact()
        self._change_rows(RowChange(new_row=new_row))
        self._resize_blend()
        log.info("catalogue compacted: %d live items, %d rows dropped", self.catalog.size,
                 new_row.size - self.catalog.size)

    def get_items(self, ids: Sequence[str]) -> dict[str, ItemRecord]:
        return self.store.get_items(ids)

    def list_items(self, after_id: str, limit: int) -> tuple[list[ItemRecord], str | None]:
        return self.store.list_items(after_id, limit)

    def list_user_events(self, user_id: str, after_seq: int, limit: int, newest_first: bool = False,
                         start_time: float = -math.inf, end_time: float = math.inf) -> tuple[list[EventRecord], int | None]:
        return self.store.list_user_events(user_id, after_seq, limit, newest_first, start_time, end_time)

    # ----------------------------------------------------------------- events

    def record_events(self, events: Sequence[EventInput], deadline: Deadline | None = None) -> tuple[int, int]:
        """Stores a batch durably (all or nothing); returns (accepted, duplicates).

        Raises UnknownItemsError, before storing anything, when a new event
        names an item the catalogue lacks. A re-sent event stays a duplicate
        even when its item was deleted since, so retries always get through,
        and so does a repeat within the batch, whatever item it names. When
        an item the events name gets a new vector or is deleted between the
        read of its vector and the commit (texts take a while to embed), the items
        are read again and the write retried, the texts not embedded again;
        ItemsChangedError after RECORD_ATTEMPTS such tries.

        A retry does not embed its texts again (embedding is a write's
        costliest part: 300 reviews re-sent took 19 s, as long as the first
        time, in an audit): only the texts of events that will be stored are
        embedded, not those of repeats within the batch nor of events found
        stored already. The store checks at the commit that these are still
        stored; any erased since are embedded and stored as new.
        """
        texts = [i for i, e in enumerate(events) if e.text]
        if texts:  # only first events are stored: repeats need no vector (item-only batches skip this)
            first = first_of_each_id(events)
            texts = [i for i in texts if first[events[i].event_id] == i]
        stored_before = self.store.existing_event_ids([events[i].event_id for i in texts]) if texts else set()
        embedded: dict[int, np.ndarray] = {}
        items_changed = 0
        while True:
            vectors, items_as_of, stored_naming_gone, known = self._item_vectors(events)
            wanted = [i for i in texts if events[i].event_id not in stored_before]
            if missing := [i for i in wanted if i not in embedded]:
                embedded.update(zip(missing, self._embed([events[i].text for i in missing], deadline)))
            if wanted:
                # Item and text: the direction of their sum. Item-only events keep
                # the item's stored vector bit for bit, so the store keeps one copy.
                vectors[wanted] = normalize(vectors[wanted] + np.array([embedded[i] for i in wanted]))
            # EventInput's fields, the vector and seq 0 (a test holds EventRecord to
            # that order): tuple.__new__ builds one at half EventRecord()'s cost.
            new = tuple.__new__
            records = [new(EventRecord, (*e, vector, 0)) for e, vector in zip(events, vectors)]
            # Events that carry their item's stored vector as it is: the store need not hash them.
            as_items = set(np.flatnonzero(known).tolist()).difference(wanted)
            try:
                stored = self.store.record_events(records, _guard(deadline), items_as_of,
                                                  stored_before | stored_naming_gone, as_items)
            except ItemsChangedError:
                items_changed += 1
                if items_changed == RECORD_ATTEMPTS:
                    raise
                continue
            except ResentEventsErasedError as erased:
                stored_before -= set(erased.event_ids)  # new again: embedded (or refused for a gone item) next try
                continue
            self._apply_new_events(stored)
            return len(stored), len(events) - len(stored)

    def _item_vectors(self, events: Sequence[EventInput]) -> tuple[np.ndarray, int | None, set[str], np.ndarray]:
        """The vectors of the items the events name ((n, dim) float32, zeros
        where an event names none or an item gone), the store's change version
        they are current at (None when no event names an item), the ids of
        the events found stored already that name a gone item (their vectors
        are placeholders), and which events' items were found ((n,) bool: their
        vectors are the stored ones, bit for bit). Raises UnknownItemsError as
        record_events says."""
        with self._catalog_write, self._lock:  # this process's catalogue writes indexed, not just committed
            # The version before the catch-up: a change between the two reads only costs a retry.
            items_as_of = self.store.head().change_version if any(e.item_id for e in events) else None
            self._catch_up()  # items another process wrote since
            rows = self.catalog.rows([e.item_id for e in events])
            missing = [(i, e.item_id) for i, (e, row) in enumerate(zip(events, rows)) if e.item_id and row < 0]
            known = rows >= 0
            vectors = np.zeros((len(events), self.dim), dtype=np.float32)
            vectors[known] = self.catalog.vectors[rows[known]]
        stored: set[str] = set()
        if missing:
            # A repeat of an event stored before or earlier in this batch is a
            # duplicate, whatever item it names: only the first is stored.
            first = first_of_each_id(events)
            stored = self.store.existing_event_ids([events[i].event_id for i, _ in missing])
            missing = [(i, item_id) for i, item_id in missing
                       if first[events[i].event_id] == i and events[i].event_id not in stored]
            if missing:
                raise UnknownItemsError(missing)
        return vectors, items_as_of, stored, known

    def _apply_new_events(self, stored: Sequence[EventRecord]) -> None:
        """Applies a batch this process just stored, unless a catch-up
        (another thread's) already fetched it from the log. An event counts for
        its item's incarnation at its commit, so the index must first hold
        every catalogue change committed before it: this process's writes in
        flight (`_catalog_write`) and other processes' (the change feed)."""
        if not stored:
            return
        # Batches apply in the log's order, as a restart and the other workers apply them: users are numbered
        # as they first come, and co-occurrence's sample of an item's newest users went by it (two batches in
        # flight, applied out of commit order, sampled otherwise than a restart: a soak). In one process a batch
        # committed before this one is another thread's, about to apply it: waited for, not read back.
        if not self._follow_store:
            with self._batch_applied:
                self._batch_applied.wait_for(lambda: self._events.through >= stored[0].seq - 1, APPLY_ORDER_WAIT_S)
        with self._catalog_write, self._lock:
            if self._follow_store:
                self._catch_up_changes(self.store.head())
            if self._events.applied(stored[0].seq):
                return
            self._apply_committed(stored[0].seq - 1)  # another process's, or one whose thread failed
            self._events.add(stored[0].seq, stored[-1].seq)
            self._apply_events(stored)
        with self._batch_applied:
            self._batch_applied.notify_all()

    def _start_cooccurrence_merge(self) -> None:
        """Begins a co-occurrence merge if one is due and builds it on its own
        thread: at 3M pairs it copies ~70 MB (~60 ms), which neither this
        caller nor, without the lock, any reader waits for. Lock held."""
        index = self._blend.cooccurrence
        merge = index.begin_merge()
        if merge is None:
            return

        def build() -> None:
            try:
                merge.build()
            finally:
                with self._lock:
                    index.end_merge(merge)  # a replaced index (erasure rebuild) just drops it

        try:
            threading.Thread(target=build, name="halflife-cooccurrence-merge", daemon=True).start()
        except RuntimeError:
            index.end_merge(merge)  # not built: dropped, its pairs merge inline later on
            log.warning("no thread for a co-occurrence merge; it will run inline", exc_info=True)

    def _apply_events(self, stored: Sequence[EventRecord]) -> None:
        """New events into the blend and the cached profiles. Lock held."""
        if not stored:
            return
        if self._erasing:  # see _Erasure
            self._number_users(stored)
            stored = [e for e in stored if e.user_id not in self._erasing]
            if not stored:
                return
        weights = self._builder.types.weights[self._builder.record_types(stored)]
        rows = self._current_item_rows([e.item_id for e in stored], np.array([e.seq for e in stored]))
        self._add_to_blend(rows, weights, np.array([e.event_time for e in stored]), [e.user_id for e in stored])
        self._start_cooccurrence_merge()
        for event in stored:
            replays, state = self._replays.get(event.user_id, ()), self._users.get(event.user_id)
            if not replays and state is None:
                continue
            # Kept past this call: its own vector, not a row of the batch's matrix, which each
            # such event held whole (1.5 MB for a 1,000-event batch: a soak).
            event = event._replace(vector=None if event.vector is None else np.array(event.vector))
            # Replays in flight take it whether or not the user is cached now:
            # a profile cached meanwhile may still be dropped (below).
            for replay in replays:
                replay.applied.append(event)
            if state is None:
                continue
            if event.seq > state.max_seq:
                state.pending.append(event)
                if len(state.pending) >= MAX_PENDING_EVENTS:
                    self._catch_up_profile(event.user_id, state, self._clock())
            else:
                # Committed before a batch this profile already applied,
                # and perhaps not read with it: rebuild from the log.
                del self._users[event.user_id]

    def _number_users(self, stored: Sequence[EventRecord]) -> None:
        """Numbers the batch's users in its order, as `BlendIndexes.entries`
        would, during an erasure: a user being erased gets a row reserved
        for each batch (`_Erasure.rows`), theirs if the delete leaves it, so
        they rank among the users who came meanwhile where a restart (and
        every other worker) numbers them: numbered as the erasure ended, they
        came after those, and co-occurrence's sample of an item's newest
        users (`max_co_users`) differed (a race review). Lock held."""
        numbered, counter, reserved = self._blend.user_rows, self._blend.next_user_row, set()
        for event in stored:
            user = event.user_id
            if (erasure := self._erasing.get(user)) is None:
                if user not in numbered:
                    numbered[user] = next(counter)
            elif user not in reserved and erasure.blend is self._blend:
                reserved.add(user)
                erasure.rows[event.seq] = next(counter)

    def delete_user(self, user_id: str, deadline: Deadline | None = None) -> int:
        """Erases the user's events for good and forgets their profile, their
        co-occurrence pairs and their share of item popularity, so that the
        engine holds what a restart over the remaining log would build.

        The store's delete runs without the lock, as the read of what it
        erases does (under it, the delete held every other call up ~2.5 s
        for a user of 1M events): meanwhile the user's events are applied
        to nothing (`_Erasure`), and those the delete leaves (committed
        after it, or every one where it failed) are applied from the log
        when it ends (`_end_erasure`). Another erasure of the same user in
        this process waits for this one."""
        erasure = self._begin_erasure(user_id, deadline)
        erased = None
        try:
            # What popularity takes back, read without the vectors (with them, a user of 100k events
            # took ~0.9 s longer: a race review). The user's events up to the head can only be erased
            # since, never added (seqs grow); an erasure elsewhere meanwhile rebuilds (see _end_erasure).
            events = list(self.store.iter_events(through_seq=erasure.head, user_id=user_id))
            deleted = self.store.delete_user(user_id, _guard(deadline))
            erased = events
        finally:
            self._end_erasure(user_id, erasure, erased)
        return deleted

    def _begin_erasure(self, user_id: str, deadline: Deadline | None) -> _Erasure:
        """Marks `user_id` as being erased (see _Erasure), once an erasure of
        theirs in flight here has ended: two would take the same events
        back. Call without the lock."""
        while True:
            with self._lock:
                running = self._erasing.get(user_id)
                if running is None:
                    erasure = _Erasure(self._events.copy(), self.store.head().event_seq, self._blend)
                    self._erasing[user_id] = erasure
                    return erasure
            deadlines.wait(running.done, deadline)

    def _end_erasure(self, user_id: str, erasure: _Erasure, erased: list[EventColumns] | None) -> None:
        """Ends `delete_user`'s erasure: takes back from the blend the events
        `erased` (None where the delete failed) that it had counted when the
        erasure began, and drops the user's profile and pairs; then applies
        the user's events that the erasure passed over and the store holds."""
        with self._catalog_write, self._lock:  # applies committed events: the index first (see _apply_new_events)
            try:
                # What the store erased goes first, with no read of the store: one that raised
                # before it left it all served (a race review). A blend rebuilt from the log
                # meanwhile (another process's erasure) counted an unknown part of the user's
                # events: it is rebuilt again instead.
                replaced = self._blend is not erasure.blend
                if erased is not None:
                    self._erasures_here += 1  # a blend being rebuilt from the log may have read the user's events
                    if not replaced:
                        for chunk in erased:
                            counted = erasure.counted.applied_mask(chunk.seqs)
                            if counted.any():
                                self._take_back_popularity(*self._joined(chunk, counted)[:3])
                        row = self._blend.user_rows.pop(user_id, None)
                        if row is not None:
                            self._blend.cooccurrence.remove_user(row)
                            self._blend.forget_held_pairs(lambda users, items: users == row)
                self._users.pop(user_id, None)  # it missed the events passed over, if nothing else
                for replay in self._replays.get(user_id, ()):
                    replay.erased = True
                # A catch-up through one head, which all below applies: through a later one, events
                # committed after the item changes it synced were applied against an index without
                # them, and the user's, after a rebuild it made, to nothing (a race review). A
                # rebuild it makes reads the log as it is now, after the delete.
                head = self.store.head()
                if self._follow_store:
                    self._catch_up_changes(head)
                rebuilt = self._rebuild_through(head.event_seq) if replaced else self._blend is not erasure.blend
                # Batches committed before the delete whose threads have not applied them
                # yet: applied now, from the log, lest a thread count the user's events.
                self._apply_committed(head.event_seq)
                if not rebuilt:
                    for chunk in self.store.iter_events(after_seq=erasure.counted.through, through_seq=head.event_seq,
                                                        user_id=user_id):
                        passed_over = ~erasure.counted.applied_mask(chunk.seqs)
                        if passed_over.any():  # after the pairs went: under a new row (a review)
                            first = int(chunk.seqs[passed_over][0])
                            if not replaced and user_id not in self._blend.user_rows and first in erasure.rows:
                                self._blend.user_rows[user_id] = erasure.rows[first]  # see _number_users
                            self._add_to_blend(*self._joined(chunk, passed_over))
                    self._start_cooccurrence_merge()
            except BaseException:
                # What it passed over may be in no index now: rebuilt from the log by a later call's
                # catch-up, as after a rebuild that raised (one process alone, which follows no store: a restart).
                self._rebuild_failed_at = time.monotonic()
                raise
            finally:
                del self._erasing[user_id]
                erasure.done.set()

    # --------------------------------------------------------------- profiles

    def _cache_profile(self, user_id: str, deadline: Deadline | None = None) -> None:
        """Caches the user's profile if it is missing or a late event made it
        stale, replaying the log without the lock: a 500-event replay takes
        ~10 ms, which would hold up every other call. Events applied meanwhile
        become the profile's pending ones; an erasure meanwhile discards the
        replay. A caller that finds this user's profile being replayed waits
        for that one rather than read the log again (16 concurrent misses of a
        100k-event user would each hold a copy), and where that one failed,
        for the next another waiter starts. Call without the lock;
        `_user_state` still replays under it if the profile is gone or stale
        again by then. DeadlineExpiredError once the caller has gone."""
        wait = True
        while True:
            with self._lock:
                # Other workers' events first: applied after the read, they would
                # already be in the replay (seq <= its max), so _apply_events would
                # drop it and _user_state replay again, under the lock.
                self._catch_up()
                state = self._users.get(user_id)
                if state is not None and not self._builder.stale(state, self._clock()):
                    return
                running = self._replays.get(user_id)
                if running and wait:
                    awaited = running[-1]
                else:
                    if state is not None:  # replayed below, as a miss is
                        del self._users[user_id]
                    replay = _Replay()
                    self._replays.setdefault(user_id, []).append(replay)
                    break
            deadlines.wait(awaited.done, deadline)  # a replay's `finally` sets it
            wait = awaited.failed  # it raised: wait for the replay another waiter starts, if any
        state = snapshot = None
        try:
            # The read sees a prefix of the log (one writer hands out seqs in
            # commit order): events up to state.max_seq are all in it.
            state, replayed = self._restore(user_id, self._clock(), unlocked=True, deadline=deadline)
            snapshot = self._builder.snapshot_of(state, replayed)
        finally:
            with self._lock:
                replays = self._replays[user_id]
                replays.remove(replay)
                if not replays:
                    del self._replays[user_id]
                if state is not None and not replay.erased and user_id not in self._users:
                    state.pending = [e for e in replay.applied if e.seq > state.max_seq]
                    self._cache(user_id, state)
            replay.failed = state is None
            replay.done.set()
        if snapshot is not None:
            self.snapshots.submit(user_id, snapshot)

    def _cache(self, user_id: str, state: UserState) -> None:
        """Adds a profile to the LRU cache, evicting the least recently used,
        unless it holds no event: reads for users with none (new visitors, say)
        filled the cache with empty profiles (an audit's 48k calls: +240 MB)
        and evicted real ones, whose next read replays their log. Lock held."""
        if not state.max_seq:
            return
        self._users[user_id] = state
        while len(self._users) > self.config.profile.cache_users:
            self._users.popitem(last=False)

    def _user_state(self, user_id: str, as_of: float) -> UserState:
        """The user's profile including every event up to `as_of`. Call with
        the lock held; a read the cached profile cannot answer (`ProfileBuilder.needs_replay`)
        replays under it here, so callers try `_replayed_state` first."""
        state = self._current_state(user_id)
        if self._builder.needs_replay(state, as_of):
            return self._replay_until(user_id, as_of)
        return state

    def _replayed_state(self, user_id: str, as_of: float, deadline: Deadline | None = None) -> UserState | None:
        """The user's profile as of `as_of` where the cached one cannot answer
        then (`ProfileBuilder.needs_replay`: a look into the past, or past the clock at
        events held for it), replayed from the log without the lock (1k events: ~20 ms that
        would hold up every other call); None when the cached profile answers
        at `as_of`. The cache is left as it is. Call without the lock.

        A long log is read, not only replayed, one call at a time, and not
        for a caller whose deadline passed while it waited its turn: 16
        concurrent looks back at a 100k-event user each held a copy of the
        log while they queued (past 6 GiB), and 6 callers gone at their
        deadline left ~50 s of replays behind them (a resource audit)."""
        with self._lock:
            current = self._current_state(user_id)
            if not self._builder.needs_replay(current, as_of):
                return None
            events = sum(current.api_counts.values())
        with self._replay_turn(events, deadline):
            return self._replay_until(user_id, as_of)

    @contextlib.contextmanager
    def _replay_turn(self, events: int, deadline: Deadline | None) -> Iterator[None]:
        """A replay of `events` events without the lock: a long one waits for
        its turn, and is not run for a caller gone meanwhile. A replay is
        Python, some small NumPy calls an event, and concurrent ones convoy
        on the GIL (8 replays of 5k events at once took 3.5x as long as one
        after another on 2 cores, the other calls starved meanwhile). Short
        ones go at once, never behind a long one."""
        if events < LONG_REPLAY_EVENTS:
            yield
            return
        deadlines.acquire(self._long_replay, deadline)  # not past the caller's deadline while it waits
        try:
            yield
        finally:
            self._long_replay.release()

    def _current_state(self, user_id: str) -> UserState:
        """The cached profile at the clock, caught up with every applied event. Lock held."""
        self._catch_up()
        # Events stamped after the clock wait in state.ahead, so that reads at
        # the clock need no replay.
        now = self._clock()
        state = self._users.get(user_id)
        if state is None:
            state = self._restore(user_id, now)[0]
            self._cache(user_id, state)
        else:
            self._users.move_to_end(user_id)
        if not self._catch_up_profile(user_id, state, now):
            state = self._restore(user_id, now)[0]  # replay exactly
            self._users[user_id] = state
        return state

    def _catch_up_profile(self, user_id: str, state: UserState, now: float) -> bool:
        """Applies the cached `state`'s pending events, and those held for
        the clock up to `now`; False, and the profile no longer cached, where
        only a replay of the log brings it up to the clock (a late event
        among them). Lock held."""
        if self._builder.stale(state, now):
            self._users.pop(user_id, None)
            return False
        if state.pending or any(e.event_time <= now for e in state.ahead):
            pending = sorted(state.pending, key=lambda e: e.seq)
            state.pending = []
            self._builder.extend(state, pending, now)
        return True

    def _replay_until(self, user_id: str, as_of: float) -> UserState:
        """A profile of what had happened by `as_of`, from the log; not cached."""
        history = self.store.user_history(user_id, from_snapshot=False, through_time=as_of, chunk=REPLAY_CHUNK)
        with history as (_, chunks):
            return self._builder.build(chunks, as_of)[0]

    def _restore(self, user_id: str, horizon: float, unlocked: bool = False,
                 deadline: Deadline | None = None) -> tuple[UserState, Replayed]:
        """The user's profile at `horizon`, from the log: their snapshot and
        the events after it where it fits (see `ProfileBuilder.thawed`), else every event.
        Returns it and what it replayed. unlocked: called without the lock,
        so a long replay waits its turn (`_replay_turn`), not past `deadline`."""
        with self.store.user_history(user_id, chunk=REPLAY_CHUNK) as (snapshot, chunks):
            size, oldest, chunks = _peek(chunks)
            start = None if snapshot is None else self._builder.thawed(user_id, snapshot, oldest, horizon)
            if snapshot is None or start is not None:
                return self._replay(size, chunks, horizon, start, unlocked, deadline)
        with self.store.user_history(user_id, from_snapshot=False, chunk=REPLAY_CHUNK) as (_, chunks):
            size, _, chunks = _peek(chunks)
            return self._replay(size, chunks, horizon, None, unlocked, deadline)

    def _replay(self, size: int, chunks: Iterator[list[EventRecord]], horizon: float, start: UserState | None,
                unlocked: bool, deadline: Deadline | None) -> tuple[UserState, Replayed]:
        """`_restore`'s replay of the log's chunks, the first of `size` events:
        a full one (REPLAY_CHUNK) is a long replay, which waits its turn where unlocked."""
        with self._replay_turn(size, deadline) if unlocked else contextlib.nullcontext():
            return self._builder.build(chunks, horizon, start)

    def profile(self, user_id: str, as_of: float | None = None, items_per_interest: int | None = None,
                deadline: Deadline | None = None) -> UserProfile:
        t = self._clock() if as_of is None else as_of
        n_items = self.config.ranking.items_per_interest if items_per_interest is None else items_per_interest
        self._cache_profile(user_id, deadline)
        replayed = self._replayed_state(user_id, t, deadline)
        kernel = None
        if self._needs_kernel_profile(user_id, t, replayed):
            kernel = self._kernel_profile(user_id, t, deadline)
        with self._lock:
            state = self._user_state(user_id, t) if replayed is None else replayed
            multi = state.multi
            importances, shares = multi.importances(t), multi.shares(t)
            # Recommend's rule: no positive weight left at t (decayed to 0 in float64) is no profile.
            clustered = bool(shares.any()) and self._single_profile(user_id, state, t, kernel).weight > 0
            if clustered:
                centroids, trends = multi.centroids(t), multi.trend_labels()
                counts, last_times = multi.counts.copy(), multi.last_time.copy()
            profile = UserProfile(
                user_id=user_id,
                interests=(),
                event_counts=dict(state.api_counts),
                last_event_time=None if state.newest_time == -np.inf else state.newest_time,
                negative_strength=state.single.negative_strength(t),
            )
        if not clustered:
            return profile
        described = self._describe(centroids, n_items)  # takes the lock only around its products
        interests = []
        for rank, c in enumerate(ranked_interests(shares)):
            labels, items = described[c]
            interests.append(
                InterestView(
                    interest_id=rank,
                    strength=float(importances[c]),
                    share=float(shares[c]),
                    trend=str(trends[c]),
                    labels=labels,
                    top_items=items,
                    event_count=int(counts[c]),
                    last_event_time=float(last_times[c]),
                )
            )
        return dataclasses.replace(profile, interests=tuple(interests))

    def _describe(self, centroids: np.ndarray, n_items: int):
        """Per centroid: ((label, similarity)...), ((item id, text, similarity)...).
        A label's similarity is the cosine between the unit centroid c and
        the label's direction m - mu (`_label_space`): (c.m - c.mu) / |m - mu|,
        how much nearer the interest is to the category's items than to the
        catalogue's, on average. Centring c too (c - mu) gave every category
        whose mean lies off the catalogue's radius a bias, -mu.(m - mu): a
        one-item category from another domain (m.mu ~ 0.07 against
        |mu|^2 = 0.44 on MovieLens) got back all its dissimilarity and named
        movie interests ("Crime, Shoes, Socks" after the README's three
        items) at noise-level cosines. Reads the
        catalogue and names the results with the lock held, and runs the
        products in between without it, as `recommend` does: if an item it
        picked was deleted or changed meanwhile, or the rows renumbered, it
        describes again under the lock.
        Items come best first, equal ones by id (`_nearest`, `_best_by_id`)."""
        units = normalize(centroids)

        def describe(items: np.ndarray, allowed: np.ndarray):
            # One more than asked: `_nearest` sees whether the cut falls in a tie.
            described = describe_clusters(
                centroids, label_vectors, items, n_labels=self.config.ranking.labels_per_interest,
                n_items=min(n_items + 1, items.shape[0]) if n_items else 0, item_allowed=allowed,
                scan=self._blocks,
            )
            return described, [_nearest(items, allowed, picked, unit, n_items)
                                for picked, unit in zip(described.item_indices, units)]

        with self._lock:
            names, label_vectors = self._label_space()
            catalog = self.catalog
            items, allowed, epoch, version = catalog.vectors, catalog.alive.copy(), catalog.epoch, catalog.version
        described, nearest = describe(items, allowed)
        with self._lock:
            catalog = self.catalog
            # Rows renumbered, a picked item deleted, or one rewritten (its new text beside its old cosine): again,
            # as `_confirm` tells.
            if catalog.epoch != epoch or not all(
                    catalog.alive[rows].all() and (catalog.rewritten[rows] <= version).all() for rows, _ in nearest):
                described, nearest = describe(catalog.vectors, catalog.alive)
            out = []
            for c, (rows, scores) in enumerate(nearest):
                # A category pointing away from the interest (cosine <= 0) does not name it: a user of
                # camping gear read "camping, outdoor, shoes" with shoes at -0.31 (an onboarding review).
                labels = tuple(
                    (names[i], float(s))
                    for i, s in zip(described.label_indices[c], described.label_scores[c])
                    if i >= 0 and s > 0
                )
                rows, scores, ids = self._best_by_id(rows, scores, n_items)
                items = tuple((i, catalog.texts[row], float(score)) for i, row, score in zip(ids, rows, scores))
                out.append((labels, items))
            return out

    # ---------------------------------------------------------- recommending

    def _allowed(self, filter: ItemFilter, exclude: np.ndarray) -> np.ndarray:
        """(size,) bool: alive items passing the filter and not at the rows
        `exclude` (-1: none). Lock held."""
        catalog = self.catalog
        allowed = catalog.alive.copy()
        if filter.include_categories:
            allowed &= catalog.category_mask(filter.include_categories)
        if filter.exclude_categories:
            allowed &= ~catalog.category_mask(filter.exclude_categories)
        for rows in (exclude, catalog.rows(filter.exclude_item_ids)):
            allowed[rows[rows >= 0]] = False
        return allowed

    def _seen_rows(self, state: UserState) -> np.ndarray:
        """Catalogue rows of the items the user had events on (-1: gone). Lock held."""
        return _derived(state, "seen", (self.catalog.version, len(state.seen)),
                        lambda: self.catalog.rows(list(state.seen)))

    def recommend(
        self,
        user_id: str,
        limit: int,
        *,
        as_of: float | None = None,
        filter: ItemFilter = ItemFilter(),
        include_seen: bool = False,
        query: str = "",
        explain: bool = False,
        diversity: float = 0.0,
        deadline: Deadline | None = None,
    ) -> Recommendation:
        t = self._clock() if as_of is None else as_of
        query_vector = self._embed([query], deadline)[0] if query else None
        self._cache_profile(user_id, deadline)
        replayed = self._replayed_state(user_id, t, deadline)
        kernel = self._kernel_profile(user_id, t, deadline)
        candidates = limit * MMR_CANDIDATES_PER_RESULT if diversity > 0 else limit
        ranked = self._with_stable_rows(lambda: self._rank(
            user_id, candidates, t, replayed, kernel, filter, include_seen, query_vector, explain,
            copy=diversity > 0 or explain))
        ids, top_scores, vectors, parts = ranked.ids, ranked.scores, ranked.vectors, ranked.parts
        if diversity > 0 and ids:
            # Quadratic in the limit (1,000: 5,000 candidates, ~125 ms): without the lock, as the scan.
            picks = mmr(top_scores, vectors, limit, lam=1.0 - diversity)
            top_scores, ids, vectors = top_scores[picks], [ids[i] for i in picks], vectors[picks]
            parts = {name: values[picks] for name, values in parts.items()}
        explanations = [None] * len(ids)
        if explain and ranked.strategy == "personalized":
            explanations = self._explain(user_id, ranked.explained, t, vectors, parts, deadline)
        elif explain:  # trending: no interest or event produced it, only its score's parts
            explanations = [Explanation((), (), row_parts) for row_parts in per_row(parts, len(ids))]
        return Recommendation(
            items=tuple(ScoredItem(i, float(s), e) for i, s, e in zip(ids, top_scores, explanations)),
            strategy=ranked.strategy,
        )

    def _rank(self, user_id: str, candidates: int, t: float, replayed: UserState | None,
              kernel: _SingleProfile | None, filter: ItemFilter, include_seen: bool, query_vector: np.ndarray | None,
              explain: bool, copy: bool) -> _Ranked:
        """The best `candidates` items for recommend(): scored without the lock,
        named with it held, where the rows' vectors (copy) and the
        explanation's parts (explain) are copied out too, while the rows'
        numbers hold (a compaction moves rows once the lock is let go)."""
        ranking = self.config.ranking
        with self._lock:
            state = self._user_state(user_id, t) if replayed is None else replayed
            allowed = self._allowed(filter, _NO_ROWS if include_seen else self._seen_rows(state))
            single = self._single_profile(user_id, state, t, kernel)
            personal = single.weight > 0
            catalog = self.catalog
            items, create_times, epoch, version = catalog.vectors, catalog.create_times, catalog.epoch, catalog.version
            explained = None
            if personal:
                scan = self._signal_sources(user_id, state, t, single=single)
                if explain:
                    explained = _Explained(state.multi.shares(t), state.multi.centroids(t), state.max_seq,
                                           sum(state.api_counts.values()))
            else:
                # In float64: an item 150 half-lives less popular than the top one is 0 in float32, and after
                # one fresh event every item of an older log tied at 0 and listed by id.
                popularity = self._popularity_at(t, np.float64)
        # The passes over the whole catalogue run without the lock (see CatalogueScan).
        if personal:
            blend, strategy = scan.blend(self._blocks, self._blend_weights()), "personalized"
        else:
            blend, strategy = Blend.of("popularity", popularity()), "trending"
        if query_vector is not None:
            query_scores = self._blocks(lambda rows: cosine_scores(query_vector, rows), items)
            blend = blend.mixed("query", query_scores, ranking.query_weight)
        if np.isfinite(ranking.freshness_half_life_days):
            blend = blend.freshened(log2_freshness(create_times, t, ranking.freshness_half_life_days * DAY))
        select = functools.partial(top_k, blend.scores, candidates, ties=True)  # select(allowed) -> (rows, scores)
        picked = select(allowed)
        with self._lock:
            rows, top_scores = self._confirm(picked, allowed, select, epoch, version)
            rows, top_scores, ids = self._best_by_id(rows, top_scores, candidates)
            return _Ranked(ids, blend.reported(top_scores), items[rows] if copy else None,
                           blend.parts_at(rows) if explain else {}, explained, strategy)

    def _best_by_id(self, rows: np.ndarray, scores: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The `limit` best of `rows` (top_k's: best first, every tie at the
        cut included), best first, exact ties by item id: rows are numbered in
        the order this process learned of its items, which differs between
        workers and across restarts; ids do not. The ties at the cut can be
        the whole catalogue (no events yet: every popularity is 0): of those,
        only the smallest ids are picked (sorting 100k took 200 ms, this 6).
        Returns (rows, scores, ids). Lock held."""
        ids, picked, values = self.catalog.ids, rows.tolist(), scores.tolist()
        keep: Sequence[int] = range(len(picked))
        if len(picked) > limit:
            sure = int(np.count_nonzero(scores > scores[limit - 1]))  # those after tie at the cut
            keep = [*range(sure), *heapq.nsmallest(limit - sure, range(sure, len(picked)), key=lambda i: ids[picked[i]])]
        order = sorted(keep, key=lambda i: (-values[i], ids[picked[i]]))
        return rows[order], scores[order], [ids[picked[i]] for i in order]

    def _confirm(self, picked, allowed: np.ndarray, select, epoch: int, version: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows picked from scores computed without the lock, checked with it
        held: if any was deleted meanwhile, `select` picks again from the same
        scores without the deleted rows (rows added meanwhile were never
        candidates). picked: (rows, scores); allowed: (n,) the mask they were
        picked under; epoch and version: the catalogue's when the scores' rows
        were read (raises _RowsChanged if it was compacted since, or a pick's
        vector rewritten: scored with the old one, it was named, explained
        and diversified with the new, its parts no longer its score's, a race
        review). Lock held."""
        if self.catalog.epoch != epoch:
            raise _RowsChanged
        alive = self.catalog.alive[: allowed.shape[0]]
        if not alive[picked[0]].all():
            picked = select(allowed & alive)
        if (self.catalog.rewritten[picked[0]] > version).any():  # the picks as returned, those picked again too
            raise _RowsChanged
        return picked

    def _blend_weights(self) -> dict[str, float]:
        """The blend's weight per signal of a user with positive events (see
        `_signal_sources`; config.BlendConfig), the negative profile's the
        interest's. The weights are divided by their sum, so the blended
        score stays on the cosine's scale and a request's query
        (`ranking.query_weight`) steers it as much as it steers a plain
        profile; the ranking does not change."""
        blend = self.config.blend
        total = (blend.interest + blend.cooccurrence + blend.popularity) or 1.0
        return {"interest": blend.interest / total, "negative": blend.interest / total,
                "cooccurrence": blend.cooccurrence / total, "popularity": blend.popularity / total}

    def signals(self, user_id: str, t: float, which: Sequence[str] | None = None) -> dict[str, np.ndarray] | None:
        """The blend's signals for the user at t before weighting (see
        `_signal_sources`), each (size,) float32 by catalogue row, the
        co-occurrence and popularity ones divided by their maximum, so in
        [0, 1]: what `halflife eval` blends offline. None where Recommend
        ranks trending instead (no positive interest at t: `_rank`'s rule)."""
        with self._lock:
            state = self._user_state(user_id, t)
            single = self._single_profile(user_id, state, t)
            if single.weight <= 0:
                return None
            return self._signal_sources(user_id, state, t, which, single).parts(_UNIT_WEIGHTS)

    def popularity(self, t: float) -> np.ndarray:
        """The popularity signal at t, as `signals` gives it: (size,) float32."""
        with self._lock:
            return self._signal_sources("", None, t, ("popularity",)).parts(_UNIT_WEIGHTS)["popularity"]

    def _signal_sources(
        self, user_id: str, state: UserState, t: float, which: Sequence[str] | None = None,
        single: _SingleProfile | None = None,
    ) -> CatalogueScan:
        """The blend's signals for one user: "interest" (profile cosine),
        "negative" (−β·fade·cosine with the negative profile, fade its
        `negative_fade`), "cooccurrence" and
        "popularity", as what the lock must be held for, taken now, and the
        work that may run after it is released (see CatalogueScan). `which`
        limits them to some names (None: those with a non-zero weight).
        single: `_single_profile`'s, where the caller has it. Lock held."""
        profile, blend = self.config.profile, self.config.blend
        if which is None:
            which = [n for n in ("interest", "cooccurrence", "popularity") if getattr(blend, n) > 0] + ["negative"]
        scan: dict = {}
        if "interest" in which or "negative" in which:
            single = single or self._single_profile(user_id, state, t)
            positive, negative = single.positive, single.negative
        if "interest" in which:
            if profile.mode == "multi":
                scan.update(centroids=state.multi.centroids(t), importances=state.multi.shares(t),
                            combine=profile.combine)
            else:
                scan.update(positive=positive)
        if "negative" in which and np.any(negative) and profile.negative_weight > 0:
            fade = negative_fade(single.weight, single.negative_strength, profile.negative_full_share)
            scan.update(negative=negative, negative_weight=profile.negative_weight * fade)
        later: dict[str, Later] = {}
        if "cooccurrence" in which:
            later["cooccurrence"] = self._affinity_scores(state, t)
        if "popularity" in which:
            later["popularity"] = self._popularity_at(t)
        return CatalogueScan(self.catalog.vectors, later=later, **scan)

    def _directed_chunks(self, user_id: str, t: float,
                         through_seq: float = np.inf) -> Iterator[tuple[list[EventRecord], np.ndarray]]:
        """The user's events stamped up to t that have a vector (see
        EventRecord.vector), and seq <= through_seq, with their internal
        types ((n,) int64), a chunk at a time (REPLAY_CHUNK; Store.user_history:
        by time, ties by seq, in one read): all at once, a 1M-event user's
        Recommend under a kernel peaked at 7.3 GiB, explained at 3.4."""
        with self.store.user_history(user_id, from_snapshot=False, through_time=t, chunk=REPLAY_CHUNK) as (_, chunks):
            for chunk in chunks:
                events = [e for e in chunk if e.vector is not None and e.seq <= through_seq]
                if events:
                    yield events, self._builder.record_types(events)

    def _single_profile(self, user_id: str, state: UserState, t: float,
                        kernel: _SingleProfile | None = None) -> _SingleProfile:
        """The user's single-vector profile at t: the decayed one, or under a
        `profile.kernel` `_kernel_profile`'s, taken without the lock (`kernel`)
        or else now. Its weight decides between personalised and trending.
        Lock held."""
        if self.config.profile.kernel == "half_life":
            single = state.single
            return _SingleProfile(single.direction(t), single.negative_direction(t), single.strength(t),
                                  single.negative_strength(t))
        return kernel if kernel is not None else self._kernel_sums(user_id, t)

    def _kernel_profile(self, user_id: str, t: float, deadline: Deadline | None = None) -> _SingleProfile | None:
        """Under a `profile.kernel`, the user's profile at t (`_kernel_sums`),
        computed without the lock, a long log one read at a time
        (`_replay_turn`): under the lock, a 1M-event user's Recommend held
        every other call up for 15 s. None under half-lives. Events recorded
        meanwhile count from the next call on. Call without the lock."""
        if self.config.profile.kernel == "half_life":
            return None
        with self._lock:
            state = self._users.get(user_id)
            events = sum(state.api_counts.values()) if state is not None else None
        if events is None:  # evicted since the caller cached it (a small cache_users): counted in the log
            events = self.store.event_count(user_id)
        with self._replay_turn(events, deadline):
            return self._kernel_sums(user_id, t)

    def _needs_kernel_profile(self, user_id: str, t: float, replayed: UserState | None) -> bool:
        """Whether GetProfile needs `_kernel_profile`'s weight at t: under a
        kernel, where it may list interests, by the shares of the profile at
        hand (a user of 20k dislikes read the log for every GetProfile).
        Call without the lock."""
        if self.config.profile.kernel == "half_life":
            return False
        with self._lock:
            state = self._users.get(user_id) if replayed is None else replayed
            return state is None or bool(state.multi.shares(t).any())

    def _kernel_sums(self, user_id: str, t: float) -> _SingleProfile:
        """The user's single-vector profile at t computed exactly from their
        log up to t (event types keep their weights; the kernel replaces
        their half-lives), a chunk at a time."""
        sums, strengths = np.zeros((2, self.dim)), np.zeros(2)
        for events, types in self._directed_chunks(user_id, t):
            chunk_sums, chunk_strengths = kernel_sums(np.stack([e.vector for e in events]),
                                                      np.array([e.event_time for e in events]),
                                                      self._builder.types.weights[types], self._decay(types, t))
            sums += chunk_sums
            strengths += chunk_strengths
        positive, negative = sums
        strength, negative_strength = strengths.tolist()
        return _SingleProfile(positive, negative, strength, negative_strength)

    def _decay(self, types: np.ndarray, t: float) -> Callable[[np.ndarray], np.ndarray]:
        """Events' times -> their decay at t, for the events of `types` ((n,)
        internal type ids): 2^(−age/h) by each one's half-life (so the times
        must be those n events'), or the configured `profile.kernel`
        (elementwise, whatever the times)."""
        profile = self.config.profile
        if profile.kernel == "half_life":
            return half_life_kernel(t, self._builder.types.half_lives[types])
        return es_kernel(profile.kernel, origin=t, scale=profile.kernel_scale_days * DAY,
                         offset=profile.kernel_offset_days * DAY, decay=profile.kernel_decay)

    def _affinity_scores(self, state: UserState, t: float) -> Later:
        """Σ_i a_i · sim(i, j): the user's decayed per-item affinity (event
        weight × 2^(−age/h), events up to t; up to a factor common to all,
        which the blend divides out) through item co-occurrence, as a
        function returning (size,) float64, run without the lock (see
        CatalogueScan): the present is scored from a view of the index taken
        now (Cooccurrence.view: under the lock, a user whose items many
        others share held every other call up, 30 ms at 2M pairs, 0.8 s
        under "jaccard"); a look into the past or after the clock rebuilds
        the pairs of then from a copy. Lock held."""
        blend = self.config.blend
        ahead = self._release_blend(t)
        rows, times, types = _derived(state, "affinity", (self.catalog.version, len(state.affinity_items)), lambda: (
            # As popularity and the pairs: an event on a deleted namesake counts for no item.
            self._current_item_rows(state.affinity_items, np.array(state.affinity_seqs, dtype=np.int64)),
            np.array(state.affinity_times, dtype=np.float64),
            np.array(state.affinity_types, dtype=np.int64),
        ))
        keep = (rows >= 0) & (times <= t)
        if not keep.any():
            zeros = np.zeros(self.catalog.size)
            return lambda: zeros
        types, times_kept = types[keep], times[keep]
        # From the newest event, not from t: the signal is divided by its maximum (CatalogueScan), where
        # the factor between the two cancels, and from t every affinity underflowed past ~1,075 half-lives.
        decay = np.exp2(-(times_kept.max() - times_kept) / (blend.affinity_half_life_days * DAY))
        items, at = np.unique(rows[keep], return_inverse=True)
        affinity = np.bincount(at, weights=self._builder.types.weights[types] * decay, minlength=items.size)
        index = self._blend.cooccurrence
        limit = blend.max_co_users or None
        held = ahead is not None and bool((ahead[1] >= 0).any())
        if t >= index.newest and not held:
            present = index.view()  # scored after the lock is let go, as the past's pairs are
            return lambda: cooccurrence_scores(present, items, affinity, blend.similarity, limit)
        pairs = index.pairs_until(t)
        if held:  # a read after the clock: the held pairs up to t too
            times, users, item_rows, _ = ahead
            pairs = tuple(np.concatenate([p, q[users >= 0]]) for p, q in zip(pairs, (users, item_rows, times)))
        n_items = index.n_items
        return lambda: cooccurrence_scores(Cooccurrence.from_pairs(n_items, *pairs), items, affinity, blend.similarity,
                                           limit)

    def _explain(self, user_id: str, explained: _Explained, t: float, item_vectors, parts,
                 deadline: Deadline | None = None) -> list[Explanation]:
        """Why each recommended item (`item_vectors`, (n, dim)) was (see
        `explain.explanations`), from the profile as it was ranked
        (`explained`: its events, seq <= max_seq, read from the log a chunk
        at a time: `_positive_chunks`) and the
        blend's `parts` ((n,) each). Call without the lock: it scores every
        positive event against every row (a user of 100k events at limit
        1,000 held every other call up for 8.7 s under it). A long log is
        read one call at a time, as a replay's (`_replay_turn`): 8 concurrent
        explanations of a 50k-event user held 1.5 GB of copies (a scaling
        review)."""
        shares, centroids = explained.shares, explained.centroids
        described = self._describe(centroids, 0) if shares.shape[0] else []
        labels = [tuple(label for label, _ in interest_labels) for interest_labels, _ in described]
        with self._replay_turn(explained.events, deadline):
            return explanations(item_vectors, parts, shares, centroids, labels,
                                self._positive_chunks(user_id, t, explained.max_seq))

    def _positive_chunks(self, user_id: str, t: float,
                         through_seq: int) -> Iterator[tuple[list[EventRecord], np.ndarray]]:
        """`_directed_chunks`' events of positive weight, with their weights decayed to t ((n,) float64)."""
        for events, types in self._directed_chunks(user_id, t, through_seq):
            weights = self._builder.types.weights[types]
            positive = weights > 0
            events = [e for e, p in zip(events, positive) if p]
            yield events, weights[positive] * self._decay(types[positive], t)(np.array([e.event_time for e in events]))

    def similar_items(
        self, *, item_id: str | None = None, text: str | None = None, limit: int, filter: ItemFilter = ItemFilter(),
        deadline: Deadline | None = None,
    ) -> Recommendation:
        """Items nearest an item (excluding itself) or a text. Raises UnknownItemError for an unknown item."""
        query = self._embed([text], deadline)[0] if text is not None else None
        return self._with_stable_rows(lambda: self._similar_items(item_id, query, limit, filter))

    def _similar_items(self, item_id: str | None, query: np.ndarray | None, limit: int,
                       filter: ItemFilter) -> Recommendation:
        with self._lock:
            self._catch_up()
            epoch, version = self.catalog.epoch, self.catalog.version
            exclude = _NO_ROWS
            if item_id is not None:
                row = self.catalog.row_of.get(item_id)
                if row is None:
                    raise UnknownItemError(item_id)
                query = self.catalog.vectors[row].copy()
                exclude = np.array([row])
            allowed, items = self._allowed(filter, exclude), self.catalog.vectors
        # Without the lock, as in recommend(); clipped before the top k, so that equal rows tie (by id).
        scores = self._blocks(lambda rows: clip_cosines(cosine_scores(query, rows)), items)
        select = functools.partial(top_k, scores, limit, ties=True)  # select(allowed) -> (rows, scores)
        picked = select(allowed)
        with self._lock:
            rows, top_scores = self._confirm(picked, allowed, select, epoch, version)
            rows, top_scores, ids = self._best_by_id(rows, top_scores, limit)
        return Recommendation(tuple(ScoredItem(i, float(s)) for i, s in zip(ids, top_scores)), "similarity")

    def _with_stable_rows(self, read: Callable[[], _Read]) -> _Read:
        """read(), which scores catalogue rows without the lock and names them
        with it held (`_confirm`): again when a compaction renumbered them in
        between, or an upsert rewrote a pick, at last with the lock held
        throughout (it is reentrant), so read() holds no more than the scan
        and the naming."""
        for _ in range(STABLE_ROWS_ATTEMPTS - 1):
            try:
                return read()
            except _RowsChanged:
                continue
        with self._lock:
            return read()

    # ---------------------------------------------------------------- status

    def catch_up(self) -> None:
        """Takes in what other processes sharing the store have written, as
        every read and write does first."""
        with self._lock:
            self._catch_up()

    def sizes(self) -> dict[str, int]:
        """Items in the catalogue and profiles in the cache, as this process
        has applied them (for metrics): no lock, no store, so a scrape neither
        holds up calls nor fails with the store (`stats` catches up first)."""
        return {"items": len(self.catalog), "cached_users": len(self._users)}
