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
# Fields scanned in all, each a step in Python (~1 us): the largest valid
# request has ~132k (1,000 items of ~131 fields), and a flood of fields of any
# kind is refused within ~0.3 s of the event loop.
MAX_FIELDS = 1 << 18
# A request shorter than this cannot hold more list elements: one takes 2 bytes at least.
SCAN_ABOVE_BYTES = 2 * MAX_LIST_ELEMENTS

_LENGTH_DELIMITED = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)
_MAX_VARINT_BYTES = 10  # 64 bits


class RefusedUnparsed(Exception):
    """A request refused before it is parsed; the message says why."""


class _Malformed(Exception):
    """Bytes that are not wire format: the parser refuses them, and says how."""


def check_request(data: bytes, descriptor: Descriptor) -> None:
    """Raises RefusedUnparsed when `data`, a serialized `descriptor` message
    longer than SCAN_ABOVE_BYTES, holds a list longer than MAX_LIST_LENGTH,
    more than MAX_LIST_ELEMENTS list elements or MAX_FIELDS fields in all, or
    a group. Bytes that are not wire format are left to the parser. Scans the
    top-level fields and those of the nested messages that hold lists."""
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
        self.fields = MAX_FIELDS
        self.elements = MAX_LIST_ELEMENTS

    def message(self, data: memoryview, descriptor: Descriptor) -> None:
        pos, end = 0, len(data)
        lengths: dict[int, int] = {}  # field number -> list elements so far
        while pos < end:
            self.fields -= 1
            if self.fields < 0:
                raise RefusedUnparsed(f"it holds over {MAX_FIELDS:,} fields, more than any valid request")
            tag, pos = _varint(data, pos)
            wire_type = tag & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
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
                                                  "more than any valid request")
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
