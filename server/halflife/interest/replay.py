"""How a user's profile is built from their event log (`ProfileBuilder`):
the replay the interest engine runs on a cache miss, the extension of a
cached profile by new events, and the snapshot that shortens a heavy
user's next replay. Knows nothing of the cache, the lock or the store: the
engine decides when to replay and what to read (interest/engine.py).

A profile is a deterministic function of the log: a replay applies its
events by time, ties by seq (`Store.user_history`'s order), a chunk of them
at a time, and new ones are applied as they arrive; events stamped after the
horizon are held until the clock reaches them.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Iterable, Sequence

import numpy as np

from halflife.config import EVENT_TYPE_NAMES, Config, api_event_type
from halflife.core.profiles import MultiInterestState, ProfileState
from halflife.interest.pseudonyms import user_pseudonym
from halflife.interest.state import UserState, snapshot_bytes, snapshot_key, state_from_snapshot
from halflife.storage.base import EventRecord, ProfileSnapshot, StoreDamagedError

log = logging.getLogger(__name__)

RATE = api_event_type("rate")
# Events a cached profile holds for the clock (see UserState.ahead), each
# with its vector (~1.6 KB): the soonest due. Later ones wait in the log, and
# the profile replays it once the clock reaches the first of them.
MAX_HELD_EVENTS_PER_USER = 16
# A replay of at least this many events saves the profile it built to the
# store (Store.save_profile_snapshot): the user's next miss replays only the
# events after it. 20-60 ms of replay, where a save costs a few ms once.
SNAPSHOT_EVENTS = 1000
# ... and at least this share of the user's events: a snapshot is written
# whole (~32 bytes an event), and a 1M-event user's took 0.4 s to serialise
# and save, where 1/100 of their events took 0.7 s to replay.
SNAPSHOT_SHARE = 100


def with_vectors(events: Sequence[EventRecord]) -> np.ndarray:
    """Positions of the events that have a vector (see EventRecord.vector). (m,) int64."""
    return np.array([i for i, e in enumerate(events) if e.vector is not None], dtype=np.int64)


@dataclasses.dataclass
class Replayed:
    """What a replay read of the log (`ProfileBuilder.build`), as far as
    `snapshot_of` asks: counted a chunk at a time, the events gone."""

    events: int = 0
    damaged: bool = False  # an event's stored vector was read back damaged (None)
    applied_through: int = 0  # the highest seq among the events applied (stamped up to the horizon)
    first_held: int | None = None  # the lowest among those held for the clock or left in the log

    def count(self, events: Sequence[EventRecord], horizon: float) -> None:
        self.events += len(events)
        self.damaged = self.damaged or any(e.vector is None for e in events)
        applied = [e.seq for e in events if e.event_time <= horizon]
        held = [e.seq for e in events if e.event_time > horizon]
        if applied:
            self.applied_through = max(self.applied_through, *applied)
        if held:
            self.first_held = min(held if self.first_held is None else [self.first_held, *held])


class ProfileBuilder:
    """Builds and extends `UserState`s under one config and vector size."""

    def __init__(self, config: Config, dim: int):
        self.config = config
        self.dim = dim
        self.types = config.decay_types()
        self.snapshot_key = snapshot_key(config, dim)

    def record_types(self, events: Sequence[EventRecord]) -> np.ndarray:
        """Internal type index of each recorded event (ratings mapped by value). (n,) int64."""
        return self.internal_types(
            np.array([e.type for e in events], dtype=np.int64),
            np.array([np.nan if e.value is None else e.value for e in events], dtype=np.float64),
        )

    def internal_types(self, api_types: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Internal type index per event: API value - 1, except that ratings
        map by value to rate / rate_mid / rate_low (config.ratings).
        api_types, values: (n,) (values NaN where none). Returns (n,) int64."""
        internal = np.asarray(api_types, dtype=np.int64) - 1
        unknown = (internal < 0) | (internal >= len(self.types.weights))
        if unknown.any():
            # The API takes only types it knows: one from the store was damaged there (it was an IndexError).
            raise StoreDamagedError(f"an event of type {int(internal[unknown][0]) + 1}, which this server does not "
                                    "know: the store is damaged")
        ratings = self.config.ratings
        is_rate = internal == RATE - 1
        low = is_rate & (values <= ratings.negative_max)
        mid = is_rate & (values > ratings.negative_max) & (values < ratings.positive_min)
        internal = np.where(low, EVENT_TYPE_NAMES.index("rate_low"), internal)
        return np.where(mid, EVENT_TYPE_NAMES.index("rate_mid"), internal)

    def build(self, chunks: Iterable[Sequence[EventRecord]], horizon: float,
              start: UserState | None = None) -> tuple[UserState, Replayed]:
        """A profile from events stamped up to `horizon`, the rest held (see
        `extend`), and what it replayed. chunks: the events in replay order
        (by time, ties by seq), a list at a time: a replay holds the chunk it
        applies and the one being read, not the log (a 1M-event user's whole
        log took 4.1 GiB). start: a
        profile to extend (none of the events older than its newest), where
        not an empty one."""
        profile = self.config.profile
        state = start if start is not None else UserState(
            multi=MultiInterestState.empty(self.types, self.dim, profile.max_interests, profile.cluster_threshold),
            single=ProfileState.empty(self.types, self.dim),
            seen=set(),
            api_counts=collections.Counter(),
            newest_time=-np.inf,
            max_seq=0,
        )
        replayed = Replayed()
        for events in chunks:
            replayed.count(events, horizon)
            self.extend(state, events, horizon)
        return state, replayed

    def extend(self, state: UserState, events: Sequence[EventRecord], horizon: float) -> None:
        """Applies the held events and `events` (in seq order or replay
        order, none older than state.newest_time) stamped up to `horizon`;
        holds the later ones."""
        events = [*state.ahead, *events]
        if not events:
            return
        state.max_seq = max(state.max_seq, max(e.seq for e in events))
        ahead = [e for e in events if e.event_time > horizon]
        if len(ahead) > MAX_HELD_EVENTS_PER_USER:
            # Before, every event was applied past the bound, and each read at the clock replayed the
            # whole log until the clock caught up: 17 events an hour ahead made a 10k-event user's
            # reads take 235 ms instead of 2-6 ms, one at a time (an audit).
            state.ahead_in_log = min(state.ahead_in_log, sorted(e.event_time for e in ahead)[MAX_HELD_EVENTS_PER_USER])
        state.ahead = [e for e in ahead if e.event_time < state.ahead_in_log]
        if ahead:
            events = [e for e in events if e.event_time <= horizon]
        if not events:
            return
        types = self.record_types(events)
        times = np.array([e.event_time for e in events])
        directed = with_vectors(events)
        if directed.size:
            vectors = np.stack([events[i].vector for i in directed])
            state.multi.add(self.types, types[directed], times[directed], vectors)
            state.single.add(self.types, types[directed], times[directed], vectors)
        state.seen.update(e.item_id for e in events if e.item_id)
        state.api_counts.update(e.type for e in events)
        state.newest_time = max(state.newest_time, float(times.max()))
        for e, k in zip(events, types.tolist()):
            if e.item_id and self.types.weights[k] > 0:
                state.affinity_items.append(e.item_id)
                state.affinity_types.append(k)
                state.affinity_times.append(e.event_time)
                state.affinity_seqs.append(e.seq)

    def snapshot_of(self, state: UserState, replayed: Replayed) -> ProfileSnapshot | None:
        """What to save of a profile just built by a replay (`build`, onto a
        snapshot or not), or None: a snapshot pays where the replay
        was long (SNAPSHOT_EVENTS, SNAPSHOT_SHARE), and one is taken only
        of what a full replay would build the same way later. Not where an
        event's stored vector was damaged: it counts without its direction
        now, but a repaired vector (an upsert of the item) would count in a
        full replay. Events held for the clock or waiting in the log for it
        are left out of it, when they came after every applied one (a client
        clock running ahead holds some at every read): the snapshot ends
        before them. Without, such a user's replays grew with every event
        since their last snapshot (an audit: 102, 374, then 1,326 events an
        hour later)."""
        if replayed.events < max(SNAPSHOT_EVENTS, sum(state.api_counts.values()) // SNAPSHOT_SHARE):
            return None
        if replayed.damaged:
            return None
        if replayed.first_held is not None:
            # Not applied: held, or waiting in the log (stamped at or after ahead_in_log).
            if not replayed.applied_through or replayed.applied_through > replayed.first_held:
                return None
            state = dataclasses.replace(state, ahead=[], ahead_in_log=np.inf, max_seq=replayed.applied_through)
        return ProfileSnapshot(state.max_seq, self.snapshot_key, snapshot_bytes(state))

    def thawed(self, user_id: str, snapshot: ProfileSnapshot, oldest_after: float,
               horizon: float) -> UserState | None:
        """The snapshot's profile where a replay of the whole log would build
        it on the way to `horizon`, and extend it with the user's events past
        it (`oldest_after`: the time of the oldest of them, inf where none):
        saved under these settings, its newest event not after `horizon`, and
        none of them older than that one (which a replay would have taken
        before some of the snapshot's). Else None."""
        if snapshot.key != self.snapshot_key:
            return None
        try:
            state = state_from_snapshot(snapshot.data)
        except Exception as e:  # damaged: only a shortcut lost, the log holds the profile
            log.warning("unreadable profile snapshot of %s, replaying their events: %s", user_pseudonym(user_id), e)
            return None
        if state.max_seq != snapshot.through_seq or state.newest_time > horizon:
            return None
        return None if oldest_after < state.newest_time else state

    @staticmethod
    def stale(state: UserState, now: float) -> bool:
        """Whether only a replay of the log brings the profile up to the
        clock (`now`): an event applied since it was built is older than its
        newest, or the clock reached the events it left in the log
        (`ahead_in_log`)."""
        late = bool(state.pending) and min(e.event_time for e in state.pending) < state.newest_time
        return late or now >= state.ahead_in_log

    @staticmethod
    def needs_replay(state: UserState, as_of: float) -> bool:
        """Whether a read at `as_of` must replay: it is before the profile's
        newest event, or past the clock at events held for it or left in the
        log (`ahead_in_log`)."""
        return (as_of < state.newest_time or as_of >= state.ahead_in_log
                or any(e.event_time <= as_of for e in state.ahead))
