"""`halflife eval`: baselines, Halflife through the InterestEngine (or a
running server), the validation grid, test numbers, plots and the report.

Protocol (docs/evaluation.md): the rating-time quantiles q80 and q90 split
train / validation / test. Validation queries every warm user with a
positive rating in [q80, q90) at t = q80; test does the same for [q90, end)
at t = q90; the second split holds out each user's last 5 ratings. Every
method sees only events before t (the engine's store is filled with exactly
those, through `record_events`), ranks the whole catalogue, and has the
user's consumed items removed the same way.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Sequence

# matplotlib (the eval extra) draws the plots: imported only there, its absence ended a run after all of the
# work, in a traceback (a review); missing here, `halflife eval` says to install the extra before any.
import matplotlib
import numpy as np

from halflife.config import (DEFAULT_EVENT_TYPES, BlendConfig, Config, EventTypeConfig, ProfileConfig, api_event_type,
                             toml_value)
from halflife.datasets.interactions import MOVIELENS, DatasetError
from halflife.embedding.manifest import load_manifest, verify_file
from halflife.eval import baselines as B
from halflife.eval.data import RATING, EvalData, Query, global_cut, leave_last_out, load_eval_data, seen_before, time_quantiles
from halflife.eval.embeddings import embed_texts, is_cached
from halflife.eval.metrics import METRICS, bootstrap_ci, bootstrap_ratio_ci, coverage, ndcg, query_metrics, ranking_from_scores, ranks_of
from halflife.progress import progress

RATE, REVIEW = api_event_type("rate"), api_event_type("review")

# The settings before this evaluation (embedding profile only, 90-day
# half-lives): the grid starts here, so a re-run reproduces the same search
# whatever the shipped defaults are now.
PREVIOUS_DEFAULT = Config(
    event_types={**DEFAULT_EVENT_TYPES, **{n: EventTypeConfig(DEFAULT_EVENT_TYPES[n].weight, 90.0)
                                           for n in ("rate", "review", "rate_low", "rate_mid")}},
    profile=ProfileConfig(cluster_threshold=0.5, negative_weight=0.5, negative_full_share=0.0),
    blend=BlendConfig(interest=1.0, cooccurrence=0.0, popularity=0.0, similarity="cosine",
                      affinity_half_life_days=90.0, popularity_half_life_days=30.0),
)
SEED = 0
REACHABLE_TIMEOUT_S = 10.0  # how long the check of --target before the run waits for an answer
BATCH = 5000


# ------------------------------------------------------------------ engine path


def _embedder(texts: Sequence[str], vectors: np.ndarray) -> Callable[..., np.ndarray]:  # an engine Embedder
    index = {t: i for i, t in enumerate(texts)}
    return lambda batch, deadline=None: vectors[[index[t] for t in batch]]


def _event_inputs(data: EvalData, start: int, stop: int):
    from halflife.interest.types import EventInput

    out = []
    for n in range(start, stop):
        text = data.kinds[n] != RATING
        out.append(EventInput(
            event_id=f"e{n}", user_id=str(data.users[n]), type=REVIEW if text else RATE,
            item_id=data.item_ids[data.items[n]], text=str(data.texts[n]) if text else None,
            value=None if text else float(data.values[n]), event_time=float(data.times[n]),
        ))
    return out


class EngineBackend:
    """An in-process InterestEngine over a SqliteStore in a temp dir."""

    def __init__(self, data: EvalData, item_vectors: np.ndarray, tag_texts, tag_vectors, config: Config, directory: Path):
        from halflife.interest.engine import InterestEngine
        from halflife.interest.types import ItemInput
        from halflife.storage.sqlite import SqliteStore

        self.data, self.directory = data, Path(directory)
        self.embed = _embedder(tag_texts, tag_vectors)
        self.store = SqliteStore(self.directory)
        self.engine = InterestEngine(config, self.store, item_vectors.shape[1], self.embed)
        if not len(self.engine.catalog):
            self.engine.upsert_items([
                ItemInput(id=i, text=t, categories=c, create_time=ct, vector=v)
                for i, t, c, ct, v in zip(data.item_ids, data.item_texts, data.item_categories, data.item_create_times, item_vectors)
            ])
        self.row = {item_id: r for r, item_id in enumerate(data.item_ids)}
        self.n = self.store.event_count()

    def advance(self, t: float) -> None:
        stop = self.data.before(t)
        for start in range(self.n, stop, BATCH):
            self.engine.record_events(_event_inputs(self.data, start, min(start + BATCH, stop)))
        self.n = max(self.n, stop)

    def reopen(self, config: Config) -> "EngineBackend":
        """A fresh engine with another config over the same store (rebuilt at start)."""
        from halflife.interest.engine import InterestEngine

        other = object.__new__(EngineBackend)
        other.__dict__.update(self.__dict__)
        other.engine = InterestEngine(config, self.store, self.engine.dim, self.embed)
        return other

    def ranking(self, q: Query) -> np.ndarray:
        rec = self.engine.recommend(q.user, self.data.n_items, as_of=q.t, include_seen=True)
        return np.array([self.row[i.item_id] for i in rec.items], dtype=np.int64)

    def signals(self, q: Query, which: Sequence[str]) -> dict[str, np.ndarray]:
        """The engine's signals for the query, by dataset row; {} where it ranks trending."""
        signals = self.engine.signals(q.user, q.t, which)
        return {} if signals is None else self._to_data_rows(signals)

    def popularity(self, t: float) -> np.ndarray:
        return self._to_data_rows({"popularity": self.engine.popularity(t)})["popularity"]

    def _to_data_rows(self, signals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Engine catalogue rows (a reopened engine orders items by id) to the dataset's rows."""
        rows = self.engine.catalog.rows(self.data.item_ids)
        return {name: values[rows] for name, values in signals.items()}

    def close(self) -> None:
        self.engine.snapshots.close(timeout=5.0)
        self.store.close()


class TargetError(ValueError):
    """The --target server cannot take the evaluation: it holds items, or
    events of the dataset's users, already, lists fewer than RANKING_LIMIT
    items, or refuses the dataset's ratings."""


# Users whose events a --target is probed for (GetProfile, ~1 ms each): all of
# ml-latest-small's 610, a spread sample of a larger dataset's.
PROBED_USERS = 1000
# Items a test user's list holds (ranks past it count as misses): the server's default ranking.max_limit.
RANKING_LIMIT = 1000


class RemoteBackend:
    """A running server over gRPC (halflife_client): the deployed path. The
    server must start empty; items (embedded by the server) and events
    before each query time are sent through the public API."""

    @staticmethod
    def check(target: str) -> None:
        """Raises grpc.RpcError unless a server answers at `target`, and
        TargetError when its catalogue holds items: they would rank among
        the dataset's, and a run against a used server ended, minutes in,
        on an item the dataset lacks (an audit). Trending for a user
        without events lists an item whenever there is one. Also when it
        refuses lists of RANKING_LIMIT (a smaller ranking.max_limit): the
        first test user's ended the run after the in-process work (a review)."""
        import grpc
        from halflife_client import HalflifeClient

        with HalflifeClient(target, timeout=REACHABLE_TIMEOUT_S) as client:
            client.model_info()
            try:
                held = client.recommend(f"halflife-eval-probe-{uuid.uuid4()}", RANKING_LIMIT).items
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                raise TargetError(f"--target {target} refuses lists of {RANKING_LIMIT} items ({error.details()}); "
                                  f"eval needs its ranking.max_limit at {RANKING_LIMIT} or more") from None
        if held:
            raise TargetError(f"--target {target} already holds items (e.g. {held[0].item_id!r}); eval needs a "
                                "server on an empty --data-dir")

    @staticmethod
    def check_users(target: str, users: np.ndarray) -> None:
        """TargetError when `target` holds events of any of `users` (up to
        PROBED_USERS of them, spread over the sorted ids): a server whose
        items were deleted passed `check`, and those events would have joined
        the dataset's users' profiles."""
        from halflife_client import HalflifeClient

        users = np.unique(users)
        probed = users[np.linspace(0, users.size - 1, min(users.size, PROBED_USERS)).astype(np.int64)]
        with HalflifeClient(target, timeout=REACHABLE_TIMEOUT_S) as client:
            for user in probed.tolist():
                if client.profile(user).event_counts:
                    raise TargetError(f"--target {target} already holds events of the dataset's user {user!r}; "
                                        "eval needs a server on an empty --data-dir")

    @staticmethod
    def check_ratings(target: str, values: np.ndarray) -> None:
        """TargetError when `target`'s rating scale (its config's [ratings])
        leaves out the lowest or highest of the dataset's ratings `values`:
        its first RecordEvents refused them, after the in-process work (a
        review). Probed with a RecordEvents of those ratings of an item
        that no catalogue holds, which stores nothing: NOT_FOUND once they pass."""
        import grpc
        from halflife_client import Event, HalflifeClient

        if not values.size:
            return
        item = f"halflife-eval-probe-{uuid.uuid4()}"
        probe = [Event(event_id=f"{item}-{n}", user_id=item, type=RATE, item_id=item, value=float(value))
                 for n, value in enumerate((values.min(), values.max()))]
        with HalflifeClient(target, timeout=REACHABLE_TIMEOUT_S) as client:
            try:
                client.record_events(probe)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:  # the ratings passed, the item did not
                    return
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                raise TargetError(f"--target {target} refuses the dataset's ratings ({error.details()}); eval needs "
                                  f"its [ratings] scale to hold {values.min():g} to {values.max():g}") from None

    def __init__(self, data: EvalData, target: str):
        from halflife_client import HalflifeClient

        self.data, self.client = data, HalflifeClient(target, timeout=600)
        self.row = {item_id: r for r, item_id in enumerate(data.item_ids)}
        from halflife_client import Item

        items = [Item(id=i, text=t, categories=list(c), create_time=_utc(ct) if ct is not None else None)
                 for i, t, c, ct in zip(data.item_ids, data.item_texts, data.item_categories, data.item_create_times)]
        for start in progress(range(0, len(items), 256), desc="upserting items (server embeds)"):
            self.client.upsert_items(items[start : start + 256])
        self.n = 0

    def advance(self, t: float) -> None:
        from halflife_client import Event

        stop = self.data.before(t)
        for start in range(self.n, stop, 1000):
            events = [Event(event_id=e.event_id, user_id=e.user_id, type=e.type, item_id=e.item_id, text=e.text,
                            value=e.value, event_time=_utc(e.event_time))
                      for e in _event_inputs(self.data, start, min(start + 1000, stop))]
            self.client.record_events(events)
        self.n = max(self.n, stop)

    def ranking(self, q: Query, limit: int = RANKING_LIMIT) -> np.ndarray:
        # Ranks beyond the limit count as misses.
        rec = self.client.recommend(q.user, limit, as_of=_utc(q.t), include_seen=True)
        return np.array([self.row[i.item_id] for i in rec.items], dtype=np.int64)

    def close(self) -> None:
        self.client.close()


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


# ----------------------------------------------------------------- evaluation


@dataclasses.dataclass
class Result:
    per_user: dict[str, np.ndarray]  # metric -> (users,)
    top10: list[np.ndarray]

    def summary(self, n_items: int) -> dict:
        out = {m: bootstrap_ci(v, seed=SEED) for m, v in self.per_user.items()}
        out["coverage@10"] = coverage(self.top10, n_items)
        out["users"] = int(len(self.top10))
        return out


class _Tally:
    """One method's per-query metrics and top 10s, query by query."""

    def __init__(self, n_items: int) -> None:
        self.n_items, self.per, self.tops = n_items, {m: [] for m in METRICS}, []

    def add(self, order: np.ndarray, q: Query) -> None:
        """order: (n,) item rows, best first, without the items seen before q.t."""
        for m, v in query_metrics(ranks_of(order, q.relevant, self.n_items)).items():
            self.per[m].append(v)
        self.tops.append(order[:10])

    def result(self) -> Result:
        return Result({m: np.array(v) for m, v in self.per.items()}, self.tops)


def _score_queries(data: EvalData, queries: Iterable[Query], rank_fn: Callable[[Query, np.ndarray], np.ndarray]) -> Result:
    tally = _Tally(data.n_items)
    for q in queries:
        seen = seen_before(data, q.user, q.t)
        order = rank_fn(q, seen)
        tally.add(order[~seen[order]], q)
    return tally.result()


def evaluate_baselines(data: EvalData, vectors: np.ndarray, queries: list[Query], desc: str) -> dict[str, Result]:
    """Every baseline on `queries` (sorted by t), the history advancing with t."""
    history = B.History(data, vectors)
    tallies = {name: _Tally(data.n_items) for name in B.BASELINES}
    for q in progress(queries, desc=f"baselines ({desc})", unit="user"):
        history.advance(q.t)
        seen = seen_before(data, q.user, q.t)
        for name, fn in B.BASELINES.items():
            tallies[name].add(ranking_from_scores(fn(history, q.user, q.t), seen), q)
    return {name: tally.result() for name, tally in tallies.items()}


def evaluate_backend(backend, data: EvalData, queries: list[Query], desc: str) -> Result:
    """The backend's rankings of `queries`, without the items each user had
    any event with in `data` (the whole evaluation's, as for the baselines:
    a backend may hold fewer events, e.g. no tag texts)."""
    def rank(q: Query, seen: np.ndarray) -> np.ndarray:
        backend.advance(q.t)
        return backend.ranking(q)

    # The bar itself, not a list of it: listed, it ran to the end before the first ranking (a review).
    return _score_queries(data, progress(queries, desc=desc, unit="user", leave=False), rank)


# ------------------------------------------------------------------ the grid


def with_types(config: Config, half_life: float | None = None, **weights_and_lives) -> Config:
    """Config whose rate / review / rate_low types get one half-life (days)
    and/or per-type (weight, half-life) overrides like review=(3.0, 90.0)."""
    types = dict(config.event_types)
    if half_life is not None:
        for name in ("rate", "review", "rate_low", "rate_mid"):
            types[name] = EventTypeConfig(types[name].weight, half_life)
    for name, (w, h) in weights_and_lives.items():
        types[name] = EventTypeConfig(w, h)
    return dataclasses.replace(config, event_types=types)


def _val_ndcg(signals: list[dict[str, np.ndarray]], seen: list[np.ndarray], queries: list[Query], weights: dict[str, float], n_items: int) -> float:
    vals = []
    for sig, s, q in zip(signals, seen, queries):
        score = np.zeros(n_items, dtype=np.float32)
        for name, w in weights.items():
            if w and name in sig:
                score += np.float32(w) * sig[name]
        score[s] = -np.inf
        top = np.argpartition(-score, min(10, n_items - 1))[:10]  # a catalogue of 10 items or fewer: all
        top = top[np.argsort(-score[top], kind="stable")]
        vals.append(ndcg(ranks_of(top, q.relevant, n_items), 10))
    return float(np.mean(vals))


@dataclasses.dataclass
class GridOutcome:
    config: Config
    val_ndcg: float
    trace: list[dict]
    half_life_curve: dict[str, list[tuple[float, float]]]
    weight_curves: dict[str, list[tuple[float, float]]]


def tune(val_backend: EngineBackend, queries: list[Query], base: Config) -> GridOutcome:
    """Coordinate search on the validation period. Profile settings (event
    types, mode, K, threshold) each need an engine; the blend's signals are
    additive, so the engine's own `signals` are computed once per setting and
    the weights searched over them in NumPy. Event-type weights also count
    in co-occurrence (affinities, which events pair) and popularity, so those
    are computed per set of weights too (a review: computed once, under the
    starting weights, the search scored review.weight=0 0.078 where the
    engine gives 0.102)."""
    data = val_backend.data
    n = data.n_items
    seen = [seen_before(data, q.user, q.t) for q in queries]
    trace: list[dict] = []

    profile_cache: dict[str, list[dict]] = {}

    def profile_signals(key: str, config: Config) -> list[dict]:
        if key not in profile_cache:
            b = val_backend.reopen(config)
            profile_cache[key] = [b.signals(q, ("interest", "negative")) for q in queries]
        return profile_cache[key]

    # Profile settings: one half-life for every rating/tag type, mode, K, threshold, combine, type weights.
    half_lives = (7.0, 30.0, 90.0, 365.0, 3650.0)
    profiles: dict[str, Config] = {}
    for h in half_lives:
        profiles[f"hl={h:g}"] = with_types(base, h)
    # Co-occurrence and popularity signals: independent of the profile settings
    # but its event-type weights, computed for each set of weights the search meets.
    cooc_options = [f"{sim}/{ah:g}" for sim in ("cosine", "lift") for ah in (30.0, 365.0, 3650.0)]
    pop_options = [f"{ph:g}" for ph in (7.0, 30.0, 365.0, 3650.0)]
    blend_cache: dict[tuple, list[dict]] = {}

    def blend_signals(config: Config, cooc: str, pop: str) -> tuple[list[dict], list[dict]]:
        """The co-occurrence (option "similarity/affinity half-life") and
        popularity (option "half-life") signals per query under `config`'s
        event-type weights (their half-lives count in neither)."""
        weights = tuple(sorted((name, t.weight) for name, t in config.event_types.items()))

        def cached(option: str, read: Callable[[EngineBackend, Query], dict], **blend) -> list[dict]:
            if (weights, option) not in blend_cache:
                b = val_backend.reopen(dataclasses.replace(
                    base, event_types=config.event_types, blend=dataclasses.replace(base.blend, **blend)))
                blend_cache[weights, option] = [read(b, q) for q in queries]
            return blend_cache[weights, option]

        sim, ah = cooc.split("/")
        return (cached(cooc, lambda b, q: b.signals(q, ("cooccurrence",)), similarity=sim, affinity_half_life_days=float(ah)),
                cached(pop, lambda b, q: {"popularity": b.popularity(q.t)}, popularity_half_life_days=float(pop)))

    def score(choice: dict) -> float:
        config = profiles[choice["profile"]]
        # How negative feedback fades scales each user's negative signal apart: a profile setting.
        config = dataclasses.replace(config, profile=dataclasses.replace(config.profile,
                                                                         negative_full_share=choice["fade"]))
        prof = profile_signals(f"{choice['profile']} fade={choice['fade']:g}", config)
        # A user without positive interest at t (no signals) gets trending from the engine, whatever the weights:
        # blended, they were scored by w_p · popularity, and at w_p = 0 by a tie of zeros (a review).
        merged = [
            {"interest": p["interest"],
             "negative": p.get("negative", np.zeros(n, np.float32)) / np.float32(base.profile.negative_weight or 1.0),
             "cooccurrence": c.get("cooccurrence", np.zeros(n, np.float32)), "popularity": o["popularity"]}
            if p else {"trending": o["popularity"]}
            for p, c, o in zip(prof, *blend_signals(config, choice["cooc"], choice["pop"]))
        ]
        value = _val_ndcg(merged, seen, queries, {"interest": choice["w_i"], "negative": choice["w_i"] * choice["beta"],
                                                   "cooccurrence": choice["w_c"], "popularity": choice["w_p"],
                                                   "trending": 1.0}, n)
        trace.append({**choice, "val_ndcg10": value})
        points.update()
        return value

    space = {
        "profile": list(profiles), "fade": [0.0, 0.01, 0.05, 0.1, 0.25, 1.0], "beta": [0.0, 0.25, 0.5, 1.0],
        "cooc": cooc_options,
        "w_c": [0.0, 0.25, 0.5, 1.0, 2.0, 4.0], "pop": pop_options, "w_p": [0.0, 0.05, 0.1, 0.25, 0.5, 1.0],
        "w_i": [0.0, 0.25, 0.5, 1.0],
    }
    # Minutes at full size (each new profile setting or set of type weights re-reads the engine for every
    # query) were silent: the bar counts the points scored, the extras and the curves once they are known.
    points = progress(total=1 + 2 * sum(len(options) for options in space.values()), desc="validation grid", unit="point")
    best = {"profile": "hl=90", "fade": 0.0, "beta": 0.5, "cooc": "cosine/365", "w_c": 1.0, "pop": "30", "w_p": 0.1,
            "w_i": 1.0}
    best_value = score(best)
    for _ in range(2):
        for key, options in space.items():
            for option in options:
                candidate = {**best, key: option}
                if candidate["w_i"] + candidate["w_c"] + candidate["w_p"] == 0:  # a blend `serve` refuses
                    points.total -= 1
                    continue
                value = score(candidate)
                if value > best_value + 1e-9:
                    best, best_value = candidate, value

    # Extra profile settings around the winner: mode, K, threshold, combine, per-type weights.
    h = float(best["profile"].split("=")[1])
    winner = profiles[best["profile"]]
    extras = {
        "single": dataclasses.replace(winner, profile=dataclasses.replace(winner.profile, mode="single")),
        "K=4": dataclasses.replace(winner, profile=dataclasses.replace(winner.profile, max_interests=4)),
        "K=16": dataclasses.replace(winner, profile=dataclasses.replace(winner.profile, max_interests=16)),
        "thr=0.4": dataclasses.replace(winner, profile=dataclasses.replace(winner.profile, cluster_threshold=0.4)),
        "thr=0.6": dataclasses.replace(winner, profile=dataclasses.replace(winner.profile, cluster_threshold=0.6)),
        "combine=max": dataclasses.replace(winner, profile=dataclasses.replace(winner.profile, combine="max")),
    }
    weight_options = {"rate": (1.0, 3.0, 6.0), "review": (0.0, 1.0, 3.0, 6.0), "rate_low": (0.0, -1.0, -2.0, -4.0)}
    for name, options in weight_options.items():
        for w in options:
            extras[f"{name}.weight={w:g}"] = with_types(winner, None, **{name: (w, h)})
    extras["review.half_life=7"] = with_types(winner, None, review=(winner.event_types["review"].weight, 7.0))
    extras["review.half_life=3650"] = with_types(winner, None, review=(winner.event_types["review"].weight, 3650.0))
    profiles.update(extras)
    points.total += len(extras) + 2 * len(half_lives) + sum(len(options) for options in weight_options.values())
    for key in extras:
        value = score({**best, "profile": key})
        if value > best_value + 1e-9:
            best, best_value = {**best, "profile": key}, value

    # Curves for the plots, everything else at the chosen values: built from the
    # final profile (the extras' winner), not the one before that step (an audit:
    # the curves were drawn at the threshold the extras step then changed).
    final = profiles[best["profile"]]

    def named(name: str, config: Config) -> str:
        """The key of a profile equal to `config` (its signals are computed once), else `name`, added."""
        key = next((k for k, c in profiles.items() if c == config), None)
        if key is None:
            profiles[key := name] = config
        return key

    hl_keys = {hh: named(f"curve: hl={hh:g}", with_types(final, hh)) for hh in half_lives}
    half_life_curve = {
        "blend": [(hh, score({**best, "profile": key})) for hh, key in hl_keys.items()],
        "embedding only": [(hh, score({**best, "profile": key, "w_c": 0.0, "w_p": 0.0, "w_i": 1.0}))
                           for hh, key in hl_keys.items()],
    }
    weight_curves = {
        name: [(w, score({**best, "profile": named(f"curve: {name}.weight={w:g}", with_types(
            final, None, **{name: (w, final.event_types[name].half_life_days)}))})) for w in options]
        for name, options in weight_options.items()
    }

    points.close()
    chosen = profiles[best["profile"]]
    sim, ah = best["cooc"].split("/")
    chosen = dataclasses.replace(
        chosen,
        profile=dataclasses.replace(chosen.profile, negative_weight=best["beta"], negative_full_share=best["fade"]),
        blend=BlendConfig(interest=best["w_i"], cooccurrence=best["w_c"], popularity=best["w_p"], similarity=sim,
                          affinity_half_life_days=float(ah), popularity_half_life_days=float(best["pop"])),
    )
    return GridOutcome(chosen, best_value, trace, half_life_curve, weight_curves)


# --------------------------------------------------------------------- main


def _fmt(ci) -> str:
    return f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"


def _check_writable(path: Path, what: str, directory: bool) -> None:
    """Raises OSError, naming `what`, unless `path` (a directory or a file) can
    be written or created; nothing is created here."""
    if path.exists():
        if path.is_dir() != directory:
            kind = NotADirectoryError if directory else IsADirectoryError
            raise kind(f"{what} {path}: {'not a directory' if directory else 'is a directory'}")
        nearest = path
    else:
        nearest = path.parent
        while not nearest.exists():
            nearest = nearest.parent
        if not nearest.is_dir():
            raise NotADirectoryError(f"{what} {path}: {nearest} is not a directory")
    if not os.access(nearest, os.W_OK):
        raise PermissionError(f"{what} {path}: {nearest} is not writable")


def _checked_variants(model_dir: Path) -> tuple[str, str]:
    """The variants the run embeds with, the fp32 graph's name first, their
    files and the tokenizer checked against the manifest: a missing int8 file
    was found only after the fp32 vectors, ~70 s of embedding (a review).
    Raises ManifestError."""
    manifest = load_manifest(model_dir)
    variants = (manifest.variants[0], manifest.variant("int8"))
    for file, sha256 in (*((v.file, v.sha256) for v in variants), (manifest.tokenizer_file, manifest.tokenizer_sha256)):
        verify_file(model_dir, file, sha256)
    return variants[0].name, variants[1].name


def data_source(data_dir: Path) -> dict:
    """The report's data: its directory's name and the licence terms of
    MovieLens (the format eval reads), which ask to be stated with results
    derived from it: tables.md carried none (a review)."""
    return {"directory": Path(os.path.abspath(data_dir)).name, "terms": MOVIELENS.terms}


def run(data_dir: Path, model_dir: Path, out_dir: Path, cache_dir: Path, target: str | None = None,
        config_out: Path | None = None) -> dict:
    """Raises DatasetError for a bad dataset (with `target`, one whose times
    the server's API refuses too), ManifestError for a bad model
    directory, OSError for an output that cannot be written and grpc.RpcError
    for a `target` that does not answer, before any work (the run takes
    minutes); grpc.RpcError too for a call to `target` that fails later."""
    started = time.perf_counter()
    np.random.seed(SEED)
    _check_writable(out_dir, "output directory", directory=True)
    try:
        _check_writable(cache_dir, "cache directory", directory=True)
        read_only_cache = None
    except PermissionError as exc:  # enough where it holds every vector needed: checked once the texts are known
        read_only_cache = exc
    if config_out:
        _check_writable(config_out, "config file", directory=False)
    if target:
        RemoteBackend.check(target)
    fp32, int8 = _checked_variants(model_dir)
    window = {}
    if target:  # times its API refuses (before 1970, over a day ahead), as load-movielens: they stopped the run at
        # the first RecordEvents, after the in-process work, with the items upserted (a review)
        from halflife.api.validation import event_time_window

        window = event_time_window(time.time())
    data = load_eval_data(data_dir, **window)
    if target:
        RemoteBackend.check_users(target, data.users)
        RemoteBackend.check_ratings(target, data.values[data.kinds == RATING])
    q80, q90 = time_quantiles(data, 0.8, 0.9)
    val_q = global_cut(data, q80, q90)
    test_q = global_cut(data, q90, math.inf)
    test_all_q = global_cut(data, q90, math.inf, warm_only=False)
    loo_q = leave_last_out(data, 5)
    for name, queries in (("validation", val_q), ("test", test_q), ("leave-last-5", loo_q)):
        if not queries:  # every number NaN, and --write-config a search over nobody, exit 0 (a review)
            raise DatasetError(f"{data_dir}: the {name} split holds no user (a user with history who rated an item "
                               "4 or more in it): the evaluation needs star ratings over time, as MovieLens's")
    tag_texts = sorted(set(data.texts[data.kinds != RATING].tolist()))
    if read_only_cache:  # a read-only cache was refused even where it held every vector (a review)
        for variant in (fp32, int8):
            for what, texts in (("items", data.item_texts), ("tags", tag_texts)):
                if not is_cached(texts, model_dir, variant, cache_dir, what):
                    raise PermissionError(f"{read_only_cache}, and it lacks the {what}' vectors ({variant}) this "
                                          "run would embed and write there")
    # Tuned and reported on the fp32 graph, the reference the defaults were
    # chosen on; the "int8 model" row is what a CPU server embeds with where
    # int8 validated (docs/evaluation.md), and so is the gRPC row.
    vec = {v: embed_texts(data.item_texts, model_dir, v, cache_dir, "items") for v in (fp32, int8)}
    tags = {v: embed_texts(tag_texts, model_dir, v, cache_dir, "tags") for v in (fp32, int8)}
    report: dict = {"data": data_source(data_dir),
                    "split": {"q80": q80, "q90": q90, "val_users": len(val_q), "test_users": len(test_q),
                              "test_users_incl_cold": len(test_all_q), "loo_users": len(loo_q)}}

    results: dict[str, dict[str, Result]] = {"test": {}, "test_all": {}, "loo": {}, "val": {}}
    results["val"].update(evaluate_baselines(data, vec[fp32], val_q, "validation"))
    results["test"].update(evaluate_baselines(data, vec[fp32], test_q, "test"))
    results["test_all"].update(evaluate_baselines(data, vec[fp32], test_all_q, "test, incl. cold users"))
    results["loo"].update(evaluate_baselines(data, vec[fp32], loo_q, "leave-last-5"))

    with tempfile.TemporaryDirectory(prefix="halflife-eval-") as tmp:
        tmp = Path(tmp)
        base = PREVIOUS_DEFAULT
        val = EngineBackend(data, vec[fp32], tag_texts, tags[fp32], base, tmp / "val")
        val.advance(q80)
        outcome = tune(val, val_q, base)
        chosen = outcome.config
        shipped = Config()
        # The variants vary what users get, the shipped defaults, which the search's choice need not be (a
        # weight of 0 for an event type, say, chosen on 21 users: docs/evaluation.md); both are reported.
        chosen_differs = _config_dict(chosen) != _config_dict(shipped)
        results["val"]["Halflife (chosen, engine)"] = evaluate_backend(val.reopen(chosen), data, val_q, "validation check")
        if chosen_differs:
            results["val"]["Halflife default (blend)"] = evaluate_backend(val.reopen(shipped), data, val_q, "validation")
        val.close()

        test = EngineBackend(data, vec[fp32], tag_texts, tags[fp32], shipped, tmp / "test")
        test.advance(q90)
        no_tags = data.without_texts()
        test_nt = EngineBackend(no_tags, vec[fp32], tag_texts, tags[fp32], shipped, tmp / "test-notags")
        test_nt.advance(q90)
        test_i8 = EngineBackend(data, vec[int8], tag_texts, tags[int8], shipped, tmp / "test-int8")
        test_i8.advance(q90)
        bl = shipped.blend

        def profile_with(**changes) -> Config:
            return dataclasses.replace(shipped, profile=dataclasses.replace(shipped.profile, **changes))

        variants = {
            "Halflife default (blend)": (test, shipped),
            **({"chosen on validation": (test, chosen)} if chosen_differs else {}),
            "− co-occurrence": (test, dataclasses.replace(shipped, blend=dataclasses.replace(bl, cooccurrence=0.0))),
            "− popularity prior": (test, dataclasses.replace(shipped, blend=dataclasses.replace(bl, popularity=0.0))),
            "− embedding interest": (test, dataclasses.replace(shipped, blend=dataclasses.replace(bl, interest=0.0))),
            "− negative feedback": (test, profile_with(negative_weight=0.0)),
            "negative feedback never fades (full share 0)": (test, profile_with(negative_full_share=0.0)),
            "negative feedback by its share (full share 1)": (test, profile_with(negative_full_share=1.0)),
            "single-interest": (test, profile_with(mode="single")),
            "multi-interest": (test, profile_with(mode="multi")),
            "previous event-type settings (90 d)": (test, dataclasses.replace(shipped, event_types=PREVIOUS_DEFAULT.event_types)),
            "per-type half-lives (review 7 d)": (test, with_types(shipped, None, review=(shipped.event_types["review"].weight, 7.0))),
            "without tag-text events": (test_nt, shipped),
            "int8 model": (test_i8, shipped),
            "embedding only (previous default)": (test, PREVIOUS_DEFAULT),
        }
        for name, (backend, config) in progress(variants.items(), desc="Halflife variants (test)"):
            results["test"][name] = evaluate_backend(backend.reopen(config), data, test_q, name)
        results["test_all"]["Halflife default (blend)"] = evaluate_backend(test.reopen(shipped), data, test_all_q, "incl. cold")
        for b in (test, test_nt, test_i8):
            b.close()

        loo = EngineBackend(data, vec[fp32], tag_texts, tags[fp32], shipped, tmp / "loo")
        results["loo"]["Halflife default (blend)"] = evaluate_backend(loo, data, loo_q, "leave-last-5 (streaming)")
        interest_plot_data = _interest_history(loo, data, q90)
        loo.close()

    if target:
        remote = RemoteBackend(data, target)
        results["test"][f"Halflife via gRPC ({target})"] = evaluate_backend(remote, data, test_q, "gRPC")
        remote.close()

    seconds = time.perf_counter() - started
    summary = {split: {name: r.summary(data.n_items) for name, r in rs.items()} for split, rs in results.items()}
    best_name = max(B.BASELINES, key=lambda nm: summary["test"][nm]["NDCG@10"][0])
    ratios = {split: bootstrap_ratio_ci(results[split]["Halflife default (blend)"].per_user["NDCG@10"],
                                        results[split][best_name if split == "test" else max(B.BASELINES, key=lambda nm: summary[split][nm]["NDCG@10"][0])].per_user["NDCG@10"], seed=SEED)
              for split in ("test", "loo")}
    report.update({
        "chosen_config": _config_dict(chosen), "chosen_is_shipped_default": not chosen_differs, "val_ndcg10_grid": outcome.val_ndcg, "best_baseline_test": best_name,
        "ratio_vs_best_baseline": ratios, "seconds": seconds, "metrics": summary, "grid_trace": outcome.trace,
        "half_life_curve": outcome.half_life_curve, "weight_curves": outcome.weight_curves,
    })
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no empty directory
    write_results(report, out_dir)
    _plots(report, interest_plot_data, out_dir)
    write_tables(report, out_dir)
    if config_out:
        config_out.parent.mkdir(parents=True, exist_ok=True)
        config_out.write_text(_config_toml(chosen))
    print(_table(summary["test"]))
    print(f"test NDCG@10 ratio vs {best_name}: {_fmt(ratios['test'])}; leave-last-5: {_fmt(ratios['loo'])}; {seconds:.0f} s")
    return report


def write_results(report: dict, out: Path) -> None:
    """results.json: the report, as strict JSON."""
    (out / "results.json").write_text(json.dumps(_finite(report), indent=1, default=float, allow_nan=False))


def _finite(value):
    """`value` with every infinite or NaN float (a ratio's bound where the
    baseline scored 0) as None: Python wrote them as Infinity, which is not
    JSON, and Node's JSON.parse refused the file (a review)."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def _config_dict(c: Config) -> dict:
    return {"event_types": {n: dataclasses.asdict(t) for n, t in c.event_types.items() if n in ("rate", "review", "rate_low", "rate_mid")},
            "profile": dataclasses.asdict(c.profile), "blend": dataclasses.asdict(c.blend)}


def _config_toml(c: Config) -> str:
    d = _config_dict(c)
    lines = []
    for name, t in d["event_types"].items():
        lines += [f"[event_types.{name}]", f"weight = {t['weight']}", f"half_life_days = {t['half_life_days']}", ""]
    for section in ("profile", "blend"):
        lines.append(f"[{section}]")
        for k, v in d[section].items():
            lines.append(f"{k} = {toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _table(summary: dict) -> str:
    head = "| method | users | " + " | ".join(METRICS) + " | coverage@10 |\n|---|---|" + "---|" * (len(METRICS) + 1)
    rows = [f"| {name} | {s['users']} | " + " | ".join(_fmt(s[m]) for m in METRICS) + f" | {s['coverage@10']:.3f} |"
            for name, s in summary.items()]
    return "\n".join([head] + rows)


def _interest_history(backend: EngineBackend, data: EvalData, until: float):
    """One real user's interests over time: the user with the most rating days before `until`."""
    e = backend.engine
    index = data.by_user
    mask = (data.kinds == RATING) & (data.times < until)
    per_code = np.bincount(index.codes[mask], minlength=len(index.code))
    users = np.array(sorted(u for u, k in index.code.items() if per_code[k]), dtype=object)  # as np.unique lists them
    counts = per_code[[index.code[u] for u in users]]

    def rating_times(user: str) -> np.ndarray:
        mine = data.user_events(user, data.before(until))
        return data.times[mine[data.kinds[mine] == RATING]]

    days = {u: len(np.unique(rating_times(u) // 86400)) for u in users[np.argsort(-counts)[:30]]}
    user = max(days, key=days.get)
    times = rating_times(user)
    points = np.linspace(times.min() + 86400, min(times.max() + 180 * 86400, until), 24)
    series = []
    for t in points:
        p = e.profile(user, as_of=float(t), items_per_interest=0)
        series.append((float(t), [(i.labels[0][0] if i.labels else "?", i.strength, i.trend) for i in p.interests]))
    return {"user": user, "series": series}


def _plots(report: dict, interest: dict, out: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in report["half_life_curve"].items():
        x, y = zip(*curve)
        ax.plot(x, y, marker="o", label=name)
    ax.set_xscale("log"); ax.set_xlabel("profile half-life (days, all rating/tag types)"); ax.set_ylabel("validation NDCG@10")
    ax.set_title("NDCG@10 against half-life (validation)"); ax.legend(); fig.tight_layout(); fig.savefig(out / "ndcg_vs_half_life.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in report["weight_curves"].items():
        x, y = zip(*curve)
        ax.plot(x, y, marker="o", label=f"{name} weight")
    ax.set_xlabel("event-type weight"); ax.set_ylabel("validation NDCG@10"); ax.set_title("Per-event-type weight sensitivity (validation)")
    ax.legend(); fig.tight_layout(); fig.savefig(out / "event_type_weights.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels: dict[str, list] = {}
    for k, (t, interests) in enumerate(interest["series"]):
        per: dict[str, float] = {}
        for label, strength, _ in interests:
            per[label] = per.get(label, 0.0) + strength
        for label, s in per.items():
            labels.setdefault(label, [np.nan] * len(interest["series"]))[k] = s
    when = [dt.datetime.fromtimestamp(t, tz=dt.timezone.utc) for t, _ in interest["series"]]
    for label, ys in sorted(labels.items(), key=lambda kv: -np.nanmax(kv[1]))[:8]:
        ax.plot(when, ys, marker=".", label=label)
    last = {label: trend for label, _, trend in interest["series"][-1][1]}
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("decayed interest strength (symlog)"); ax.set_title(f"MovieLens user {interest['user']}: interests over time (final trend: "
                                                              + ", ".join(f"{k} {v}" for k, v in list(last.items())[:3]) + ")", fontsize=8)
    ax.legend(fontsize=7); fig.autofmt_xdate(); fig.tight_layout(); fig.savefig(out / "user_interests.png", dpi=120)
    plt.close(fig)


def write_tables(report: dict, out: Path) -> None:
    """bench/results/eval/tables.md: every method × metric (mean [95% CI]) per split."""
    titles = {
        "test": "Test period (global cut at q90, warm users)",
        "test_all": "Test period including cold-start users",
        "loo": "Second split: per-user leave-last-5-out by time (streaming)",
        "val": "Validation period (global cut at q80; used for tuning)",
    }
    parts = [f"Run time: {report['seconds']:.0f} s. Best baseline on test: {report['best_baseline_test']}. "
             f"Chosen config equals the shipped default: {report.get('chosen_is_shipped_default')}.",
             "", f"Data: {report['data']['directory']}. {report['data']['terms']}".rstrip()]
    for split in ("test", "loo", "test_all", "val"):
        parts += ["", f"### {titles[split]}", "", _table(report["metrics"][split])]
    r = report["ratio_vs_best_baseline"]
    parts += ["", f"NDCG@10 ratio, default / best baseline (paired bootstrap): test {_fmt(r['test'])}, leave-last-5 {_fmt(r['loo'])}"]
    (out / "tables.md").write_text("\n".join(parts) + "\n")
