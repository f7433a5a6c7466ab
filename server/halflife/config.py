"""Decay, weights and ranking settings: documented defaults, overridable by a TOML file (`--config`).

Every key is optional; an unknown key, a wrong type or an out-of-range value
fails at start with a message naming the key (e.g. `event_types.view.weight`).
See docs/configuration.md for the meaning of each setting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from halflife.core.decay import EventTypes

DAY = 86400.0

# Where `serve` (and `eval`) find the exported model and `serve` keeps its
# store, from the working directory: `make serve`'s layout.
DEFAULT_MODEL_DIR = Path("var/models/all-MiniLM-L6-v2")
DEFAULT_DATA_DIR = Path("var/data")
# MiB of requests `serve` handles at once (ServerConfig.max_requests_bytes).
DEFAULT_MAX_REQUESTS_MIB = 256

# Internal event types: the API's EventType values 1..11 in order, then the
# two a rating maps to when it is not positive (low = negative feedback,
# mid = no signal). Index i holds API value i + 1.
EVENT_TYPE_NAMES = (
    "view",
    "click",
    "like",
    "add_to_cart",
    "purchase",
    "rate",
    "review",
    "search",
    "share",
    "dislike",
    "skip",
    "rate_low",
    "rate_mid",
)


def api_event_type(name: str) -> int:
    """The API's EventType value of an event type name (EVENT_TYPE_NAMES)."""
    return EVENT_TYPE_NAMES.index(name) + 1


class ConfigError(ValueError):
    """The config file is invalid; the message names the key."""


@dataclasses.dataclass(frozen=True)
class EventTypeConfig:
    weight: float  # negative: negative feedback
    half_life_days: float  # inf: never decays


# Defaults: a week for browsing signals, a quarter for other deliberate ones,
# half a year for purchases; ratings and reviews (and a low rating's negative
# feedback) a year, chosen on ml-latest-small's validation period by
# `halflife eval` (docs/evaluation.md: 365 d beat 7/30/90 d there). Each
# profile keeps one decayed accumulator per distinct half-life.
DEFAULT_EVENT_TYPES = {
    "view": EventTypeConfig(1.0, 7.0),
    "click": EventTypeConfig(1.5, 7.0),
    "like": EventTypeConfig(3.0, 90.0),
    "add_to_cart": EventTypeConfig(3.0, 7.0),
    "purchase": EventTypeConfig(5.0, 180.0),
    "rate": EventTypeConfig(3.0, 365.0),
    "review": EventTypeConfig(3.0, 365.0),
    "search": EventTypeConfig(1.0, 7.0),
    "share": EventTypeConfig(2.0, 90.0),
    "dislike": EventTypeConfig(-3.0, 90.0),
    "skip": EventTypeConfig(-0.5, 7.0),
    "rate_low": EventTypeConfig(-2.0, 365.0),
    "rate_mid": EventTypeConfig(0.0, 365.0),
}


@dataclasses.dataclass(frozen=True)
class RatingConfig:
    positive_min: float = 4.0  # rating >= this: a positive "rate" event
    negative_max: float = 2.0  # rating <= this: "rate_low" (negative feedback); between: "rate_mid"
    # The scale: RecordEvents refuses a rating outside it (INVALID_ARGUMENT), a typo's 45 for 4.5 among them.
    lowest: float = 0.0
    highest: float = 5.0


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    mode: str = "multi"  # "multi" (interest clusters) or "single" (one decayed vector)
    max_interests: int = 8  # K
    cluster_threshold: float = 0.6  # cosine to join an existing interest (chosen by `halflife eval`)
    combine: str = "sum"  # how interests' similarities combine: "sum" or "max"
    # beta: score -= beta * fade * cos(negative profile, item) (chosen by `halflife eval`), fade =
    # min(1, share / negative_full_share), share the negative events' part of the profile's decayed
    # weight: old negative feedback that newer likes outweigh fades (docs/interest.md); 0: never fades.
    negative_weight: float = 1.0
    negative_full_share: float = 0.01
    cache_users: int = 10_000  # profiles kept in memory; others are rebuilt from the event log (and snapshots)
    # Time kernel of a single-vector profile: "half_life" (each event type's
    # half-life, forward-decayed) or an Elasticsearch function_score kernel,
    # "exp", "gauss" or "linear", computed exactly from the event log at read
    # time with origin = the request's time and the parameters below.
    kernel: str = "half_life"
    kernel_scale_days: float = 30.0  # distance at which the kernel weighs `kernel_decay`
    kernel_offset_days: float = 0.0  # no decay within this distance
    kernel_decay: float = 0.5


