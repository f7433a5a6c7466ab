"""halflife.texts.blank, the API's and the dataset loader's rule for "no text",
against what the bundled model's tokenizer actually reads."""

from __future__ import annotations

import random
import unicodedata

import pytest

from halflife.embedding.engine import load_tokenizer
from halflife.embedding.manifest import load_manifest
from halflife.texts import blank

UNREAD = ["", " \t\n", "\u200b\ufeff", "\u00ad", "\x01\x02", "\x7f", "\ue000", "\u0301", "\ufe0f", "\ufffd",
          "\U000e0001", " \u200b\x01 "]
READ = ["a", "é", "\u0301a", "日本", "🙂", "\u200bx", "x\x01", "\ufffdy"]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir / load_manifest(model_dir).tokenizer_file)


@pytest.mark.parametrize("text", UNREAD, ids=ascii)
def test_what_the_tokenizer_drops_is_blank(text, tokenizer):
    assert tokenizer.encode(text).ids == tokenizer.encode("").ids  # embeds as the empty text
    assert blank(text)


@pytest.mark.parametrize("text", READ, ids=ascii)
def test_a_readable_character_is_text(text, tokenizer):
    assert len(tokenizer.encode(text).ids) > len(tokenizer.encode("").ids)
    assert not blank(text)


def _blank_by_loop(text: str) -> bool:
    """`blank` as it was written first, character by character: the reference."""
    from halflife.texts import _UNREAD_CATEGORIES

    return all(c.isspace() or c == "\ufffd" or unicodedata.category(c) in _UNREAD_CATEGORIES for c in text)


def test_blank_agrees_with_the_character_loop_on_every_kind_of_character():
    rng = random.Random(7)
    picks = [lambda: rng.randrange(0x80), lambda: rng.randrange(0x80, 0x370), lambda: rng.randrange(0x2000, 0x2070),
             lambda: rng.randrange(0xE000, 0xE100), lambda: 0xFFFD, lambda: rng.randrange(0x1D160, 0x1D180),
             lambda: rng.randrange(0xE0000, 0xE0080), lambda: rng.randrange(0xF0000, 0x10FFFF),
             lambda: rng.randrange(0x110000)]
    for _ in range(20_000):
        text = "".join(chr(rng.choice(picks)()) for _ in range(rng.randrange(1, 6)))
        assert blank(text) == _blank_by_loop(text), repr(text)


def test_blank_reads_a_long_unread_text_in_one_scan(monkeypatch):
    """A loop over the characters took 4 ms a 32 KiB text of controls, on
    the event loop: 1,000 such events held every client up for 7.9 s (a
    review). Counted as the Python-level category lookups it makes."""
    from halflife import texts

    texts.readable_character()  # built once, before counting
    looked_up = []
    monkeypatch.setattr(texts.unicodedata, "category", lambda c: looked_up.append(c) or "Cc")
    assert blank("\x01" * 32_767 + "\u200b") and not blank("\x01" * 32_767 + "a")
    assert looked_up == []
