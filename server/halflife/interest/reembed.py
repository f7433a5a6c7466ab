"""A store's catalogue and event log, embedded again by another model into a new store.

A store holds one model's vectors (`Store.bind_vectors`): a server refuses to
serve it with another model, since its items and events would rank in a
mixture of two spaces. `halflife reembed` makes the new model's store from the
old one instead of starting empty: every item embedded from its text, every
event's text embedded again, an event on an item taking the item's new
vector; users, event ids, types, values and times as they were, in the order
they arrived. The old store is only read (`SqliteStore` migrates an older
schema when it opens one).

What the new model cannot make is left out or changed, and counted:
- an item whose vector was given with it (not embedded by the server from its
  text) has no vector in the new space: its caller gives one (`vectors`,
  `read_item_vectors`), or the copy is refused, naming them all. The old
  vector is never carried over: another model, of the same name and size
  too (other weights), puts texts elsewhere, and a model whose space is the
  same needs no copy (`serve` takes the store);
- an event keeps the vector its item had when it was recorded, which came
  from the item's text then; the copy uses the item's text now (the store
  keeps no older text);
- an event on an item deleted since (or on an id's earlier item, deleted and
  created anew) has no item to take a vector from: with text it is copied
  without the item (its text's vector alone), else left out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from halflife.interest.engine import InterestEngine
from halflife.interest.types import EventInput, ItemInput
from halflife.storage.base import ItemRecord, Store

ITEMS_PER_BATCH = 1_000
SEQS_PER_BATCH = 5_000  # events are read and recorded in batches of this many seqs (fewer where some were erased)


class GivenVectorsError(Exception):
    """The old store holds items whose vectors were given with them, and no
    new vector was given for these: the new model cannot make theirs."""

    def __init__(self, item_ids: list[str]):
        self.item_ids = item_ids
        shown = ", ".join(map(repr, item_ids[:3])) + (f" and {len(item_ids) - 3} more" if len(item_ids) > 3 else "")
        super().__init__(f"items carry vectors given with them, not embedded from their text ({len(item_ids)}: "
                         f"{shown}): no model but the one they came from can make theirs, so give the new model's "
                         "(reembed --item-vectors; a store from before schema 6 records no model for any item: "
                         "upsert the same texts through its server first, which records it)")


class ItemVectorsFileError(ValueError):
    """An --item-vectors file that cannot be read as the new model's vectors; says which line, and why."""