@dataclasses.dataclass(frozen=True)
class RankingConfig:
    max_limit: int = 1000
    freshness_half_life_days: float = math.inf  # inf: no freshness decay
    query_weight: float = 0.5  # share of a request's query text (its cosine with each item) in the score
    labels_per_interest: int = 3  # at most MAX_PER_INTEREST
    items_per_interest: int = 3  # at most MAX_PER_INTEREST


@dataclasses.dataclass(frozen=True)
class BlendConfig:
    """How a personalised score is blended from three normalised signals:

        score = ( interest · cos-interest              (in [-1, 1]; minus negative_weight · fade · cos(negative profile))
                + cooccurrence · cooc / max(cooc)      (in [0, 1])
                + popularity · pop / max(pop) )        (in [0, 1])
                / (interest + cooccurrence + popularity)

    cos-interest is the multi-interest (or single) profile's cosine with each
    item; cooc is Σ_i a_i · sim(i, j) over the items i the user consumed,
    with a_i their decayed affinity (event-type weight × 2^(−age /
    affinity_half_life_days)) and sim an item co-occurrence similarity
    (halflife.core.cooccurrence); pop is the decayed count of positive
    events per item (popularity_half_life_days). The maxima are taken over
    the catalogue per request, so the weights are comparable across users.
    Defaults were chosen on the validation period of ml-latest-small by
    `halflife eval` (docs/evaluation.md).
    """

    interest: float = 1.0
    cooccurrence: float = 0.5
    popularity: float = 0.1
    similarity: str = "cosine"  # "count", "jaccard", "cosine" or "lift"
    affinity_half_life_days: float = 365.0  # inf: no decay
    popularity_half_life_days: float = 7.0
    max_co_users: int = 100_000  # 0: no limit


@dataclasses.dataclass(frozen=True)
class Config:
    event_types: dict[str, EventTypeConfig] = dataclasses.field(default_factory=lambda: dict(DEFAULT_EVENT_TYPES))
    ratings: RatingConfig = RatingConfig()
    profile: ProfileConfig = ProfileConfig()
    ranking: RankingConfig = RankingConfig()
    blend: BlendConfig = BlendConfig()

    def decay_types(self) -> EventTypes:
        """The numerical core's view: weight and half-life (seconds) per internal type."""
        return EventTypes(
            np.array([self.event_types[n].weight for n in EVENT_TYPE_NAMES]),
            np.array([self.event_types[n].half_life_days * DAY for n in EVENT_TYPE_NAMES]),
            EVENT_TYPE_NAMES,
        )


# Bounds that keep the arithmetic finite: a half-life of 1e-320 days made every
# decay factor infinite (the server spun and never answered), a weight of 1e308
# overflowed float32 popularity into NaN. Weights are relative; a minute is
# shorter than any interest worth keeping.
MIN_HALF_LIFE_DAYS = 1 / 1440
MAX_WEIGHT = 1000.0
# Each interest holds float64 sums per rate group (K+1 x groups x dim): at 64,
# ~0.8 MB a cached 384-d profile; 10**15 passed, and every personal call failed
# with "array is too big" (an audit).
MAX_INTERESTS = 64
MAX_PER_INTEREST = 20  # labels and items GetProfile lists per interest (and its items_per_interest's range)


def _half_life(value: Any, key: str) -> float:
    return float(_number(value, key, positive=True, minimum=MIN_HALF_LIFE_DAYS, minimum_is="1 minute"))


def _weight(value: Any, key: str, minimum: float = -MAX_WEIGHT) -> float:
    return float(_number(value, key, minimum=minimum, maximum=MAX_WEIGHT))


def _exact(bound: float) -> str:
    """`bound` short where that is exact ("1"), in full where not (1/1440 days
    as 0.0006944444444444445, not 0.000694444, a value it rejects)."""
    return f"{bound:g}" if float(f"{bound:g}") == bound else repr(bound)


