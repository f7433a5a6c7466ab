"""`halflife export` on tiny random models: the manifest, the served path against
an independent PyTorch reference, and the CLI's error paths."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402

from halflife import cli  # noqa: E402
from halflife.embedding.engine import CPU, CUDA, EmbeddingEngine  # noqa: E402
from halflife.embedding.manifest import ManifestError, load_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ERROR_PREFIX = "halflife export: error:"

# kind -> what its manifest must say
EXPECTED = {
    "bert": dict(model_type="bert", kind="encoder", pooling="mean", pad_token_id=0),
    # Its tokenizer returns token_type_ids, which its forward does not take.
    "distilbert": dict(model_type="distilbert", kind="encoder", pooling="mean", pad_token_id=0),
    "gpt2": dict(model_type="gpt2", kind="decoder", pooling="last_token", pad_token_id=0),
    "mpnet": dict(model_type="mpnet", kind="encoder", pooling="mean", pad_token_id=1),
    "roberta": dict(model_type="roberta", kind="encoder", pooling="mean", pad_token_id=1),
    # Positions after padding, as RoBERTa's: a list of model types missed it, and its export crashed.
    "data2vec-text": dict(model_type="data2vec-text", kind="encoder", pooling="mean", pad_token_id=1),
    # No O2 fusions: its fp16 variant failed validation (RMSNorm's reductions in fp16), so it did not export.
    # RMSNorm: no LayerNorm output for SmoothQuant to smooth, so int8 quantizes the whole graph.
    "qwen2": dict(model_type="qwen2", kind="decoder", pooling="last_token", pad_token_id=0, smoothed=False),
}

# Not the exporter's validation sentences; the last one is truncated.
SENTENCES = [
    "the cat sat on the mat",
    "A woman is playing a guitar while the crowd cheers!",
    "x",
    "Revenue and costs: the quarterly report, week 12.",
    "many tokens across long inputs test padding and attention masks " * 8,
]


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def exported(request, tmp_path_factory):
    """(kind, source dir, exported dir, returned Manifest); each model exported once."""
    src, out, manifest = tiny_models.exported(request.param, tmp_path_factory)
    return request.param, src, out, manifest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- the manifest


def test_manifest(exported):
    kind, src, out, manifest = exported
    expected = EXPECTED[kind]
    on_disk = load_manifest(out)
    assert on_disk == manifest
    assert json.loads((out / "manifest.json").read_text()) == json.loads(manifest.to_json())

    assert manifest.format_version == 1
    assert manifest.model_id == kind  # the source directory's name
    assert manifest.source["model_type"] == expected["model_type"]
    assert manifest.source["kind"] == expected["kind"]
    assert manifest.source["path"] == str(src)
    assert manifest.source["weights_sha256"] == {"model.safetensors": sha256(src / "model.safetensors")}
    assert manifest.pooling == expected["pooling"]
    assert manifest.pad_token_id == expected["pad_token_id"]
    assert manifest.dimension == 32
    # 64 positions for all (RoBERTa, MPNet: 66 position embeddings, numbered from pad_token_id + 1 = 2).
    assert manifest.max_input_tokens == manifest.position_limit == tiny_models.MAX_POSITIONS
    assert manifest.opset >= 18
    assert manifest.normalize is True
    assert set(manifest.tooling) >= {"halflife", "torch", "transformers", "optimum", "onnx", "onnxruntime"}


def test_manifest_files_and_checksums(exported):
    import onnx

    kind, src, out, manifest = exported
    assert manifest.tokenizer_file == "tokenizer.json"
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert manifest.tokenizer_sha256 == sha256(out / "tokenizer.json")
    names = [v.name for v in manifest.variants]
    assert len(set(names)) == len(names)
    assert names[0] in ("fp32-o2", "fp32") and {"fp16", "int8"} <= set(names)
    listed = {"manifest.json", "tokenizer.json"}
    for variant in manifest.variants:
        path = out / variant.file
        assert path.is_file(), variant
        assert variant.sha256 == sha256(path), variant.name
        listed.add(variant.file)
        model = onnx.load(str(path), load_external_data=False)
        assert [i.name for i in model.graph.input] == list(manifest.input_names)
        default_domain = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
        assert default_domain and default_domain[0] >= manifest.opset
    # Nothing else in the directory: no temp files, no raw export left behind.
    assert {p.name for p in out.iterdir()} == listed
    precisions = {v.name: v.precision for v in manifest.variants}
    assert precisions["fp16"] == "fp16" and precisions["int8"] == "int8" and precisions[names[0]] == "fp32"
    inputs = set(manifest.input_names)
    assert {"input_ids", "attention_mask"} <= inputs
    if kind == "bert":
        assert "token_type_ids" in inputs
    if kind == "distilbert":
        assert "token_type_ids" not in inputs


def test_manifest_validation_and_defaults(exported):
    from halflife_export.exporter import VALIDATION_SENTENCES

    kind, src, out, manifest = exported
    for variant in manifest.variants:
        val = variant.validation
        assert val.sentences == len(VALIDATION_SENTENCES) + 1  # and one past the limit
        assert np.isfinite([val.min_cosine, val.mean_cosine, val.max_abs_diff]).all()
        assert val.min_cosine <= val.mean_cosine <= 1.0 + 1e-9
        if variant.precision == "int8":
            assert val.threshold == 0.99
            assert val.passed == (val.min_cosine >= 0.99)
        else:
            assert val.threshold == 0.999
            assert val.passed and val.min_cosine >= 0.999, variant
    by_name = {v.name: v for v in manifest.variants}
    assert set(manifest.default_variants) == {CPU, CUDA}
    fp32 = manifest.variants[0].name
    assert manifest.default_variants[CPU] == ("int8" if by_name["int8"].validation.passed else fp32)
    assert manifest.default_variants[CUDA] == "fp16"
    for provider, name in manifest.default_variants.items():
        assert provider in by_name[name].execution_providers
    # Validated where they ran (no CUDA here), as the manifest says; a manifest from before the field reads as CPU.
    assert {v.validation.provider for v in manifest.variants} == {CPU}
    data = json.loads((out / "manifest.json").read_text())
    for variant in data["variants"]:
        del variant["validation"]["provider"]
    (out.parent / "older").mkdir(exist_ok=True)
    (out.parent / "older" / "manifest.json").write_text(json.dumps(data))
    assert load_manifest(out.parent / "older") == manifest


def test_each_variant_is_validated_on_the_provider_it_is_for_where_offered(tmp_path, sources, monkeypatch):
    """On a GPU host fp16 was validated on the CPU, though its graph was
    optimised by a CUDA session, for CUDA (a GPU-path review). With CUDA
    offered (and falling back here, with no GPU), fp16 asks for it."""
    import halflife_export.exporter as exporter
    import onnxruntime as ort

    asked = {}
    load = exporter.EmbeddingEngine.load

    def spy(model_dir, *, variant, provider, **kwargs):
        asked[variant] = provider
        return load(model_dir, variant=variant, provider=provider, **kwargs)

    monkeypatch.setattr(exporter.EmbeddingEngine, "load", spy)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    manifest = exporter.export_model(exporter.ExportOptions(output=tmp_path / "out", model=str(sources["bert"]),
                                                            progress=lambda line: None))
    assert asked == {v.name: "auto" if v.precision == "fp16" else "cpu" for v in manifest.variants}
    assert {v.validation.provider for v in manifest.variants} == {CPU}  # where onnxruntime really ran them


def test_int8_quantizes_the_smoothed_matmuls_only(exported):
    import onnx

    from halflife_export import smoothquant

    kind, src, out, manifest = exported
    variant = manifest.variant("int8")
    if not EXPECTED[kind].get("smoothed", True):
        assert variant.optimization == "dynamic-per-channel"
        return
    assert variant.optimization == f"smoothquant-a{smoothquant.ALPHA}-dynamic-per-channel"
    graph = onnx.load(str(out / variant.file)).graph
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    smoothing = [node for node in graph.node if node.name.startswith("SmoothQuant_")]
    assert smoothing and all(node.op_type == "Mul" for node in smoothing)
    # Each smoothed activation is quantized on its way into the int8 MatMuls...
    for node in smoothing:
        assert set(readers[node.output[0]]) == {"DynamicQuantizeLinear"}, (kind, node.name)
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulInteger") + ops.count("QAttention") > 0
    # ...and the MatMuls no LayerNorm feeds (the FFN's second one, the attention output) stay fp32.
    assert ops.count("MatMul") > 0


def test_int8_falls_back_to_the_whole_graph_when_smoothing_fails(tmp_path_factory, monkeypatch, caplog):
    from halflife_export import smoothquant
    from halflife_export.exporter import ExportOptions, export_model

    def broken(*args, **kwargs):
        raise RuntimeError("an operator the rewrite does not know")

    monkeypatch.setattr(smoothquant, "smooth", broken)
    out = tmp_path_factory.mktemp("fallback") / "model"
    manifest = export_model(ExportOptions(output=out, model=str(tiny_models.source("bert", tmp_path_factory)),
                                          progress=lambda line: None))
    int8 = manifest.variant("int8")
    assert int8.optimization == "dynamic-per-channel" and (out / int8.file).is_file()
    assert "SmoothQuant failed on this graph (an operator the rewrite does not know)" in caplog.text
    assert EmbeddingEngine.load(out, variant="int8", provider="cpu").forward([np.array([1, 5, 2])]).shape == (1, 32)


def test_a_model_type_without_o2_fusions_says_so_once_and_briefly(tmp_path_factory, caplog):
    """optimum's refusal, whole, listed some 40 model types and asked for a pull request, once for each graph."""
    from halflife_export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("plain") / "model"
    manifest = export_model(ExportOptions(output=out, model=str(tiny_models.source("qwen2", tmp_path_factory)),
                                          progress=lambda line: None))
    assert [(v.name, v.optimization) for v in manifest.variants][:2] == [("fp32", "none"), ("fp16", "none")]
    assert [r.getMessage() for r in caplog.records if "O2" in r.getMessage()] == [
        "no O2 fusions for qwen2, so plain fp32 and fp16 graphs: ONNX Runtime doesn't support the graph optimization "
        "of qwen2 yet"]


