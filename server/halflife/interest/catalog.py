"""The in-memory catalogue: one normalised float32 matrix that ranking scores in one product.

Rows are item slots: an update rewrites its row in place, a delete marks the
row dead (masked out of every ranking) and frees the id; a re-created id gets
a new row. Per-row statistics kept elsewhere (e.g. popularity) therefore never
leak from a deleted item to a new one. Dead rows still cost memory and every
scan's time, so the owner `compact`s the index now and then: the live rows
move down and are renumbered, and `epoch` tells rows numbered before it from
rows numbered after. Not thread-safe by itself: the interest engine
serialises access.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterable, Sequence

import numpy as np

from halflife.storage.base import ItemRecord


def _rows(row_of: dict[str, int], ids: Sequence[str | None]) -> np.ndarray:
    # map() over dict.get: the loop runs in C (10k ids: 1.0 ms, a generator 1.3)
    return np.fromiter(map(row_of.get, ids, itertools.repeat(-1)), dtype=np.int64, count=len(ids))


@dataclasses.dataclass(frozen=True)
class CatalogRows:
    """A catalogue's ids, rows and created seqs at one moment (`CatalogIndex.frozen_rows`)."""

    row_of: dict[str, int]
    created_seq: np.ndarray  # (size,) int64
    size: int

    def rows(self, ids: Sequence[str | None]) -> np.ndarray:
        """As `CatalogIndex.rows`, then."""
        return _rows(self.row_of, ids)


_SUM_CHUNK = 4096  # rows gathered at once for the running sums (6 MB at 384-d)
MASK_CACHE_BYTES = 64 << 20  # cached category masks, a byte a row: 64 categories at 1M items


def _grown(rows: int) -> int:
    """The capacity a full catalogue of `rows` rows grows to."""
    return max(1024, math.ceil(rows * 1.5))