def _number(value: Any, key: str, *, minimum: float | None = None, maximum: float | None = None, positive: bool = False,
            integer: bool = False, minimum_is: str = ""):
    """`value` checked as the config key `key`; `minimum_is` names the minimum
    in words where its number does not say it (1/1440 days: "1 minute")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{key}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if isinstance(value, int) and not -(1 << 63) <= value < 1 << 63:
        # TOML's integers are 64-bit, tomllib reads any (and one past ~1e308 overflowed math.isinf: a traceback).
        raise ConfigError(f"{key}: must be a 64-bit integer, as TOML's are; got one of {len(str(abs(value)))} digits")
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{key}: must not be NaN")
    if positive and not value > 0:
        raise ConfigError(f"{key}: must be greater than 0, got {value!r}")
    if minimum is not None and value < minimum:
        named = f" ({minimum_is})" if minimum_is else ""
        raise ConfigError(f"{key}: must be at least {_exact(minimum)}{named}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key}: must be at most {_exact(maximum)}, got {value!r}")
    if not integer and math.isinf(value) and not positive:
        raise ConfigError(f"{key}: must be finite")
    return value


def _check_rating_order(ratings: RatingConfig, given: dict) -> None:
    """lowest <= negative_max < positive_min <= highest: the thresholds inside the scale (a scale up to 3 under
    the default positive_min of 4 made no rating positive, one from 6 up every rating: a review). Each pair is
    named by the key the file set, the first where it set both or neither (a file that set only positive_min
    was told of a negative_max it never wrote: an operations review)."""
    for low, high, strict in (("negative_max", "positive_min", True), ("lowest", "negative_max", False),
                              ("positive_min", "highest", False)):
        a, b = getattr(ratings, low), getattr(ratings, high)
        if a < b or (a == b and not strict):
            continue
        if high in given and low not in given:
            raise ConfigError(f"ratings.{high}: must be {'above' if strict else 'at least'} ratings.{low} ({a:g}), "
                              f"got {b:g}")
        raise ConfigError(f"ratings.{low}: must be {'below' if strict else 'at most'} ratings.{high} ({b:g}), "
                          f"got {a:g}")


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _table(data: dict, key: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table")
    return value


def _reject_unknown(table: dict, known, prefix: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(known))})")


def _section(cls, table: dict, prefix: str, checks: dict[str, Any]):
    """Builds a frozen dataclass section from a TOML table, checking each key."""
    fields = {f.name for f in dataclasses.fields(cls)}
    _reject_unknown(table, fields, prefix)
    values = {}
    for name, value in table.items():
        check = checks[name]
        values[name] = check(value, prefix + name)
    return cls(**values)


def parse_config(data: dict) -> Config:
    """A Config from parsed TOML; raises ConfigError naming the bad key."""
    _reject_unknown(data, {f.name for f in dataclasses.fields(Config)}, "")
    event_types = dict(DEFAULT_EVENT_TYPES)
    types_table = _table(data, "event_types")
    _reject_unknown(types_table, EVENT_TYPE_NAMES, "event_types.")
    for name, table in types_table.items():
        prefix = f"event_types.{name}."
        if not isinstance(table, dict):
            raise ConfigError(f"event_types.{name}: expected a table")
        _reject_unknown(table, {"weight", "half_life_days"}, prefix)
        base = event_types[name]
        event_types[name] = EventTypeConfig(
            weight=_weight(table.get("weight", base.weight), prefix + "weight"),
            half_life_days=_half_life(table.get("half_life_days", base.half_life_days), prefix + "half_life_days"),
        )
    ratings = _section(RatingConfig, _table(data, "ratings"), "ratings.", {
        "positive_min": lambda v, k: float(_number(v, k)),
        "negative_max": lambda v, k: float(_number(v, k)),
        "lowest": lambda v, k: float(_number(v, k)),
        "highest": lambda v, k: float(_number(v, k)),
    })
    _check_rating_order(ratings, _table(data, "ratings"))
    profile = _section(ProfileConfig, _table(data, "profile"), "profile.", {
        "mode": lambda v, k: _choice(v, k, ("multi", "single")),
        "max_interests": lambda v, k: _number(v, k, minimum=1, maximum=MAX_INTERESTS, integer=True),
        "cluster_threshold": lambda v, k: float(_number(v, k, minimum=-1.0, maximum=1.0)),
        "combine": lambda v, k: _choice(v, k, ("sum", "max")),
        "negative_weight": lambda v, k: _weight(v, k, minimum=0.0),
        "negative_full_share": lambda v, k: float(_number(v, k, minimum=0.0, maximum=1.0)),
        "cache_users": lambda v, k: _number(v, k, minimum=1, integer=True),
        "kernel": lambda v, k: _choice(v, k, ("half_life", "exp", "gauss", "linear")),
        "kernel_scale_days": _half_life,
        "kernel_offset_days": lambda v, k: float(_number(v, k, minimum=0.0)),
        "kernel_decay": lambda v, k: float(_number(v, k, minimum=0.0, maximum=1.0)),
    })
    if profile.kernel != "half_life" and profile.mode != "single":
        raise ConfigError('profile.kernel: kernels other than "half_life" need profile.mode = "single"')
    # As core.decay's kernels take it: weight `kernel_decay` at offset + scale.
    if profile.kernel == "linear" and not profile.kernel_decay < 1.0:
        raise ConfigError("profile.kernel_decay: must be below 1 for the linear kernel")
    if profile.kernel in ("exp", "gauss") and not 0.0 < profile.kernel_decay < 1.0:
        raise ConfigError("profile.kernel_decay: must lie strictly between 0 and 1 for the exp and gauss kernels")
    ranking = _section(RankingConfig, _table(data, "ranking"), "ranking.", {
        "max_limit": lambda v, k: _number(v, k, minimum=1, integer=True),
        "freshness_half_life_days": _half_life,
        "query_weight": lambda v, k: float(_number(v, k, minimum=0.0, maximum=1.0)),
        # As GetProfile's items_per_interest: 100,000 listed the whole catalogue under each interest (a review).
        "labels_per_interest": lambda v, k: _number(v, k, minimum=0, maximum=MAX_PER_INTEREST, integer=True),
        "items_per_interest": lambda v, k: _number(v, k, minimum=0, maximum=MAX_PER_INTEREST, integer=True),
    })
    blend = _section(BlendConfig, _table(data, "blend"), "blend.", {
        "interest": lambda v, k: _weight(v, k, minimum=0.0),
        "cooccurrence": lambda v, k: _weight(v, k, minimum=0.0),
        "popularity": lambda v, k: _weight(v, k, minimum=0.0),
        "similarity": lambda v, k: _choice(v, k, ("count", "jaccard", "cosine", "lift")),
        "affinity_half_life_days": _half_life,
        "popularity_half_life_days": _half_life,
        "max_co_users": lambda v, k: _number(v, k, minimum=0, integer=True),
    })
    if blend.interest + blend.cooccurrence + blend.popularity == 0:  # a weighted mean of nothing
        raise ConfigError("blend: interest, cooccurrence and popularity must not all be 0")
    return Config(event_types=event_types, ratings=ratings, profile=profile, ranking=ranking, blend=blend)


def changed_settings(config: Config) -> list[str]:
    """`key = value` for each setting of `config` that is not its default, as a config file writes it."""

    def flat(c: Config) -> dict[str, Any]:
        settings = {f"event_types.{name}.{key}": value for name, types in c.event_types.items()
                    for key, value in dataclasses.asdict(types).items()}
        for section in dataclasses.fields(c):
            if section.name != "event_types":
                settings |= {f"{section.name}.{key}": value
                             for key, value in dataclasses.asdict(getattr(c, section.name)).items()}
        return settings

    defaults = flat(Config())
    return [f"{key} = {toml_value(value)}" for key, value in flat(config).items() if value != defaults[key]]


def toml_value(value: str | float) -> str:
    """A setting's value as a config file writes it: a string quoted, a number (`inf` too) as it is."""
    return json.dumps(value) if isinstance(value, str) else str(value)


def load_config(path: Path | None) -> Config:
    """Defaults, overridden by the TOML file at `path` when given."""
    if path is None:
        return Config()
    return config_from_text(read_config_text(path), path)


def read_config_text(path: Path) -> str:
    """The text of the config file at `path`. Raises ConfigError."""
    try:
        # utf-8-sig: a byte order mark (Windows editors save one) was "not valid TOML ... line 1, column 1".
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc}") from None


def config_from_text(text: str, origin: Path) -> Config:
    """The config in TOML `text`, read from `origin` (named in errors). Raises ConfigError."""
    try:
        data = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or int()'s limit on an integer of over 4,300 digits
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
    return parse_config(data)
