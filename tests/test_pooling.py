"""halflife.embedding.pooling against plain reference loops, and the engine's
tokenize/forward (padding, truncation, too-long inputs) on tiny exported models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402
from tests.fakes import RecordingTokenizer  # noqa: E402

from halflife.embedding import pooling  # noqa: E402
from halflife.embedding.pooling import (  # noqa: E402
    POOLING_MODES,
    cls_pool,
    cosine_rows,
    l2_normalize,
    last_token_pool,
    mean_pool,
    pool,
)

SENTINEL = 1e6  # what padded positions hold: any leak into a pooled vector shows


# ---------------------------------------------------------------- reference loops


def ref_mean(hidden, mask):
    out = np.zeros((hidden.shape[0], hidden.shape[2]), dtype=np.float64)
    for b in range(hidden.shape[0]):
        total, count = np.zeros(hidden.shape[2]), 0
        for s in range(hidden.shape[1]):
            if mask[b, s]:
                total += hidden[b, s]
                count += 1
        out[b] = total / max(count, 1)
    return out


def ref_last(hidden, mask):
    out = []
    for b in range(hidden.shape[0]):
        last = None
        for s in range(hidden.shape[1]):
            if mask[b, s]:
                last = s
        out.append(hidden[b, last])
    return np.stack(out)


def batch(lengths, seq, dim=8, side="right", seed=0):
    """Random (batch, seq, dim) states whose padded positions hold SENTINEL, and the 0/1 mask."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((len(lengths), seq, dim)).astype(np.float32)
    mask = np.zeros((len(lengths), seq), dtype=np.int64)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, seq - n :] = 1
    hidden[mask == 0] = SENTINEL
    return hidden, mask


# ---------------------------------------------------------------- mean


@pytest.mark.parametrize("side", ["right", "left"])
def test_mean_pool_matches_loop_and_ignores_padding(side):
    hidden, mask = batch([1, 3, 7, 7, 2], seq=7, side=side)
    got = mean_pool(hidden, mask)
    assert got.shape == (5, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_mean(hidden, mask), rtol=1e-5, atol=1e-5)
    assert np.abs(got).max() < 100  # no SENTINEL leaked in


def test_mean_pool_accepts_bool_mask_and_float16_states():
    hidden, mask = batch([2, 5], seq=5)
    hidden[mask == 0] = 0
    got = mean_pool(hidden.astype(np.float16), mask.astype(bool))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref_mean(hidden.astype(np.float16).astype(np.float32), mask), atol=1e-3)


def test_mean_pool_all_padding_row_is_zero_not_nan():
    hidden, mask = batch([3, 0], seq=4)
    got = mean_pool(hidden, mask)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[1], 0.0)


# ---------------------------------------------------------------- last token


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_pool_picks_last_real_token(side):
    lengths = [1, 2, 5, 9, 4, 9]
    hidden, mask = batch(lengths, seq=9, side=side, seed=1)
    got = last_token_pool(hidden, mask)
    assert got.shape == (6, 8) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref_last(hidden, mask))
    assert (got != SENTINEL).all()  # never a padded position
    expected_index = [n - 1 for n in lengths] if side == "right" else [8] * len(lengths)
    for b, s in enumerate(expected_index):
        np.testing.assert_array_equal(got[b], hidden[b, s])
    # Never the first token (unless it is the only real one).
    for b, n in enumerate(lengths):
        first_real = 0 if side == "right" else 9 - n
        if n > 1:
            assert not np.array_equal(got[b], hidden[b, first_real])


def test_last_token_pool_mixed_padding_and_bool_mask():
    hidden = np.random.default_rng(2).standard_normal((3, 6, 4)).astype(np.float32)
    mask = np.array(
        [
            [1, 1, 1, 0, 0, 0],  # right padded
            [0, 0, 1, 1, 1, 1],  # left padded
            [1, 1, 1, 1, 1, 1],  # no padding
        ]
    )
    for m in (mask, mask.astype(bool), mask.astype(np.int32)):
        got = last_token_pool(hidden, m)
        np.testing.assert_array_equal(got, hidden[[0, 1, 2], [2, 5, 5]])


def test_last_token_pool_all_padding_row_is_zero():
    hidden, mask = batch([3, 0], seq=4)
    got = last_token_pool(hidden, mask)
    np.testing.assert_array_equal(got[0], hidden[0, 2])
    np.testing.assert_array_equal(got[1], 0.0)


def test_last_token_pool_upcasts_to_float32():
    hidden, mask = batch([2, 3], seq=3)
    hidden[mask == 0] = 0
    got = last_token_pool(hidden.astype(np.float16), mask)
    assert got.dtype == np.float32


