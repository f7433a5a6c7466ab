"""The engine's tokenizing of long texts from their start (engine._encoded):
the same ids, truncation and refusals as tokenizing them whole, for each
family of tokenizer, at a cost bounded by what the model keeps."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402
from tests.fakes import RecordingTokenizer  # noqa: E402

from halflife.embedding import engine as engine_module  # noqa: E402
from halflife.embedding.engine import (  # noqa: E402
    EmbeddingEngine,
    InputsTooLongError,
    load_tokenizer,
    tokenizer_input,
)
from halflife.embedding.manifest import load_manifest  # noqa: E402

MAX_TOKENS = 24  # kept by the tiny tokenizers: texts past 16 x 24 = 384 characters are read from their start
# Llama 3's and Qwen2's pre-tokenizer: punctuation takes the line breaks after it (".\n\n" is one piece).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = tiny_models.BPE_CORPUS + [" ".join(tiny_models.COMMON_WORDS)]


def _trained(tokenizer: Tokenizer, trainer) -> Tokenizer:
    """`tokenizer` trained on sentences and on texts as tested, so that its merges span whitespace and punctuation."""
    rng = random.Random(99)
    tokenizer.train_from_iterator(CORPUS + [_random_text(rng, 2000) for _ in range(100)], trainer=trainer)
    return tokenizer


def _byte_level_bpe(pre_tokenizer) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    return _trained(tokenizer, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                   special_tokens=["<|endoftext|>"], show_progress=False))


def _metaspace_unigram() -> Tokenizer:
    """XLM-R's and multilingual-e5's kind: SentencePiece Unigram, Metaspace, runs of spaces made one, <s> ... </s>."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    _trained(tokenizer, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"],
                                                unk_token="<unk>", show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                                 ("</s>", 1)])
    return tokenizer


def _sentencepiece_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    return _trained(tokenizer, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False))