# ---------------------------------------------------------------- the served path


def torch_reference(src: Path, sentences, pooling: str, max_tokens: int) -> np.ndarray:
    """Embeddings computed here, independently of halflife: transformers'
    AutoModel, one unpadded sentence at a time, pooled with torch, L2-normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src).eval()
    rows = []
    with torch.no_grad():
        for sentence in sentences:
            ids = tokenizer(sentence, truncation=True, max_length=max_tokens)["input_ids"]
            assert len(ids) <= max_tokens
            states = model(input_ids=torch.tensor([ids])).last_hidden_state[0].double()
            vector = {"mean": states.mean(dim=0), "cls": states[0], "last_token": states[-1]}[pooling]
            rows.append((vector / vector.norm()).numpy())
    return np.stack(rows)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return np.einsum("nd,nd->n", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def reference(exported):
    kind, src, out, manifest = exported
    return torch_reference(src, SENTENCES, EXPECTED[kind]["pooling"], manifest.max_input_tokens)


@pytest.mark.parametrize("variant,bar", [(None, 0.99), ("fp32", 0.999), ("fp16", 0.999), ("int8", 0.99)])
def test_served_embeddings_match_pytorch(exported, reference, variant, bar):
    kind, src, out, manifest = exported
    if variant == "fp32":  # fp32-o2, or the plain graph where the model type has no O2 fusions
        variant = manifest.variants[0].name
    engine = EmbeddingEngine.load(out, variant=variant, provider="cpu", intra_op_threads=1)
    assert engine.provider == CPU
    assert engine.dimension == 32
    if variant is None:
        assert engine.variant.name == manifest.default_variants[CPU]
    tokens = engine.tokenize(SENTENCES, truncate=True)
    assert tokens.truncated.tolist() == [False] * (len(SENTENCES) - 1) + [True]
    pooled = engine.forward(tokens.ids)
    assert pooled.shape == (len(SENTENCES), 32) and pooled.dtype == np.float32
    served = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    cos = cosines(served, reference)
    assert cos.min() >= bar, (kind, variant, cos)
    if variant in ("fp32-o2", "fp32"):
        assert np.abs(served - reference).max() < 1e-4


def test_pooling_choice_matters(exported, reference):
    # The reference must be sensitive to pooling, or the test above proves little.
    kind, src, out, manifest = exported
    other = "last_token" if EXPECTED[kind]["pooling"] == "mean" else "mean"
    wrong = torch_reference(src, SENTENCES[:2], other, manifest.max_input_tokens)
    assert cosines(wrong, reference[:2]).min() < 0.99


def test_tampered_variant_is_refused(exported, tmp_path):
    kind, src, out, manifest = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    path = copy / manifest.variant("int8").file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="fails its checksum"):
        EmbeddingEngine.load(copy, variant="int8", provider="cpu")
    EmbeddingEngine.load(copy, variant="fp16", provider="cpu")  # the others still load


def test_each_variant_names_what_maps_its_texts_to_vectors(exported):
    """The interest engine keeps an item's vector while its text and this identity stay the same."""
    kind, src, out, manifest = exported
    int8 = EmbeddingEngine.load(out, variant="int8", provider="cpu")
    assert int8.identity == EmbeddingEngine.load(out, variant="int8", provider="cpu").identity
    assert int8.identity != EmbeddingEngine.load(out, variant="fp16", provider="cpu").identity


def _edited_copy(out: Path, tmp_path: Path, edit) -> Path:
    """A copy of an exported model directory whose manifest (a dict) `edit` changed in place."""
    copy = tmp_path / "edited"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _rewrite(copy: Path, file: str, data: bytes) -> str:
    """Replaces `file` with `data` and returns its sha256, as a manifest would record it."""
    (copy / file).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _garbage_variant(manifest, copy):
    variant = next(v for v in manifest["variants"] if v["name"] == manifest["default_variants"][CPU])
    variant["sha256"] = _rewrite(copy, variant["file"], b"not an onnx model")


def _garbage_tokenizer(manifest, copy):
    manifest["tokenizer_sha256"] = _rewrite(copy, manifest["tokenizer_file"], b"{not json")


@pytest.mark.parametrize("edit, message", [
    (_garbage_variant, "is not a loadable ONNX model"),
    (_garbage_tokenizer, "is not a loadable tokenizer"),
    (lambda m, _: m.update(pooling="bogus"), "pooling 'bogus' is not one of mean, last_token, cls"),
    (lambda m, _: m.update(default_variants={}), "names no default variant for CPUExecutionProvider"),
    (lambda m, _: m.update(dimension=m["dimension"] + 1), "-d vectors, the manifest says"),
    # Hand edits of the wrong type or beyond the model (an audit: tracebacks, or "32-d vectors, the manifest says 32").
    (lambda m, _: m.update(default_variants=list(m["default_variants"])), "default_variants must be a JSON object"),
    (lambda m, _: m.update(dimension=str(m["dimension"])), "dimension must be a whole number, got '32'"),
    (lambda m, _: m.update(normalize=1), "normalize must be true or false, got 1"),
    (lambda m, _: m["variants"][0]["validation"].update(min_cosine="high"), "min_cosine must be a number"),
    (lambda m, _: m.update(max_input_tokens=0), "max_input_tokens must be at least 1, got 0"),
    (lambda m, _: m.update(position_limit="64"), "position_limit must be a whole number, got '64'"),
    (lambda m, _: m.update(pad_token_id=10**6), r"the model fails on 1 x 8 tokens, which its manifest allows"),
    # Served as another variant, or from outside the directory (a review).
    (lambda m, _: m.update(variants=[]), "variants is empty"),
    (lambda m, _: m["variants"].insert(0, {**m["variants"][-1], "name": m["default_variants"][CPU]}),
     "variant names must be unique: '[^']+' named more than once"),
    (lambda m, _: m.update(default_variants={CPU: "fp64"}), "default_variants names 'fp64' for CPUExecutionProvider"),
    (lambda m, _: m["variants"][0].update(file="../" + m["variants"][0]["file"]), "must be a path inside the model"),
    (lambda m, _: m.update(tokenizer_file="/etc/passwd"), "'/etc/passwd' must be a path inside the model directory"),
])
def test_a_consistent_but_wrong_manifest_is_a_manifest_error(exported, tmp_path, edit, message):
    # Checksums that match files the manifest misdescribes: an audit found each
    # of these a traceback at start, or (the dimension) INTERNAL on every upsert.
    kind, src, out, manifest = exported
    copy = _edited_copy(out, tmp_path, edit)
    with pytest.raises(ManifestError, match=message):
        EmbeddingEngine.load(copy, provider="cpu").warm_up()