# ---------------------------------------------------------------- cls and dispatch


def test_cls_pool_is_first_position():
    hidden, mask = batch([2, 4], seq=4)
    got = cls_pool(hidden.astype(np.float64), mask)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, hidden[:, 0])


@pytest.mark.parametrize(
    "mode,ref",
    [("mean", ref_mean), ("last_token", ref_last), ("cls", lambda h, m: h[:, 0])],
)
def test_pool_dispatches(mode, ref):
    hidden, mask = batch([3, 1, 5], seq=5, seed=3)
    np.testing.assert_allclose(pool(hidden, mask, mode), ref(hidden, mask), rtol=1e-5, atol=1e-5)


def test_pool_modes_and_unknown_mode():
    assert set(POOLING_MODES) == {"mean", "last_token", "cls"}
    hidden, mask = batch([1], seq=2)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pool(hidden, mask, "max")


# ---------------------------------------------------------------- l2_normalize, cosine_rows


def test_l2_normalize_unit_rows_and_zero_rows_stay_zero():
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((6, 16)) * np.array([[1e-3], [1], [1e3], [0], [5], [0]])
    got = l2_normalize(vectors)
    assert got.dtype == np.float32 and got.shape == vectors.shape
    assert np.isfinite(got).all()
    for i, row in enumerate(vectors):
        norm = np.sqrt(sum(x * x for x in row))
        if norm == 0:
            np.testing.assert_array_equal(got[i], 0.0)
        else:
            assert abs(np.linalg.norm(got[i]) - 1.0) < 1e-6
            np.testing.assert_allclose(got[i], row / norm, rtol=1e-5, atol=1e-7)


def test_l2_normalize_is_idempotent():
    vectors = np.random.default_rng(5).standard_normal((3, 7)).astype(np.float32)
    once = l2_normalize(vectors)
    np.testing.assert_allclose(l2_normalize(once), once, atol=1e-7)


def test_cosine_rows_matches_loop():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((5, 9)).astype(np.float32)
    b = rng.standard_normal((5, 9)).astype(np.float32)
    got = cosine_rows(a, b)
    assert got.shape == (5,) and got.dtype == np.float64
    for i in range(5):
        dot = sum(float(x) * float(y) for x, y in zip(a[i], b[i]))
        na = sum(float(x) ** 2 for x in a[i]) ** 0.5
        nb = sum(float(y) ** 2 for y in b[i]) ** 0.5
        assert got[i] == pytest.approx(dot / (na * nb), abs=1e-12)


