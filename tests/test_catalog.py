"""The in-memory catalogue index."""

from __future__ import annotations

import numpy as np

from halflife.core.ranking import normalize
from halflife.interest import catalog as catalog_module
from halflife.interest.catalog import CatalogIndex
from halflife.storage.base import ItemRecord

DIM = 16
CATEGORIES = ("a", "b", "c", "d")


def test_running_means_match_means_from_scratch_after_upserts_updates_and_deletes():
    rng = np.random.default_rng(0)
    catalog = CatalogIndex(DIM, capacity=8)  # grows on the way
    for step in range(300):
        item_id = f"i{rng.integers(60)}"
        if rng.random() < 0.25:
            catalog.delete([item_id])
        else:
            categories = tuple(rng.choice(CATEGORIES, size=rng.integers(0, 3), replace=False))
            catalog.upsert([ItemRecord(item_id, "", categories, {}, None, normalize(rng.standard_normal(DIM)))])
    live = np.flatnonzero(catalog.alive)
    assert 0 < live.size < catalog.size  # some rows were deleted, some live
    np.testing.assert_allclose(catalog.mean(), catalog.vectors[live].mean(axis=0), atol=1e-6)
    for category in CATEGORIES:
        rows = [r for r in live if category in catalog.categories[r]]
        expected = catalog.vectors[rows].mean(axis=0) if rows else np.zeros(DIM)
        np.testing.assert_allclose(catalog.mean(category), expected, atol=1e-6)
    names = catalog.all_categories
    np.testing.assert_allclose(catalog.means(names), [catalog.mean(c) for c in names], atol=1e-7)
    catalog.delete([catalog.ids[r] for r in live])
    np.testing.assert_allclose(catalog.mean(), np.zeros(DIM))
    assert catalog.all_categories == [] and not catalog.mean("a").any()


def test_running_means_hold_for_a_bulk_upsert_that_repeats_ids_across_chunks(monkeypatch):
    rng = np.random.default_rng(1)
    catalog = CatalogIndex(DIM)
    ids = [f"i{n % 3000}" for n in range(5000)]  # 2,000 ids come twice, the second time past the first chunk
    catalog.upsert(ItemRecord(i, "", (CATEGORIES[n % 4],), {}, None, normalize(rng.standard_normal(DIM)))
                   for n, i in enumerate(ids))
    assert len(catalog) == 3000 and catalog.size == 3000
    np.testing.assert_allclose(catalog.mean(), catalog.vectors.mean(axis=0), atol=1e-6)
    for category in CATEGORIES:
        rows = [r for r in range(catalog.size) if category in catalog.categories[r]]
        np.testing.assert_allclose(catalog.mean(category), catalog.vectors[rows].mean(axis=0), atol=1e-6)
    monkeypatch.setattr(catalog_module, "_SUM_CHUNK", 3)  # means across chunks, the last one short
    np.testing.assert_allclose(catalog.means(list(CATEGORIES)), [catalog.mean(c) for c in CATEGORIES], atol=1e-7)


def test_a_category_no_live_item_has_leaves_nothing_behind_without_a_compaction():
    """Found by a soak: an item re-tagged by upserts (no deletes, so no
    compaction) kept every tag it ever had, an empty member set and a
    running sum each."""
    catalog = CatalogIndex(DIM)
    vector = normalize(np.ones(DIM))
    catalog.upsert([ItemRecord("other", "", ("kept",), {}, None, vector)])
    for n in range(50):
        catalog.upsert([ItemRecord("a", "", (f"tag-{n}", "kept"), {}, None, vector)])
    catalog.upsert([ItemRecord("b", "", ("gone",), {}, None, vector)])
    catalog.delete(["b"])
    assert catalog.dead_rows == 1
    assert set(catalog._category_rows) == set(catalog._category_sums) == {"tag-49", "kept"}
    assert catalog.take_changed_categories() == {"tag-49", "kept"}  # names only for the labels' next refresh
    assert catalog.all_categories == ["kept", "tag-49"]
    np.testing.assert_allclose(catalog.mean("kept"), vector, atol=1e-7)
    np.testing.assert_allclose(catalog.mean("tag-49"), vector, atol=1e-7)
    assert not catalog.mean("tag-48").any()


