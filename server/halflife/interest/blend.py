"""The blend of one user's signals over the catalogue: what Recommend ranks.

`CatalogueScan` holds what the interest engine copies out under its lock
(profile vectors; the other signals as functions) and makes the pass over
every catalogue row after the lock is released. `Blend` is what it gives:
the scores, and the terms they sum at chosen rows, for explanations.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from halflife.core.profiles import interest_mix, interest_scores
from halflife.core.ranking import RowBlocks, cosine_scores, normalize, row_dots

Later = Callable[[], np.ndarray]  # a signal whose work may run after the engine lock is released


def unit_max(values: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """values / max(values) as `dtype` (all zeros stay zeros): a signal in [0, 1]."""
    peak = float(values.max(initial=0.0))
    return (values / peak if peak > 0 else np.zeros_like(values)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class CatalogueScan:
    """The signals that read every catalogue row (a dot product per row),
    with the profile vectors they need copied out under the engine lock, so
    that the scan itself runs after the lock is released: NumPy lets go of
    the GIL in the product, and concurrent Recommends then use every core.

    `items` is a view of the catalogue's rows: a row deleted meanwhile is
    dropped when the results are confirmed under the lock, and a row updated
    meanwhile scores as the old or the new vector (or, while it is being
    copied, a mix of both) for this one call, as a call just before or after
    the update would. A compaction moves rows within it (CatalogIndex.compact):
    the confirmation sees the catalogue's epoch moved on and the call starts
    again, so `Blend.parts_at` is read before the lock is let go.

    `later` are the blend's other signals, as functions: cheap reads of the
    present were taken under the lock, and a look into the past rebuilds
    from copies taken under it (co-occurrence pairs, the popularity log),
    which at 1M events held every other call up for 1.3 s."""

    items: np.ndarray  # (N, d) float32 unit rows
    centroids: np.ndarray | None = None  # (K, d) interests (multi mode)
    importances: np.ndarray | None = None  # (K,)
    combine: str = "sum"
    positive: np.ndarray | None = None  # (d,) the single profile (single mode)
    negative: np.ndarray | None = None  # (d,) the negative profile, when it has mass
    negative_weight: float = 0.0
    later: Mapping[str, Later] = dataclasses.field(default_factory=dict)  # name -> signal, any scale (`_dense`)

    def blend(self, blocks: RowBlocks, weights: Mapping[str, float]) -> Blend:
        """Σ weights[name] · signal (the signals as in
        `InterestEngine._signal_sources`; the blend's other signals divided by
        their maximum, so in [0, 1]), in one pass over the rows split into
        `blocks`: each block adds the other signals while its scores are in
        the cache. Linear profile terms (a single profile, "sum" interests,
        the negative profile) make one dot product per row together."""
        dense = self._dense(weights)
        terms = self._profile_terms(weights)  # name -> (rows -> weighted scores, direction or None, weight)
        directions = [direction for _, direction, _ in terms.values()]
        linear = bool(terms) and all(direction is not None for direction in directions)
        combined = np.sum(directions, axis=0, dtype=np.float32) if linear else None

        def score(rows: np.ndarray, *columns: np.ndarray) -> np.ndarray:
            if combined is not None:
                out = row_dots(rows, combined)
            elif terms:
                out = sum(term(rows) for term, _, _ in terms.values())
            else:
                out = np.zeros(rows.shape[0], dtype=np.float32)
            for (_, _, factor), column in zip(dense, columns):
                out += factor * column
            return out

        scores = blocks(score, self.items, *(values for _, values, _ in dense))
        # Each profile term lies in ±|weight|, each other signal in [0, its weight].
        reach = sum(abs(weight) for _, _, weight in terms.values())
        high = reach + sum(weights[name] for name in self.later)
        return Blend(scores.astype(np.float32, copy=False), lambda rows: self._parts(rows, terms, dense), -reach, high)

    def parts(self, weights: Mapping[str, float]) -> dict[str, np.ndarray]:
        """Each weighted term of `blend` over the whole catalogue, apart,
        without the blended pass. Returns name -> (N,) float32."""
        return self._parts(slice(None), self._profile_terms(weights), self._dense(weights))

    def _dense(self, weights: Mapping[str, float]) -> list[tuple[str, np.ndarray, float]]:
        """The blend's other signals: (name, (N,) values, weight / their maximum)."""
        dense = []
        for name, signal in self.later.items():
            values = signal()
            peak = float(values.max(initial=0.0))
            dense.append((name, values, weights[name] / peak if peak > 0 else 0.0))
        return dense

    def _parts(self, rows, terms, dense) -> dict[str, np.ndarray]:
        """The weighted terms at `rows` (an index array, or a slice)."""
        items = self.items[rows]
        parts = {name: term(items) for name, (term, _, _) in terms.items()}
        return parts | {name: (factor * values[rows]).astype(np.float32) for name, values, factor in dense}

    def _profile_terms(self, weights: Mapping[str, float]) -> dict[str, tuple[Callable, np.ndarray | None, float]]:
        """The profile's terms, "interest" and "negative", as weighted
        scorers of rows, each with the direction it scores rows against
        where it is linear (None: "max" interests) and the weight by which it
        multiplies a cosine (so it lies in ±|weight|)."""
        terms: dict[str, tuple[Callable, np.ndarray | None, float]] = {}
        w = np.float32(weights.get("interest", 0.0))
        if self.centroids is not None:
            linear = self.combine == "sum"
            terms["interest"] = (
                lambda rows: w * interest_scores(rows, self.centroids, self.importances, mode=self.combine),
                w * interest_mix(self.centroids, self.importances) if linear else None,
                float(w),
            )
        elif self.positive is not None:
            terms["interest"] = (lambda rows: w * cosine_scores(self.positive, rows), w * normalize(self.positive),
                                 float(w))
        if self.negative is not None and weights.get("negative", 0.0) > 0:
            v = -np.float32(weights["negative"] * self.negative_weight)
            terms["negative"] = (lambda rows: v * cosine_scores(self.negative, rows), v * normalize(self.negative),
                                 float(v))
        return terms


