"""Requests too long to be surely small are scanned before they are parsed
(halflife.api.wire), so that a flood of list elements, parsed at ~50x its
size on the event loop, is refused unparsed; a valid request never is."""

from __future__ import annotations

import gc
import struct
import weakref

import grpc
import numpy as np
import pytest

from halflife.api import catalog, validation
from halflife.api.errors import (
    MalformedRequest, Received, invalid_argument, parse_leniently, refuse_malformed, translate_errors,
)
from halflife.api.server import API_SERVICES
from halflife.api.wire import (
    MAX_LIST_ELEMENTS,
    MAX_LIST_LENGTH,
    MAX_STEPS,
    SCAN_ABOVE_BYTES,
    RefusedUnparsed,
    check_request,
)
from halflife.embedding.batcher import QueueFullError
from halflife.v1 import catalog_pb2, interest_pb2, recommend_pb2
from tests.test_malformed_requests import call_raw, length_delimited


def _largest_upsert(text_bytes: int = 0) -> catalog_pb2.UpsertItemsRequest:
    """UpsertItems at every list limit at once: items, categories, attributes."""
    item = catalog_pb2.Item(text="t" * text_bytes, categories=[f"c{n}" for n in range(catalog.MAX_CATEGORIES)],
                            attributes={f"a{n}": "v" for n in range(catalog.MAX_ATTRIBUTES)}, vector=[0.5] * 384)
    request = catalog_pb2.UpsertItemsRequest()
    for n in range(validation.MAX_ITEMS_PER_REQUEST):
        request.items.add().CopyFrom(item)
        request.items[-1].id = f"i{n}"
    return request


def test_the_bounds_hold_the_largest_valid_requests():
    # docs/api.md: batches of at most 1000 (256 for Embed), items of 64 categories and 64 attributes.
    limits = (validation.MAX_ITEMS_PER_REQUEST, validation.MAX_EVENTS_PER_REQUEST, validation.MAX_INPUTS_PER_REQUEST)
    assert limits + (catalog.MAX_CATEGORIES, catalog.MAX_ATTRIBUTES) == (1000, 1000, 256, 64, 64)
    for limit in (validation.MAX_ITEMS_PER_REQUEST, validation.MAX_EVENTS_PER_REQUEST, validation.MAX_INPUTS_PER_REQUEST,
                  catalog.MAX_CATEGORIES, catalog.MAX_ATTRIBUTES):
        assert limit <= MAX_LIST_LENGTH
    assert validation.MAX_ITEMS_PER_REQUEST * (1 + catalog.MAX_CATEGORIES + catalog.MAX_ATTRIBUTES) <= MAX_LIST_ELEMENTS
    request = _largest_upsert()
    data = request.SerializeToString()
    assert len(data) > SCAN_ABOVE_BYTES  # scanned, not waved through for its size
    check_request(data, catalog_pb2.UpsertItemsRequest.DESCRIPTOR)
    assert parse_leniently(catalog_pb2.UpsertItemsRequest)(data).request == request
    events = interest_pb2.RecordEventsRequest(events=[
        interest_pb2.Event(event_id=f"e{n}", user_id="u", type=1, text="x" * 1024)
        for n in range(validation.MAX_EVENTS_PER_REQUEST)])
    check_request(events.SerializeToString(), interest_pb2.RecordEventsRequest.DESCRIPTOR)
    # The same items with their vectors unpacked, a tag a float, which parsers must accept.
    def unpacked_item(item: catalog_pb2.Item) -> bytes:
        without_vector = catalog_pb2.Item(id=item.id, text=item.text, categories=item.categories,
                                          attributes=item.attributes)
        return without_vector.SerializeToString() + b"".join(b"\x35" + struct.pack("<f", x) for x in item.vector)

    unpacked = b"".join(length_delimited(1, unpacked_item(item)) for item in request.items)
    assert catalog_pb2.UpsertItemsRequest.FromString(unpacked) == request
    check_request(unpacked, catalog_pb2.UpsertItemsRequest.DESCRIPTOR)
    recommend = recommend_pb2.RecommendRequest(user_id="u", filter=recommend_pb2.ItemFilter(
        include_categories=["c" * 100] * 1000, exclude_categories=["d" * 100] * 1000, exclude_item_ids=["i" * 200] * 1000))
    check_request(recommend.SerializeToString(), recommend_pb2.RecommendRequest.DESCRIPTOR)


def _padded(elements: bytes) -> bytes:
    """`elements` after an unknown field long enough to be scanned."""
    return length_delimited(1000, b"p" * SCAN_ABOVE_BYTES) + elements