def test_cosine_rows_special_cases():
    a = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    b = np.array([[2.0, 4.0, 6.0], [-3.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [1.0, 2.0, 3.0]])
    got = cosine_rows(a, b)
    np.testing.assert_allclose(got, [1.0, -1.0, 0.0, 0.0], atol=1e-12)
    assert np.isfinite(got).all()  # a zero row gives 0, not NaN


def test_pooling_module_is_numpy_only():
    # The server runtime has no torch: pooling must not pull it in.
    src = Path(pooling.__file__).read_text()
    assert "import torch" not in src and "transformers" not in src


# ---------------------------------------------------------------- the engine on tiny exported models


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    src, out, manifest = tiny_models.exported("bert", tmp_path_factory)
    return src, out, manifest


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    src, out, manifest = tiny_models.exported("gpt2", tmp_path_factory)
    return src, out, manifest


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    src, out, manifest = tiny_models.exported("roberta", tmp_path_factory)
    return src, out, manifest


def _engine(model_dir, variant="fp32-o2"):
    from halflife.embedding.engine import EmbeddingEngine

    return EmbeddingEngine.load(model_dir, variant=variant, provider="cpu", intra_op_threads=1)


def _hf_ids(src, text):
    """Token ids from transformers' tokenizer of the source model (not the engine's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)(text)["input_ids"]


def _hf_token_count(src, text):
    return len(_hf_ids(src, text))


def test_an_empty_input_is_refused_where_the_tokenizer_adds_no_tokens(bert, gpt2, tmp_path):
    """GPT-2's tokenizer adds no special tokens: "" had no token to pool and
    came back as a zero vector, where the proto promises unit length (an
    audit). BERT's [CLS] [SEP] still embed it."""
    import grpc

    from halflife.api.server import ServerConfig
    from halflife_client import HalflifeClient, field_violations
    from tests.serving import ServerThread

    for (_, out, _), refused in ((gpt2, True), (bert, False)):
        config = ServerConfig(port=0, model_dir=out, data_dir=tmp_path / out.parent.name, provider="cpu")
        with ServerThread(config) as server, HalflifeClient(server.address) as client:
            if refused:
                with pytest.raises(grpc.RpcError) as caught:
                    client.embed(["hello", ""])
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert [field for field, _ in field_violations(caught.value)] == ["inputs[1]"]
                assert client.embed(["hello"]).shape == (1, 32)  # and the server goes on
            else:
                assert np.linalg.norm(client.embed([""])[0]) == pytest.approx(1.0, abs=1e-5)


SHORT = "the cat sat on the mat"
LONGER = [
    "a quick brown fox and a lazy dog " * 3,
    "science fiction movies about time travel, with many tokens across long inputs " * 2,
    "hello world",
]


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("variant", ["fp32-o2", "fp16"])
def test_forward_is_padding_invariant(kind, variant, request):
    src, out, manifest = request.getfixturevalue(kind)
    engine = _engine(out, variant)
    texts = [SHORT] + LONGER
    tokens = engine.tokenize(texts, truncate=True)
    lengths = [len(i) for i in tokens.ids]
    assert max(lengths) > 3 * lengths[0]  # the batch really pads the short sentence a lot
    alone = engine.forward([tokens.ids[0]])
    batched = engine.forward(tokens.ids)
    assert alone.shape == (1, manifest.dimension) and batched.shape == (4, manifest.dimension)
    assert alone.dtype == np.float32
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5, rtol=0)
    # The short sentence placed last in the batch as well.
    reordered = engine.forward(tokens.ids[1:] + tokens.ids[:1])
    np.testing.assert_allclose(reordered[-1], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_int8_forward_stays_close_across_batches(kind, request):
    # Dynamic int8 quantises activations with per-batch scales, so it is only
    # approximately padding-invariant; it must still stay close.
    src, out, manifest = request.getfixturevalue(kind)
    engine = _engine(out, "int8")
    tokens = engine.tokenize([SHORT] + LONGER, truncate=True)
    alone = engine.forward([tokens.ids[0]])
    batched = engine.forward(tokens.ids)
    assert cosine_rows(alone, batched[:1])[0] >= 0.99


def test_empty_text_on_a_decoder_is_batch_invariant(gpt2):
    src, out, manifest = gpt2
    engine = _engine(out)
    tokens = engine.tokenize(["", SHORT, *LONGER], truncate=True)
    assert tokens.token_counts[0] == 0
    alone = engine.forward([tokens.ids[0]])
    batched = engine.forward(tokens.ids)
    assert np.isfinite(batched).all()
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5, rtol=0)


def test_tokenize_counts_without_truncation(bert):
    src, out, manifest = bert
    engine = _engine(out)
    texts = [SHORT, "hello", ""]
    tokens = engine.tokenize(texts)
    assert [list(t[:1]) + list(t[-1:]) for t in tokens.ids] == [[2, 3]] * 3  # [CLS] ... [SEP]
    assert tokens.token_counts.tolist() == [_hf_token_count(src, t) for t in texts]
    assert tokens.token_counts.tolist() == [len(i) for i in tokens.ids]
    assert not tokens.truncated.any()
    assert all(i.dtype == np.int64 for i in tokens.ids)


def test_whitespace_around_a_text_is_not_embedded(roberta):
    """sentence-transformers strips every text before its tokenizer. RoBERTa's
    byte-level BPE reads leading and trailing whitespace as tokens of their
    own, and "  text\n" was embedded otherwise (a review: cosine 0.79-0.995
    against sentence-transformers)."""
    src, out, manifest = roberta
    engine = _engine(out)
    padded = ["  " + SHORT + "\n", "\t" + SHORT, SHORT + " \r\n"]
    assert all(_hf_ids(src, text) != _hf_ids(src, SHORT) for text in padded)  # the tokenizer itself would differ
    for truncate in (False, True):
        tokens = engine.tokenize([SHORT, *padded], truncate=truncate)
        assert [ids.tolist() for ids in tokens.ids] == [_hf_ids(src, SHORT)] * 4
        assert tokens.token_counts.tolist() == [len(_hf_ids(src, SHORT))] * 4
    vectors = engine.forward(tokens.ids)
    np.testing.assert_allclose(vectors[1:], np.repeat(vectors[:1], 3, axis=0), atol=1e-6, rtol=0)