def test_category_masks_stay_right_and_their_cache_holds_only_live_categories_within_its_budget(monkeypatch):
    from halflife.interest import catalog as catalog_module

    monkeypatch.setattr(catalog_module, "MASK_CACHE_BYTES", 3 * 200)  # 3 masks of the 200 rows below
    rng = np.random.default_rng(1)
    catalog = CatalogIndex(DIM)
    names = [f"c{n}" for n in range(12)]
    catalog.upsert([ItemRecord(f"i{n}", "", tuple(rng.choice(names, size=2, replace=False)), {}, None,
                               normalize(rng.standard_normal(DIM))) for n in range(200)])
    for step in range(300):
        asked = list(rng.choice(names + ["nobody-has-this", "nor-this"], size=int(rng.integers(1, 4))))
        if step % 50 == 49:  # a change on the way: masks of its categories go
            catalog.delete([f"i{rng.integers(200)}"])
        expected = np.array([alive and bool(set(asked) & set(cats))
                             for alive, cats in zip(catalog.alive, catalog.categories)])
        np.testing.assert_array_equal(catalog.category_mask(asked) & catalog.alive, expected)
        cached = catalog._category_masks
        assert len(cached) <= 3 and set(cached) <= set(names)  # no mask for a name no item has
    # The most recently used stay.
    catalog.category_mask(["c1"])
    catalog.category_mask(["c2"])
    catalog.category_mask(["c1"])
    catalog.category_mask(["c3"])
    assert list(catalog._category_masks)[-3:] == ["c2", "c1", "c3"]


def test_a_mask_left_a_row_short_by_a_new_item_is_built_again_even_first_in_line(monkeypatch):
    """Found by a review: the stale mask, rebuilt where it sat (first in
    line), was evicted by the budget and then looked up: KeyError, INTERNAL."""
    from halflife.interest import catalog as catalog_module

    monkeypatch.setattr(catalog_module, "MASK_CACHE_BYTES", 3 * 4)
    catalog = CatalogIndex(DIM)
    catalog.upsert([ItemRecord(f"i{n}", "", (f"c{n}",), {}, None, normalize(np.ones(DIM))) for n in range(4)])
    for name in ("c0", "c1", "c2"):
        catalog.category_mask([name])
    catalog.upsert([ItemRecord("i4", "", ("c3",), {}, None, normalize(np.ones(DIM)))])  # 5 rows: every mask stale
    assert catalog.category_mask(["c0"]).tolist() == [True, False, False, False, False]
    assert list(catalog._category_masks) == ["c1", "c2", "c0"][-len(catalog._category_masks):]


def test_compact_drops_the_dead_rows_and_renumbers_the_live_ones_in_their_order():
    rng = np.random.default_rng(2)
    catalog = CatalogIndex(DIM, capacity=8)
    for n in range(200):
        categories = tuple(rng.choice(CATEGORIES, size=rng.integers(0, 3), replace=False))
        vector = normalize(rng.standard_normal(DIM))
        catalog.upsert([ItemRecord(f"i{n}", f"text {n}", categories, {}, float(n), vector)])
    catalog.delete([f"i{n}" for n in range(0, 200, 3)])
    catalog.category_mask(["a", "b"])  # cached masks must not outlive the numbering
    before = {name: catalog.mean(name) for name in (None, *CATEGORIES)}
    old_ids, old_vectors = list(catalog.ids), catalog.vectors.copy()
    live = [r for r in range(catalog.size) if catalog.alive[r]]
    epoch, version = catalog.epoch, catalog.version

    new_row = catalog.compact()

    assert new_row.tolist() == [live.index(r) if r in live else -1 for r in range(len(old_ids))]
    assert catalog.epoch == epoch + 1 and catalog.version > version
    assert catalog.size == len(catalog) == len(live) and catalog.dead_rows == 0 and catalog.alive.all()
    assert catalog.ids == [old_ids[r] for r in live]
    assert all(catalog.row_of[item_id] == row for row, item_id in enumerate(catalog.ids))
    np.testing.assert_array_equal(catalog.vectors, old_vectors[live])
    np.testing.assert_array_equal(catalog.create_times, [float(old_ids[r][1:]) for r in live])
    assert catalog.texts == [f"text {old_ids[r][1:]}" for r in live]
    for name in CATEGORIES:
        mask = catalog.category_mask([name])
        assert mask.tolist() == [name in catalog.categories[r] for r in range(catalog.size)]
    for name, mean in before.items():
        np.testing.assert_allclose(catalog.mean(name), mean, atol=1e-6)
    catalog.upsert([ItemRecord("new", "", ("a",), {}, None, normalize(rng.standard_normal(DIM)))])
    catalog.delete([catalog.ids[0]])
    assert catalog.row_of["new"] == len(live) and catalog.dead_rows == 1
    assert catalog.category_mask(["a"]).tolist() == ["a" in catalog.categories[r] and catalog.alive[r]
                                                     for r in range(catalog.size)]


