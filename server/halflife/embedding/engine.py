"""The embedding engine: an exported model directory on onnxruntime.

Knows tokens, tensors and vectors; nothing of users, requests or gRPC.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from halflife.cpu import physical_cores
from halflife.embedding.manifest import CPU, CUDA, Manifest, ManifestError, Variant, load_manifest, verify_file
from halflife.embedding.pooling import pool

WARM_UP_MAX_TOKENS = 512
# What onnxruntime raises for a run the graph cannot do (an id past its vocabulary, a length past its positions).
ORT_RUN_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                  ort.capi.onnxruntime_pybind11_state.RuntimeException)

log = logging.getLogger(__name__)

PROVIDER_CHOICES = ("auto", "cpu", "cuda")
# onnxruntime's CPU arena keeps the peak of its largest forward pass for good:
# ~750 MB RSS after one 128 x 128-token batch, 1.8 GB after 256 x 128. After
# a pass over more padded tokens than this, `release_memory` gives it back.
ARENA_KEEP_TOKENS = 4096
# Padded tokens per forward pass at which each provider runs best (the server's
# default `max_batch_tokens`). On CPU, sentences/s peak at 1-2k tokens and
# fall past them as a batch's activations outgrow the caches (int8, 2 threads,
# 2026-12-06, alternated: 64-token inputs 217/s at 2,048 tokens a batch, 202
# at 8,192, 187 at 16,384; 16-token inputs -8% from 2,048 to 4,096). A GPU
# wants big batches: 16,384, text-embeddings-inference's default.
BATCH_TOKENS = {CPU: 2048, CUDA: 16384}


class InputsTooLongError(ValueError):
    """Some inputs exceed the model's max input tokens and truncation was not asked for."""

    def __init__(self, too_long: list[tuple[int, int | None]], max_tokens: int):
        self.too_long = too_long  # (input index, token count, or None where not counted: `EmbeddingEngine.tokenize`)
        self.max_tokens = max_tokens
        first = ", ".join(f"inputs[{i}] {self.says(n)}" for i, n in too_long[:3])
        super().__init__(f"{first}; set truncate to cut them")

    def says(self, tokens: int | None) -> str:
        """What is said of one input too long: its token count, where counted."""
        if tokens is None:
            return f"has more than the model's {self.max_tokens} tokens"
        return f"has {tokens} tokens, more than the model's {self.max_tokens}"


@dataclasses.dataclass(frozen=True)
class TokenizedInputs:
    """Token ids of a list of texts, ready for `EmbeddingEngine.forward`."""

    ids: list[np.ndarray]  # one (tokens,) int64 array per text, special tokens included
    token_counts: np.ndarray  # (n,) int32, tokens the model sees (after truncation)
    truncated: np.ndarray  # (n,) bool


SPINNING = ("during runs", "never", "always")  # `session_options`' choices, the engine's first