def _unsplit_bpe() -> Tokenizer:
    """BPE over the whole text, no pre-tokenizer: merges across spaces ("e t"), a head tokenizes otherwise."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return _trained(tokenizer, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"], show_progress=False,
                                                   initial_alphabet=list("▁ \t\n")))


def _minilm(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / load_manifest(model_dir).tokenizer_file))


FAMILIES = {
    "wordpiece (tiny)": tiny_models.wordpiece_tokenizer,
    "byte-level BPE (GPT-2, RoBERTa)": lambda: _byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "byte-level BPE (Qwen2, Llama 3)": lambda: _byte_level_bpe(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])),
    "Metaspace Unigram": _metaspace_unigram,
    "Metaspace BPE": _sentencepiece_bpe,
    "BPE, no pre-tokenizer": _unsplit_bpe,
}

PIECES = (tiny_models.COMMON_WORDS * 3 + [
    "it's", "they'll", "WE'RE", ".", ",", "!", "?", "...", "(", ")", "\"", "'", "-", "--", "12", "2026", "3.14",
    "12345678", "ΣΟΦΟΣ", "όσος", "café", "naïve", "東京", "日本語のテキスト", "中文", "한국어", "🙂", "👩‍👩‍👧",
    "🇵🇹", "e\u0301", "\u0301", "\u200b", "\ufffd", "\x00", "#" * 7, "x" * 150, "ab" * 80, "https://example.com/a?b=c",
])
SPACES = [" "] * 12 + ["  ", "   ", "\n", "\n\n", "\t", " \t ", "\r\n", " \n ", "\u3000", "\u00a0", "\x1c", ".\n\n",
                       ", ", "\n" + " " * 4]


def _random_text(rng: random.Random, chars: int) -> str:
    parts: list[str] = []
    while sum(map(len, parts)) < chars:
        parts += [rng.choice(PIECES), rng.choice(SPACES) if rng.random() < 0.85 else ""]
    text = "".join(parts)
    if rng.random() < 0.3:  # whitespace of every kind where the head is cut
        at = engine_module.CHARS_PER_TOKEN_BOUND * MAX_TOKENS - rng.randrange(4)
        text = text[:at] + rng.choice(SPACES) + rng.choice(SPACES) + text[at:]
    return rng.choice(["", " ", "\n"]) + text + rng.choice(["", " ", "\n\t"])


# Added tokens' texts, which a tokenizer matches before it splits a text into pre-tokens.
ADDED = ("<|endoftext|>", "<s>", "</s>", "<unk>", "[SEP]", "[CLS]", "[MASK]")


def _without_spaces(rng: random.Random, chars: int) -> str:
    """Pieces run together (CJK, punctuation, emoji, words, added tokens' texts, now and then after whitespace
    of another kind): a head is cut inside a pre-token."""
    text = ""
    while len(text) < chars:
        text += rng.choice(PIECES) if rng.random() < 0.9 else rng.choice(SPACES[12:]) + rng.choice(ADDED)
    return text


def _texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    chars = 16 * MAX_TOKENS
    texts = [_random_text(rng, rng.choice([8, chars // 2, chars, 2 * chars, 6 * chars])) for _ in range(300)]
    texts += [_without_spaces(rng, rng.choice([chars, 2 * chars, 6 * chars])) for _ in range(100)]
    texts += ["東京" * chars, "?!" * chars, "日本語のテキスト" * chars + " end"]
    # An added token's text across the cut, after whitespace (a fuzz: the head kept "<" where the text has the token).
    texts += ["東" * 4 + "x" * (chars - 20 - k) + "\t   " + token + "東京" * chars
              for token in ADDED for k in range(-2, len(token) + 2)]
    # Few tokens before the last space in the bound: the head says nothing, the whole text is read.
    texts += ["hello " + "x" * chars + " world " * 100, "a " + "ab" * chars, "word " * 5 + "\t" * chars + "word " * 50]
    return texts


@pytest.fixture(scope="module", params=list(FAMILIES) + ["all-MiniLM-L6-v2 (WordPiece)"])
def truncating(request, model_dir):
    make = FAMILIES.get(request.param) or (lambda: _minilm(model_dir))
    tokenizer = make()
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_TOKENS)
    return tokenizer


# 16, and less, for heads just past the limit: a head's end among the tokens kept.
@pytest.mark.parametrize("chars_per_token", [16, 6, 4])
@pytest.mark.parametrize("seed", range(2))
def test_a_long_text_read_from_its_start_tokenizes_as_read_whole(truncating, chars_per_token, seed, monkeypatch):
    """The kept ids and whether a text is cut (what tokenize returns, truncating
    or not, and what refuses it) are those of the whole text, whichever
    family of pre-tokenizer splits it."""
    monkeypatch.setattr(engine_module, "CHARS_PER_TOKEN_BOUND", chars_per_token)
    texts = _texts(seed)
    recording = RecordingTokenizer(truncating)
    got = list(engine_module._encoded(recording, texts))
    whole = truncating.encode_batch([tokenizer_input(text) for text in texts])
    assert [e.ids for e in got] == [e.ids for e in whole]
    assert [bool(e.overflowing) for e in got] == [bool(e.overflowing) for e in whole]
    assert sum(bool(e.overflowing) for e in whole) > 100 and not all(e.overflowing for e in whole)
    # The heads were what decided many long texts, except where a space does not start a pre-token.
    read_whole = set(recording.texts)
    heads_decided = sum(tokenizer_input(text) not in read_whole for text in texts)
    assert heads_decided == 0 if truncating.pre_tokenizer is None else heads_decided > 10


def test_where_a_space_may_not_start_a_pre_token_texts_are_read_whole(monkeypatch):
    """Merges across a space (BPE without a pre-tokenizer, as Llama 2's):
    "abc " is one token, "abc" at a head's end three, and a head just past
    the limit kept other tokens than the whole text."""
    vocab = {"<unk>": 0, "▁": 1, "a": 2, "b": 3, "c": 4, "c▁": 5, "bc▁": 6, "abc▁": 7}
    tokenizer = Tokenizer(models.BPE(vocab, [("c", "▁"), ("b", "c▁"), ("a", "bc▁")], unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.enable_truncation(MAX_TOKENS)
    text = "€" * 300 + " abc" * 100  # a head of <unk> and 20 words: 25 tokens, the last 3 "a", "b", "c"
    whole = tokenizer.encode(text).ids
    assert [e.ids for e in engine_module._encoded(tokenizer, [text])] == [whole]
    monkeypatch.setattr(engine_module, "_cuts_at_spaces", lambda tokenizer: True)
    assert [e.ids for e in engine_module._encoded(tokenizer, [text])] != [whole]


def test_a_space_starts_a_pre_token_in_each_family_but_where_nothing_splits_there():
    assert all(engine_module._cuts_at_spaces(make()) for name, make in FAMILIES.items() if name != "BPE, no pre-tokenizer")
    assert not engine_module._cuts_at_spaces(_unsplit_bpe())
    unsplit = _sentencepiece_bpe()
    unsplit.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)  # Mistral's
    assert not engine_module._cuts_at_spaces(unsplit)
    added = tiny_models.wordpiece_tokenizer()
    added.add_tokens(["new york"])  # a text cut before " york" ends otherwise
    assert not engine_module._cuts_at_spaces(added)


@pytest.fixture(scope="module")
def minilm(model_dir):
    return EmbeddingEngine.load(model_dir, provider="cpu", intra_op_threads=1)


def test_a_32_kib_input_is_tokenized_from_its_start(minilm, monkeypatch):
    """Tokenizing a 32 KiB English input whole took 18 ms (256 of them, the most an Embed takes: 2.2 s of CPU) for
    the 256 tokens the model keeps; truncating or not, the tokenizer is now given its first 4 KiB, and it is cut
    (or refused) as before."""
    limit = minilm.max_input_tokens
    text = " ".join(random.Random(0).choice(tiny_models.COMMON_WORDS) for _ in range(9000))[:32 * 1024]
    whole = load_tokenizer(minilm.model_dir / minilm.manifest.tokenizer_file, truncate_at=limit).encode(text)
    recording = RecordingTokenizer(minilm._truncating_tokenizer)
    monkeypatch.setattr(minilm, "_truncating_tokenizer", recording)
    counting = RecordingTokenizer(minilm._tokenizer)
    monkeypatch.setattr(minilm, "_tokenizer", counting)
    tokens = minilm.tokenize([text, "short"], truncate=True)
    assert tokens.ids[0].tolist() == whole.ids and tokens.truncated.tolist() == [True, False]
    assert tokens.token_counts.tolist() == [limit, 3]
    with pytest.raises(InputsTooLongError) as caught:
        minilm.tokenize(["short", text])
    assert caught.value.too_long == [(1, None)]
    assert "inputs[1] has more than the model's 256 tokens" in str(caught.value)
    assert max(map(len, recording.texts)) <= engine_module.CHARS_PER_TOKEN_BOUND * limit and counting.texts == []


@pytest.mark.parametrize("text", ["日本語のテキスト、東京。" * 3000, "?!" * 16384, "中文文本" * 8192],
                         ids=["japanese", "punctuation", "chinese"])
def test_a_32_kib_input_without_spaces_is_tokenized_from_its_start_too(minilm, monkeypatch, text):
    """With no space to cut at, the whole text was read (~0.04 s for 32 KiB, 10 s for an Embed of 256; an
    embed review); cut inside a pre-token, the head decides where what it keeps ends before that pre-token."""
    text = text[:32 * 1024]
    limit = minilm.max_input_tokens
    whole = load_tokenizer(minilm.model_dir / minilm.manifest.tokenizer_file, truncate_at=limit).encode(text)
    recording = RecordingTokenizer(minilm._truncating_tokenizer)
    monkeypatch.setattr(minilm, "_truncating_tokenizer", recording)
    tokens = minilm.tokenize([text], truncate=True)
    assert tokens.ids[0].tolist() == whole.ids and tokens.truncated.tolist() == [True]
    assert max(map(len, recording.texts)) <= engine_module.CHARS_PER_TOKEN_BOUND * limit


def test_a_refused_input_is_counted_where_it_is_read_whole(minilm):
    limit = minilm.max_input_tokens
    near = "word " * 300  # 302 tokens, 1,500 characters
    far = "word " * 1000
    with pytest.raises(InputsTooLongError) as caught:
        minilm.tokenize(["short", near, far, "word " * (limit - 2)])
    assert caught.value.too_long == [(1, 302), (2, None)]
    assert str(caught.value) == ("inputs[1] has 302 tokens, more than the model's 256, inputs[2] has more than "
                                 "the model's 256 tokens; set truncate to cut them")


def test_the_whole_texts_of_heads_that_say_nothing_are_encoded_together():
    """Heads of too few tokens to decide (words of over 16 characters a token: hashes, URLs, base64) leave the
    whole texts to encode: one at a time, 256 such 32 KiB inputs took twice as long as encoding them whole in the
    first place (2.3-3.3 s against 1.2-1.5 s, 2 shared cores); together, in batches as any texts, the tokenizer's threads
    share them."""
    tokenizer = tiny_models.wordpiece_tokenizer()
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_TOKENS)
    texts = [f"{n} " + "x" * 16 * MAX_TOKENS + " word" * 100 for n in range(20)]
    recording = RecordingTokenizer(tokenizer)
    got = list(engine_module._encoded(recording, ["short", *texts]))
    assert [e.ids for e in got] == [e.ids for e in tokenizer.encode_batch(["short", *texts])]
    assert recording.batches == [["short", *(text[: text.index(" ")] for text in texts)], texts]
