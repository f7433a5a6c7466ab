"""halflife.texts.blank, the API's and the dataset loader's rule for "no text",
against what the bundled model's tokenizer actually reads."""

from __future__ import annotations

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
