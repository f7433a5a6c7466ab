"""What counts as text, and as a name (an id or category): one rule for the
API's validation and the dataset loader."""

from __future__ import annotations

import functools
import re
import sys
import unicodedata

import numpy as np

MAX_ID_BYTES = 256
MAX_CATEGORY_BYTES = 128
MAX_CATEGORIES = 64  # per item
MAX_TEXT_BYTES = 32 * 1024  # an item's or event's text, a query, an Embed input
# Ids and categories are names, never text: a control character in one is a
# client's bug, and NUL would be cut off by SQLite's JSON functions (3.40),
# which the store looks ids up with, so "a\0b" would name item "a".
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")
_CONTROL_CHARACTER_BUT_NUL = re.compile("[\x01-\x1f\x7f]")


def name_problem(value: str, max_bytes: int = MAX_ID_BYTES) -> str | None:
    """What makes `value` no valid id or category, said as a violation
    ("must not be empty", ...), or None when it is one."""
    if not value:
        return "must not be empty"
    if len(value.encode()) > max_bytes:
        return f"is {len(value.encode())} bytes long; at most {max_bytes}"
    if _CONTROL_CHARACTER.search(value):
        return "must not contain control characters (U+0000 to U+001F, U+007F)"
    return None


def stored_name_problem(value: str, nul: bool) -> str | None:
    """`name_problem` of an id a request only looks up (a user to read or
    erase, an item to read or delete): control characters pass, since
    halflife before 2026-12-05 (5efd287) stored ids with them, and an
    upgrade left such users unreadable and unerasable, such items served
    by Recommend but never deletable (an upgrade review). NUL passes where
    `nul`: item ids are looked up through JSON, which cuts them there."""
    passing = _CONTROL_CHARACTER if nul else _CONTROL_CHARACTER_BUT_NUL
    return name_problem(passing.sub("_", value))  # one byte for one: the length counts as stored


# Characters a tokenizer drops or cannot read as a word: controls (Cc), format
# characters such as U+200B and U+FEFF (Cf), private use (Co), combining marks
# with nothing to combine with (Mn; accent-stripping models drop them), and the
# replacement character U+FFFD (all-MiniLM-L6-v2 encodes each as [CLS][SEP]).
_UNREAD_CATEGORIES = frozenset(("Cc", "Cf", "Co", "Mn"))


def text_problem(text: str) -> str | None:
    """What makes `text` no text the API takes (an item's, an event's), said
    as a violation, or None: blank (see `blank`), or over MAX_TEXT_BYTES."""
    return "is empty" if blank(text) else text_size_problem(text)


def text_size_problem(text: str) -> str | None:
    """"is N bytes long; at most MAX_TEXT_BYTES" where `text` is longer, else None."""
    if (size := len(text.encode())) > MAX_TEXT_BYTES:
        return f"is {size} bytes long; at most {MAX_TEXT_BYTES}"
    return None


def blank(text: str) -> bool:
    """Whether `text` holds nothing a model reads (whitespace and the
    characters above), so that it would embed as the empty text does. An
    ordinary text costs a few C calls (ingest asks it of every event); others
    stop at the first readable character."""
    if not text.strip():
        return True
    if text.isascii() and text.isprintable():
        return False
    return readable_character().search(text) is None


@functools.cache
def readable_character() -> re.Pattern:
    """One character a model reads: any but whitespace, U+FFFD and the
    categories above, as one class of ~360 ranges, so that `blank` is one C
    scan. A loop over the characters took 4 ms a 32 KiB text of controls,
    on the event loop: 1,000 such events stalled every client for 7.9 s
    (a review). Built once (~0.2 s; `serve` builds it as it loads)."""
    unread = np.fromiter((c.isspace() or c == "\ufffd" or unicodedata.category(c) in _UNREAD_CATEGORIES
                          for c in map(chr, range(sys.maxunicode + 1))), dtype=bool, count=sys.maxunicode + 1)
    edges = np.flatnonzero(np.diff(np.concatenate(([False], unread, [False])).astype(np.int8)))
    runs = "".join(f"\\U{first:08x}-\\U{last - 1:08x}" for first, last in edges.reshape(-1, 2))
    return re.compile(f"[^{runs}]")