def test_tokenize_encodes_a_bounded_number_of_characters_at_once(bert, monkeypatch):
    """1,000 texts of 32 KiB encoded in one batch held ~1.8 GB of encodings
    (offsets, token strings) to keep 256 ids of each, and the cut ones were
    encoded twice (a resource audit)."""
    from halflife.embedding import engine as engine_module

    src, out, manifest = bert
    engine = _engine(out)
    texts = [SHORT, "the quick brown fox and the lazy dog " * 20, "hello", "a " * 40, ""]
    whole = engine.tokenize(texts, truncate=True)
    batches = []
    monkeypatch.setattr(engine, "_tokenizer", RecordingTokenizer(engine._tokenizer, batches))
    monkeypatch.setattr(engine, "_truncating_tokenizer", RecordingTokenizer(engine._truncating_tokenizer, batches))
    monkeypatch.setattr(engine_module, "TOKENIZE_CHARS", 100)
    chunked = engine.tokenize(texts, truncate=True)
    assert [t.tolist() for t in chunked.ids] == [t.tolist() for t in whole.ids]
    assert (chunked.truncated == whole.truncated).all() and whole.truncated.any()
    # At most 100 characters a batch, or one longer text alone; each text encoded once (the cut ones were
    # encoded twice: in full, then again truncated, twice the time for long texts).
    assert len(batches) > 2 and all(sum(map(len, b)) <= 100 or len(b) == 1 for b in batches)
    assert sorted(text for b in batches for text in b) == sorted(text.strip() for text in texts)


@pytest.mark.parametrize("text", ["the quick brown fox " * 40, "?" * 5000], ids=["words", "one long word"])
def test_tokenize_gives_up_between_its_batches_once_its_check_raises(bert, monkeypatch, text):
    """A caller that has gone stops the work at the next batch: an abandoned
    Embed's tokenizing ran to its end, ~0.04 s a 32 KiB text without spaces,
    and held up everyone else's (a review)."""
    from halflife.deadlines import DeadlineExpiredError
    from halflife.embedding import engine as engine_module

    engine = _engine(bert[1])
    monkeypatch.setattr(engine_module, "TOKENIZE_CHARS", 100)  # a text a batch
    checks = []

    def check():
        checks.append(len(checks))
        if len(checks) == 3:
            raise DeadlineExpiredError("the call was cancelled")

    with pytest.raises(DeadlineExpiredError):
        engine.tokenize([text] * 10, truncate=True, check=check)
    assert len(checks) == 3
    assert len(engine.tokenize([text] * 10, truncate=True, check=lambda: None).ids) == 10


def test_truncation_keeps_final_sep_and_reports_counts(bert):
    src, out, manifest = bert
    engine = _engine(out)
    limit = manifest.max_input_tokens
    assert limit == tiny_models.MAX_POSITIONS
    long_text = "the quick brown fox and the lazy dog " * 20
    exactly = "a " * (limit - 2)  # [CLS] + limit-2 words + [SEP] == limit: not truncated
    texts = [SHORT, long_text, exactly]
    tokens = engine.tokenize(texts, truncate=True)
    assert tokens.truncated.tolist() == [False, True, False]
    assert tokens.token_counts.tolist() == [_hf_token_count(src, SHORT), limit, limit]
    cut = tokens.ids[1]
    assert len(cut) == limit
    assert cut[0] == 2 and cut[-1] == 3  # [CLS] first, [SEP] kept last
    assert (cut[1:-1] != 3).all()
    # What the model sees is the start of the untruncated text, then [SEP].
    full = _hf_ids(src, long_text)
    assert len(full) > limit
    assert cut.tolist() == full[: limit - 1] + [3]
    vectors = engine.forward(tokens.ids)
    assert vectors.shape == (3, manifest.dimension) and np.isfinite(vectors).all()


def test_gpt2_truncation_keeps_the_first_tokens(gpt2):
    src, out, manifest = gpt2
    engine = _engine(out)
    long_text = "the quick brown fox jumps over the lazy dog. " * 20
    full = _hf_ids(src, long_text)
    limit = manifest.max_input_tokens
    assert len(full) > limit
    tokens = engine.tokenize([long_text], truncate=True)
    assert tokens.truncated.tolist() == [True]
    assert tokens.token_counts.tolist() == [limit]
    assert tokens.ids[0].tolist() == full[:limit]  # no special tokens: simply the first ones


