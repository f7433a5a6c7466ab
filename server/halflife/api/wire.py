"""How many list elements a request's bytes hold, counted before they are parsed.

Parsing is the one step that runs before any validation, on the event loop,
and an element of a list of strings or messages costs ~100 bytes of memory
parsed for 2 bytes on the wire (an empty `events {}`): an 8 MiB request of
empty events took 450 MB and a 32 MiB one blocked every other call for 10 s,
only to be refused for holding more than 1,000 events. So requests too long
to be surely small are first scanned, and refused past `MAX_LIST_ELEMENTS`.
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
# A request shorter than this cannot hold more: an element takes 2 bytes at least.
SCAN_ABOVE_BYTES = 2 * MAX_LIST_ELEMENTS

_LENGTH_DELIMITED = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)


class TooManyElements(Exception):
    """The bytes hold a list longer than MAX_LIST_LENGTH, or more than
    MAX_LIST_ELEMENTS list elements in all."""


def check_list_elements(data: bytes, descriptor: Descriptor) -> None:
    """Raises TooManyElements when `data`, a serialized `descriptor` message
    longer than SCAN_ABOVE_BYTES, holds a list longer than MAX_LIST_LENGTH
    or more than MAX_LIST_ELEMENTS list elements in all. Bytes that are not
    valid wire format are left to the parser to refuse. Cost: a step per
    top-level field and per field of the nested messages that hold lists."""
    if len(data) > SCAN_ABOVE_BYTES:
        _count(memoryview(data), descriptor, MAX_LIST_ELEMENTS)


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError past the end: malformed
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _count(data: memoryview, descriptor: Descriptor, budget: int) -> int:
    """Counts list elements into `budget`; returns what is left of it."""
    pos, end = 0, len(data)
    lengths: dict[int, int] = {}  # field number -> elements so far
    try:
        while pos < end:
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
                field = descriptor.fields_by_number.get(tag >> 3)
                if field is not None:
                    if field.is_repeated and field.type in _LENGTH_DELIMITED:
                        budget -= 1
                        lengths[field.number] = length_so_far = lengths.get(field.number, 0) + 1
                        if budget < 0 or length_so_far > MAX_LIST_LENGTH:
                            raise TooManyElements
                    if field.type == FieldDescriptor.TYPE_MESSAGE and _holds_lists(field.message_type):
                        budget = _count(data[pos : pos + length], field.message_type, budget)
                pos += length
            else:
                return budget  # groups are not proto3: the parser refuses them
    except IndexError:
        pass  # truncated: the parser refuses it
    return budget


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