@pytest.mark.parametrize("descriptor, elements", [
    # One list past its longest: refused after MAX_LIST_LENGTH steps.
    (interest_pb2.RecordEventsRequest.DESCRIPTOR, b"\x0a\x00" * (MAX_LIST_LENGTH + 1)),
    # Lists within that length, nested: refused on the total. Items of 400 empty categories.
    (catalog_pb2.UpsertItemsRequest.DESCRIPTOR,
     length_delimited(1, b"\x1a\x00" * 400) * (MAX_LIST_ELEMENTS // 400 + 1)),
    # Within a message that is not a list element: ItemFilter's lists.
    (recommend_pb2.RecommendRequest.DESCRIPTOR, length_delimited(4, b"\x0a\x00" * (MAX_LIST_LENGTH + 1))),
])
def test_a_flood_of_list_elements_is_refused_unparsed(descriptor, elements):
    with pytest.raises(RefusedUnparsed):
        check_request(_padded(elements), descriptor)


@pytest.mark.parametrize("descriptor, payload", [
    # An empty unknown group, then the flood: the scan stopped at the group (found by a review).
    (interest_pb2.RecordEventsRequest.DESCRIPTOR, b"\x7b\x7c" + b"\x0a\x00" * (4 << 20)),
    # Fields that are no list element, unknown varints and empty filters: each a step all the same.
    (interest_pb2.RecordEventsRequest.DESCRIPTOR, b"\x78\x00" * (MAX_STEPS + 1)),
    (recommend_pb2.RecommendRequest.DESCRIPTOR, b"\x22\x00" * (MAX_STEPS + 1)),
    # Long tags and varints: a step a byte (10-byte tags are malformed, 5-byte ones valid).
    (interest_pb2.RecordEventsRequest.DESCRIPTOR, (b"\xf8\xff\xff\xff\x0f" + b"\xff" * 9 + b"\x01") * (MAX_STEPS // 13)),
])
def test_groups_and_floods_of_other_fields_are_refused_unparsed(descriptor, payload):
    with pytest.raises(RefusedUnparsed):
        check_request(payload, descriptor)


def test_malformed_bytes_are_left_to_the_parser_at_once():
    """A varint that never ends grew a Python int a byte at a time: 512 KiB
    of 0xff took 12 s to scan (found by a review). The parser refuses them."""
    import time

    for payload in (b"\xff" * (1 << 20), b"\x0a\xff\xff\xff\xff\x0f" + b"x" * SCAN_ABOVE_BYTES, b"\x0f" * (1 << 20)):
        began = time.perf_counter()
        check_request(payload, interest_pb2.RecordEventsRequest.DESCRIPTOR)
        assert time.perf_counter() - began < 1.0
        assert isinstance(parse_leniently(interest_pb2.RecordEventsRequest)(payload).request, MalformedRequest)


def test_a_short_request_is_left_to_the_parser_and_the_validation():
    check_request(b"\x0a\x00" * (MAX_LIST_LENGTH + 1), interest_pb2.RecordEventsRequest.DESCRIPTOR)


def test_the_count_matches_the_parsed_lists():
    """Random requests above the scan size: refused exactly when a list, or
    the total, is past its bound in the parsed message."""
    rng = np.random.default_rng(0)
    outcomes = []
    for _ in range(40):
        request = catalog_pb2.UpsertItemsRequest()
        for n in range(int(rng.integers(1, 1100))):
            item = request.items.add(id=f"i{n}", text="t" * int(rng.integers(0, 600)))
            item.categories.extend(["c"] * int(rng.integers(0, 200)))
        data = request.SerializeToString()
        longest = max([len(request.items)] + [len(i.categories) for i in request.items])
        total = len(request.items) + sum(len(i.categories) for i in request.items)
        over = len(data) > SCAN_ABOVE_BYTES and (longest > MAX_LIST_LENGTH or total > MAX_LIST_ELEMENTS)
        try:
            check_request(data, catalog_pb2.UpsertItemsRequest.DESCRIPTOR)
            refused = False
        except RefusedUnparsed:
            refused = True
        assert refused == over, (len(data), longest, total)
        outcomes.append((refused, len(data) > SCAN_ABOVE_BYTES))
    assert {(True, True), (False, True), (False, False)} <= set(outcomes)  # refused, scanned and kept, not scanned


def test_a_flood_through_the_server_is_refused_unparsed_and_the_server_keeps_serving(channel):
    record = next(m for s, _ in API_SERVICES for m in s.methods if m.name == "RecordEvents")
    with pytest.raises(grpc.RpcError) as caught:
        call_raw(channel, record, b"\x0a\x00" * (4 << 20))  # 8 MiB of empty events: ~450 MB parsed
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "refused unparsed" in caught.value.details()
    received = parse_leniently(interest_pb2.RecordEventsRequest)(b"\x0a\x00" * (4 << 20))
    assert isinstance(received.request, MalformedRequest) and received.size == 8 << 20


class _Request:  # a plain object: a weak reference can tell when it is freed
    pass


class _Context:
    def __init__(self):
        self.status = None

    def time_remaining(self):
        return None

    async def abort_with_status(self, status):
        self.status = status
        raise grpc.aio.AbortError()

    def code(self):
        return None if self.status is None else self.status.code


@pytest.mark.parametrize("metrics", [False, True], ids=["", "with admission and metrics"])
@pytest.mark.parametrize("error", [lambda: invalid_argument([("f", "bad")]), lambda: QueueFullError("full")],
                         ids=["refused", "queue full"])
def test_a_refused_request_is_freed_at_once_not_by_the_garbage_collector(error, metrics):
    """The AbortError that answers a refused call ends up in a reference cycle
    within grpc: whatever its traceback holds stays until the garbage collector
    runs. It held the request: sent from inside the `except` block, it chained
    the error, whose traceback holds the handler's frame, and the wrappers'
    frames held it too (60 refused 240 KiB requests: +260 MB until a GC)."""
    from halflife.api.metrics import Metrics
    from halflife.api.server import api_calls

    class Servicer:
        @translate_errors
        async def Call(self, request, context):
            raise error()

    context = _Context()
    call = refuse_malformed(Servicer().Call, False, False)
    if metrics:  # as the server wraps each API method with --metrics-port
        call = Metrics().counted("Service/Call", api_calls(10).wrap(call))
    assert _freed_as_refused(call, context)
    assert context.status.code != grpc.StatusCode.OK


def _freed_as_refused(call, context: _Context, size: int = 1) -> bool:
    """Whether the request that `call` refuses (an AbortError out of an
    asyncio task, a cycle as within grpc) is freed without the garbage collector."""
    import asyncio

    request = _Request()
    freed = weakref.ref(request)
    gc.disable()
    try:
        with pytest.raises(grpc.aio.AbortError):
            asyncio.run(call(Received(request, size), context))
        del request
        return freed() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("bytes_in_hand", [False, True], ids=["calls in hand", "bytes in hand"])
def test_a_request_refused_by_admission_is_freed_at_once_not_by_the_garbage_collector(bytes_in_hand):
    """The same cycle holds what Admission's frame holds as it refuses a call:
    a request refused for the bytes in hand (serve --max-requests-mib), a big
    one, stayed until the garbage collector ran, the memory the bound is for."""
    from halflife.api.metrics import Metrics
    from halflife.api.server import api_calls

    async def never_runs(request, context):
        raise AssertionError("admitted")

    admission = api_calls(10, max_bytes=100) if bytes_in_hand else api_calls(1)
    admission.open, admission.open_bytes = 1, 60  # a call in hand
    call = Metrics().counted("Service/Call", admission.wrap(refuse_malformed(never_runs, False, False)))
    context = _Context()
    assert _freed_as_refused(call, context, size=60)
    assert context.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("MiB" if bytes_in_hand else "calls are being handled") in context.status.details
    assert (admission.open, admission.open_bytes) == (1, 60)


def test_a_damaged_store_is_data_loss_not_internal(monkeypatch, caplog):
    """Its files damaged or deleted under the server: INTERNAL and a traceback a call before (an audit); then
    an ERROR line a call, every write failing until a restart (100 lines for 100 writes, a review): one a minute."""
    import asyncio
    import logging

    from halflife.api import errors
    from halflife.storage.base import StoreDamagedError

    class Servicer:
        @translate_errors
        async def Call(self, request, context):
            raise StoreDamagedError("var/data/halflife.sqlite3 or its -wal was deleted")

    monkeypatch.setattr(errors._store_damaged, "_next", -float("inf"))  # as if none logged yet in this process
    with caplog.at_level(logging.DEBUG, logger=errors.log.name):
        for _ in range(3):
            context = _Context()
            with pytest.raises(grpc.aio.AbortError):
                asyncio.run(Servicer().Call(_Request(), context))
            assert context.status.code == grpc.StatusCode.DATA_LOSS
            assert context.status.details == "the store is damaged: var/data/halflife.sqlite3 or its -wal was deleted"
    assert [(record.levelname, record.getMessage().rpartition(".<locals>.")[2]) for record in caplog.records] == [
        ("ERROR", "Servicer.Call: store damaged: var/data/halflife.sqlite3 or its -wal was deleted")]
