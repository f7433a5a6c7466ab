"""Token states to sentence vectors: pooling and normalisation, pure NumPy.

Shared by the server and by the exporter's validation, so the vectors a
variant is validated with are computed exactly as they are served.
"""

from __future__ import annotations

import numpy as np

POOLING_MODES = ("mean", "last_token", "cls")


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Average of the token states the attention mask keeps.

    hidden: (batch, seq, dim) float; mask: (batch, seq) 0/1 ints.
    Returns (batch, dim) float32.
    """
    weights = mask.astype(np.float32)[:, :, None]
    summed = np.einsum("bsd,bsk->bd", hidden.astype(np.float32, copy=False), weights)
    counts = np.maximum(weights.sum(axis=1), 1.0)
    return summed / counts


def last_token_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """State of each row's last non-padding token (for causal decoders, whose
    last token is the only one that has seen the whole input).

    Works for right padding (the server's) and left padding alike.
    hidden: (batch, seq, dim); mask: (batch, seq). Returns (batch, dim) float32.
    """
    seq = mask.shape[1]
    # Index of the last 1 in each row: seq - 1 - argmax over the reversed row.
    last = seq - 1 - np.argmax(mask[:, ::-1], axis=1)
    pooled = hidden[np.arange(hidden.shape[0]), last].astype(np.float32)
    # A row with no real token (e.g. an empty text on a tokenizer that adds no
    # special tokens) would otherwise pick a padded position, whose state
    # depends on the batch: give zeros, as mean_pool does.
    pooled[~mask.astype(bool).any(axis=1)] = 0.0
    return pooled


def cls_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """State of the first token (BERT's [CLS]); never right for causal models.

    hidden: (batch, seq, dim); mask unused, kept for a uniform signature.
    Returns (batch, dim) float32.
    """
    del mask
    return hidden[:, 0].astype(np.float32)


_POOLERS = {"mean": mean_pool, "last_token": last_token_pool, "cls": cls_pool}


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Pools (batch, seq, dim) token states to (batch, dim) with `mode`."""
    try:
        pooler = _POOLERS[mode]
    except KeyError:
        raise ValueError(f"unknown pooling {mode!r}; expected one of {POOLING_MODES}") from None
    return pooler(hidden, mask)


def l2_normalize(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scales each row to unit length; all-zero rows stay zero.

    vectors: (n, dim). Returns (n, dim) float32.
    """
    vectors = vectors.astype(np.float32, copy=False)
    # What np.linalg.norm computes, without its Python-level dispatch.
    norms = np.sqrt((vectors * vectors).sum(axis=1, keepdims=True))
    return vectors / np.maximum(norms, eps)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, dim) arrays. Returns (n,) float64."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
    return (a * b).sum(axis=1) / denom
