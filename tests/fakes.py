"""Test doubles that need no model."""

from __future__ import annotations

import hashlib

import numpy as np

DIM = 16


def fake_embed(texts):
    """Deterministic unit vectors per text (no model needed here)."""
    rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=DIM) for t in texts]
    rows = np.array(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)
