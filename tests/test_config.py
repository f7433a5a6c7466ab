"""halflife.config: defaults, overrides, and errors that name the key; `halflife serve --config`."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from halflife.config import (
    DEFAULT_EVENT_TYPES,
    EVENT_TYPE_NAMES,
    Config,
    ConfigError,
    EventTypeConfig,
    ProfileConfig,
    RankingConfig,
    RatingConfig,
    load_config,
    parse_config,
)


def test_event_type_names_follow_the_protos_event_types_in_order():
    """The engine keeps API event types by value (EVENT_TYPE_NAMES[value - 1]):
    a type added to the proto, or two swapped, must show here."""
    from halflife.config import api_event_type
    from halflife.v1 import interest_pb2

    api = {value: name for name, value in interest_pb2.EventType.items() if value}
    assert {api_event_type(name): f"EVENT_TYPE_{name.upper()}" for name in EVENT_TYPE_NAMES[: len(api)]} == api
    assert not {f"EVENT_TYPE_{name.upper()}" for name in EVENT_TYPE_NAMES[len(api):]} & set(api.values())


def test_defaults():
    assert load_config(None) == Config() == parse_config({})
    config = Config()
    assert set(config.event_types) == set(EVENT_TYPE_NAMES)
    assert config.event_types["view"] == EventTypeConfig(1.0, 7.0)
    assert config.event_types["dislike"].weight < 0 and config.event_types["rate_low"].weight < 0
    assert config.event_types["rate_mid"].weight == 0
    assert config.ratings == RatingConfig(positive_min=4.0, negative_max=2.0)
    assert config.profile == ProfileConfig()
    assert config.ranking == RankingConfig()
    assert math.isinf(config.ranking.freshness_half_life_days)
    types = config.decay_types()
    assert list(types.weights) == [DEFAULT_EVENT_TYPES[n].weight for n in EVENT_TYPE_NAMES]
    assert types.half_lives[EVENT_TYPE_NAMES.index("like")] == 90 * 86400


def test_overriding_an_event_type_keeps_the_rest(tmp_path):
    path = tmp_path / "halflife.toml"
    path.write_text(
        "[event_types.view]\nweight = 0.25\n\n"
        "[event_types.purchase]\nhalf_life_days = inf\n\n"
        "[ratings]\npositive_min = 3.5\n\n"
        '[profile]\nmode = "single"\nmax_interests = 4\n\n'
        "[ranking]\nfreshness_half_life_days = 30\nquery_weight = 0.25\n"
    )
    config = load_config(path)
    assert config.event_types["view"] == EventTypeConfig(0.25, 7.0)  # half-life kept
    assert config.event_types["purchase"] == EventTypeConfig(5.0, math.inf)  # weight kept
    assert {n: t for n, t in config.event_types.items() if n not in ("view", "purchase")} == {
        n: t for n, t in DEFAULT_EVENT_TYPES.items() if n not in ("view", "purchase")
    }
    assert config.ratings == RatingConfig(positive_min=3.5, negative_max=2.0)
    assert config.profile == ProfileConfig(mode="single", max_interests=4)
    assert config.ranking == RankingConfig(freshness_half_life_days=30.0, query_weight=0.25)
    assert isinstance(config.ranking.freshness_half_life_days, float)
    assert DEFAULT_EVENT_TYPES["view"] == EventTypeConfig(1.0, 7.0)  # the defaults were not mutated


@pytest.mark.parametrize(
    "data, key",
    [
        ({"unknown": 1}, "unknown"),
        ({"event_types": {"glance": {"weight": 1.0}}}, "event_types.glance"),
        ({"event_types": {"view": {"wieght": 1.0}}}, "event_types.view.wieght"),
        ({"profile": {"k": 3}}, "profile.k"),
        ({"ranking": {"limit": 3}}, "ranking.limit"),
        ({"event_types": {"view": {"weight": "heavy"}}}, "event_types.view.weight"),
        ({"event_types": {"view": {"weight": True}}}, "event_types.view.weight"),
        ({"event_types": {"view": 1.0}}, "event_types.view"),
        ({"event_types": 3}, "event_types"),
        ({"ratings": []}, "ratings"),
        ({"profile": {"max_interests": "8"}}, "profile.max_interests"),
        ({"profile": {"max_interests": 8.0}}, "profile.max_interests"),
        ({"profile": {"max_interests": 0}}, "profile.max_interests"),
        ({"profile": {"mode": "both"}}, "profile.mode"),
        ({"profile": {"combine": "mean"}}, "profile.combine"),
        ({"profile": {"negative_weight": -0.5}}, "profile.negative_weight"),
        ({"profile": {"cache_users": 0}}, "profile.cache_users"),
        ({"event_types": {"like": {"half_life_days": -1}}}, "event_types.like.half_life_days"),
        ({"event_types": {"like": {"half_life_days": 0}}}, "event_types.like.half_life_days"),
        ({"event_types": {"like": {"half_life_days": math.nan}}}, "event_types.like.half_life_days"),
        ({"event_types": {"like": {"weight": math.inf}}}, "event_types.like.weight"),
        # Positive but breaking the arithmetic: infinite decay rates, float32 overflow.
        ({"event_types": {"view": {"half_life_days": 1e-320}}}, "event_types.view.half_life_days"),
        ({"event_types": {"rate": {"weight": 1e308}}}, "event_types.rate.weight"),
        ({"event_types": {"dislike": {"weight": -1e4}}}, "event_types.dislike.weight"),
        ({"blend": {"popularity": 1e308}}, "blend.popularity"),
        ({"blend": {"affinity_half_life_days": 1e-9}}, "blend.affinity_half_life_days"),
        ({"profile": {"negative_weight": 1e9}}, "profile.negative_weight"),
        ({"profile": {"negative_full_share": 1.5}}, "profile.negative_full_share"),
        ({"profile": {"negative_full_share": -0.01}}, "profile.negative_full_share"),
        ({"profile": {"negative_full_share": math.nan}}, "profile.negative_full_share"),
        # Accepted, then every personal call failed: "array is too big" (an audit).
        ({"profile": {"max_interests": 10**15}}, "profile.max_interests"),
        ({"profile": {"max_interests": 65}}, "profile.max_interests"),
        ({"profile": {"kernel_scale_days": 1e-9}}, "profile.kernel_scale_days"),
        ({"ranking": {"freshness_half_life_days": 1e-9}}, "ranking.freshness_half_life_days"),
        ({"blend": {"popularity_half_life_days": -7}}, "blend.popularity_half_life_days"),
        ({"blend": {"max_co_users": -1}}, "blend.max_co_users"),
        ({"blend": {"max_co_users": 2.5}}, "blend.max_co_users"),
        ({"ranking": {"max_limit": 0}}, "ranking.max_limit"),
        ({"ranking": {"query_weight": -0.1}}, "ranking.query_weight"),
        ({"ranking": {"labels_per_interest": -1}}, "ranking.labels_per_interest"),
        # Past GetProfile's own range: 100,000 listed the whole catalogue under every interest (a review).
        ({"ranking": {"items_per_interest": 21}}, "ranking.items_per_interest"),
        ({"ranking": {"labels_per_interest": 21}}, "ranking.labels_per_interest"),
        ({"ratings": {"negative_max": 4.0}}, "ratings.negative_max"),
        ({"ratings": {"negative_max": 3.0, "positive_min": 2.5}}, "ratings.negative_max"),
        ({"ratings": {"positive_min": "4"}}, "ratings.positive_min"),
        ({"ratings": {"highest": 0.0}}, "ratings.highest"),  # under positive_min (4)
        ({"ratings": {"highest": 3.0}}, "ratings.highest"),  # no rating could be positive (a review)
        ({"ratings": {"lowest": 6.0, "highest": 10.0}}, "ratings.lowest"),  # every rating would be
        ({"ratings": {"positive_min": 6.0}}, "ratings.positive_min"),  # over highest (5)
        ({"ratings": {"lowest": -math.inf}}, "ratings.lowest"),
        # Accepted once, then every personal Recommend failed (core.decay takes decay < 1 only).
        ({"profile": {"mode": "single", "kernel": "linear", "kernel_decay": 1.0}}, "profile.kernel_decay"),
        ({"profile": {"mode": "single", "kernel": "exp", "kernel_decay": 0.0}}, "profile.kernel_decay"),
        ({"profile": {"cluster_threshold": 2.0}}, "profile.cluster_threshold"),
        # Past TOML's 64 bits, which tomllib reads: a number key's math.isinf overflowed (a traceback, a review).
        ({"event_types": {"view": {"half_life_days": 10**310}}}, "event_types.view.half_life_days"),
        ({"ranking": {"max_limit": 1 << 63}}, "ranking.max_limit"),
    ],
)
def test_invalid_settings_name_the_key(data, key):
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert str(caught.value).startswith(f"{key}:"), str(caught.value)
    assert "\n" not in str(caught.value)


def test_ratings_bounds_in_the_wrong_order_name_both_values():
    """positive_min's default (4) is not in the file that sets negative_max alone."""
    with pytest.raises(ConfigError, match=r"^ratings.negative_max: must be below ratings.positive_min \(4\), got 4.5$"):
        parse_config({"ratings": {"negative_max": 4.5}})
    # ... and the file that sets positive_min alone is told of the key it wrote (it was negative_max's).
    with pytest.raises(ConfigError, match=r"^ratings.positive_min: must be above ratings.negative_max \(2\), got 1$"):
        parse_config({"ratings": {"positive_min": 1}})
    with pytest.raises(ConfigError, match=r"^ratings.negative_max: must be below ratings.positive_min \(3\), got 3$"):
        parse_config({"ratings": {"positive_min": 3, "negative_max": 3}})


