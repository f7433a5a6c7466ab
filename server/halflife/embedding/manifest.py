"""The model directory's manifest: what `halflife export` writes and the server reads.

A model directory is self-describing: ONNX variants, `tokenizer.json` and
`manifest.json`, which records where the model came from, how to pool it and,
per variant, its checksum, precision, intended execution providers and how
well it matched the PyTorch model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path, PurePosixPath
from typing import Any

from halflife.embedding.pooling import POOLING_MODES

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class ManifestError(Exception):
    """The model directory is missing, malformed or fails its checksums."""


@dataclasses.dataclass(frozen=True)
class Validation:
    """Agreement of a variant's embeddings with the PyTorch model's."""

    sentences: int
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    threshold: float
    passed: bool
    # Where the export ran it: fp16 on CUDA where the exporting onnxruntime offers it. (Absent from
    # manifests before 2026-12-06, which validated every variant on the CPU.)
    provider: str = CPU


# A variant's validation in the draft manifest `halflife export` writes to validate its variants through the
# server's engine, before any is validated: a manifest whose variants all say so is that draft (`Manifest.is_draft`).
PENDING_VALIDATION = Validation(sentences=0, max_abs_diff=float("nan"), min_cosine=float("nan"),
                                mean_cosine=float("nan"), threshold=0.0, passed=False)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str  # e.g. "fp32-o2"
    file: str  # relative to the model directory
    sha256: str
    precision: str  # "fp32" | "fp16" | "int8"
    optimization: str  # e.g. "O2", "none"
    execution_providers: tuple[str, ...]  # the providers it is meant for
    validation: Validation


@dataclasses.dataclass(frozen=True)
class Manifest:
    model_id: str
    source: dict[str, Any]  # path, model_type, architecture, weights sha256
    dimension: int
    pooling: str
    normalize: bool
    max_input_tokens: int
    opset: int
    tokenizer_file: str
    tokenizer_sha256: str
    default_variants: dict[str, str]  # execution provider -> variant name
    variants: tuple[Variant, ...]
    input_names: tuple[str, ...]
    pad_token_id: int
    tooling: dict[str, str] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # Tokens the model's position table holds, as the export reads its config (the most --max-input-tokens it
    # takes), or None where the config says none. The server runs no input that long at start (warm_up stops at
    # 512 tokens), so a max_input_tokens edited past it was INTERNAL on long requests. (Absent from manifests
    # before 2026-12-07.)
    position_limit: int | None = None

    @property
    def is_draft(self) -> bool:
        """Whether this is the draft a `halflife export` validates with (no variant validated yet)."""
        return not any(v.validation.sentences for v in self.variants)

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        known = ", ".join(v.name for v in self.variants)
        raise ManifestError(f"no variant {name!r} in the manifest (have: {known})")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"manifest format_version {data.get('format_version')!r} is not {FORMAT_VERSION}; "
                "re-export the model with this version of halflife"
            )
        _check_known(cls, data, "the manifest")
        for v in data["variants"]:
            _check_known(Variant, v, "a variant")
            _check_known(Validation, v["validation"], "a variant's validation")
        data["variants"] = tuple(
            Variant(
                **{
                    **v,
                    "execution_providers": tuple(v["execution_providers"]),
                    "validation": Validation(**v["validation"]),
                }
            )
            for v in data["variants"]
        )
        data["input_names"] = tuple(data["input_names"])
        manifest = cls(**data)
        for record in (manifest, *manifest.variants, *(v.validation for v in manifest.variants)):
            _check_types(record)
        if manifest.pooling not in POOLING_MODES:
            raise ManifestError(f"pooling {manifest.pooling!r} is not one of {', '.join(POOLING_MODES)}")
        for name in ("dimension", "max_input_tokens"):
            if getattr(manifest, name) < 1:
                raise ManifestError(f"{name} must be at least 1, got {getattr(manifest, name)}")
        if manifest.pad_token_id < 0:
            raise ManifestError(f"pad_token_id must not be negative, got {manifest.pad_token_id}")
        if manifest.position_limit is not None and manifest.max_input_tokens > manifest.position_limit:
            raise ManifestError(f"max_input_tokens {manifest.max_input_tokens} is more than {manifest.model_id} has "
                                f"positions for ({manifest.position_limit})")
        _check_variants(manifest)
        return manifest


def _check_variants(manifest: Manifest) -> None:
    """Variants that can be told apart and files inside the model directory:
    a hand-edited manifest with two variants named int8 served the first as
    int8 whatever its precision, and "../x.onnx" loaded a file from elsewhere."""
    names = [v.name for v in manifest.variants]
    if not names:
        raise ManifestError("variants is empty: the directory holds no model to serve")
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise ManifestError(f"variant names must be unique: {', '.join(map(repr, repeated))} named more than once")
    for provider, name in manifest.default_variants.items():
        if name not in names:
            raise ManifestError(f"default_variants names {name!r} for {provider}, which is not a variant "
                                f"(have: {', '.join(names)})")
    for file in (*(v.file for v in manifest.variants), manifest.tokenizer_file):
        path = PurePosixPath(file)
        if not file or path.is_absolute() or ".." in path.parts:
            raise ManifestError(f"file {file!r} must be a path inside the model directory")


_KINDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", dict: "a JSON object",
          tuple: "a JSON array"}


def _check_known(record_type, data: dict[str, Any], what: str) -> None:
    """Fields of `data` that `record_type` does not have: those of a manifest
    written by a newer export (an older server read one as "malformed:
    unexpected keyword argument")."""
    if not isinstance(data, dict):  # its keys, or a string's letters, read as a newer export's fields
        raise TypeError(f"{what} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(record_type)})
    if unknown:
        raise ManifestError(f"{what} has fields this version of halflife does not know ({', '.join(unknown)}): "
                            "written by a newer `halflife export`; upgrade halflife, or export the model again "
                            "with this version")


def _check_types(record) -> None:
    """Each field of `record` (a dataclass) of the type its annotation names:
    a hand-edited manifest (a list for default_variants, "32" for the
    dimension) failed later as an AttributeError or a self-contradicting
    message. Whole numbers pass for floats; true and false not for numbers;
    null only where the annotation says `| None`."""
    hints = typing.get_type_hints(type(record))
    for field in dataclasses.fields(record):
        hint, value = hints[field.name], getattr(record, field.name)
        if type(None) in typing.get_args(hint):
            if value is None:
                continue
            (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        expected = typing.get_origin(hint) or hint
        allowed = (int, float) if expected is float else expected
        if not isinstance(value, allowed) or (expected in (int, float) and isinstance(value, bool)):
            raise ManifestError(f"{field.name} must be {_KINDS.get(expected, expected.__name__)}, got {value!r}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(model_dir: Path, *, draft: bool = False) -> Manifest:
    """Reads `model_dir/manifest.json`; raises ManifestError with a clear message.

    draft: take the export's draft (`Manifest.is_draft`), as the export does
    to validate its variants; refused otherwise."""
    manifest = _read_manifest(Path(model_dir))
    if manifest.is_draft and not draft:
        # What an export killed during validation (SIGKILL, the OOM killer) leaves in its work directory: named
        # with --variant, it was served, its variants validated by nothing (a review).
        raise ManifestError(f"{Path(model_dir) / MANIFEST_NAME} is the draft of an unfinished `halflife export` "
                            "(killed during validation, or still running), not a model: serve the export's "
                            "--output; a killed export's draft can be deleted (the next export into that --output "
                            "deletes it)")
    return manifest


def _read_manifest(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        # `halflife export --force` moves the old model aside under this name before it swaps the new one in.
        retired = Path(model_dir).parent / f".old-{Path(model_dir).name}"
        if (retired / MANIFEST_NAME).is_file():
            raise ManifestError(f"{path} not found: an interrupted `halflife export --force` left the previous "
                                f"model whole at {retired} (move it back, or export again)")
        raise ManifestError(
            f"{path} not found: {model_dir} is not an exported model directory "
            "(create one with `halflife export --output DIR`, or `make model`)"
        )
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return Manifest.from_dict(data)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise ManifestError(f"{path} is malformed: {exc}") from exc


def verify_file(model_dir: Path, file: str, expected_sha256: str) -> Path:
    """Checks a model file against its recorded checksum; returns its path."""
    path = Path(model_dir) / file
    if not path.is_file():
        raise ManifestError(f"{path} is listed in the manifest but missing")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ManifestError(
            f"{path} fails its checksum (sha256 {actual[:12]}..., manifest says "
            f"{expected_sha256[:12]}...): the file was changed or truncated; re-export the model"
        )
    return path
