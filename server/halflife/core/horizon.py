"""Time-stamped entries held back until a read reaches their time, pure NumPy.

The blend's indexes (decayed popularity, co-occurrence) answer a read at t
quickly only when they hold nothing stamped after t; otherwise they rebuild
what had happened by t from their logs, a pass over every entry. Clients
whose clocks run ahead of the server's stamp events after "now", and one such
event would send every read at the clock down that slow path until the clock
caught up. `Horizon` keeps such entries out of the indexes until a read at or
after their time, so reads at the clock stay on the fast path and still count
exactly the entries stamped up to their time.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Entries = tuple[np.ndarray, ...]  # (times, *columns), each (n,)


def _joined(chunks: list[Entries]) -> Entries:
    """Chunks of entries as one."""
    return chunks[0] if len(chunks) == 1 else tuple(np.concatenate(c) for c in zip(*chunks))


class Horizon:
    """Splits entries into those an index holds, stamped up to `through`, and
    those held back, stamped later. Invariant: every entry stamped at or
    before `through` has been handed out, every later one is held; so an
    index fed with what `admit` and `release` return holds exactly the
    entries up to `through`, and a read at t >= `through` that first takes
    `release(t)` sees exactly the entries up to t.

    Entries are tuples of equal-length arrays, times first. At most
    `max_held` are held: beyond that, `admit` hands out every held entry
    (and `through` moves past them), so a server whose own clock runs behind
    its clients' keeps a bounded memory and reads fall back to rebuilding,
    as they did before entries were held."""

    def __init__(self, max_held: int = 1_000_000) -> None:
        self.through = -np.inf
        self.max_held = max_held
        self._held: list[Entries] = []
        self._earliest = np.inf  # of the held entries
        self._count = 0  # held entries

    def __len__(self) -> int:
        return self._count

    def admit(self, now: float, times: np.ndarray, *columns: np.ndarray) -> Entries:
        """New entries: returns those to index now, i.e. the new and held ones
        stamped up to max(through, now), and holds the rest."""
        return self._due(max(self.through, now), (np.asarray(times, dtype=np.float64), *columns))

    def release(self, t: float) -> Entries | None:
        """Before a read at t: the held entries stamped up to t (None when
        there are none, or when t < through, a read into the past that leaves
        every held entry out anyway)."""
        if t < self.through or t < self._earliest:
            return None
        return self._due(t, None)

    def peek(self, t: float) -> Entries | None:
        """The held entries stamped up to t, left held (None when there are
        none): for a read ahead of the clock, which should not move what
        reads at the clock see."""
        if t < self._earliest:
            return None
        entries = _joined(self._held)
        due = entries[0] <= t
        return tuple(c[due] for c in entries)

    def map_held(self, fn: Callable[..., Entries]) -> None:
        """Replaces each held chunk (times, *columns) with fn(times, *columns),
        e.g. to forget what an erasure took back; fn keeps the times."""
        self._held = [fn(*chunk) for chunk in self._held]  # same lengths: the count stands

    def _due(self, horizon: float, new: Entries | None) -> Entries:
        parts = [] if new is None else [new]
        if self._earliest <= horizon:
            parts += self._held
            self._held, self._earliest, self._count = [], np.inf, 0
        entries = _joined(parts)
        due = entries[0] <= horizon
        if not due.all():
            later = tuple(c[~due] for c in entries)
            self._held.append(later)
            self._earliest = min(self._earliest, float(later[0].min()))
            self._count += later[0].shape[0]
            entries = tuple(c[due] for c in entries)
        if self._count > self.max_held:  # the bound on memory: hand out everything
            entries = _joined([entries, *self._held])
            self._held, self._earliest, self._count = [], np.inf, 0
        if entries[0].size:
            self.through = max(self.through, float(entries[0].max()))
        return entries
