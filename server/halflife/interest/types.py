"""The interest engine's vocabulary: what callers (the gRPC layer, the
offline evaluation) hand `InterestEngine` and get back, and the errors it
raises for their input. Plain frozen values; the engine's state is elsewhere."""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple

import numpy as np


class UnknownItemsError(LookupError):
    """Events refer to items the catalogue does not have."""

    def __init__(self, missing: list[tuple[int, str]]):
        self.missing = missing  # (event index, item id)
        super().__init__(", ".join(f"events[{i}].item_id {item!r}" for i, item in missing[:3]))


class UnknownItemError(LookupError):
    """similar_items' item is not in the catalogue: a class of its own, so
    that a KeyError of a bug is not answered as "no such item"."""


@dataclasses.dataclass(frozen=True)
class ItemInput:
    id: str
    text: str
    categories: tuple[str, ...] = ()
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    create_time: float | None = None
    vector: np.ndarray | None = None  # precomputed, normalised; None: embed `text`


class EventInput(NamedTuple):  # a tuple: one is built per event (see EventRecord)
    event_id: str
    user_id: str
    type: int  # API EventType value, 1..11
    item_id: str | None
    text: str | None
    value: float | None
    event_time: float


@dataclasses.dataclass(frozen=True)
class ItemFilter:
    include_categories: tuple[str, ...] = ()
    exclude_categories: tuple[str, ...] = ()
    exclude_item_ids: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class EventContribution:
    event_id: str
    type: int
    item_id: str | None
    event_time: float
    similarity: float
    weight: float


@dataclasses.dataclass(frozen=True)
class InterestContribution:
    interest_id: int
    labels: tuple[str, ...]
    similarity: float
    share: float


@dataclasses.dataclass(frozen=True)
class Explanation:
    interests: tuple[InterestContribution, ...]
    events: tuple[EventContribution, ...]
    score_parts: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float
    explanation: Explanation | None = None


@dataclasses.dataclass(frozen=True)
class Recommendation:
    items: tuple[ScoredItem, ...]
    strategy: str  # "personalized" | "trending" | "similarity"


@dataclasses.dataclass(frozen=True)
class InterestView:
    interest_id: int
    strength: float
    share: float
    trend: str  # "rising" | "steady" | "fading"
    labels: tuple[tuple[str, float], ...]
    top_items: tuple[tuple[str, str, float], ...]  # (item id, text, similarity)
    event_count: int
    last_event_time: float


@dataclasses.dataclass(frozen=True)
class UserProfile:
    user_id: str
    interests: tuple[InterestView, ...]
    event_counts: Mapping[int, int]  # API EventType value -> count
    last_event_time: float | None
    negative_strength: float