def session_options(intra_op_threads: int | None = None, spinning: str = "during runs") -> ort.SessionOptions:
    """The onnxruntime session options the engine runs with (also what the
    benchmark's raw-onnxruntime baseline uses, so it compares like with like).

    intra_op_threads: default physical_cores(). spinning: when idle intra-op
    threads busy-wait for work instead of sleeping: "during runs" (the
    engine's), "never", or "always" (onnxruntime's default); the benchmark's
    baseline tries each.
    """
    if spinning not in SPINNING:
        raise ValueError(f"spinning must be one of {SPINNING}, got {spinning!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Within a run, a sleeping thread costs a wake-up per operator: batch 1
    # took 1.9-2.0 ms spinning, 2.6-2.7 not (int8, 2 threads, 16 tokens).
    # After a run, spinning (onnxruntime's default) takes the cores the event
    # loop and tokenizers need between batches: 40 ms of CPU in 50 ms idle,
    # and batch 1 in 17-50 ms under load against 5-7. So threads spin during
    # runs and stop when one returns. Two servers alternated (2026-12-05):
    # Embed c1 p50 3.52 ms against 4.24 never spinning; 8 and 32 callers
    # within the noise (438 / 458 and 564 / 538 sentences/s; long inputs
    # 153 / 147 and 156 / 150).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0" if spinning == "never" else "1")
    options.add_session_config_entry("session.force_spinning_stop", "1" if spinning == "during runs" else "0")
    return options


def load_tokenizer(path: Path | str, truncate_at: int | None = None) -> Tokenizer:
    """The fast tokenizer at `path` with padding off (the shipped
    tokenizer.json may pad, all-MiniLM's to 128; `model_inputs` pads each
    batch to its longest input), truncating at `truncate_at` tokens (keeping
    the closing special tokens) or not at all."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    if truncate_at is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(truncate_at)
    return tokenizer


# The graph inputs `model_inputs` feeds; a graph that takes another (Longformer's global_attention_mask,
# LayoutLM's bbox) cannot be served.
FED_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids"})


def unfed_inputs(input_names: Sequence[str]) -> list[str]:
    """Those of a graph's `input_names` that `model_inputs` does not feed
    (the export refuses such a graph, and so does loading one)."""
    return [name for name in input_names if name not in FED_INPUTS]


def model_inputs(
    ids: Sequence[np.ndarray], input_names: Sequence[str], pad_token_id: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One padded batch as the exported graph's inputs, and its attention
    mask (for pooling). ids: n arrays of token ids (any lengths).
    Returns ({input name: (n, longest) int64}, (n, longest) int64 mask)."""
    # Row by row: fewer distinct NumPy calls than a vectorised mask (see
    # EmbeddingEngine.tokenize), and a batch is at most a few hundred rows.
    width = max(max(map(len, ids), default=0), 1)
    input_ids = np.full((len(ids), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in input_names:
        feeds["token_type_ids"] = np.zeros_like(input_ids)
    if "position_ids" in input_names:
        feeds["position_ids"] = np.broadcast_to(np.arange(width, dtype=np.int64), input_ids.shape).copy()
    return {name: feeds[name] for name in input_names}, attention_mask


def _resolve_provider(requested: str) -> str:
    available = ort.get_available_providers()
    if requested == "cuda":
        if CUDA not in available:
            raise ManifestError(
                f"--provider cuda asked for, but this onnxruntime offers only {available} "
                "(install onnxruntime-gpu: `make install-gpu`)"
            )
        return CUDA
    if requested == "cpu":
        return CPU
    if requested != "auto":
        raise ManifestError(f"unknown provider {requested!r}; expected one of {PROVIDER_CHOICES}")
    return CUDA if CUDA in available else CPU


Check = Callable[[], None]  # raises to stop a piece of work between its steps


def _go_on() -> None:
    """A `Check` that never stops the work."""


# Texts encoded at once: an encoding holds ~110 bytes a token (offsets, token
# strings), and 1,000 texts of 32 KiB in one batch held ~1.8 GB, of which
# the ids of 256 tokens each were kept (a resource audit). Between batches a
# caller's `check` may stop the work: 256 KiB of text read whole (one long
# pre-token, see `_encoded`) takes ~0.3 s here.
TOKENIZE_CHARS = 1 << 18


def tokenizer_input(text: str) -> str:
    """What the tokenizer is given of `text`: the text without leading and
    trailing whitespace, as sentence-transformers' Transformer.tokenize gives
    it. A byte-level BPE or SentencePiece tokenizer (RoBERTa's, MPNet's,
    GPT-2's) reads that whitespace as tokens of its own: "text\n" embedded
    otherwise than sentence-transformers embeds it (cosine 0.79-0.995, a review)."""
    return text.strip()


def _batches(texts: Sequence[str]) -> Iterator[slice]:
    """`texts` in consecutive batches of at most TOKENIZE_CHARS characters
    (one text alone where it is longer)."""
    start = 0
    while start < len(texts):
        end, chars = start + 1, len(texts[start])
        while end < len(texts) and chars + len(texts[end]) <= TOKENIZE_CHARS:
            chars += len(texts[end])
            end += 1
        yield slice(start, end)
        start = end


def _in_batches(tokenizer: Tokenizer, texts: Sequence[str], check: Check = _go_on) -> Iterator[Encoding]:
    """Each text's encoding, encoded in `_batches`, `check()` before each."""
    for batch in _batches(texts):
        check()
        yield from tokenizer.encode_batch(texts[batch])


# A text longer than this many characters a token the model keeps is
# tokenized from its start first (`_head`): a 32 KiB text took 18 ms to
# tokenize whole, for the 256 tokens all-MiniLM keeps (English prose runs
# 4-5 characters a token; a WordPiece [UNK] word up to 100).
CHARS_PER_TOKEN_BOUND = 16
# Where a text may be cut: at a space after a non-space (the last one, greedily).
_LAST_CUT = re.compile(r".*\S(?= )", re.DOTALL)


def _head(text: str, chars: int) -> tuple[str, bool]:
    """(head, at_space): `text` itself where it is at most `chars` long; else
    its start up to the last space after a non-space within them (at_space),
    or, where there is none (CJK, runs of punctuation), its first `chars`
    characters, cut inside a pre-token."""
    if len(text) <= chars:
        return text, True
    cut = _LAST_CUT.match(text, 0, chars)
    return (text[: cut.end()], True) if cut else (text[:chars], False)


def _added_token_prefixes(tokenizer: Tokenizer) -> frozenset[str]:
    """Every start of every added token's text, lowercased (`_before_added_token`)."""
    contents = [added.content.lower() for added in tokenizer.get_added_tokens_decoder().values()]
    return frozenset(content[:k] for content in contents for k in range(1, len(content) + 1))


def _before_added_token(head: str, prefixes: frozenset[str]) -> str:
    """A head cut inside a pre-token, without the start of an added token's
    text at its end: the whole text matches that token before it splits
    into pre-tokens, so its start ends a piece there (GPT-2's whitespace
    before it splits otherwise, an lstrip token takes that whitespace), and
    the head would split it into more pre-tokens than `_decides` leaves out
    ("<|endoftext|>" cut before ">": a fuzz of the cut found 4-31 texts in
    each byte-level family)."""
    longest = max(map(len, prefixes), default=0)
    for start in range(max(0, len(head) - longest), len(head)):
        if head[start:].lower() in prefixes:
            return head[:start]
    return head


def _decides(encoding: Encoding, at_space: bool) -> bool:
    """Whether a head's encoding holds its whole text's kept tokens: it
    overflows the truncation, and, for a head cut inside a pre-token, the
    tokens kept end before the head's last two pre-tokens: the cut one,
    which the rest of the text may tokenize otherwise, and the one before
    it, which a pre-tokenizer's look-ahead (GPT-2's `\\s+(?!\\S)`) may
    split otherwise. A 32 KiB text without spaces was read whole: ~0.04 s."""
    if not encoding.overflowing:
        return False
    if at_space:
        return True
    kept = [word for word in encoding.word_ids if word is not None]
    last = max((word for part in encoding.overflowing for word in part.word_ids if word is not None), default=-1)
    return bool(kept) and max(kept) < last - 1


def _cuts_at_spaces(tokenizer: Tokenizer) -> bool:
    """Whether a space after a non-space always starts a new pre-token: the
    pre-tokenizer splits there (BERT's, byte-level BPE's, Metaspace's do; a
    tokenizer with none, or Metaspace without split, reads the text as one
    piece) and no added token spans such a space ("New York")."""
    probe = tokenizer.normalizer.normalize_str("a b") if tokenizer.normalizer else "a b"
    return (tokenizer.pre_tokenizer is not None and len(tokenizer.pre_tokenizer.pre_tokenize_str(probe)) == 2
            and not any(re.search(r"\S\s", added.content) for added in tokenizer.get_added_tokens_decoder().values()))


def _encoded(tokenizer: Tokenizer, texts: Sequence[str], check: Check = _go_on) -> Iterator[Encoding]:
    """What `tokenizer` (a truncating one) encodes of each text's
    `tokenizer_input`, in bounded batches (`_batches`): the whole text's
    ids and truncation (not the tokens cut off), at a bounded cost.

    A text of more than CHARS_PER_TOKEN_BOUND characters a token kept is
    encoded from its `_head` first. That is exact: where a space after a
    non-space starts a new pre-token (`_cuts_at_spaces`), normalizers map
    characters where they stand and models tokenize each pre-token alone,
    the head's tokens are the first of the whole text's; so a head that
    overflows the truncation has the whole text's kept tokens and is cut as
    it is; so does one cut inside a pre-token, where what it keeps ends
    before that pre-token (`_decides`) and no added token's text is cut
    (`_before_added_token`). Any other head (one huge unknown word) says
    nothing of the rest: the whole text is encoded after all, with the
    others of its batch that need it (one at a time, they took twice as
    long as before heads were read)."""
    texts = [tokenizer_input(text) for text in texts]
    chars = CHARS_PER_TOKEN_BOUND * tokenizer.truncation["max_length"]
    if max(map(len, texts), default=0) <= chars or not _cuts_at_spaces(tokenizer):
        yield from _in_batches(tokenizer, texts, check)
        return
    heads, at_space = zip(*(_head(text, chars) for text in texts))
    if not all(at_space):
        prefixes = _added_token_prefixes(tokenizer)
        heads = tuple(head if at else _before_added_token(head, prefixes) for head, at in zip(heads, at_space))
    for batch in _batches(heads):
        check()
        batch_heads, batch_texts = heads[batch], texts[batch]
        encodings = tokenizer.encode_batch(list(batch_heads))
        undecided = [i for i, (head, text, encoding, at) in
                     enumerate(zip(batch_heads, batch_texts, encodings, at_space[batch]))
                     if head is not text and not _decides(encoding, at)]
        for i, encoding in zip(undecided, _in_batches(tokenizer, [batch_texts[i] for i in undecided], check)):
            encodings[i] = encoding
        yield from encodings


def _variant_name(manifest: Manifest, model_dir: Path, provider: str, variant: str | None) -> str:
    """`variant`, else the manifest's default for `provider` (resolved), else its CPU one."""
    name = variant or manifest.default_variants.get(provider) or manifest.default_variants.get(CPU)
    if name is None:
        raise ManifestError(f"{model_dir}: the manifest names no default variant for {provider}; pass --variant")
    return name


def model_identity(manifest: Manifest, variant: Variant) -> str:
    """Names what maps a text to its vector: the variant's weights, the
    tokenizer, pooling, normalisation and the truncation length (SHA-256)."""
    m = manifest
    parts = (variant.sha256, m.tokenizer_sha256, m.pooling, str(m.normalize), str(m.max_input_tokens))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def vector_space(manifest: Manifest) -> str:
    """Names the space the export's vectors live in, whichever variant makes
    them: the source weights, the tokenizer, pooling, normalisation, the
    truncation length and the dimension (SHA-256). Another model, or the same
    one pooled otherwise, is another space; its variants are the same one."""
    # The weights by content, those transformers loads: safetensors where there are any (a directory may also
    # hold pytorch_model.bin or training_args.bin; named by file, the same weights beside them read as another
    # model, a review).
    files = manifest.source.get("weights_sha256", {})
    loaded = {name: digest for name, digest in files.items() if name.endswith(".safetensors")} or files
    return _space_name(repr(sorted(loaded.values())), manifest)


def former_vector_spaces(manifest: Manifest) -> tuple[str, ...]:
    """The names halflife gave `vector_space(manifest)` before, which the
    stores it bound still record: until 2026-12-06 (bed3b31) every weights
    file counted, by name and content. Their model serves them still; they
    were refused as another model's, the way forward a reembed of every
    item and event (an upgrade review)."""
    return (_space_name(repr(sorted(manifest.source.get("weights_sha256", {}).items())), manifest),)


def _space_name(weights: str, m: Manifest) -> str:
    parts = (weights, m.tokenizer_sha256, m.pooling, str(m.normalize), str(m.max_input_tokens), str(m.dimension))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def named_vector_space(manifest: Manifest) -> tuple[str, str]:
    """(vector_space, a name for people): what an InterestEngine binds its store to."""
    return vector_space(manifest), f"{manifest.model_id} ({manifest.dimension}-d)"


def served_identity(model_dir: Path | str, *, variant: str | None = None, provider: str = "auto") -> str:
    """The `identity` of the engine `EmbeddingEngine.load` would give for
    these arguments, from the manifest alone (checksums not verified, no
    session). Raises ManifestError."""
    manifest = load_manifest(model_dir)
    name = _variant_name(manifest, Path(model_dir), _resolve_provider(provider), variant)
    return model_identity(manifest, manifest.variant(name))


def _preload_cuda_libraries() -> None:
    """Loads CUDA and cuDNN from the nvidia-* wheels installed beside
    onnxruntime-gpu (its `cuda,cudnn` extras, or PyTorch's), which the CUDA
    provider would not find on its own without LD_LIBRARY_PATH."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu >= 1.21
    if preload is not None:
        preload()


class EmbeddingEngine:
    """Tokenizes texts and runs one ONNX variant of an exported model."""

    def __init__(
        self,
        manifest: Manifest,
        model_dir: Path,
        variant_name: str,
        session: ort.InferenceSession,
        tokenizer_path: Path,
    ):
        self.manifest = manifest
        self.model_dir = model_dir
        self.variant = manifest.variant(variant_name)
        self._session = session
        # Two tokenizers, because truncation is tokenizer state and tokenize()
        # runs on several threads: one always truncates, one never (to count
        # an input too long).
        self._tokenizer = load_tokenizer(tokenizer_path)
        self._truncating_tokenizer = load_tokenizer(tokenizer_path, truncate_at=manifest.max_input_tokens)
        self._input_names = [i.name for i in session.get_inputs()]
        if unfed := unfed_inputs(self._input_names):
            raise ManifestError(f"{model_dir}: the model takes {', '.join(unfed)}, which the server does not feed")
        self._output_name = session.get_outputs()[0].name
        # The provider onnxruntime actually placed the model on, which can be
        # CPU even when CUDA was asked for (e.g. missing CUDA libraries).
        self.provider = session.get_providers()[0]
        self._use_io_binding = self.provider == CUDA
        # Where IO binding leaves the output: the provider's device ("cpu" only in tests, which run
        # the CUDA branch's calls on the CPU provider to check them against onnxruntime's real API).
        self._output_device = "cuda" if self.provider == CUDA else "cpu"
        self._arena_grown = False  # a pass over more than ARENA_KEEP_TOKENS ran since release_memory
        self.memory_releases = 0  # release_memory calls that gave memory back (for tests)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        variant: str | None = None,
        provider: str = "auto",
        intra_op_threads: int | None = None,
        draft: bool = False,
    ) -> EmbeddingEngine:
        """Loads `model_dir` (verifying checksums) on the best or the given provider.

        variant: a name from the manifest; default: the manifest's default for
        the provider. provider: "auto" (CUDA where usable, else CPU), "cpu" or "cuda".
        draft: load the export's draft manifest, as the export does to validate
        its variants (`load_manifest`); refused otherwise.
        """
        model_dir = Path(model_dir)
        manifest = load_manifest(model_dir, draft=draft)
        wanted = _resolve_provider(provider)
        variant_name = _variant_name(manifest, model_dir, wanted, variant)
        chosen = manifest.variant(variant_name)
        # The export keeps an int8 below its bar, never a default. Its own draft, which it loads to validate,
        # is validated on nothing yet (it warned "fell short (min cosine nan)" on every export).
        if not manifest.is_draft and not chosen.validation.passed:
            log.warning("variant %s fell short of its export validation (min cosine %.5f against PyTorch, bar %.5f)",
                        chosen.name, chosen.validation.min_cosine, chosen.validation.threshold)
        onnx_path = verify_file(model_dir, chosen.file, chosen.sha256)
        tokenizer_path = verify_file(model_dir, manifest.tokenizer_file, manifest.tokenizer_sha256)

        providers = [CUDA, CPU] if wanted == CUDA else [CPU]
        if wanted == CUDA:
            _preload_cuda_libraries()
        # Checksums match what the manifest says, but the manifest may be wrong
        # too: onnxruntime and tokenizers raise their own exception types.
        try:
            session = ort.InferenceSession(
                str(onnx_path), sess_options=session_options(intra_op_threads), providers=providers
            )
        except Exception as exc:  # noqa: BLE001
            raise ManifestError(f"{onnx_path} is not a loadable ONNX model: {exc}") from exc
        if wanted == CUDA and session.get_providers()[0] != CUDA:
            log.warning("CUDA was requested but onnxruntime fell back to %s", session.get_providers()[0])
            cpu_default = manifest.default_variants.get(CPU)
            if variant is None and cpu_default not in (None, variant_name):
                # Not swapped here: a --workers group has pinned the variant's identity already.
                log.warning("serving %s, the CUDA default, on the CPU, where %s is the default: pass --provider cpu "
                            "(or make CUDA's libraries loadable)", variant_name, cpu_default)
        try:
            return cls(manifest, model_dir, variant_name, session, tokenizer_path)
        except Exception as exc:  # noqa: BLE001
            raise ManifestError(f"{tokenizer_path} is not a loadable tokenizer: {exc}") from exc

    @property
    def _filler_token_id(self) -> int:
        """A token id for the passes of no text (warm_up, release_memory):
        in the vocabulary and not padding. pad_token_id + 1 was past the
        vocabulary where the pad token was added last (add_special_tokens,
        then resize_token_embeddings: fine-tuned decoders), and serve refused
        to start."""
        pad = self.manifest.pad_token_id
        return pad - 1 if pad > 0 else 1

    @property
    def batch_tokens(self) -> int:
        """Padded tokens per forward pass at which this engine's provider runs best (BATCH_TOKENS)."""
        return BATCH_TOKENS.get(self.provider, BATCH_TOKENS[CPU])

    @property
    def dimension(self) -> int:
        return self.manifest.dimension

    @property
    def identity(self) -> str:
        """Names what maps a text to its vector here (`model_identity`)."""
        return model_identity(self.manifest, self.variant)

    @property
    def vector_space(self) -> str:
        """Names the space its vectors live in (`vector_space`), shared by the export's variants."""
        return vector_space(self.manifest)

    @property
    def former_vector_spaces(self) -> tuple[str, ...]:
        """What earlier halflifes named this space (`former_vector_spaces`): a store bound to one is this model's."""
        return former_vector_spaces(self.manifest)

    @property
    def named_vector_space(self) -> tuple[str, str]:
        """`named_vector_space` of its export."""
        return named_vector_space(self.manifest)

    @property
    def max_input_tokens(self) -> int:
        return self.manifest.max_input_tokens

    def tokenize(self, texts: Sequence[str], truncate: bool = False, check: Check = _go_on) -> TokenizedInputs:
        """Token ids of `texts`; raises InputsTooLongError unless `truncate`.
        check: called between batches of the work, to stop it by raising (a
        caller gone: `Deadline.check`)."""
        # Plain Python over the few inputs of a typical request: each distinct
        # NumPy function touched here runs from a cache that the model's last
        # forward pass evicted, at 10-50 us apiece on this 2-vCPU VM.
        # One pass, truncating or not: the truncating tokenizer keeps what it cut off (encoding them again took twice
        # as long), so it tells the inputs too long.
        encodings = [(np.array(e.ids, dtype=np.int64), bool(e.overflowing))
                     for e in _encoded(self._truncating_tokenizer, texts, check)]
        ids, cut = [row for row, _ in encodings], [overflowed for _, overflowed in encodings]
        if not truncate and any(cut):
            too_long = [i for i, overflowed in enumerate(cut) if overflowed]
            counts = self._token_counts([texts[i] for i in too_long], check)
            raise InputsTooLongError(list(zip(too_long, counts)), self.max_input_tokens)
        counts = np.array([len(row) for row in ids], dtype=np.int32)
        return TokenizedInputs(ids=ids, token_counts=counts, truncated=np.array(cut, dtype=bool))

    def _token_counts(self, texts: Sequence[str], check: Check = _go_on) -> list[int | None]:
        """Each text's tokens, untruncated; None for a text longer than
        `_encoded` reads whole, which is not read whole to say by how much
        it is too long."""
        texts = [tokenizer_input(text) for text in texts]
        chars = CHARS_PER_TOKEN_BOUND * self.max_input_tokens
        counted = _in_batches(self._tokenizer, [text for text in texts if len(text) <= chars], check)
        return [len(next(counted).ids) if len(text) <= chars else None for text in texts]

    def forward(self, ids: Sequence[np.ndarray]) -> np.ndarray:
        """Runs one padded batch and pools it.

        ids: n arrays of token ids (any lengths). Returns (n, dim) float32,
        pooled but not normalised.
        """
        feeds, attention_mask = model_inputs(ids, self._input_names, self.manifest.pad_token_id)
        return pool(self._run(feeds), attention_mask, self.manifest.pooling)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if not self._use_io_binding:
            self._arena_grown |= next(iter(feeds.values())).size > ARENA_KEEP_TOKENS
            return self._session.run([self._output_name], feeds)[0]
        # On CUDA, IO binding lets onnxruntime copy inputs once and allocate the
        # output on the device, instead of staging through extra host buffers.
        binding = self._session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(self._output_name, self._output_device)
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def release_memory(self) -> None:
        """Gives back what onnxruntime's CPU arena grew by in passes over more
        than ARENA_KEEP_TOKENS padded tokens since the last call (nothing
        otherwise). The arena shrinks only at the end of a run, so this runs
        a one-token pass that asks for it: 30-45 ms after 256 x 64 tokens,
        RSS 860 -> 170 MB. Meant for idle moments: shrinking after every
        large pass instead made sustained 32-sentence requests of long texts
        10-17% slower, each pass faulting its memory in again."""
        if not self._arena_grown:
            return
        shrink = ort.RunOptions()
        shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        feeds, _ = model_inputs([np.array([self._filler_token_id])], self._input_names, self.manifest.pad_token_id)
        self._session.run([self._output_name], feeds, shrink)
        self._arena_grown = False
        self.memory_releases += 1

    def warm_up(self) -> None:
        """Runs a few batch shapes so the first real request pays no set-up
        cost, one of them as long as the manifest allows (up to 512 tokens: a
        long-context model's full length would cost seconds at each start).
        A manifest that does not fit its model (a pad token past the
        vocabulary, more tokens than positions) fails here, as a
        ManifestError, not in requests (it was an onnxruntime traceback)."""
        pad = self.manifest.pad_token_id
        for batch, tokens in ((1, 8), (8, 32), (4, 128), (1, WARM_UP_MAX_TOKENS)):
            tokens = min(tokens, self.max_input_tokens)
            rows = [np.full(tokens, self._filler_token_id, dtype=np.int64)] * batch
            if batch > 1 and tokens > 1:  # the last row a token short, so that padding (the pad id) runs too
                rows[-1] = rows[-1][:-1]
            try:
                vectors = self.forward(rows)
            except ORT_RUN_ERRORS as exc:
                raise ManifestError(
                    f"{self.model_dir}: the model fails on {batch} x {tokens} tokens, which its manifest allows "
                    f"(max_input_tokens {self.max_input_tokens}, pad_token_id {pad}): {' '.join(str(exc).split())}"
                ) from exc
            if vectors.shape != (batch, self.dimension):  # else every item upsert fails later
                raise ManifestError(
                    f"{self.model_dir}: the model gives {vectors.shape[1]}-d vectors, the manifest says {self.dimension}"
                )