def test_inputs_too_long_lists_every_offender(bert):
    from halflife.embedding.engine import InputsTooLongError

    src, out, manifest = bert
    engine = _engine(out)
    limit = manifest.max_input_tokens
    long_texts = {i: "hello world " * (30 + 5 * i) for i in (1, 3, 4, 6, 7)}
    texts = [long_texts.get(i, SHORT) for i in range(8)]
    with pytest.raises(InputsTooLongError) as caught:
        engine.tokenize(texts)
    error = caught.value
    expected = [(i, _hf_token_count(src, long_texts[i])) for i in sorted(long_texts)]
    assert all(n > limit for _, n in expected)
    assert error.too_long == expected
    assert error.max_tokens == limit
    assert isinstance(error, ValueError)
    message = str(error)
    assert f"inputs[1] has {expected[0][1]} tokens" in message
    assert f"more than the model's {limit}" in message and "truncate" in message
    # At the limit exactly is fine.
    engine.tokenize(["a " * (limit - 2)])


def test_cuda_request_preloads_the_cuda_libraries_and_reports_a_fallback(bert, monkeypatch, caplog):
    """Asking for CUDA loads the nvidia-* libraries first (onnxruntime would not
    find them without LD_LIBRARY_PATH); where CUDA still cannot run, the engine
    says which provider it really uses instead of pretending."""
    import onnxruntime as ort

    from halflife.embedding import engine as engine_module

    preloads = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: [engine_module.CUDA, engine_module.CPU])
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: preloads.append(a), raising=False)
    with caplog.at_level("WARNING", logger=engine_module.log.name):
        engine = engine_module.EmbeddingEngine.load(bert[1], variant="fp32-o2", provider="cuda", intra_op_threads=1)
    assert preloads == [()]
    assert engine.provider == engine_module.CPU
    assert "fell back to CPUExecutionProvider" in caplog.text
    assert "serving" not in caplog.text  # a variant asked for by name is what was asked for

    preloads.clear()
    engine_module.EmbeddingEngine.load(bert[1], variant="fp32-o2", provider="cpu", intra_op_threads=1)
    assert preloads == []

    # CUDA's default variant (fp16) on the CPU, where it is not the default: the operator is told what to pass.
    defaults = bert[2].default_variants
    caplog.clear()
    with caplog.at_level("WARNING", logger=engine_module.log.name):
        fallen = engine_module.EmbeddingEngine.load(bert[1], provider="auto", intra_op_threads=1)
    assert fallen.variant.name == defaults[engine_module.CUDA] != defaults[engine_module.CPU]
    assert (f"serving {defaults[engine_module.CUDA]}, the CUDA default, on the CPU, where "
            f"{defaults[engine_module.CPU]} is the default: pass --provider cpu") in caplog.text


def test_io_binding_branch_gives_the_plain_run_s_vectors(bert):
    """The CUDA branch of EmbeddingEngine._run (IO binding) runs onnxruntime's
    IOBinding calls; here on the CPU provider, so that a typo or an API change
    in them fails on a machine without a GPU, not on the one GPU run."""
    from halflife.embedding import engine as engine_module

    engine = engine_module.EmbeddingEngine.load(bert[1], variant="fp32-o2", provider="cpu", intra_op_threads=1)
    ids = engine.tokenize(["hello world", "a longer sentence about trail shoes and espresso", "x"], truncate=True).ids
    plain = engine.forward(ids)
    engine._use_io_binding = True
    bound = engine.forward(ids)
    assert bound.dtype == np.float32 and bound.shape == plain.shape
    np.testing.assert_allclose(bound, plain, rtol=1e-6, atol=1e-6)


_ARENA_PROBE = """
import sys
import numpy as np
from halflife.embedding.engine import ARENA_KEEP_TOKENS, EmbeddingEngine

def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

engine = EmbeddingEngine.load(sys.argv[1], provider="cpu")
engine.warm_up()
before = rss_mib()
tokens = 128
batch = [np.full(tokens, engine.manifest.pad_token_id + 1, dtype=np.int64)] * (2 * ARENA_KEEP_TOKENS // tokens)
for _ in range(2):
    engine.forward(batch)
grown = rss_mib() - before
engine.release_memory()
print(grown, rss_mib() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_release_memory_gives_back_what_passes_over_many_tokens_took(model_dir):
    """onnxruntime's CPU arena would keep the peak of such a pass (~330 MiB
    for 64 x 128 tokens of all-MiniLM) for the life of the server; measured in
    a process of its own, so nothing else this run allocated counts."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _ARENA_PROBE, str(model_dir)], capture_output=True, text=True,
                         timeout=120, check=True)
    grown, kept = map(float, out.stdout.split())
    assert grown > 200, f"two 8,192-token passes grew RSS by {grown:.0f} MiB only: the probe proves nothing"
    assert kept < 60, f"RSS still {kept:.0f} MiB above the start after release_memory ({grown:.0f} before it)"