def test_a_linear_kernel_takes_a_decay_of_zero_as_its_kernel_does():
    assert parse_config({"profile": {"mode": "single", "kernel": "linear", "kernel_decay": 0.0}}).profile.kernel_decay == 0


def test_a_bound_is_quoted_exactly():
    """1/1440 days printed as 0.000694444 made "must be at least 0.000694444, got 0.000694444"."""
    with pytest.raises(ConfigError) as caught:
        parse_config({"event_types": {"view": {"half_life_days": 0.000694444}}})
    assert str(caught.value) == ("event_types.view.half_life_days: must be at least 0.0006944444444444445 (1 minute), "
                                 "got 0.000694444")


def test_blend_weights_that_are_all_zero_are_refused():
    """Every personalised score was 0 and the list in id order, said to be personalised (an audit)."""
    with pytest.raises(ConfigError, match=r"^blend: interest, cooccurrence and popularity must not all be 0$"):
        parse_config({"blend": {"interest": 0, "cooccurrence": 0, "popularity": 0}})
    assert parse_config({"blend": {"interest": 0, "cooccurrence": 0}}).blend.popularity > 0  # one is enough


def test_query_weight_above_one_is_refused():
    with pytest.raises(ConfigError, match=r"^ranking\.query_weight:"):
        parse_config({"ranking": {"query_weight": 1.5}})


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[profile\nmode = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    broken.write_text("[ranking]\nmax_limit = 1" + "0" * 4400)  # past int()'s digit limit: a ValueError of its own
    with pytest.raises(ConfigError, match="not valid TOML: Exceeds the limit"):
        load_config(broken)


@pytest.mark.parametrize("kind", ["directory", "binary"])
def test_unreadable_config_files_are_config_errors(tmp_path, kind):
    if kind == "directory":
        path = tmp_path / "conf.d"
        path.mkdir()
    else:
        path = tmp_path / "latin1.toml"
        path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=str(path.name)):
        load_config(path)


