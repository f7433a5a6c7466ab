"""Why an item was recommended (`explanations`): the user's interests that
point towards it and their events nearest it, from a profile's centroids
and a log read by the engine. Pure NumPy over what the engine hands in:
no store, no lock (interest/engine.py gathers the inputs).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

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


class StrongestEvents:
    """Per item, the k events of largest weight × max(cosine, 0) among those
    added so far, strongest first, ties by key (an event's seq: arrival
    order), added a chunk at a time: a log read in chunks (Store.user_history)
    holds a chunk and the best, not the log. items: (m, d) unit rows.
    keys, strengths: (m, min(k, events added)) the best so far, int64 and float64."""

    def __init__(self, items: np.ndarray, k: int):
        self.items, self.k = items, k
        self.keys = np.empty((items.shape[0], 0), dtype=np.int64)
        self.strengths = np.empty((items.shape[0], 0))

    def add(self, events: np.ndarray, weights: np.ndarray, keys: np.ndarray, chunk: int = 4096) -> None:
        """Takes in n events: events (n, d) unit rows, weights and keys (n,),
        keys distinct from each other and from those added before. A chunk
        of them at a time keeps the (m, chunk) products small: all at once,
        1,000 items by 100k events took 1.3 GB. A GEMM's rounding depends on
        where a column sits, so identical events (an item viewed again and
        again) scored one ulp apart, within a chunk (its tail columns) and
        across chunks: a chunk's distinct vectors are scored once, and each
        chunk's best are scored again row by row, the strengths kept."""
        if (keys[1:] < keys[:-1]).any():  # ties at a chunk's cut go to the first in key order
            # (A log read by time is mostly in seq order already: a copy of a 10k chunk took 40 ms.)
            order = np.argsort(keys, kind="stable")
            events, weights, keys = events[order], weights[order], keys[order]
        for start in range(0, events.shape[0], chunk):
            block = events[start : start + chunk]
            first: dict[bytes, int] = {}  # a row's bytes -> the first row holding them
            firsts = [first.setdefault(row.tobytes(), i) for i, row in enumerate(block)]
            distinct, copy_of = np.unique(firsts, return_inverse=True)
            cosines = clip_cosines(self.items @ block[distinct].T)[:, copy_of]
            strength = weights[start : start + chunk] * np.maximum(cosines, 0)
            top = min(self.k, strength.shape[1])
            kth = -np.partition(-strength, top - 1, axis=1)[:, top - 1 : top]  # each row's top-th largest
            above, tied = strength > kth, strength == kth
            # The top - (above) earliest of those tied with it: `top` a row.
            keep = above | (tied & (np.cumsum(tied, axis=1) <= top - above.sum(axis=1, keepdims=True)))
            best = np.nonzero(keep)[1].reshape(-1, top) + start
            strengths = np.empty(best.shape)
            for j, column in enumerate(best.T):  # a column at a time: all at once is (m, top, d)
                strengths[:, j] = weights[column] * np.maximum(clip_cosines(row_dots(self.items, events[column])), 0)
            self._merge(keys[best], strengths)

    def _merge(self, keys: np.ndarray, strengths: np.ndarray) -> None:
        """The best of those kept and of candidates: keys, strengths (m, c)."""
        keys = np.concatenate([self.keys, keys], axis=1)
        strengths = np.concatenate([self.strengths, strengths], axis=1)
        order = np.lexsort((keys, -strengths), axis=1)[:, : self.k]
        self.keys = np.take_along_axis(keys, order, axis=1)
        self.strengths = np.take_along_axis(strengths, order, axis=1)


def strongest_events(items: np.ndarray, chunks: Iterable[tuple[Sequence[EventRecord], np.ndarray]],
                     k: int = EXPLAINED_EVENTS) -> tuple[list[EventRecord], np.ndarray, np.ndarray]:
    """Per item (`items`, (m, d) unit rows), the k events of largest weight ×
    max(cosine, 0), strongest first, ties by seq: from `chunks` of events
    (each with its vector) and their weights ((n,)), read one at a time
    (StrongestEvents), beside the events best so far. Returns those picked
    for any item, their weights ((c,)) and each item's as (m, min(k, events))
    int64 indices into them."""
    best = StrongestEvents(items, k)
    kept: dict[int, tuple[EventRecord, float]] = {}  # seq -> an event among the best, its weight
    for events, weights in chunks:
        if not events:
            continue
        best.add(np.stack([e.vector for e in events]), weights, np.array([e.seq for e in events], dtype=np.int64))
        held = set(best.keys.ravel().tolist())
        kept = {seq: pair for seq, pair in kept.items() if seq in held}
        kept.update((e.seq, (e, w)) for e, w in zip(events, weights.tolist()) if e.seq in held)
    seqs, nearest = np.unique(best.keys, return_inverse=True)
    picked = [kept[seq] for seq in seqs.tolist()]
    return [e for e, _ in picked], np.array([w for _, w in picked]), nearest.reshape(best.keys.shape)


def per_row(parts: Mapping[str, np.ndarray], n: int) -> list[dict[str, float]]:
    """A blend's parts at n rows (name -> (n,)) as one {name: value} per row."""
    return [{name: float(values[j]) for name, values in parts.items()} for j in range(n)]


def explanations(item_vectors: np.ndarray, parts: Mapping[str, np.ndarray], shares: np.ndarray,
                 centroids: np.ndarray, labels: Sequence[tuple[str, ...]],
                 event_chunks: Iterable[tuple[Sequence[EventRecord], np.ndarray]]) -> list[Explanation]:
    """Why each item (`item_vectors`, (n, d) unit rows) was recommended: up
    to EXPLAINED_INTERESTS interests (`shares` (K,), `centroids` (K, d),
    `labels` each one's label names) that point towards it, by cosine ×
    share, numbered as the profile lists them (`ranked_interests`); up to
    EXPLAINED_EVENTS of the user's positive events (`event_chunks`: lists of
    them, each with its vector, and their decayed weights (m,), read one at a
    time) by weight × cosine (`strongest_events`); and the
    blend's `parts` ((n,) each)."""
    n_clusters = shares.shape[0]
    rank_of = {int(c): r for r, c in enumerate(ranked_interests(shares))}
    cluster_sims = clip_cosines(item_vectors @ centroids.T) if n_clusters else np.zeros((len(item_vectors), 0))
    events, weights, nearest = strongest_events(item_vectors, event_chunks)
    if events:
        event_vectors = np.stack([e.vector for e in events])
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
