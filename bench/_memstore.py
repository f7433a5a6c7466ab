"""A minimal in-memory `Store` so the interest engine can be timed in-process
(no SQLite, no fsync): only what InterestEngine calls."""

from __future__ import annotations

import contextlib
import math
from typing import Collection, Iterator, Sequence

from halflife.storage.base import EventColumns, EventRecord, Guard, ItemRecord, ResentEventsErasedError, StoreHead


def _check(guard: Guard | None) -> None:
    if guard is not None:
        guard()


class MemoryStore:
    origin = "memory"

    def __init__(self) -> None:
        self.items: dict[str, ItemRecord] = {}
        self.events: list[EventRecord] = []
        self.by_user: dict[str, list[EventRecord]] = {}
        self.ids: set[str] = set()
        self.vectors_from: tuple[str, str] | None = None

    def upsert_items(self, items: Sequence[ItemRecord], guard: Guard | None = None) -> tuple[int, int]:
        _check(guard)
        created = sum(1 for i in items if i.id not in self.items)
        for item in items:
            self.items[item.id] = item
        return created, len(items) - created

    def delete_items(self, ids, guard: Guard | None = None):
        _check(guard)
        return [i for i in ids if self.items.pop(i, None) is not None]

    def get_items(self, ids):
        return {i: self.items[i] for i in ids if i in self.items}

    def item_count(self) -> int:
        return len(self.items)

    def iter_items(self) -> Iterator[ItemRecord]:
        return iter(list(self.items.values()))

    def record_events(self, events: Sequence[EventRecord], guard: Guard | None = None,
                      items_as_of: int | None = None, stored_before: Collection[str] = (),
                      as_items: Collection[int] = ()) -> list[EventRecord]:
        # items_as_of goes unchecked: the benchmark changes no item while it records.
        _check(guard)
        if erased := [i for i in stored_before if i not in self.ids]:
            raise ResentEventsErasedError(erased)
        out = []
        for e in events:
            if e.event_id in self.ids:
                continue
            self.ids.add(e.event_id)
            stored = e._replace(seq=len(self.events) + 1)
            self.events.append(stored)
            self.by_user.setdefault(e.user_id, []).append(stored)
            out.append(stored)
        return out

    def existing_event_ids(self, event_ids):
        return {i for i in event_ids if i in self.ids}

    def user_events(self, user_id: str) -> list[EventRecord]:
        return list(self.by_user.get(user_id, []))

    @contextlib.contextmanager
    def user_history(self, user_id: str, from_snapshot: bool = True, through_time: float = math.inf,
                     chunk: int = 10_000) -> Iterator[tuple[None, Iterator[list[EventRecord]]]]:
        events = sorted((e for e in self.by_user.get(user_id, []) if e.event_time <= through_time),
                        key=lambda e: (e.event_time, e.seq))
        yield None, (events[i : i + chunk] for i in range(0, len(events), chunk))

    def save_profile_snapshot(self, user_id: str, snapshot) -> bool:
        return False  # keeps none: the benchmark times replays of the log

    def iter_events(self, chunk: int = 50_000, through_seq: int | None = None,
                    user_id: str | None = None) -> Iterator[EventColumns]:
        return iter(())

    def head(self) -> StoreHead:
        return StoreHead(event_seq=len(self.events), change_version=0)

    def delete_user(self, user_id: str, guard: Guard | None = None) -> int:
        _check(guard)
        return len(self.by_user.pop(user_id, []))

    def bind_vectors(self, space: str, model: str) -> tuple[str, str]:
        if self.vectors_from is None or self.vector_size() is None:  # as SqliteStore: an empty store is rebound
            self.vectors_from = (space, model)
        return self.vectors_from

    def bound_vectors(self) -> tuple[str, str] | None:
        return self.vectors_from

    def vector_size(self) -> int | None:
        item = next(iter(self.items.values()), None)  # the benchmark's events are on its items
        return None if item is None else item.vector.shape[0]

    def event_count(self) -> int:
        return len(self.events)

    def close(self) -> None:
        pass
