"""Tiny random Hugging Face models, built locally from a `transformers` config.

Nothing is downloaded: weights are random (seeded), tokenizers are built with
the `tokenizers` library from a small vocabulary or trained on a few sentences.
Each builder writes a complete model directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, ...) that
`halflife export --model DIR` accepts, and returns the directory.

`exported(kind, tmp_path_factory)` exports one of them once per test session
(cached across test modules) for tests that need a served model.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 1234
MAX_POSITIONS = 64

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
COMMON_WORDS = [
    "the", "a", "an", "and", "or", "but", "is", "are", "was", "in", "on", "of", "to", "for",
    "with", "while", "about", "man", "woman", "playing", "guitar", "stage", "crowd", "cheers",
    "phone", "battery", "camera", "light", "movies", "science", "fiction", "time", "travel",
    "long", "inputs", "test", "padding", "attention", "masks", "positions", "across", "many",
    "tokens", "cheap", "flights", "report", "revenue", "costs", "shoes", "jacket", "week",
    "hello", "world", "cat", "dog", "sat", "mat", "quick", "brown", "fox", "lazy",
]  # fmt: skip

# Sentences the byte-level BPE tokenizers are trained on.
BPE_CORPUS = [
    "A man is playing a guitar on stage while the crowd cheers.",
    "The new phone's battery lasts two days, but the camera is disappointing in low light.",
    "Science fiction movies about time travel and parallel universes.",
    "Long inputs test padding, attention masks and positions across many tokens.",
    "cheap flights to lisbon, the quick brown fox jumps over the lazy dog.",
    "The quarterly report shows revenue grew 12% while costs fell.",
    "Ceci est une phrase en français. Der schnelle braune Fuchs springt.",
]


def wordpiece_vocab() -> dict[str, int]:
    """[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then characters, ##characters and words."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = SPECIAL_TOKENS + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + COMMON_WORDS
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def wordpiece_tokenizer():
    """A BERT-style (lowercasing, [CLS] ... [SEP]) WordPiece `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = wordpiece_vocab()
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _bert_fast_tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(
        tokenizer_object=wordpiece_tokenizer(),
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        do_lower_case=True,
    )


def byte_level_bpe_tokenizer(special_tokens: list[str], vocab_size: int = 400):
    """A byte-level BPE `tokenizers.Tokenizer` trained on BPE_CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(BPE_CORPUS, trainer=trainer)
    return tokenizer


def _save(model, tokenizer, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    assert (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()
    assert (path / "model.safetensors").is_file()
    return path


def make_tiny_bert(path: str | Path, seed: int = SEED, positions: int = MAX_POSITIONS) -> Path:
    """A random BERT encoder (hidden 32, 2 layers, 2 heads, 64 positions unless `positions`) with a WordPiece
    tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = _bert_fast_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=positions,
        type_vocab_size=2,
        pad_token_id=0,
        architectures=["BertModel"],
    )
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    return _save(model, tokenizer, Path(path))


def make_tiny_distilbert(path: str | Path, seed: int = SEED) -> Path:
    """A random DistilBERT encoder (dim 32, 2 layers, 2 heads, 64 positions); no token_type_ids."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    tokenizer = _bert_fast_tokenizer()
    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
        architectures=["DistilBertModel"],
    )
    torch.manual_seed(seed)
    model = DistilBertModel(config).eval()
    return _save(model, tokenizer, Path(path))


def _roberta_fast_tokenizer():
    """A byte-level BPE tokenizer with RoBERTa's special tokens (<s> ... </s>); <pad> is id 1."""
    from tokenizers import processors
    from transformers import RobertaTokenizerFast

    backend = byte_level_bpe_tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    backend.post_processor = processors.RobertaProcessing(
        sep=("</s>", backend.token_to_id("</s>")), cls=("<s>", backend.token_to_id("<s>")), trim_offsets=True
    )
    tokenizer = RobertaTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    assert tokenizer.pad_token_id == 1
    return tokenizer


def _tiny_after_padding(config_class, model_class, path: str | Path, seed: int, **extra) -> Path:
    """A random encoder (hidden 32, 2 layers, 2 heads) with RoBERTa's byte-level
    BPE tokenizer, whose positions start after padding_idx (1), as RoBERTa's
    and MPNet's do: 66 position embeddings allow 64 tokens; the pad token is
    id 1, not 0."""
    import torch

    tokenizer = _roberta_fast_tokenizer()
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS + 2,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        architectures=[model_class.__name__],
        **extra,
    )
    torch.manual_seed(seed)
    return _save(model_class(config).eval(), tokenizer, Path(path))


def make_tiny_roberta(path: str | Path, seed: int = SEED) -> Path:
    """A random RoBERTa encoder (see `_tiny_after_padding`)."""
    from transformers import RobertaConfig, RobertaModel

    return _tiny_after_padding(RobertaConfig, RobertaModel, path, seed, type_vocab_size=1)


def make_tiny_mpnet(path: str | Path, seed: int = SEED) -> Path:
    """A random MPNet encoder with RoBERTa's tokenizer, as mpnet-base has (see `_tiny_after_padding`)."""
    from transformers import MPNetConfig, MPNetModel

    return _tiny_after_padding(MPNetConfig, MPNetModel, path, seed)


def make_tiny_data2vec_text(path: str | Path, seed: int = SEED) -> Path:
    """A random data2vec-text encoder, RoBERTa's kin (see `_tiny_after_padding`)."""
    from transformers import Data2VecTextConfig, Data2VecTextModel

    return _tiny_after_padding(Data2VecTextConfig, Data2VecTextModel, path, seed)


def make_tiny_longformer(path: str | Path, seed: int = SEED) -> Path:
    """A random Longformer encoder (window 8; see `_tiny_after_padding`), whose
    graph takes an input the server does not feed (global_attention_mask)."""
    from transformers import LongformerConfig, LongformerModel

    return _tiny_after_padding(LongformerConfig, LongformerModel, path, seed, attention_window=8)


def make_tiny_qwen2(path: str | Path, seed: int = SEED) -> Path:
    """A random Qwen2 decoder (hidden 32, 2 layers, RMSNorm, 64 positions) whose
    tokenizer appends its end-of-text token, as gte-Qwen2's does: a model type
    without onnxruntime's O2 fusions, so fp16 takes the plain conversion."""
    import torch
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    backend = byte_level_bpe_tokenizer(["<|endoftext|>"])
    eot = backend.token_to_id("<|endoftext|>")
    backend.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                           special_tokens=[("<|endoftext|>", eot)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        eos_token_id=eot,
        pad_token_id=eot,
        architectures=["Qwen2Model"],
    )
    torch.manual_seed(seed)
    return _save(Qwen2Model(config).eval(), tokenizer, Path(path))


def make_tiny_gpt2(path: str | Path, seed: int = SEED, added_pad_token: str | None = None) -> Path:
    """A random GPT-2 decoder (n_embd 32, 2 layers, 2 heads, 64 positions), byte-level BPE, no pad token;
    or `added_pad_token` added as fine-tuned decoder embedders add one: last in the vocabulary (add_special_tokens,
    then resize_token_embeddings)."""
    import torch
    from transformers import GPT2Config, GPT2Model, GPT2TokenizerFast

    backend = byte_level_bpe_tokenizer(["<|endoftext|>"])
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    eot = backend.token_to_id("<|endoftext|>")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_inner=64,
        n_positions=MAX_POSITIONS,
        bos_token_id=eot,
        eos_token_id=eot,
        architectures=["GPT2Model"],
    )
    torch.manual_seed(seed)
    model = GPT2Model(config).eval()
    if added_pad_token is not None:
        tokenizer.add_special_tokens({"pad_token": added_pad_token})
        model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
    return _save(model, tokenizer, Path(path))


