"""Why an item was recommended (`explanations`): the user's interests that
point towards it and their events nearest it, from a profile's centroids
and a log read by the engine. Pure NumPy over what the engine hands in:
no store, no lock (interest/engine.py gathers the inputs).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from halflife.core.ranking import clip_cosines, row_dots
from halflife.interest.types import EventContribution, Explanation, InterestContribution
from halflife.storage.base import EventRecord

EXPLAINED_EVENTS = 3
EXPLAINED_INTERESTS = 3


def ranked_interests(shares: np.ndarray) -> np.ndarray:
    """The clusters a profile lists, strongest first, equal ones in order:
    those with a share > 0 (one that decayed to nothing beside the others has
    no direction left to describe). shares: (K,). Returns indices."""
    order = np.argsort(-shares, kind="stable")
    return order[shares[order] > 0]


def strongest_events(items: np.ndarray, events: np.ndarray, weights: np.ndarray, k: int,
                     chunk: int = 4096) -> np.ndarray:
    """Per item, the k events of largest weight × max(cosine, 0), strongest
    first, ties by event order. items: (m, d) and events: (n, d) unit rows;
    weights: (n,). A chunk of events at a time keeps the (m, chunk) products
    small: all at once, 1,000 items by 100k events took 1.3 GB. A GEMM's
    rounding depends on where a column sits, so identical events (an item
    viewed again and again) scored one ulp apart, within a chunk (its tail
    columns) and across chunks: a chunk's distinct vectors are scored once,
    and each chunk's best are scored again row by row.
    Returns (m, min(k, n)) int64 indices into events."""
    best_rows = []
    for start in range(0, events.shape[0], chunk):
        block = events[start : start + chunk]
        first: dict[bytes, int] = {}  # a row's bytes -> the first row holding them
        firsts = [first.setdefault(row.tobytes(), i) for i, row in enumerate(block)]
        distinct, copy_of = np.unique(firsts, return_inverse=True)
        cosines = clip_cosines(items @ block[distinct].T)[:, copy_of]
        strength = weights[start : start + chunk] * np.maximum(cosines, 0)
        top = min(k, strength.shape[1])
        kth = -np.partition(-strength, top - 1, axis=1)[:, top - 1 : top]  # each row's top-th largest
        above, tied = strength > kth, strength == kth
        # The top - (above) earliest of those tied with it: `top` a row.
        keep = above | (tied & (np.cumsum(tied, axis=1) <= top - above.sum(axis=1, keepdims=True)))
        best_rows.append(np.nonzero(keep)[1].reshape(-1, top) + start)
    candidates = np.concatenate(best_rows, axis=1)
    strengths = np.empty(candidates.shape)
    for j, column in enumerate(candidates.T):  # a column at a time: all at once is (m, 3 x chunks, d)
        strengths[:, j] = weights[column] * np.maximum(clip_cosines(row_dots(items, events[column])), 0)
    order = np.lexsort((candidates, -strengths), axis=1)[:, :k]
    return np.take_along_axis(candidates, order, axis=1)


def per_row(parts: Mapping[str, np.ndarray], n: int) -> list[dict[str, float]]:
    """A blend's parts at n rows (name -> (n,)) as one {name: value} per row."""
    return [{name: float(values[j]) for name, values in parts.items()} for j in range(n)]


def explanations(item_vectors: np.ndarray, parts: Mapping[str, np.ndarray], shares: np.ndarray,
                 centroids: np.ndarray, labels: Sequence[tuple[str, ...]], events: Sequence[EventRecord],
                 weights: np.ndarray) -> list[Explanation]:
    """Why each item (`item_vectors`, (n, d) unit rows) was recommended: up
    to EXPLAINED_INTERESTS interests (`shares` (K,), `centroids` (K, d),
    `labels` each one's label names) that point towards it, by cosine ×
    share, numbered as the profile lists them (`ranked_interests`); up to
    EXPLAINED_EVENTS of `events` (the user's positive events, each with its
    vector, and their decayed `weights`, (m,)) by weight × cosine; and the
    blend's `parts` ((n,) each)."""
    n_clusters = shares.shape[0]
    rank_of = {int(c): r for r, c in enumerate(ranked_interests(shares))}
    cluster_sims = clip_cosines(item_vectors @ centroids.T) if n_clusters else np.zeros((len(item_vectors), 0))
    if events:
        event_vectors = np.stack([e.vector for e in events])
        nearest = strongest_events(item_vectors, event_vectors, weights, EXPLAINED_EVENTS)
        # Row by row: the same value whatever chunk an event fell in.
        event_sims = clip_cosines(np.einsum("jd,jkd->jk", item_vectors, event_vectors[nearest]))
    out = []
    for j, score_parts in enumerate(per_row(parts, len(item_vectors))):
        # Only what points towards the item matches it, or is responsible for it.
        contrib = cluster_sims[j] * shares
        listed = [int(c) for c in np.argsort(-contrib, kind="stable")
                  if int(c) in rank_of and cluster_sims[j, c] > 0][:EXPLAINED_INTERESTS]
        interests = tuple(
            InterestContribution(interest_id=rank_of[c], labels=tuple(labels[c]),
                                 similarity=float(cluster_sims[j, c]), share=float(shares[c]))
            for c in listed
        )
        top_events: tuple[EventContribution, ...] = ()
        if events:
            top_events = tuple(
                EventContribution(events[e].event_id, events[e].type, events[e].item_id, events[e].event_time,
                                  float(sim), float(weights[e]))
                for e, sim in zip(nearest[j].tolist(), event_sims[j])
                # One weighing 0 (a kernel past its reach) made nothing; one below float32's range (its
                # type's ~150 half-lives) would read 0 in EventContribution.weight (a clients review).
                if sim > 0 and np.float32(weights[e]) > 0
            )
        out.append(Explanation(interests, top_events, score_parts))
    return out
