"""Which of the store's events an engine has applied to its in-memory state."""

from __future__ import annotations

import numpy as np


class EventWatermark:
    """Every event with seq <= `through` is applied (or was erased), plus
    whole batches above it: ones this process wrote and applied as they
    committed, while another process's batch below them is still to be fetched.

    A batch committed by one store call gets consecutive seqs and commits
    atomically, so it is always applied as a whole, by exactly one of two
    paths: its writer's thread, or a follow-up read of the store's log.
    """

    def __init__(self, through: int):
        self.through = through
        self._ahead: list[tuple[int, int]] = []  # (first, last) seqs applied above `through`, sorted

    def copy(self) -> EventWatermark:
        """What is applied now, kept as it is while this one moves on."""
        copied = EventWatermark(self.through)
        copied._ahead = list(self._ahead)
        return copied

    def applied(self, seq: int) -> bool:
        return bool(self.applied_mask(np.array([seq]))[0])

    def applied_mask(self, seqs: np.ndarray) -> np.ndarray:
        """`applied` of each of seqs, (n,) bool: one array pass a range, where a
        Python test of each seq took an erasure of 1M events ~0.1 s under the lock."""
        mask = seqs <= self.through
        for first, last in self._ahead:
            mask |= (first <= seqs) & (seqs <= last)
        return mask

    def add(self, first: int, last: int) -> None:
        """Marks the batch first..last applied."""
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted([*self._ahead, (first, last)]):  # adjacent batches become one range
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        if merged[0][0] <= self.through + 1:
            self.through = max(self.through, merged.pop(0)[1])
        self._ahead = merged

    def advance(self, through: int) -> None:
        """Everything up to `through` is applied now."""
        self.through = max(self.through, through)
        self._ahead = [(first, last) for first, last in self._ahead if last > self.through]