def make_tiny_t5(path: str | Path, seed: int = SEED) -> Path:
    """A random T5 encoder-decoder (unsupported by `halflife export`), with a WordPiece tokenizer."""
    import torch
    from transformers import PreTrainedTokenizerFast, T5Config, T5Model

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece_tokenizer(), pad_token="[PAD]", unk_token="[UNK]")
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=0,
        decoder_start_token_id=0,
        architectures=["T5Model"],
    )
    torch.manual_seed(seed)
    model = T5Model(config).eval()
    return _save(model, tokenizer, Path(path))


def make_sentence_transformers(
    path: str | Path, pooling: tuple[str, ...] = ("mean_tokens",), extra_modules: tuple[str, ...] = ()
) -> Path:
    """The tiny BERT as a sentence-transformers model (max_seq_length 32): modules.json lists
    Transformer, Pooling with the `pooling` modes on (cls_token, mean_tokens, max_tokens, ...),
    `extra_modules` (their types only: Dense, ...) and Normalize."""
    path = make_tiny_bert(path)
    kinds = ["Transformer", "Pooling", *extra_modules, "Normalize"]
    modules = [
        {"idx": i, "name": str(i), "path": "" if kind == "Transformer" else f"{i}_{kind}",
         "type": f"sentence_transformers.models.{kind}"}
        for i, kind in enumerate(kinds)
    ]  # fmt: skip
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    pooling_config = {"word_embedding_dimension": 32, **{f"pooling_mode_{mode}": mode in pooling for mode in modes}}
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2))
    return path


BUILDERS = {
    "bert": make_tiny_bert,
    "distilbert": make_tiny_distilbert,
    "roberta": make_tiny_roberta,
    "mpnet": make_tiny_mpnet,
    "gpt2": make_tiny_gpt2,
    "data2vec-text": make_tiny_data2vec_text,
    "qwen2": make_tiny_qwen2,
    "t5": make_tiny_t5,
    "longformer": make_tiny_longformer,
}

_SOURCES: dict[str, Path] = {}
_EXPORTS: dict[str, tuple[Path, object]] = {}


def source(kind: str, tmp_path_factory) -> Path:
    """The tiny `kind` model's Hugging Face directory, built once per session."""
    if kind not in _SOURCES:
        _SOURCES[kind] = BUILDERS[kind](tmp_path_factory.mktemp(f"hf-{kind}") / kind)
    return _SOURCES[kind]


def exported(kind: str, tmp_path_factory) -> tuple[Path, Path, object]:
    """(source dir, exported dir, Manifest) of the tiny `kind` model, exported once per session."""
    if kind not in _EXPORTS:
        from halflife_export.exporter import ExportOptions, export_model

        src = source(kind, tmp_path_factory)
        out = tmp_path_factory.mktemp(f"onnx-{kind}") / "model"
        manifest = export_model(ExportOptions(output=out, model=str(src), progress=lambda line: None))
        _EXPORTS[kind] = (out, manifest)
    out, manifest = _EXPORTS[kind]
    return _SOURCES[kind], out, manifest
