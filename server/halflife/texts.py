"""What counts as text: one rule for the API's validation and the dataset loader."""

from __future__ import annotations

import unicodedata

# Characters a tokenizer drops or cannot read as a word: controls (Cc), format
# characters such as U+200B and U+FEFF (Cf), private use (Co), combining marks
# with nothing to combine with (Mn; accent-stripping models drop them), and the
# replacement character U+FFFD (all-MiniLM-L6-v2 encodes each as [CLS][SEP]).
_UNREAD_CATEGORIES = frozenset(("Cc", "Cf", "Co", "Mn"))


def blank(text: str) -> bool:
    """Whether `text` holds nothing a model reads (whitespace and the
    characters above), so that it would embed as the empty text does. An
    ordinary text costs a few C calls (ingest asks it of every event); others
    stop at the first readable character."""
    if not text.strip():
        return True
    if text.isascii() and text.isprintable():
        return False
    return all(c.isspace() or c == "\ufffd" or unicodedata.category(c) in _UNREAD_CATEGORIES for c in text)