@dataclasses.dataclass(frozen=True)
class Blend:
    """Blended scores over the catalogue, the bounds the blend's weights put
    on them, and, for explanations, the terms they sum at chosen rows."""

    scores: np.ndarray  # (N,) float32; a freshened blend's: their log2, float64 (see `freshened`)
    parts_at: Callable[[np.ndarray], dict[str, np.ndarray]]  # rows (m,) -> name -> (m,)
    low: float = 0.0  # every score lies in [low, high]
    high: float = 1.0
    log2: bool = False  # scores hold log2 of the scores

    @classmethod
    def of(cls, name: str, values: np.ndarray) -> "Blend":
        """One signal, already divided by its maximum (see `unit_max`): (N,) float32 (or float64) in [0, 1]."""
        return cls(values, lambda rows: {name: values[rows]})

    def freshened(self, log2_fresh: np.ndarray) -> "Blend":
        """Scores moved from [low, high] to [0, 1], so that age always lowers
        them, times the items' freshness 2^log2_fresh (log2_fresh: (N,) <= 0,
        `log2_freshness`), held as log2 in float64: as float32 products, the
        scores of items older than ~149 half-lives were all 0 and ranked by
        id, whatever their relevance. A score of 0 stays the lowest and
        still rankable (log2 of 0, -inf, would exclude it). The freshness
        shows as a part of its own. The last step of a blend."""
        parts_at, span = self.parts_at, self.high - self.low
        unit = (np.clip((self.scores - np.float32(self.low)) / np.float32(span), 0, 1) if span > 0
                else np.ones(self.scores.shape, dtype=np.float32))
        with np.errstate(divide="ignore"):
            scores = np.log2(unit, dtype=np.float64) + log2_fresh
        scores[unit == 0] = np.finfo(np.float64).min
        return Blend(scores, lambda rows: parts_at(rows) | {"freshness": np.exp2(log2_fresh[rows]).astype(np.float32)},
                     log2=True)

    def reported(self, ranked: np.ndarray) -> np.ndarray:
        """The scores to show for `ranked`, values of `scores` (float32)."""
        return np.exp2(ranked).astype(np.float32) if self.log2 else ranked

    def mixed(self, name: str, values: np.ndarray, weight: float) -> "Blend":
        """(1 − weight) · these scores + weight · values (a cosine, in [-1, 1]), a part of its own."""
        assert not self.log2, "a freshened blend is final: mix before freshening"
        parts_at = self.parts_at
        return Blend((1 - weight) * self.scores + weight * values,
                     lambda rows: {n: (1 - weight) * v for n, v in parts_at(rows).items()} | {name: weight * values[rows]},
                     (1 - weight) * self.low - weight, (1 - weight) * self.high + weight)