def serve_with_config(path: Path, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    # The config is read before the model: a missing model directory is never reached.
    return subprocess.run(
        [sys.executable, "-m", "halflife.cli", "serve", "--port", "0", "--config", str(path),
         "--model-dir", str(tmp_path / "no-model"), "--data-dir", str(tmp_path / "data"), *flags],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(
    "toml, key",
    [
        ("[event_types.view]\nhalf_life_days = -1\n", "event_types.view.half_life_days"),
        ("[profile]\nmax_interests = 'many'\n", "profile.max_interests"),
        ("[ranking]\nnot_a_setting = 1\n", "ranking.not_a_setting"),
        ("[ratings]\nnegative_max = 5.0\n", "ratings.negative_max"),
    ],
)
def test_serve_with_a_bad_config_exits_1_naming_the_key(tmp_path, toml, key):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    result = serve_with_config(path, tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"halflife serve: error: config: {key}:"), lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "data").exists()  # nothing was started


def test_serve_with_a_missing_or_broken_config_file(tmp_path):
    result = serve_with_config(tmp_path / "missing.toml", tmp_path)
    assert result.returncode == 1 and "not found" in result.stderr and "Traceback" not in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[profile\n")
    result = serve_with_config(broken, tmp_path)
    assert result.returncode == 1 and "not valid TOML" in result.stderr and "Traceback" not in result.stderr


def test_serve_with_a_directory_as_config_exits_1_without_traceback(tmp_path):
    result = serve_with_config(tmp_path, tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_config_saved_with_a_byte_order_mark_loads(tmp_path):
    from halflife.config import load_config

    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[ranking]\nmax_limit = 7\n")
    assert load_config(path).ranking.max_limit == 7


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_logs_the_settings_its_config_changes(tmp_path, workers):
    """Nothing said whether `--config` was read or which settings it changed (an onboarding review).
    The line comes before the error that ends the start: logged from a thread of its own, it came
    after it, as if the settings were read once the start had failed."""
    path = tmp_path / "mine.toml"
    path.write_text('[profile]\nmode = "single"\nmax_interests = 8\n[event_types.view]\nweight = 2\n')
    result = serve_with_config(path, tmp_path, "--workers", workers)
    settings = f'settings from {path}: event_types.view.weight = 2.0; profile.mode = "single" (the rest default)'
    assert result.returncode == 1 and settings in result.stderr, result.stderr  # max_interests = 8: not a change
    assert result.stderr.index(settings) < result.stderr.index("manifest.json not found"), result.stderr
    path.write_text("")
    assert f"settings from {path}: the defaults" in serve_with_config(path, tmp_path).stderr