def read_item_vectors(path: Path, dimension: int) -> dict[str, np.ndarray]:
    """The vectors in the JSON-lines file at `path`, by item id: one object a
    line, {"id": "...", "vector": [numbers]} (blank lines skipped), each
    vector of `dimension` finite numbers, not all zero (as UpsertItems takes
    one), each id once. Raises ItemVectorsFileError naming the line, OSError."""
    vectors: dict[str, np.ndarray] = {}
    lines: dict[str, int] = {}
    with open(path, "rb") as file:  # decoded line by line: a bad byte is refused by its line, not a traceback
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue

            def refuse(why: str) -> ItemVectorsFileError:
                return ItemVectorsFileError(f"{path}, line {number}: {why}")

            try:
                row = json.loads(line)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise refuse(f"not UTF-8 JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("vector"), list):
                raise refuse('not an object {"id": "...", "vector": [numbers]}')
            item_id, values = row["id"], row["vector"]
            if item_id in lines:
                raise refuse(f"item {item_id!r} again (first on line {lines[item_id]})")
            if len(values) != dimension:
                raise refuse(f"item {item_id!r} has {len(values)} values; the model's dimension is {dimension}")
            # Checked as stored, in float32: 1e39 passed as a float and was stored as inf (NaN once
            # normalised), 1e-46 as 0; an integer past any float was a traceback.
            vector = None
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                with np.errstate(over="ignore"), contextlib.suppress(OverflowError):
                    vector = np.array(values, dtype=np.float64).astype(np.float32)
            if vector is None or not np.isfinite(vector).all():
                raise refuse(f"item {item_id!r}: its vector holds a value that is not a finite number (as float32)")
            if not vector.any():
                raise refuse(f"item {item_id!r}: its vector is all zeros, which has no direction")
            vectors[item_id], lines[item_id] = vector, number
    return vectors


class SourceChangedError(Exception):
    """Items or users of the old store changed while it was copied: the copy
    would bring back what was deleted or erased meanwhile."""

    def __init__(self, items: int, erasures: int):
        # A server started on the old store meanwhile may have pruned the feed: its entries gone, its version moved.
        what = f"{items} items upserted or deleted, {erasures} users erased" if items or erasures else "items or users"
        super().__init__(f"the old store changed while it was copied ({what}): the copy would bring back what was "
                         "deleted or erased, so it is not kept; stop what writes to the old store and run reembed "
                         "again")


@dataclasses.dataclass(frozen=True)
class Reembedded:
    """What a copy did: items and events copied, events copied without their
    deleted item (text only) and left out (neither item nor text), the
    last event seq of the old store it read, the events recorded in it
    after that, not copied, and the vectors given for items it did not hold."""

    items: int
    events: int
    without_item: int
    left_out: int
    through_seq: int
    recorded_since: int = 0
    vectors_unused: int = 0


def reembed(source: Store, target: InterestEngine,
            steps: Callable[[range, str], Iterable[int]] = lambda starts, what: starts,
            vectors: Mapping[str, np.ndarray] = {}) -> Reembedded:
    """Copies `source`'s catalogue and event log into `target` (an engine,
    with the new model, on an empty store; see the module's docstring).
    Events recorded in `source` after the copy starts are not copied (and
    counted); an item upserted or deleted, or a user erased, meanwhile
    raises SourceChangedError at the end (an erased user's events, read
    before, came back in the copy: a review). `steps` wraps the batches'
    starts, "items" (offsets) then "events" (seqs): a progress bar.
    `vectors`: the new model's, by item id, taken instead of embedding the
    item's text; each item whose vector was given with it needs one. Raises
    GivenVectorsError, and ValueError where `target` holds anything."""
    if target.store.event_count() or len(target.catalog):
        raise ValueError("the new store is not empty: give the copy a data directory of its own")
    head = source.head()
    # Ids and created seqs first, the vectors not kept (1M items' took ~1.5 GB): the check before any write.
    created_seq, given = {}, []
    for item in source.iter_items():
        created_seq[item.id] = item.created_seq
        if item.embedded_by is None and item.id not in vectors:
            given.append(item.id)
    if given:
        raise GivenVectorsError(given)
    items = (item for item in source.iter_items() if item.id in created_seq)  # those of the start (see head)
    copied_seq = {}  # what the events join to: an item deleted (or created anew) since the first read, as it is now
    for _ in steps(range(0, len(created_seq), ITEMS_PER_BATCH), "items"):
        batch = list(itertools.islice(items, ITEMS_PER_BATCH))
        target.upsert_items([_item_input(item, vectors.get(item.id)) for item in batch])
        copied_seq.update((item.id, item.created_seq) for item in batch)
    created_seq = copied_seq
    copied = without_item = left_out = 0
    for after in steps(range(0, head.event_seq, SEQS_PER_BATCH), "events"):
        events = []
        for event in source.events_between(after, min(after + SEQS_PER_BATCH, head.event_seq),
                                           vectors_of=lambda user_id: False):
            item_id = event.item_id
            # The item it was recorded on is gone: deleted, or this id's item is a later one.
            if item_id is not None and (item_id not in created_seq or event.seq <= created_seq[item_id]):
                if not event.text:
                    left_out += 1
                    continue
                item_id, without_item = None, without_item + 1
            events.append(EventInput(event.event_id, event.user_id, event.type, item_id, event.text, event.value,
                                     event.event_time))
        copied += target.record_events(events)[0] if events else 0
    now = source.head()
    if now.change_version != head.change_version:  # the feed may be pruned meanwhile; its versions only grow
        changes = source.changes_since(head.change_version)
        erasures = sum(change.item_id is None for change in changes)
        raise SourceChangedError(len(changes) - erasures, erasures)
    return Reembedded(len(created_seq), copied, without_item, left_out, head.event_seq,
                      now.event_seq - head.event_seq, len(vectors.keys() - created_seq.keys()))


def _item_input(item: ItemRecord, vector: np.ndarray | None) -> ItemInput:
    """The item as it was upserted, with the new model's `vector` given for
    it, or without one: embedded from its text anew."""
    return ItemInput(id=item.id, text=item.text, categories=item.categories, attributes=dict(item.attributes),
                     create_time=item.create_time, vector=vector)