def test_a_variant_that_fell_short_of_its_validation_loads_with_a_warning(exported, tmp_path, caplog):
    """The export keeps an int8 variant below its bar for whoever asks for it by name: it loads, but says so."""
    kind, src, out, manifest = exported

    def fail_default(m, _):
        next(v for v in m["variants"] if v["name"] == m["default_variants"][CPU])["validation"].update(passed=False)

    copy = _edited_copy(out, tmp_path, fail_default)
    with caplog.at_level("WARNING", logger="halflife.embedding.engine"):
        EmbeddingEngine.load(out, provider="cpu")
        assert not caplog.records
        engine = EmbeddingEngine.load(copy, provider="cpu")
    assert [f"variant {engine.variant.name} fell short of its export validation" in r.getMessage()
            for r in caplog.records] == [True]


@pytest.mark.parametrize("recorded, message", [
    (lambda m: None, r"manifest\.json: max_input_tokens 128 is more than bert has positions for \(64\)$"),
    # What the export records where the config gives no position limit, and manifests from before the field:
    # warm_up, which runs past 64 tokens, still refuses it.
    (lambda m: m.update(position_limit=None), r"the model fails on 4 x 128 tokens, which its manifest allows"),
    (lambda m: m.pop("position_limit"), r"the model fails on 4 x 128 tokens, which its manifest allows"),
], ids=["position-limit", "no-position-limit", "manifest-from-before-position-limit"])
def test_more_input_tokens_than_the_model_has_positions_for_is_a_manifest_error(recorded, message, tmp_path,
                                                                                tmp_path_factory):
    """A position table of 64, whose length the export records (position_limit): refused as the manifest is read."""
    _, out, _ = tiny_models.exported("bert", tmp_path_factory)

    def edit(m, _):
        recorded(m)
        m.update(max_input_tokens=tiny_models.MAX_POSITIONS * 2)

    copy = _edited_copy(out, tmp_path, edit)
    with pytest.raises(ManifestError, match=message):
        EmbeddingEngine.load(copy, provider="cpu").warm_up()


def test_more_input_tokens_than_positions_past_what_warm_up_runs_is_refused_at_start(tmp_path):
    """warm_up runs at most WARM_UP_MAX_TOKENS (a long-context model's whole length would cost seconds at each
    start): a manifest edited past a longer position table started, and requests longer than the table failed
    with INTERNAL (a review). The export records the table's length; loading, and so serve, refuses more."""
    from halflife.embedding.engine import WARM_UP_MAX_TOKENS, served_identity
    from halflife_export.exporter import ExportOptions, export_model

    positions = WARM_UP_MAX_TOKENS + 64
    src = tiny_models.make_tiny_bert(tmp_path / "bert", positions=positions)
    out = tmp_path / "out"
    export_model(ExportOptions(output=out, model=str(src), progress=lambda line: None))
    EmbeddingEngine.load(out, provider="cpu").warm_up()
    copy = _edited_copy(out, tmp_path, lambda m, _: m.update(max_input_tokens=positions + 100))
    message = (f"^{re.escape(str(copy / 'manifest.json'))}: max_input_tokens {positions + 100} is more than bert "
               f"has positions for \\({positions}\\)$")
    with pytest.raises(ManifestError, match=message):
        served_identity(copy)  # what serve checks before it binds its port
    with pytest.raises(ManifestError, match=message):
        EmbeddingEngine.load(copy, provider="cpu").warm_up()


def test_a_model_taking_an_input_the_server_does_not_feed_is_a_manifest_error(tmp_path_factory, monkeypatch):
    """The export refuses such a graph; one in a directory made by hand was a
    KeyError traceback at the first forward pass. Shown with attention_mask
    taken off the inputs the engine feeds."""
    from halflife.embedding import engine as engine_module

    _, out, _ = tiny_models.exported("bert", tmp_path_factory)
    EmbeddingEngine.load(out, provider="cpu")
    monkeypatch.setattr(engine_module, "FED_INPUTS", engine_module.FED_INPUTS - {"attention_mask"})
    with pytest.raises(ManifestError, match="the model takes attention_mask, which the server does not feed"):
        EmbeddingEngine.load(out, provider="cpu")


