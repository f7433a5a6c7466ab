"""A user's profile as the interest engine caches it (`UserState`), and its
snapshot: the state as bytes for the store (`Store.save_profile_snapshot`),
so that a heavy user's profile is rebuilt from the snapshot and the events
after it instead of their whole log (a 50k-event replay took 3.2 s)."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
from hashlib import sha256

import numpy as np

from halflife.config import Config
from halflife.core.profiles import TREND_HALF_LIVES, MultiInterestState, ProfileState
from halflife.storage.base import EventRecord

# Bumped whenever what a snapshot holds, or what a replay builds from the same
# events, changes: a snapshot of another format is ignored (and replaced).
SNAPSHOT_FORMAT = 1


@dataclasses.dataclass
class UserState:
    """A user's profile built from their events with seq <= max_seq, except
    those stamped after its newest (`ahead`: a client clock running ahead),
    plus events recorded since (`pending`), applied on the next read."""

    multi: MultiInterestState
    single: ProfileState
    seen: set[str]
    api_counts: collections.Counter
    newest_time: float
    max_seq: int
    pending: list[EventRecord] = dataclasses.field(default_factory=list)
    # Seen (seq <= max_seq) but stamped after the clock when applied: each later
    # than newest_time, held until the clock reaches it, so that reads at the
    # clock need no replay. In the order seen (a replay's: by time, ties by seq).
    ahead: list[EventRecord] = dataclasses.field(default_factory=list)
    # Past replay.MAX_HELD_EVENTS_PER_USER, the time of the first event seen
    # but neither applied nor held (it waits in the log, as do those after
    # it); a read at or after it replays. inf: none.
    ahead_in_log: float = np.inf
    # Positive item events, for the co-occurrence affinity: item ids, internal types, times.
    affinity_items: list[str] = dataclasses.field(default_factory=list)
    affinity_types: list[int] = dataclasses.field(default_factory=list)
    affinity_times: list[float] = dataclasses.field(default_factory=list)
    affinity_seqs: list[int] = dataclasses.field(default_factory=list)  # to tell an item from a deleted namesake
    # Arrays derived from the above and the catalogue (see engine._derived): name -> (key, value).
    derived: dict = dataclasses.field(default_factory=dict)


def snapshot_key(config: Config, dim: int) -> str:
    """What a profile depends on besides the events: the settings a replay
    reads. A snapshot saved under another key (the config changed) is not
    used, since a replay would build another profile."""
    types = config.decay_types()
    settings = (
        SNAPSHOT_FORMAT, dim, types.names, types.weights.tolist(), types.half_lives.tolist(),
        config.ratings.negative_max, config.ratings.positive_min,
        config.profile.max_interests, config.profile.cluster_threshold, TREND_HALF_LIVES,
    )
    return f"{SNAPSHOT_FORMAT}:{sha256(repr(settings).encode()).hexdigest()[:32]}"


def snapshot_bytes(state: UserState) -> bytes:
    """The state as bytes (an .npz archive, no pickles). Only a state with
    every event applied: none pending, none held for the clock."""
    if state.pending or state.ahead or state.ahead_in_log != np.inf:
        raise ValueError("a snapshot holds applied events only")
    ids = sorted(state.seen)
    position = {item_id: n for n, item_id in enumerate(ids)}
    arrays = {f"multi.{k}": v for k, v in state.multi.to_arrays().items()}
    arrays.update({f"single.{k}": v for k, v in state.single.to_arrays().items()})
    arrays.update(
        # Item ids once, as JSON; the affinity lists point into them.
        ids=np.frombuffer(json.dumps(ids).encode(), dtype=np.uint8),
        api_types=np.array(list(state.api_counts), dtype=np.int64),
        api_counts=np.array(list(state.api_counts.values()), dtype=np.int64),
        newest_time=np.array(state.newest_time),
        max_seq=np.array(state.max_seq, dtype=np.int64),
        affinity_items=np.array([position[i] for i in state.affinity_items], dtype=np.int64),
        affinity_types=np.array(state.affinity_types, dtype=np.int64),
        affinity_times=np.array(state.affinity_times, dtype=np.float64),
        affinity_seqs=np.array(state.affinity_seqs, dtype=np.int64),
    )
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def state_from_snapshot(data: bytes) -> UserState:
    """The state `snapshot_bytes` wrote. Raises (ValueError, KeyError,
    zipfile's errors...) on bytes it did not write."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    ids = json.loads(arrays["ids"].tobytes())
    return UserState(
        multi=MultiInterestState.from_arrays({k[6:]: v for k, v in arrays.items() if k.startswith("multi.")}),
        single=ProfileState.from_arrays({k[7:]: v for k, v in arrays.items() if k.startswith("single.")}),
        seen=set(ids),
        api_counts=collections.Counter(dict(zip(arrays["api_types"].tolist(), arrays["api_counts"].tolist()))),
        newest_time=float(arrays["newest_time"]),
        max_seq=int(arrays["max_seq"]),
        affinity_items=[ids[n] for n in arrays["affinity_items"].tolist()],
        affinity_types=arrays["affinity_types"].tolist(),
        affinity_times=arrays["affinity_times"].tolist(),
        affinity_seqs=arrays["affinity_seqs"].tolist(),
    )
