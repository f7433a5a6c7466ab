"""CatalogService: validates items and hands them to the interest engine."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from halflife.api.backend import Backend
from halflife.api.calls import run_with_deadline
from halflife.api.errors import not_found, translate_errors
from halflife.api.paging import page_size, page_token, token_position
from halflife.api.validation import MAX_ITEMS_PER_REQUEST, UNREADABLE, Violations, to_timestamp
from halflife.interest.types import ItemInput
from halflife.storage.base import ItemRecord
from halflife.texts import MAX_CATEGORIES, blank
from halflife.v1 import catalog_pb2, catalog_pb2_grpc

MAX_ATTRIBUTES = 64
# Keys and values together, so that 1,000 items of the largest kind still fit
# one GetItems response (64 MiB by default).
MAX_ATTRIBUTE_BYTES = 16 * 1024


def _item_input(item: catalog_pb2.Item, field: str, dim: int, violations: Violations) -> ItemInput | None:
    before = len(violations.items)
    violations.identifier(item.id, f"{field}.id")
    violations.text(item.text, f"{field}.text")
    vector = None
    if item.vector:
        vector = np.asarray(item.vector, dtype=np.float32)
        if vector.shape[0] != dim:
            violations.add(f"{field}.vector", f"has {vector.shape[0]} values; the model's dimension is {dim}")
        elif not np.isfinite(vector).all():
            violations.add(f"{field}.vector", "holds NaN or infinite values")
        elif not np.any(vector):
            violations.add(f"{field}.vector", "is all zeros: it has no direction")
    elif not item.text:
        violations.add(f"{field}.text", "is required when no vector is given")
    elif blank(item.text):
        violations.add(f"{field}.text", f"{UNREADABLE}; give a text the model reads, or a vector")
    if len(item.categories) > MAX_CATEGORIES:
        violations.add(f"{field}.categories", f"holds {len(item.categories)} categories; at most {MAX_CATEGORIES}")
    for j, category in enumerate(item.categories):
        violations.category(category, f"{field}.categories[{j}]")
    if len(item.attributes) > MAX_ATTRIBUTES:
        violations.add(f"{field}.attributes", f"holds {len(item.attributes)} entries; at most {MAX_ATTRIBUTES}")
    elif (size := sum(len(k.encode()) + len(v.encode()) for k, v in item.attributes.items())) > MAX_ATTRIBUTE_BYTES:
        violations.add(f"{field}.attributes", f"hold {size} bytes of keys and values; at most {MAX_ATTRIBUTE_BYTES}")
    create_time = violations.timestamp(item, "create_time", f"{field}.create_time", None)
    if len(violations.items) > before:
        return None
    return ItemInput(
        id=item.id,
        text=item.text,
        categories=tuple(item.categories),
        attributes=dict(item.attributes),
        create_time=create_time,
        vector=vector,
    )


def _check_ids(ids, violations: Violations) -> None:
    if violations.count(ids, "ids", MAX_ITEMS_PER_REQUEST):
        for i, item_id in enumerate(ids):
            violations.stored_item(item_id, f"ids[{i}]")
    violations.raise_if_any()


def _item_message(record: ItemRecord, include_vector: bool) -> catalog_pb2.Item:
    item = catalog_pb2.Item(id=record.id, text=record.text, categories=record.categories,
                            attributes=dict(record.attributes))
    if record.create_time is not None:
        item.create_time.CopyFrom(to_timestamp(record.create_time))
    if include_vector:
        item.vector.extend(record.vector.tolist())
    return item


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @translate_errors
    async def UpsertItems(self, request: catalog_pb2.UpsertItemsRequest, context: grpc.aio.ServicerContext):
        interest = self._backend.ready().interest
        violations = Violations()
        items = []
        if violations.count(request.items, "items", MAX_ITEMS_PER_REQUEST):
            seen: dict[str, int] = {}
            for i, item in enumerate(request.items):
                if item.id in seen:
                    violations.add(f"items[{i}].id", f"repeats items[{seen[item.id]}].id {item.id!r}")
                seen.setdefault(item.id, i)
                items.append(_item_input(item, f"items[{i}]", interest.dim, violations))
        violations.raise_if_any()
        threads = self._backend.write_threads(embeds=any(item.vector is None for item in items))
        created, updated = await run_with_deadline(context, interest.upsert_items, items, threads=threads)
        return catalog_pb2.UpsertItemsResponse(created_count=created, updated_count=updated)

    @translate_errors
    async def DeleteItems(self, request: catalog_pb2.DeleteItemsRequest, context: grpc.aio.ServicerContext):
        interest = self._backend.ready().interest
        violations = Violations()
        _check_ids(request.ids, violations)
        deleted = await run_with_deadline(context, interest.delete_items, list(request.ids))
        return catalog_pb2.DeleteItemsResponse(deleted_count=deleted)

    @translate_errors
    async def GetItems(self, request: catalog_pb2.GetItemsRequest, context: grpc.aio.ServicerContext):
        interest = self._backend.ready().interest
        violations = Violations()
        _check_ids(request.ids, violations)
        found = await asyncio.to_thread(interest.get_items, list(request.ids))
        missing = [(f"ids[{i}]", f"no item {item_id!r}") for i, item_id in enumerate(request.ids) if item_id not in found]
        if missing:
            raise not_found(f"{len(missing)} of the items do not exist", missing)
        items = [_item_message(found[item_id], request.include_vectors) for item_id in request.ids]
        return catalog_pb2.GetItemsResponse(items=items)

    @translate_errors
    async def ListItems(self, request: catalog_pb2.ListItemsRequest, context: grpc.aio.ServicerContext):
        interest = self._backend.ready().interest
        violations = Violations()
        size = page_size(request.page_size, violations)
        after = token_position(request.page_token, violations, "ListItems")
        violations.raise_if_any()
        records, last_id = await asyncio.to_thread(interest.list_items, after, size)
        return catalog_pb2.ListItemsResponse(
            items=[_item_message(record, request.include_vectors) for record in records],
            next_page_token="" if last_id is None else page_token("ListItems", last_id),
        )
