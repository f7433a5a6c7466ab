"""Requests counted before they are parsed.

Parsing is the one step that runs before any validation, on the event loop,
and an element of a list of strings or messages costs ~100 bytes of memory
parsed for 2 bytes on the wire (an empty `events {}`): an 8 MiB request of
empty events took 450 MB and a 32 MiB one blocked every other call for 10 s,
only to be refused for holding more than 1,000 events. So requests too long
to be surely small are first scanned, a field at a time, and refused
unparsed past the limits below, or when they hold a group (proto2's; no
valid request has one, and the parser keeps an unknown one).
"""

from __future__ import annotations

import functools

from google.protobuf.descriptor import Descriptor, FieldDescriptor

# Elements of repeated string, bytes and message fields (map entries
# included) in one request, at every depth. The largest valid request holds
# 129,000: 1,000 items of 64 categories and 64 attributes each (tested).
MAX_LIST_ELEMENTS = 1 << 17
# Elements of one list: no list of the API takes over 1,000 (tested). A flood
# of one list is refused after this many steps (~1 ms), not MAX_LIST_ELEMENTS.
MAX_LIST_LENGTH = 1024
# Steps of the scan in all, each ~1 us of Python: one a field, plus one for
# each byte of a tag or varint past its first. An unpacked list of floats (a
# vector sent element by element, which parsers must accept) is one step: its
# run of equal tags is skipped in C. The largest valid request takes ~132k
# (1,000 items of ~131 fields), and a flood of any kind is refused within ~0.3 s.
MAX_STEPS = 1 << 18
# A request shorter than this cannot hold more list elements: one takes 2 bytes at least.
SCAN_ABOVE_BYTES = 2 * MAX_LIST_ELEMENTS

_LENGTH_DELIMITED = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)
_MAX_VARINT_BYTES = 10  # 64 bits
_MAX_TAG_BYTES = 5  # field numbers stop at 2^29 - 1


class RefusedUnparsed(Exception):
    """A request refused before it is parsed; the message says why."""


class _Malformed(Exception):
    """Bytes that are not wire format: the parser refuses them, and says how."""


def check_request(data: bytes, descriptor: Descriptor) -> None:
    """Raises RefusedUnparsed when `data`, a serialized `descriptor` message
    longer than SCAN_ABOVE_BYTES, holds a list longer than MAX_LIST_LENGTH,
    more than MAX_LIST_ELEMENTS list elements in all, takes more than
    MAX_STEPS to scan, or holds a group. Bytes that are not wire format are
    left to the parser. Scans the top-level fields and those of the nested
    messages that hold lists."""
    if len(data) > SCAN_ABOVE_BYTES:
        try:
            _Scan().message(memoryview(data), descriptor)
        except _Malformed:
            pass


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 7 * _MAX_VARINT_BYTES, 7):
        if pos >= len(data):
            raise _Malformed
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
    raise _Malformed  # a varint of over 10 bytes


class _Scan:
    """One request's scan: what is left of its budgets."""

    def __init__(self) -> None:
        self.steps = MAX_STEPS
        self.elements = MAX_LIST_ELEMENTS

    def _charge(self, steps: int) -> None:
        self.steps -= steps
        if self.steps < 0:
            raise RefusedUnparsed(f"it takes over {MAX_STEPS:,} steps to scan (fields, and their tag and varint "
                                  "bytes past the first), more than any valid request")

    def message(self, data: memoryview, descriptor: Descriptor) -> None:
        self._charge(1)  # a nested message's scan costs a call more than a field
        pos, end = 0, len(data)
        lengths: dict[int, int] = {}  # field number -> list elements so far
        while pos < end:
            start = pos
            tag, pos = _varint(data, pos)
            if pos - start > _MAX_TAG_BYTES:
                raise _Malformed
            self._charge(pos - start)
            wire_type = tag & 7
            if wire_type == 0:
                value_start = pos
                _, pos = _varint(data, pos)
                self._charge(pos - value_start - 1)
            elif wire_type in (1, 5):
                width = 8 if wire_type == 1 else 4
                field = descriptor.fields_by_number.get(tag >> 3)
                pos = _after_run(data, start, pos - start, width) if field is not None and field.is_repeated \
                    else pos + width
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                if pos + length > end:
                    raise _Malformed
                field = descriptor.fields_by_number.get(tag >> 3)
                if field is not None:
                    if field.is_repeated and field.type in _LENGTH_DELIMITED:
                        lengths[field.number] = count = lengths.get(field.number, 0) + 1
                        self.elements -= 1
                        if count > MAX_LIST_LENGTH:
                            raise RefusedUnparsed(f"its list {field.name} has over {MAX_LIST_LENGTH:,} elements, "
                                                  "more than any valid request (each list's limit: docs/api.md, "
                                                  "Limits)")
                        if self.elements < 0:
                            raise RefusedUnparsed(f"it holds over {MAX_LIST_ELEMENTS:,} list elements in all, "
                                                  "more than any valid request")
                    if field.type == FieldDescriptor.TYPE_MESSAGE and _holds_lists(field.message_type):
                        self.message(data[pos : pos + length], field.message_type)
                pos += length
            elif wire_type in (3, 4):
                raise RefusedUnparsed("it holds a group, which no valid request has")
            else:
                raise _Malformed  # wire types 6 and 7 do not exist


def _after_run(data: memoryview, start: int, tag_bytes: int, width: int) -> int:
    """Where a run of fixed-width elements of one unpacked list ends: the
    element at `start` (a tag of `tag_bytes`, then `width` bytes) and those
    after it with the same tag. Every tag byte of a stretch of the run is
    compared at once in C, stretches doubling from 16 elements, so that the
    cost follows the run's length, however short the runs."""
    stride = tag_bytes + width
    tag = bytes(data[start : start + tag_bytes])
    pos, stretch = start, 16
    while True:
        whole = min(stretch, (len(data) - pos) // stride)  # complete elements to look at
        if whole == 0:
            if pos == start:
                raise _Malformed  # not even the first one
            return pos
        span = data[pos : pos + whole * stride]
        run = whole
        for j in range(tag_bytes):
            column = bytes(span[j::stride])  # byte j of every element's tag
            run = min(run, len(column) - len(column.lstrip(tag[j : j + 1])))
        pos += run * stride
        if run < whole:
            return pos
        stretch *= 2


@functools.cache
def _holds_lists(descriptor: Descriptor) -> bool:
    """Whether a message of this type may hold list elements, at any depth."""
    seen, types = set(), [descriptor]
    while types:
        message_type = types.pop()
        if message_type in seen:
            continue
        seen.add(message_type)
        for field in message_type.fields:
            if field.is_repeated and field.type in _LENGTH_DELIMITED:
                return True
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                types.append(field.message_type)
    return False