def test_a_model_whose_pad_token_is_the_last_of_its_vocabulary_serves(tmp_path):
    """A pad token added last (add_special_tokens, resize_token_embeddings: fine-tuned decoder embedders) exported,
    but serve refused to start: warm_up and release_memory fed pad_token_id + 1, past the vocabulary (a review)."""
    from halflife.embedding.engine import ARENA_KEEP_TOKENS
    from halflife_export.exporter import ExportOptions, export_model

    src = tiny_models.make_tiny_gpt2(tmp_path / "gpt2", added_pad_token="[PAD]")
    out = tmp_path / "out"
    manifest = export_model(ExportOptions(output=out, model=str(src), progress=lambda line: None))
    vocabulary = json.loads((src / "config.json").read_text())["vocab_size"]
    assert manifest.pad_token_id == vocabulary - 1
    engine = EmbeddingEngine.load(out, provider="cpu")
    engine.warm_up()
    engine.forward([np.ones(64, dtype=np.int64)] * (ARENA_KEEP_TOKENS // 64 + 1))
    engine.release_memory()
    assert engine.memory_releases == 1
    # The warm-up still pads, so a pad token just past the vocabulary still fails there.
    copy = _edited_copy(out, tmp_path, lambda m, _: m.update(pad_token_id=vocabulary))
    with pytest.raises(ManifestError, match=r"the model fails on 8 x 32 tokens, which its manifest allows"):
        EmbeddingEngine.load(copy, provider="cpu").warm_up()


def test_a_manifest_that_is_not_an_object_names_its_file(tmp_path):
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(ManifestError, match=f"{tmp_path / 'manifest.json'} is malformed: expected a JSON object"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("where", ["manifest", "variant", "validation"])
def test_a_manifest_from_a_newer_export_says_so(exported, tmp_path, where):
    """A field this server does not know read as "malformed: unexpected
    keyword argument" (what a server from before `position_limit` said of
    today's manifests): it names the fields and says what to do."""
    _, _, out, _ = exported

    def add(manifest, _):
        record = {"manifest": manifest, "variant": manifest["variants"][0],
                  "validation": manifest["variants"][0]["validation"]}[where]
        record.update(from_the_future=1, also_new=2)

    copy = _edited_copy(out, tmp_path, add)
    with pytest.raises(ManifestError, match=r"has fields this version of halflife does not know \(also_new, "
                                            r"from_the_future\): written by a newer `halflife export`"):
        load_manifest(copy)
    for name, edit in (("a-string", lambda m, _: m["variants"].__setitem__(0, "int8")),
                       ("a-dict", lambda m, _: m.update(variants={"int8": m["variants"][0]}))):
        malformed = _edited_copy(out, tmp_path / name, edit)  # hand edits, not a newer export's (a review)
        with pytest.raises(ManifestError, match=r"is malformed: a variant must be a JSON object, got str"):
            load_manifest(malformed)


# ---------------------------------------------------------------- CLI error paths


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return {kind: tiny_models.source(kind, tmp_path_factory) for kind in ("bert", "gpt2", "t5")}


def assert_one_line_error(rc, err, out="", code=(1,), contains=""):
    assert rc in code, err
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err  # the last thing printed, on one line
    assert contains in errors[0], errors[0]
    return errors[0]


def run_cli(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _bad_model(tmp_path, sources):
    return ["--model", str(tmp_path / "no-such-model")], "is not a Hugging Face model directory"


def _garbage_config(tmp_path, sources):
    bad = tmp_path / "garbage"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    return ["--model", str(bad)], "cannot read the model config"


def _t5(tmp_path, sources):
    return ["--model", str(sources["t5"])], "unsupported architecture 't5'"


def _longformer(tmp_path, sources):
    # Its global_attention_mask was a KeyError traceback at validation, after the whole export.
    model = tiny_models.make_tiny_longformer(tmp_path / "longformer")
    return ["--model", str(model)], \
        "unsupported architecture 'longformer': its graph takes global_attention_mask, which the server does not feed"


def _opset17(tmp_path, sources):
    return ["--model", str(sources["bert"]), "--opset", "17"], "--opset 17 is too old"


def _opset_too_new(tmp_path, sources):
    return ["--model", str(sources["bert"]), "--opset", "99"], "--opset 99 is newer than this PyTorch exports"


def _cls_for_decoder(tmp_path, sources):
    return ["--model", str(sources["gpt2"]), "--pooling", "cls"], "wrong for a causal decoder"


def _mean_for_decoder(tmp_path, sources):
    return ["--model", str(sources["gpt2"]), "--pooling", "mean"], "wrong for a causal decoder"


def _bad_pooling_choice(tmp_path, sources):
    return ["--model", str(sources["bert"]), "--pooling", "max"], "invalid choice"


def _unknown_model_type(tmp_path, sources):
    # transformers' message for it spans three lines.
    bad = tmp_path / "unknown"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    return ["--model", str(bad)], "has model type `no-such-model` but Transformers does not recognize"


def _no_tokenizer(tmp_path, sources):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(sources["bert"] / name, bare)
    return ["--model", str(bare)], f"{bare} has no tokenizer (no tokenizer.json"


def _left_truncation(tmp_path, sources):
    model = tmp_path / "left"
    shutil.copytree(sources["bert"], model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "truncation_side": "left"}))
    return ["--model", str(model)], "truncates on the left (tokenizer_config.json truncation_side)"


def _sentence_transformers_max_pooling(tmp_path, sources):
    model = tiny_models.make_sentence_transformers(tmp_path / "st", pooling=("max_tokens",))
    return ["--model", str(model)], f"Pooling module {model / '1_Pooling'} pools by max_tokens, which is not supported"


def _sentence_transformers_two_poolings(tmp_path, sources):
    model = tiny_models.make_sentence_transformers(tmp_path / "st", pooling=("cls_token", "mean_tokens"))
    return ["--model", str(model)], "pools by cls_token + mean_tokens, which is not supported"


def _sentence_transformers_cls_flag_alone(tmp_path, sources):
    # sentence-transformers' Pooling(**config) keeps mean_tokens on (CLS + mean, 2 x dim): it was exported as CLS.
    model = tiny_models.make_sentence_transformers(tmp_path / "st")
    (model / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_cls_token": True}))
    return ["--model", str(model)], "pools by cls_token + mean_tokens, which is not supported"


def _sentence_transformers_max_pooling_by_name(tmp_path, sources):
    model = tiny_models.make_sentence_transformers(tmp_path / "st")  # mean's flag on, but the name wins
    config = json.loads((model / "1_Pooling" / "config.json").read_text())
    (model / "1_Pooling" / "config.json").write_text(json.dumps({**config, "pooling_mode": "max"}))
    return ["--model", str(model)], "pools by max_tokens, which is not supported"


def _sentence_transformers_dense(tmp_path, sources):
    model = tiny_models.make_sentence_transformers(tmp_path / "st", extra_modules=("Dense",))
    return ["--model", str(model)], f"sentence-transformers Dense module {model / '2_Dense'} is not supported"


def _sentence_transformers_lower_case(tmp_path, sources):
    model = tiny_models.make_sentence_transformers(tmp_path / "st")
    (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": True}))
    return ["--model", str(model)], "lowercases its inputs before the tokenizer (sentence_bert_config.json do_lower_case)"


def _sentence_transformers_malformed_modules(tmp_path, sources):
    model = tiny_models.make_sentence_transformers(tmp_path / "st")
    (model / "modules.json").write_text(json.dumps([{"idx": 0, "path": ""}]))  # no type
    return ["--model", str(model)], "modules.json is not a list of modules with a type and a path"


def _sentence_transformers_null_modules(tmp_path, sources):
    model = tiny_models.make_sentence_transformers(tmp_path / "st", pooling=("max_tokens",))
    (model / "modules.json").write_text("null")  # not "no modules": its Pooling config would go unread
    return ["--model", str(model)], "modules.json is not a list of modules with a type and a path"


def _sentence_transformers_max_seq_length_of_text(tmp_path, sources):
    model = tiny_models.make_sentence_transformers(tmp_path / "st")
    (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": "64"}))
    return ["--model", str(model)], "sentence_bert_config.json: max_seq_length must be a positive whole number, got '64'"


def _tokenizer_config_that_is_a_list(tmp_path, sources):
    model = tmp_path / "listed"
    shutil.copytree(sources["bert"], model)
    (model / "tokenizer_config.json").write_text("[]")  # was an AttributeError
    return ["--model", str(model)], "tokenizer_config.json holds an array, not a JSON object"


def _pooling_config_that_is_a_list(tmp_path, sources):
    model = tiny_models.make_sentence_transformers(tmp_path / "st")
    (model / "1_Pooling" / "config.json").write_text("[1]")
    return ["--model", str(model)], "config.json holds an array, not a JSON object"


def _max_input_tokens_below_the_special_tokens(tmp_path, sources):
    # [CLS] and [SEP] take 2: the tokenizer cannot truncate below them, and validation crashed.
    return ["--model", str(sources["bert"]), "--max-input-tokens", "2"], \
        "--max-input-tokens 2 leaves no room for text: the tokenizer adds 2 special tokens to every input"


def _sentence_transformers_max_seq_length_below_the_special_tokens(tmp_path, sources):
    # From the model's own config it was a PyTorch traceback at the last step, validation (a review).
    model = tiny_models.make_sentence_transformers(tmp_path / "st")
    (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 1}))
    return ["--model", str(model)], ("the model's max input tokens (its max_seq_length or model_max_length) 1 leaves "
                                     "no room for text: the tokenizer adds 2 special tokens to every input; pass "
                                     "--max-input-tokens")


def _sentence_transformers_default_prompt(tmp_path, sources):
    model = tiny_models.make_sentence_transformers(tmp_path / "st")
    (model / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: "}, "default_prompt_name": "query"}))
    return ["--model", str(model)], "prepends its 'query' prompt to every input"


def _vocabulary_without_unknown_token(tmp_path, sources):
    model = tmp_path / "no-unk"
    shutil.copytree(sources["bert"], model)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    del tokenizer["model"]["vocab"]["[UNK]"]  # was a traceback from the validation's PyTorch reference
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    return ["--model", str(model)], "tokenizer cannot encode"


def _tokens_past_the_embeddings(tmp_path, sources):
    from transformers import AutoTokenizer

    model = tmp_path / "added"
    shutil.copytree(sources["bert"], model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens(["[USER]", "[ITEM]"])  # without resizing the model's embeddings: ids 169 and 170
    tokenizer.save_pretrained(model)
    return ["--model", str(model)], (f"{model}'s tokenizer has 2 token(s) past the model's 169 embeddings (config.json "
                                     "vocab_size): '[USER]' (id 169), '[ITEM]' (id 170); is it the model's own tokenizer?")


def _garbled_tokenizer(tmp_path, sources):
    model = tmp_path / "garbled"
    shutil.copytree(sources["bert"], model)
    (model / "tokenizer.json").write_text("not json")  # a traceback before the check meant for it (a review)
    return ["--model", str(model)], f"{model} has no usable tokenizer"


ERROR_CASES = {
    "bad-model-path": (_bad_model, (1,)),
    "garbled-tokenizer": (_garbled_tokenizer, (1,)),
    "garbage-config": (_garbage_config, (1,)),
    "unsupported-t5": (_t5, (1,)),
    "unfed-graph-input": (_longformer, (1,)),
    "opset-17": (_opset17, (1,)),
    "opset-99": (_opset_too_new, (1,)),
    "cls-for-decoder": (_cls_for_decoder, (1,)),
    "mean-for-decoder": (_mean_for_decoder, (1,)),
    "pooling-not-a-choice": (_bad_pooling_choice, (2,)),
    "unknown-model-type": (_unknown_model_type, (1,)),
    "no-tokenizer": (_no_tokenizer, (1,)),
    "left-truncation": (_left_truncation, (1,)),
    "st-max-pooling": (_sentence_transformers_max_pooling, (1,)),
    "st-two-poolings": (_sentence_transformers_two_poolings, (1,)),
    "st-cls-flag-alone": (_sentence_transformers_cls_flag_alone, (1,)),
    "st-max-pooling-by-name": (_sentence_transformers_max_pooling_by_name, (1,)),
    "st-dense": (_sentence_transformers_dense, (1,)),
    "st-lower-case": (_sentence_transformers_lower_case, (1,)),
    "st-malformed-modules": (_sentence_transformers_malformed_modules, (1,)),
    "st-null-modules": (_sentence_transformers_null_modules, (1,)),
    "st-max-seq-length-of-text": (_sentence_transformers_max_seq_length_of_text, (1,)),
    "tokenizer-config-list": (_tokenizer_config_that_is_a_list, (1,)),
    "pooling-config-list": (_pooling_config_that_is_a_list, (1,)),
    "max-tokens-below-specials": (_max_input_tokens_below_the_special_tokens, (1,)),
    "st-max-seq-length-below-specials": (_sentence_transformers_max_seq_length_below_the_special_tokens, (1,)),
    "st-default-prompt": (_sentence_transformers_default_prompt, (1,)),
    "no-unk-token": (_vocabulary_without_unknown_token, (1,)),
    "tokens-past-the-embeddings": (_tokens_past_the_embeddings, (1,)),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_cli_errors(case, tmp_path, sources, capsys):
    make, code = ERROR_CASES[case]
    args, message = make(tmp_path, sources)
    output = tmp_path / "out"
    rc, out, err = run_cli(["export", *args, "--output", str(output)], capsys)
    assert_one_line_error(rc, err, out, code, message)
    assert not output.exists()


@pytest.mark.parametrize("case", ["no-unk-token", "tokens-past-the-embeddings"])
def test_a_tokenizer_the_model_cannot_be_served_with_is_refused_before_any_work(case, tmp_path, sources, capsys):
    """Both were found by steps after the ONNX export: the first at writing
    tokenizer.json, the second as a PyTorch IndexError traceback at validation
    (a text holding such a token, served, failed its whole batch)."""
    make, _ = ERROR_CASES[case]
    args, message = make(tmp_path, sources)
    rc, out, err = run_cli(["export", *args, "--output", str(tmp_path / "out")], capsys)
    assert_one_line_error(rc, err, out, contains=message)
    assert "[1/5]" not in err


def test_cli_output_under_a_file(tmp_path, sources, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    output = blocker / "model"
    rc, out, err = run_cli(["export", "--model", str(sources["bert"]), "--output", str(output)], capsys)
    assert_one_line_error(rc, err, out, contains=f"cannot write to {blocker}")
    assert blocker.read_text() == "not a directory"


def test_cli_output_under_proc(tmp_path, sources, capsys):
    output = Path("/proc/halflife-test-no-such-dir/model")
    rc, out, err = run_cli(["export", "--model", str(sources["bert"]), "--output", str(output)], capsys)
    assert_one_line_error(rc, err, out, contains="cannot write to /proc/halflife-test-no-such-dir")


def test_cli_output_is_a_file(tmp_path, sources, capsys):
    output = tmp_path / "model"
    output.write_text("precious")
    rc, out, err = run_cli(["export", "--model", str(sources["bert"]), "--output", str(output), "--force"], capsys)
    assert_one_line_error(rc, err, out, contains="exists and is not a directory")
    assert output.read_text() == "precious"


def test_tokenizer_config_overrides_of_tokenizer_json_are_served(tmp_path, sources):
    """BertTokenizerFast applies tokenizer_config.json's do_lower_case over tokenizer.json's
    normalizer; copying tokenizer.json served other tokens than validation's reference (refused)."""
    from halflife_export.exporter import ExportOptions, export_model

    model = tmp_path / "cased"
    shutil.copytree(sources["bert"], model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    manifest = export_model(ExportOptions(output=tmp_path / "out", model=str(model), progress=lambda line: None))
    assert all(v.validation.passed for v in manifest.variants if v.precision != "int8")


def test_force_replaces_only_a_model_directory(tmp_path, sources, capsys, monkeypatch):
    output = tmp_path / "notes"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    rc, out, err = run_cli(["export", "--model", str(sources["bert"]), "--output", str(output), "--force"], capsys)
    assert_one_line_error(rc, err, out, contains="is not a model directory (no Halflife manifest.json)")
    assert (output / "notes.txt").read_text() == "mine"
    (output / "manifest.json").write_text(json.dumps({"name": "My PWA", "start_url": "/"}))  # a web app's
    rc, out, err = run_cli(["export", "--model", str(sources["bert"]), "--output", str(output), "--force"], capsys)
    assert_one_line_error(rc, err, out, contains="is not a model directory (no Halflife manifest.json)")
    assert (output / "notes.txt").read_text() == "mine"
    (output / "manifest.json").write_text("{}")  # even a model directory cannot be swapped out from under us
    monkeypatch.chdir(output)
    rc, out, err = run_cli(["export", "--model", str(sources["bert"]), "--output", ".", "--force"], capsys)
    assert_one_line_error(rc, err, out, contains="holds the working directory")
    assert sorted(p.name for p in output.iterdir()) == ["manifest.json", "notes.txt"]


@pytest.mark.parametrize("output", [".", ".."])
def test_an_empty_working_directory_is_no_output(tmp_path, sources, capsys, monkeypatch, output):
    """An empty working directory (or the one above it) passed every check
    and failed the rename that publishes the model after the whole export
    (an audit); and `--output ""` (the working directory) is a usage error."""
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    rc, out, err = run_cli(["export", "--model", str(sources["bert"]), "--output", output], capsys)
    assert_one_line_error(rc, err, out, contains="holds the working directory")
    assert list(here.iterdir()) == []
    rc, out, err = run_cli(["export", "--model", str(sources["bert"]), "--output", ""], capsys)
    assert rc == 2 and "--output: must not be empty" in err, err


def test_cli_refuses_an_output_that_is_a_symbolic_link(tmp_path, sources, capsys, tmp_path_factory):
    _, good, _ = tiny_models.exported("bert", tmp_path_factory)
    model = tmp_path / "model"
    shutil.copytree(good, model)
    link = tmp_path / "link"
    link.symlink_to(model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    rc, out, err = run_cli(["export", "--model", str(sources["bert"]), "--output", str(link), "--force"], capsys)
    assert_one_line_error(rc, err, out, contains=f"--output {link} is a symbolic link; give the directory itself")
    assert link.is_symlink() and link.readlink() == model
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "model"]


def test_cli_non_empty_output_needs_force(tmp_path, sources, capsys):
    output = tmp_path / "model"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    rc, out, err = run_cli(["export", "--model", str(sources["bert"]), "--output", str(output)], capsys)
    assert_one_line_error(rc, err, out, contains="is not empty; pass --force")
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert (output / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "case,code,message",
    [("opset-17", 1, "--opset 17 is too old"), ("unsupported-t5", 1, "unsupported architecture 't5'"),
     ("pooling-not-a-choice", 2, "invalid choice")],
)  # fmt: skip
def test_cli_errors_in_a_real_process(case, code, message, tmp_path, sources):
    """The same errors through `python -m halflife.cli`, warnings and all."""
    make, _ = ERROR_CASES[case]
    args, _ = make(tmp_path, sources)
    output = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    result = subprocess.run(
        [sys.executable, "-m", "halflife.cli", "export", *args, "--output", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(result.returncode, result.stderr, result.stdout, (code,), message)
    assert not output.exists()


def test_a_real_process_prints_progress_not_the_libraries_noise(tmp_path, sources):
    """optimum's advice to install accelerate and onnxruntime's ERROR that a
    machine without a GPU skips its pre-pass for the fp16 graph read as a
    failing export between the progress lines (an onboarding review)."""
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "halflife.cli", "export", "--model", str(sources["bert"]), "--output", str(output)],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    printed = result.stdout + result.stderr
    assert "accelerate" not in printed and "no gpu" not in printed, printed
    assert (output / "manifest.json").exists()


@pytest.mark.parametrize("value", ["-5", "1000"])
def test_cli_rejects_impossible_max_input_tokens(value, tmp_path, sources, capsys):
    output = tmp_path / "out"
    argv = ["export", "--model", str(sources["bert"]), "--output", str(output), f"--max-input-tokens={value}"]
    rc, out, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, out, (1, 2), "--max-input-tokens")
    assert not output.exists()


# ---------------------------------------------------------------- validation failure


@pytest.mark.parametrize("existing", [False, True], ids=["fresh-output", "force-over-a-good-export"])
def test_validation_failure_refuses_and_writes_nothing(existing, tmp_path, sources, capsys, monkeypatch, tmp_path_factory):
    """The ONNX variants are compared with a PyTorch model whose weights differ
    (another seed): exactly what validation exists to catch."""
    import halflife_export.exporter as exporter

    # Exported before the reference is swapped (run alone, this test's own export of it failed validation).
    _, good, _ = tiny_models.exported("bert", tmp_path_factory)
    impostor = tiny_models.make_tiny_bert(tmp_path / "impostor", seed=tiny_models.SEED + 1)
    real_reference = exporter.reference_embeddings
    calls = []

    def reference_from_other_weights(source_path, *args):
        calls.append(source_path)
        return real_reference(impostor, *args)

    monkeypatch.setattr(exporter, "reference_embeddings", reference_from_other_weights)

    parent = tmp_path / "models"
    output = parent / "model"
    argv = ["export", "--model", str(sources["bert"]), "--output", str(output)]
    if existing:
        shutil.copytree(good, output)
        argv.append("--force")
        before = {p.name: p.read_bytes() for p in output.iterdir()}
    rc, out, err = run_cli(argv, capsys)

    assert calls == [sources["bert"]]
    line = assert_one_line_error(rc, err, out, contains="validation failed for")
    assert "fp32-o2" in line and "fp16" in line and "nothing written" in line
    assert "FAILED" in err  # the per-variant table was shown before refusing
    if existing:
        assert {p.name: p.read_bytes() for p in output.iterdir()} == before
        assert sorted(p.name for p in parent.iterdir()) == ["model"]
    else:
        assert not parent.exists()  # no staging directory left behind, nor the parent it made for --output


def test_validation_failing_on_weights_the_checkpoint_lacks_says_so(tmp_path, sources, capsys):
    """Saved under a wrapper's prefix, no weight loads: transformers initialises each load at random (its warning
    silenced), and the export failed as if its numerics were off."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "prefixed"
    shutil.copytree(sources["bert"], model)
    weights = load_file(model / "model.safetensors")
    save_file({f"encoder.{name}": value for name, value in weights.items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    rc, out, err = run_cli(["export", "--model", str(model), "--output", str(tmp_path / "out")], capsys)
    line = assert_one_line_error(rc, err, out, contains="validation failed for fp32-o2")
    assert line.endswith(f"nothing written. The checkpoint in {model} lacks 37 of the model's weights "
                         "(embeddings.LayerNorm.bias, embeddings.LayerNorm.weight, embeddings.position_embeddings.weight, "
                         "...), which transformers initialises at random on each load: were they saved under other "
                         "names (a wrapper's prefix)?")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- publishing


@pytest.mark.parametrize("put_back", [True, False], ids=["old-model-put-back", "output-left-absent"])
def test_an_interrupted_swap_keeps_the_old_model_beside_the_output(put_back, tmp_path, sources, monkeypatch,
                                                                   tmp_path_factory):
    import halflife_export.exporter as exporter
    from halflife_export.exporter import ExportOptions, export_model

    _, good, _ = tiny_models.exported("bert", tmp_path_factory)
    output = tmp_path / "model"
    shutil.copytree(good, output)
    old = {p.name: p.read_bytes() for p in output.iterdir()}
    real_replace = os.replace

    class Interrupted(Exception):
        pass

    def interrupted_after_moving_the_old_model_aside(src, dst):
        real_replace(src, dst)
        if Path(dst).name == ".old-model":
            raise Interrupted

    monkeypatch.setattr(exporter.os, "replace", interrupted_after_moving_the_old_model_aside)
    options = ExportOptions(output=output, model=str(sources["bert"]), model_id="new", force=True,
                            progress=lambda line: None)
    with pytest.raises(Interrupted):
        export_model(options)
    retired = tmp_path / ".old-model"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".old-model"]
    assert {p.name: p.read_bytes() for p in retired.iterdir()} == old
    # serve, pointed at the output, says where the model is (it said only "not an exported model directory").
    with pytest.raises(ManifestError, match=r"left the previous model whole at .*\.old-model"):
        load_manifest(output)

    # The next export replaces the old model (put back, or not), and the stale copy goes with it (it was
    # left, ~200 MB for the bundled model, where the output was absent).
    monkeypatch.undo()
    if put_back:
        shutil.copytree(retired, output)
    export_model(options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert load_manifest(output).model_id == "new"


def test_sigterm_during_an_export_leaves_no_work_directory(tmp_path, sources):
    """As Ctrl-C: SIGTERM (timeout, a CI cancel, docker stop) left the work
    directory, raw and half-built ONNX files, beside the output for good;
    and the parent it made for --output stayed (an export into a new
    models/ directory)."""
    import signal

    output = tmp_path / "models" / "model"
    process = subprocess.Popen([sys.executable, "-m", "halflife.cli", "export", "--model", str(sources["bert"]),
                                "--output", str(output)], cwd=REPO, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        for line in process.stderr:  # bounded: the export ends, and its stderr with it
            if line.startswith("[2/5]"):  # the work directory holds the raw ONNX export by now
                assert [p.name for p in output.parent.iterdir() if p.name.startswith(".model.")], "no work directory"
                process.send_signal(signal.SIGTERM)
                break
        assert process.wait(120) == 128 + signal.SIGTERM
    finally:
        process.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# `halflife export`, killed outright (as the OOM killer kills: no cleanup runs) as it loads its draft to validate it.
KILLED_DURING_VALIDATION = """
import os, signal, sys
import halflife_export.exporter as exporter
from halflife import cli

class KilledAtLoad:
    @staticmethod
    def load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

exporter.EmbeddingEngine = KilledAtLoad
sys.exit(cli.main(sys.argv[1:]))
"""


def _killed_during_validation(source: Path, output: Path) -> Path:
    """The work directory an export into `output` left when killed during validation, its draft manifest in it."""
    import signal

    result = subprocess.run([sys.executable, "-c", KILLED_DURING_VALIDATION, "export", "--model", str(source),
                             "--output", str(output)], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    (work,) = [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert json.loads((work / "model" / "manifest.json").read_text())["default_variants"] == {}  # the draft
    return work


def test_the_draft_a_killed_export_left_is_no_model(tmp_path, sources):
    """Named with --variant (it has no defaults), the draft was served, its variants validated by nothing (a review)."""
    from halflife.embedding.engine import served_identity

    draft = _killed_during_validation(sources["bert"], tmp_path / "model") / "model"
    message = (f"^{re.escape(str(draft / 'manifest.json'))} is the draft of an unfinished `halflife export` "
               r"\(killed during validation, or still running\), not a model: .* can be deleted")
    for variant in ("fp32-o2", "fp16", "int8"):
        with pytest.raises(ManifestError, match=message):
            served_identity(draft, variant=variant)  # what serve checks before it binds its port
        with pytest.raises(ManifestError, match=message):
            EmbeddingEngine.load(draft, variant=variant, provider="cpu")
    served = subprocess.run([sys.executable, "-m", "halflife.cli", "serve", "--port", "47151", "--model-dir",
                             str(draft), "--variant", "fp32-o2", "--data-dir", str(tmp_path / "data")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert served.returncode == 1 and "Traceback" not in served.stderr, served.stderr
    assert served.stderr.strip().splitlines()[-1].startswith(f"halflife serve: error: {draft / 'manifest.json'} is "
                                                             "the draft of an unfinished `halflife export`")
    assert not (tmp_path / "data").exists()


def test_the_next_export_removes_a_killed_exports_work_directory_and_not_a_live_ones(tmp_path, sources):
    """A killed export's work directory (about the model's size, and its draft) was left for good, whatever came
    next. Each export holds a lock in its own, which the next one into the same output takes to remove one."""
    from halflife.locks import hold_lock
    from halflife_export.exporter import ExportOptions, export_model

    output = tmp_path / "model"
    killed = _killed_during_validation(sources["bert"], output)
    live = tmp_path / ".model.running"
    another_output = tmp_path / ".model.v2.abandoned"  # a killed export into model.v2, not this output's to judge
    shutil.copytree(killed, another_output)
    live.mkdir()
    planted, victim = tmp_path / ".model.planted1", tmp_path / "victim.txt"  # links, as in a shared parent
    victim.write_text("not the export's")
    planted.mkdir()
    (planted / "export.lock").symlink_to(victim)
    (tmp_path / ".model.linked12").symlink_to(planted, target_is_directory=True)
    lines = []
    with hold_lock(live / "export.lock", "pid 1, halflife export into model"):  # as a live export holds it
        export_model(ExportOptions(output=output, model=str(sources["bert"]), progress=lines.append))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [another_output.name, live.name, "model", planted.name, ".model.linked12", victim.name])
    assert victim.read_text() == "not the export's"
    assert f"note: removed {killed}, left by an export into {output} that was killed" in lines
    assert not load_manifest(output).is_draft


def test_a_work_directory_loses_its_lock_last(tmp_path, monkeypatch):
    """Killed while removing it after the lock went, an export left the rest
    unlocked, which no later export removes (a review)."""
    import halflife_export.exporter as exporter

    removed, rmtree = [], shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: removed.append(
        (Path(path).name, (exporter_work / exporter.WORK_DIR_LOCK).exists())) or rmtree(path, *a, **k))
    with exporter._work_dir(tmp_path / "model") as exporter_work:
        (exporter_work / "raw").mkdir()
        (exporter_work / "raw" / "model.onnx").write_text("graph")
        (exporter_work / "model.onnx").write_text("graph")
    assert removed == [("raw", True), (exporter_work.name, True)] and not exporter_work.exists()


def test_the_pad_id_is_one_of_the_vocabulary_or_0():
    """An old LLaMA conversion's pad_token_id -1 failed the export after all its work (a review)."""
    from types import SimpleNamespace

    from halflife_export.exporter import _pad_token_id

    assert [_pad_token_id(SimpleNamespace(pad_token_id=pad, vocab_size=100)) for pad in (5, -1, 100, None, "1")] == [
        5, 0, 0, 0, 0]
    assert _pad_token_id(SimpleNamespace(pad_token_id=7)) == 7


def test_publishing_refuses_an_output_written_meanwhile_and_keeps_a_model_it_could_not_clear(tmp_path, monkeypatch):
    """Two exports into one new output both said "wrote", the later one
    replacing the other's; and once swapped in, a model whose old files
    could not be removed was reported as a failed export, which every
    later export then failed on (a review)."""
    from halflife_export.exporter import ExportError, _check_output, _publish

    def staged(name: str) -> Path:
        staging = tmp_path / name
        staging.mkdir()
        (staging / "manifest.json").write_text(json.dumps({"format_version": 1, "variants": [], "name": name}))
        return staging

    def published_in(directory: Path) -> str:
        return json.loads((directory / "manifest.json").read_text())["name"]

    def published() -> str:
        return published_in(output)

    output = tmp_path / "model"
    _check_output(output, force=False)  # absent: fine, then another export publishes first
    assert _publish(staged("first"), output, force=False) is None
    with pytest.raises(ExportError, match="was written meanwhile"):
        _publish(staged("second"), output, force=False)
    assert published() == "first"
    theirs = tmp_path / "theirs"  # someone's files, written there during an export with --force
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not a model directory"):
        _publish(staged("fourth"), theirs, force=True)
    assert (theirs / "notes.txt").read_text() == "mine"

    rmtree = shutil.rmtree

    def stuck(path, *args, **kwargs):
        if Path(path).name == ".old-model":
            raise PermissionError(1, "Operation not permitted")
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", stuck)
    note = _publish(staged("third"), output, force=True)
    assert published() == "third"
    assert note == f"warning: the replaced model stays in {tmp_path / '.old-model'}: it could not be removed " \
                   "(Operation not permitted)"
    with pytest.raises(ExportError, match=r"\.old-model, a model an earlier export replaced, cannot be removed"):
        _check_output(output, force=True)  # before any work, not after it
    with pytest.raises(ExportError, match="is not empty; pass --force"):  # refused: nothing removed
        _check_output(output, force=False)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert (tmp_path / ".old-model").is_dir()
    _check_output(output, force=True)
    assert not (tmp_path / ".old-model").exists()
    # Interrupted between the renames: the old model is the only one, kept until the new one is in (it was
    # removed before the work, a review of the change).
    output.rename(tmp_path / ".old-model")
    _check_output(output, force=False)
    assert published_in(tmp_path / ".old-model") == "third"
    assert _publish(staged("fifth"), output, force=False) is None
    assert published() == "fifth" and not (tmp_path / ".old-model").exists()
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == output)
    with pytest.raises(ExportError, match="is a mount point; give a directory inside it"):
        _check_output(output, force=True)


def test_a_bind_mount_of_the_same_file_system_is_a_mount_point_too(tmp_path, monkeypatch):
    """os.path.ismount tells a mount point by its device: a directory bound onto another of the same file system
    passed, and the export failed at its last step ("Device or resource busy")."""
    import halflife_export.exporter as exporter
    from halflife_export.exporter import ExportError, _check_output

    output = tmp_path / "a volume"
    output.mkdir()
    mountinfo, escaped = tmp_path / "mountinfo", str(output).replace(" ", "\\040")  # as the kernel writes it
    mountinfo.write_text("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
                         f"612 27 254:0 /srv/models {escaped} rw - ext4 /dev/vda rw\n")
    assert not os.path.ismount(output)
    monkeypatch.setattr(exporter, "MOUNTINFO", mountinfo)
    with pytest.raises(ExportError, match="is a mount point; give a directory inside it"):
        _check_output(output, force=False)
    _check_output(output / "model", force=False)  # inside it


@pytest.mark.skipif(not shutil.which("unshare") or os.geteuid() != 0, reason="binds a directory: needs root")
def test_a_real_bind_mount_is_refused_before_any_work(tmp_path, sources):
    volume = tmp_path / "volume"
    volume.mkdir()
    export = [sys.executable, "-m", "halflife.cli", "export", "--model", str(sources["bert"]), "--output", str(volume)]
    result = subprocess.run(["unshare", "-m", "sh", "-c", f'mount --bind "$0" "$0" && exec "$@"', volume, *export],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if "mount:" in result.stderr or "unshare:" in result.stderr:
        pytest.skip(f"cannot bind a directory here: {result.stderr.strip()}")
    assert result.returncode == 1
    assert result.stderr.strip() == f"halflife export: error: --output {volume} is a mount point; give a directory inside it"


def test_a_full_disk_during_an_export_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import halflife_export.exporter as exporter

    def full(options):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".out.abc" / "model.onnx"))

    monkeypatch.setattr(exporter, "export_model", full)
    rc, out, err = run_cli(["export", "--output", str(tmp_path / "out")], capsys)
    assert_one_line_error(rc, err, out, (1,), "No space left on device")


def test_a_work_directory_whose_lock_is_a_fifo_is_left_alone_without_waiting(tmp_path):
    """Reading such a lock to see whether it named a holder hung the export for good (a review)."""
    import threading

    from halflife_export.exporter import _remove_abandoned_work_dirs

    work = tmp_path / ".model.fifo1234"
    work.mkdir()
    os.mkfifo(work / "export.lock")
    removed = []
    probe = threading.Thread(target=lambda: removed.append(_remove_abandoned_work_dirs(tmp_path / "model")),
                             daemon=True)
    probe.start()
    probe.join(10)
    assert removed == [[]] and work.is_dir()


# ---------------------------------------------------------------- sentence-transformers models


def test_validation_compares_an_input_past_the_models_limit_truncated_as_served(tmp_path, sources, monkeypatch,
                                                                               caplog):
    """The fixed sentences stop near 212 tokens: truncation, and positions
    past that, were never compared with PyTorch (an export review). Loading
    its own draft to validate it, every export also warned that each variant
    'fell short of its export validation (min cosine nan)'."""
    import halflife_export.exporter as exporter
    from transformers import AutoTokenizer

    compared = []
    reference = exporter.reference_embeddings

    def spy(path, sentences, pooling, max_tokens, input_names):
        compared.append((list(sentences), max_tokens))
        return reference(path, sentences, pooling, max_tokens, input_names)

    monkeypatch.setattr(exporter, "reference_embeddings", spy)
    with caplog.at_level("WARNING", logger="halflife.embedding.engine"):
        manifest = exporter.export_model(exporter.ExportOptions(output=tmp_path / "out", model=str(sources["bert"]),
                                                                progress=lambda line: None))
    assert not [r.getMessage() for r in caplog.records if "fell short" in r.getMessage()]
    [(sentences, max_tokens)] = compared
    tokenizer = AutoTokenizer.from_pretrained(sources["bert"])
    assert max_tokens == manifest.max_input_tokens
    assert max(len(tokenizer(s)["input_ids"]) for s in sentences) > max_tokens
    assert {v.validation.sentences for v in manifest.variants} == {len(sentences)}
    assert len(exporter.past_the_limit(10**6).split()) == exporter.LONGEST_VALIDATED_TOKENS + 32  # long contexts


@pytest.mark.parametrize("normalized", [True, False])
def test_a_sentence_transformers_model_without_normalize_is_exported_with_a_note(tmp_path, normalized):
    """A dot-product model (no Normalize module) was normalised silently (an
    export review): it serves, validated as served, and the export says so."""
    from halflife_export.exporter import ExportOptions, export_model

    src = tiny_models.make_sentence_transformers(tmp_path / "st")
    if not normalized:
        modules = [m for m in json.loads((src / "modules.json").read_text()) if not m["type"].endswith("Normalize")]
        (src / "modules.json").write_text(json.dumps(modules))
    lines: list[str] = []
    manifest = export_model(ExportOptions(output=tmp_path / "out", model=str(src), progress=lines.append))
    noted = [line for line in lines if "has no sentence-transformers Normalize module" in line]
    assert len(noted) == (not normalized) and manifest.normalize


def test_max_input_tokens_follow_sentence_transformers_max_seq_length_up_to_the_positions(tmp_path):
    """sentence-transformers truncates at max_seq_length whatever the
    tokenizer's model_max_length says: taking the smaller of the two
    refused (or cut) inputs the model embeds whole (an export review)."""
    from halflife_export.exporter import ExportError, ExportOptions, _max_input_tokens, _resolve_source

    src = tiny_models.make_sentence_transformers(tmp_path / "st")
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 16}))

    def limit(st_config: dict | None) -> int:
        if st_config is None:
            (src / "sentence_bert_config.json").unlink(missing_ok=True)
        else:
            (src / "sentence_bert_config.json").write_text(json.dumps(st_config))
        return _max_input_tokens(_resolve_source(ExportOptions(output=tmp_path / "out", model=str(src))))

    assert limit({"max_seq_length": 48}) == 48
    assert limit({"max_seq_length": 10_000}) == tiny_models.MAX_POSITIONS  # never past the position table
    assert limit(None) == 16  # no sentence-transformers config: the tokenizer's
    # None given: sentence-transformers takes the tokenizer's limit (and the positions'); it was refused.
    assert limit({"do_lower_case": False}) == limit({"max_seq_length": None}) == 16
    for wrong in (0, -1, "64", 1.5, True):
        with pytest.raises(ExportError, match=f"max_seq_length must be a positive whole number, got {wrong!r}"):
            limit({"max_seq_length": wrong})


@pytest.mark.parametrize("st_config", [{"do_lower_case": False}, {"max_seq_length": None}], ids=["absent", "null"])
def test_no_max_seq_length_exports_at_the_tokenizers_limit(st_config, tmp_path, capsys):
    """sentence-transformers then truncates at min(positions, the tokenizer's
    model_max_length); the export refused such a model (a review)."""
    model = tiny_models.make_sentence_transformers(tmp_path / "st")
    (model / "sentence_bert_config.json").write_text(json.dumps(st_config))
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 48}))
    rc, out, err = run_cli(["export", "--model", str(model), "--output", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    assert load_manifest(tmp_path / "out").max_input_tokens == 48


@pytest.mark.parametrize("pooling, written", [("auto", "flags"), ("mean", "flags"), ("auto", "name")])
def test_sentence_transformers_pooling_module(pooling, written, tmp_path):
    """--pooling auto serves what the Pooling module says (CLS here: its flag
    on and mean's off, or its name, `pooling_mode`, which was refused as no
    mode), as sentence-transformers computes it (Transformer, CLS pooling,
    Normalize: the reference's CLS; sentence-transformers is a bench
    dependency, not a test one); an explicit --pooling wins, with a warning
    (validation cannot tell its vectors from the model's apart)."""
    from halflife_export.exporter import ExportOptions, export_model

    src = tiny_models.make_sentence_transformers(tmp_path / "st-cls", pooling=("cls_token",))
    if written == "name":
        (src / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                   "pooling_mode": "cls"}))
    out = tmp_path / "out"
    lines: list[str] = []
    manifest = export_model(ExportOptions(output=out, model=str(src), pooling=pooling, progress=lines.append))
    overridden = [line for line in lines if "overrides the model's sentence-transformers Pooling module (cls)" in line]
    assert len(overridden) == (pooling != "auto")
    served_pooling = "cls" if pooling == "auto" else pooling
    assert manifest.pooling == served_pooling
    assert manifest.max_input_tokens == 32  # the model's max_seq_length
    engine = EmbeddingEngine.load(out, variant="fp32-o2", provider="cpu", intra_op_threads=1)
    served = engine.forward(engine.tokenize(SENTENCES, truncate=True).ids)
    expected = torch_reference(src, SENTENCES, served_pooling, 32)
    assert cosines(served, expected).min() >= 0.9999
    if pooling == "auto":  # and not what mean pooling gives
        assert cosines(served, torch_reference(src, SENTENCES, "mean", 32)).min() < 0.99