def test_compact_moves_rows_in_place_and_gives_back_the_arrays_of_a_catalogue_that_shrank():
    rng = np.random.default_rng(3)
    catalog = CatalogIndex(DIM)
    catalog.upsert(ItemRecord(f"i{n}", "", ("a",) if n % 2 else (), {}, None, normalize(rng.standard_normal(DIM)))
                   for n in range(6000))
    matrix = catalog._matrix
    catalog.delete([f"i{n}" for n in range(0, 6000, 4)])
    catalog.compact()  # 4,500 live of 6,000: moved down within the same arrays
    assert catalog._matrix is matrix and catalog.size == 4500
    catalog.delete([f"i{n}" for n in range(6000) if n % 4 and n > 300])
    kept = {i: catalog.vectors[catalog.row_of[i]].copy() for i in catalog.row_of}
    catalog.compact()  # 225 live: into arrays of their own size
    assert catalog._matrix.shape[0] == 1024 and catalog.size == len(kept) == 225
    assert all(np.array_equal(catalog.vectors[catalog.row_of[i]], v) for i, v in kept.items())
    assert catalog.category_mask(["a"]).sum() == sum(1 for i in kept if int(i[1:]) % 2)
    assert np.isnan(catalog._create_times[catalog.size:]).all() and not catalog._alive[catalog.size:].any()


def test_a_growth_copies_into_the_arrays_reserve_allocated_and_holds_what_it_would_have(monkeypatch):
    """A growth's allocation and page faults happen in `reserve`, which the
    engine calls without its lock; the growth under it only copies."""
    rng = np.random.default_rng(1)

    def records(start: int, n: int) -> list[ItemRecord]:
        return [ItemRecord(f"i{k}", f"text {k}", (CATEGORIES[k % 4],), {}, float(k) if k % 3 else None,
                           normalize(rng.standard_normal(DIM)), created_seq=k) for k in range(start, start + n)]

    first, second = records(0, 1000), records(1000, 100)  # 1,100 rows: past the first capacity, 1,024
    plain, reserved = CatalogIndex(DIM), CatalogIndex(DIM)
    for catalog in (plain, reserved):
        catalog.upsert(first)
    reserved.reserve(len(second))
    spare_matrix = reserved._spare[0]
    allocations = []
    reallocate = CatalogIndex._reallocate
    monkeypatch.setattr(CatalogIndex, "_reallocate", lambda self, *a: allocations.append(a) or reallocate(self, *a))
    reserved.upsert(second)
    assert allocations == [] and reserved._matrix is spare_matrix and reserved._spare is None
    plain.upsert(second)
    assert len(allocations) == 1  # without: allocated in the growth
    for name in ("vectors", "alive", "created_seq", "rewritten"):
        np.testing.assert_array_equal(getattr(reserved, name), getattr(plain, name))
    np.testing.assert_array_equal(reserved.create_times, plain.create_times)  # NaN where unknown, in both
    assert not reserved._alive[reserved.size:].any() and np.isnan(reserved._create_times[reserved.size:]).all()
    reserved.reserve(0)
    assert reserved._spare is None  # room enough: nothing allocated