class CatalogIndex:
    """Item vectors (rows, dim) with ids, texts, categories and create times."""

    def __init__(self, dim: int, capacity: int = 1024):
        self.dim = dim
        self._matrix = np.zeros((capacity, dim), dtype=np.float32)
        self._alive = np.zeros(capacity, dtype=bool)
        self._create_times = np.full(capacity, np.nan)
        self._created_seq = np.zeros(capacity, dtype=np.int64)
        self._rewritten = np.zeros(capacity, dtype=np.int64)  # the version that last changed a live row's vector or time
        self._spare: tuple[np.ndarray, ...] | None = None  # arrays allocated ahead of a growth (`reserve`)
        self.size = 0  # rows in use (alive or dead)
        self.ids: list[str | None] = []
        self.texts: list[str] = []
        self.categories: list[tuple[str, ...]] = []
        self.row_of: dict[str, int] = {}
        self._category_rows: dict[str, set[int]] = {}
        self._category_masks: dict[str, np.ndarray] = {}  # cache, invalidated on change; least recently used first
        # Running float64 sums of the live rows' vectors, overall and per
        # category, so that means cost O(dim) however large the catalogue.
        self._live_sum = np.zeros(dim)
        self._category_sums: dict[str, np.ndarray] = {}
        self._changed_categories: set[str] = set()  # live ones, since take_changed_categories()
        self.categories_version = 0  # bumped as a category comes (its first live item) or goes (its last)
        self.version = 0  # bumped on every change (callers cache derived data by it)
        self.epoch = 0  # bumped by compact(): a row number read before it means nothing after

    # Views over the rows in use; valid until the next mutation.
    @property
    def vectors(self) -> np.ndarray:
        """(size, dim) float32, unit rows (dead rows keep stale values: mask them)."""
        return self._matrix[: self.size]

    @property
    def alive(self) -> np.ndarray:
        """(size,) bool."""
        return self._alive[: self.size]

    @property
    def created_seq(self) -> np.ndarray:
        """(size,) int64: ItemRecord.created_seq of each row's item (events at
        or below it concern an earlier item with the same id)."""
        return self._created_seq[: self.size]

    @property
    def rewritten(self) -> np.ndarray:
        """(size,) int64: the `version` at which each row's vector or create
        time last changed in place (0: never since it was created). A reader
        that scored rows without the owner's lock compares it with the
        version it read them at."""
        return self._rewritten[: self.size]

    @property
    def create_times(self) -> np.ndarray:
        """(size,) float64 unix seconds, NaN when unknown."""
        return self._create_times[: self.size]

    def __len__(self) -> int:
        return len(self.row_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.row_of

    @property
    def dead_rows(self) -> int:
        """Rows of deleted items, until `compact`."""
        return self.size - len(self.row_of)

    def upsert(self, items: Iterable[ItemRecord]) -> tuple[int, int]:
        """Inserts or replaces items; returns (created, updated)."""
        created = updated = 0
        it = iter(items)
        while chunk := list(itertools.islice(it, _SUM_CHUNK)):  # a store's whole catalogue streams through
            c, u = self._upsert_chunk(chunk)
            created, updated = created + c, updated + u
        self.version += 1
        return created, updated

    def _upsert_chunk(self, items: list[ItemRecord]) -> tuple[int, int]:
        replaced = sorted({self.row_of[item.id] for item in items if item.id in self.row_of})
        self._add_to_sums(replaced, -1.0)  # their vectors as they were before this chunk
        touched = []
        created = updated = 0
        for item in items:
            row = self.row_of.get(item.id)
            if row is None:
                row = self._new_row()
                self.row_of[item.id] = row
                self.ids[row] = item.id
                self._created_seq[row] = item.created_seq
                created += 1
            else:
                self._forget_categories(row)
                updated += 1
                create_time = item.create_time if item.create_time is not None else np.nan
                if not (np.array_equal(self._matrix[row], item.vector)
                        and np.array_equal(self._create_times[row], create_time, equal_nan=True)):
                    self._rewritten[row] = self.version + 1
            touched.append(row)
            self._matrix[row] = item.vector
            self._alive[row] = True
            self._create_times[row] = item.create_time if item.create_time is not None else np.nan
            self.texts[row] = item.text
            # Once each, whatever the record: a repeat counted twice in its category's mean.
            self.categories[row] = tuple(dict.fromkeys(item.categories))
            for category in self.categories[row]:
                rows = self._category_rows.get(category)
                if rows is None:
                    rows = self._category_rows[category] = set()
                    self.categories_version += 1
                rows.add(row)
                self._category_masks.pop(category, None)
        self._add_to_sums(sorted(set(touched)), 1.0)
        return created, updated

    def delete(self, ids: Iterable[str]) -> list[str]:
        """Removes items; returns the ids that existed."""
        ids = list(dict.fromkeys(ids))
        self._add_to_sums([self.row_of[i] for i in ids if i in self.row_of], -1.0)
        deleted = []
        for item_id in ids:
            row = self.row_of.pop(item_id, None)
            if row is None:
                continue
            self._forget_categories(row)
            self._alive[row] = False
            self.ids[row] = None
            self.texts[row] = ""
            self.categories[row] = ()
            deleted.append(item_id)
        self.version += 1
        return deleted

    def compact(self) -> np.ndarray:
        """Drops the dead rows: the live ones become rows 0.. in their order,
        moved down in place, or copied into smaller arrays where they fill
        under a third of the capacity. In place, there is no second matrix
        (at 1M items 1.5 GB more at once, and its first-touched pages were
        most of the time), so views taken before see rows move: whoever
        holds row numbers across a compaction checks `epoch`, bumped here.
        Returns (old size,) int64: each old row's new row, -1 for a dead
        one, for whoever keeps per-row data."""
        live = np.flatnonzero(self.alive)
        new_row = np.full(self.size, -1, dtype=np.int64)
        new_row[live] = np.arange(live.size)
        self._spare = None  # sized for the rows before
        capacity = _grown(live.size)
        if 2 * capacity < self._matrix.shape[0]:
            self._reallocate(capacity, live)
        else:
            # Chunk by chunk, each live row to its place: every source lies at or after its
            # destination, and after every earlier chunk's.
            for start in range(0, live.size, _SUM_CHUNK):
                rows = live[start : start + _SUM_CHUNK]
                for array in (self._matrix, self._create_times, self._created_seq, self._rewritten):
                    array[start : start + rows.size] = array[rows]
            self._alive[: live.size] = True
            self._alive[live.size : self.size] = False
        self.size = live.size
        keep = live.tolist()
        self.ids = [self.ids[r] for r in keep]
        self.texts = [self.texts[r] for r in keep]
        self.categories = [self.categories[r] for r in keep]
        self.row_of = {item_id: row for row, item_id in enumerate(self.ids)}
        renumber = new_row.tolist()
        self._category_rows = {c: {renumber[r] for r in rows} for c, rows in self._category_rows.items()}
        self._category_masks = {}
        self.version += 1
        self.epoch += 1
        return new_row

    def rows(self, ids: Sequence[str | None]) -> np.ndarray:
        """Row of each id, -1 for unknown ids (None too). Returns (len(ids),) int64."""
        return _rows(self.row_of, ids)

    def frozen_rows(self) -> CatalogRows:
        """The ids' rows and created seqs as they are now, for a reader off
        the owner's lock (a copy: 1M ids take ~50 ms)."""
        return CatalogRows(dict(self.row_of), self.created_seq.copy(), self.size)

    def category_mask(self, categories: Iterable[str]) -> np.ndarray:
        """(size,) bool: rows having at least one of `categories`. Masks are
        cached only for categories that live items have, the least recently
        used first out past MASK_CACHE_BYTES: a filter may name any string,
        and caching them all grew by a catalogue's size per name (an audit:
        +8 MB a call of 1,000 fresh names at 20k items, never given back)."""
        mask = np.zeros(self.size, dtype=bool)
        masks = self._category_masks
        for category in categories:
            rows = self._category_rows.get(category)
            if not rows:
                continue
            cached = masks.pop(category, None)
            if cached is None or cached.shape[0] != self.size:  # new, or the catalogue grew since
                cached = np.zeros(self.size, dtype=bool)
                cached[np.fromiter(rows, dtype=np.int64, count=len(rows))] = True
            masks[category] = cached  # the most recently used last
            while len(masks) > 1 and len(masks) * self.size > MASK_CACHE_BYTES:
                masks.pop(next(iter(masks)))
            mask |= cached
        return mask

    @property
    def all_categories(self) -> list[str]:
        return sorted(self._category_rows)

    def take_changed_categories(self) -> set[str]:
        """The live categories whose members or their vectors changed since
        the last call (so whose means did), for one consumer: the interest
        engine's labels, which `categories_version` tells when categories
        came or went."""
        changed, self._changed_categories = self._changed_categories, set()
        return changed

    def mean(self, category: str | None = None) -> np.ndarray:
        """Mean vector of the live items, or of those in `category`: (dim,)
        float64, zeros when there are none. O(dim): kept as running sums."""
        if category is None:
            count, total = len(self.row_of), self._live_sum
        else:
            count, total = len(self._category_rows.get(category, ())), self._category_sums.get(category)
        return total / count if count else np.zeros(self.dim)

    def means(self, categories: Sequence[str]) -> np.ndarray:
        """`mean` of each of `categories` that live items have: (len(categories),
        dim) float32, a chunk at a time (at 192k categories, the float64
        means of all at once took 1.9 s, mostly faulting their 590 MB in)."""
        out = np.empty((len(categories), self.dim), dtype=np.float32)
        for start in range(0, len(categories), _SUM_CHUNK):
            chunk = categories[start : start + _SUM_CHUNK]
            counts = np.array([len(self._category_rows[c]) for c in chunk], dtype=np.float64)
            out[start : start + len(chunk)] = np.array([self._category_sums[c] for c in chunk]) / counts[:, None]
        return out

    def reserve(self, rows: int) -> None:
        """Allocates now the arrays a growth for `rows` new rows would: the
        growth then copies into them. Their first touch is most of a growth
        (at 448k rows 1.3-2.6 s of page faults, against 0.07 s to copy into
        touched pages; a scaling review), which the owner can thus pay
        without its lock, the copy under it. May run beside readers and a
        growth (the sizes it reads are a guess; a spare too small for the
        growth is dropped), but not beside another `reserve`."""
        needed = self.size + rows
        capacity = self._matrix.shape[0]
        spare = self._spare  # read once: a growth under the owner's lock may take it meanwhile
        if needed <= capacity or (spare is not None and spare[0].shape[0] >= needed):
            return
        arrays = []
        for old, empty in self._per_row_arrays():
            new = np.empty((max(_grown(capacity), needed), *old.shape[1:]), dtype=old.dtype)
            new.fill(empty)  # touched: its page faults happen here
            arrays.append(new)
        if self._matrix.shape[0] == capacity:  # else a growth ran meanwhile: sized for the arrays before, dropped
            self._spare = tuple(arrays)

    def _new_row(self) -> int:
        if self.size == self._matrix.shape[0]:
            self._grow(_grown(self.size))
        row = self.size
        self.size += 1
        self.ids.append(None)
        self.texts.append("")
        self.categories.append(())
        return row

    def _grow(self, capacity: int) -> None:
        spare, self._spare = self._spare, None
        if spare is not None and spare[0].shape[0] >= capacity:  # allocated and touched by `reserve`
            for old, new in zip((a for a, _ in self._per_row_arrays()), spare):
                new[: self.size] = old[: self.size]
            self._matrix, self._alive, self._create_times, self._created_seq, self._rewritten = spare
        else:
            self._reallocate(capacity)

    def _per_row_arrays(self) -> tuple[tuple[np.ndarray, object], ...]:
        """Each per-row array with what an empty row holds."""
        return ((self._matrix, 0.0), (self._alive, False), (self._create_times, np.nan), (self._created_seq, 0),
                (self._rewritten, 0))

    def _reallocate(self, capacity: int, rows: np.ndarray | None = None) -> None:
        """New per-row arrays of `capacity` rows that begin with the old rows in
        use, or with those of `rows` ((n,) in their new order); the rest empty."""
        arrays, n = [], self.size if rows is None else rows.size
        for old, empty in self._per_row_arrays():
            new = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)  # calloc: untouched pages cost nothing
            if rows is None:
                new[:n] = old[:n]
            else:  # gathered straight into place: a temporary copy of the live rows doubled the page faults
                np.take(old, rows, axis=0, out=new[:n])
            if empty:
                new[n:] = empty
            arrays.append(new)
        self._matrix, self._alive, self._create_times, self._created_seq, self._rewritten = arrays

    def _forget_categories(self, row: int) -> None:
        """Takes `row` out of its categories; one that no row has left goes
        whole, its running sum and its name too (its rows' vectors are taken
        out of it first): kept, every name an item ever had held ~3.5 KB at
        384-d until a compaction, which a catalogue that re-tags its items
        without deleting any never makes, and its name until the next
        GetProfile (10,000 re-tags of 100 items: +34 MiB, now +0.3)."""
        for category in self.categories[row]:
            rows = self._category_rows[category]
            rows.discard(row)
            self._category_masks.pop(category, None)
            if not rows:
                del self._category_rows[category]
                self._category_sums.pop(category, None)  # none yet where the row came in this chunk
                self._changed_categories.discard(category)
                self.categories_version += 1

    def _add_to_sums(self, rows: Sequence[int], sign: float) -> None:
        """Adds (sign 1) or takes out (-1) distinct live rows' current vectors
        to or from the running sums, overall and per category: per chunk of
        rows, one float32 gather, then one float64 reduction per category."""
        for start in range(0, len(rows), _SUM_CHUNK):
            chunk = rows[start : start + _SUM_CHUNK]
            vectors = self._matrix[chunk]
            self._live_sum += sign * np.add.reduce(vectors, axis=0, dtype=np.float64)
            members: dict[str, list[int]] = {}
            for k, row in enumerate(chunk):
                for category in self.categories[row]:
                    members.setdefault(category, []).append(k)
            self._changed_categories.update(members)
            for category, ks in members.items():
                part = sign * np.add.reduce(vectors[ks], axis=0, dtype=np.float64)
                if category in self._category_sums:
                    self._category_sums[category] += part
                else:
                    self._category_sums[category] = part
