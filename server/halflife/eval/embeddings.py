"""Item and user-text vectors for the evaluation, cached on disk.

A cache file is keyed by the model manifest's sha256, the variant and the
sha256 of the texts, so a re-run never re-embeds the catalogue, and a new
model or changed texts never reuse stale vectors.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from halflife.embedding.offline import embed_sorted
from halflife.progress import progress

log = logging.getLogger(__name__)


def _texts_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def manifest_hash(model_dir: Path) -> str:
    return hashlib.sha256((Path(model_dir) / "manifest.json").read_bytes()).hexdigest()[:16]


def _cache_file(texts: Sequence[str], model_dir: Path, variant: str | None, cache_dir: Path, what: str) -> Path:
    return Path(cache_dir) / f"{what}-{manifest_hash(model_dir)}-{variant or 'default'}-{_texts_hash(texts)}.npy"


def is_cached(texts: Sequence[str], model_dir: Path, variant: str | None, cache_dir: Path, what: str = "texts") -> bool:
    """Whether `embed_texts` finds the vectors in the cache, and so writes nothing there."""
    return _cached(_cache_file(texts, model_dir, variant, cache_dir, what), len(texts)) is not None


def embed_texts(
    texts: Sequence[str], model_dir: Path, variant: str | None, cache_dir: Path, what: str = "texts"
) -> np.ndarray:
    """(len(texts), dim) float32 unit rows, from the cache when present."""
    from halflife.embedding.engine import EmbeddingEngine

    model_dir = Path(model_dir)
    path = _cache_file(texts, model_dir, variant, cache_dir, what)
    cached = _cached(path, len(texts))
    if cached is not None:
        return cached
    engine = EmbeddingEngine.load(model_dir, variant=variant, provider="cpu")
    label = f"embedding {what} ({variant or 'default'})"
    out = embed_sorted(engine, texts, lambda starts: progress(starts, desc=label, unit="batch"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out


def _cached(path: Path, rows: int) -> np.ndarray | None:
    """The vectors a cache file holds, or None when there is none or (logged)
    it is damaged: a truncated file stopped the evaluation with a traceback
    (an audit)."""
    if not path.is_file():
        return None
    try:
        vectors = np.load(path)
    except (OSError, ValueError, EOFError) as exc:
        log.warning("%s is damaged (%s); embedding again", path, exc)
        return None
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != rows:
        log.warning("%s holds %s %s, not %d vectors; embedding again", path, vectors.dtype, vectors.shape, rows)
        return None
    return vectors
