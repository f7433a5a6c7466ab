"""Elasticsearch function_score kernels as a profile's time kernel, computed exactly from the stored log."""

from __future__ import annotations

import numpy as np
import pytest

from halflife.config import Config, ConfigError, ProfileConfig, parse_config
from halflife.interest.engine import InterestEngine
from halflife.interest.types import EventInput, ItemInput
from halflife.storage.sqlite import SqliteStore
from tests.fakes import DIM, fake_embed

DAY = 86400.0
T = 1_700_000_000.0
LIKE, DISLIKE = 3, 10


def single_profile(engine: InterestEngine, user_id: str, t: float):
    with engine._lock:
        return engine._single_profile(user_id, engine._user_state(user_id, t), t)


def engine_with(config: Config, tmp_path) -> InterestEngine:
    engine = InterestEngine(config, SqliteStore(tmp_path), DIM, fake_embed, clock=lambda: T)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(40)])
    ages = [1, 3, 10, 30, 90, 200]
    events = [EventInput(f"e{n}", "u", LIKE, f"i{n}", None, None, T - age * DAY) for n, age in enumerate(ages)]
    events.append(EventInput("d", "u", DISLIKE, "i7", None, None, T - 2 * DAY))
    engine.record_events(events)
    return engine


@pytest.mark.parametrize("kind", ["exp", "gauss", "linear"])
def test_kernel_profile_scores_equal_a_brute_force_recomputation(kind, tmp_path):
    profile = ProfileConfig(mode="single", kernel=kind, kernel_scale_days=20.0, kernel_offset_days=2.0,
                            kernel_decay=0.4, negative_full_share=0.5)
    config = Config(profile=profile)
    engine = engine_with(config, tmp_path)
    got = engine.recommend("u", 40, as_of=T, include_seen=True, explain=False)
    scores = {item.item_id: item.score for item in got.items}

    # By hand: ES function_score formulas, distance from the origin T minus the offset.
    items = engine.catalog.vectors
    scale, offset, decay = 20 * DAY, 2 * DAY, 0.4
    def weight(age):
        d = max(0.0, age - offset)
        if kind == "exp":
            return np.exp(np.log(decay) / scale * d)
        if kind == "gauss":
            return np.exp(-d * d / (2 * (-scale ** 2 / (2 * np.log(decay)))))
        s = scale / (1 - decay)
        return max(0.0, (s - d) / s)
    positive = np.zeros(DIM)
    negative = np.zeros(DIM)
    strengths = {True: 0.0, False: 0.0}
    for event in engine.store.user_events("u"):
        w = config.event_types["like" if event.type == LIKE else "dislike"].weight * weight(T - event.event_time)
        strengths[w > 0] += abs(w)
        if w > 0:
            positive += w * event.vector
        else:
            negative -= w * event.vector
    cos = lambda v: items @ (v / np.linalg.norm(v))
    blend = config.blend
    share = strengths[False] / (strengths[True] + strengths[False])
    fade = min(1.0, share / profile.negative_full_share)
    assert fade < 1  # one dislike beside six likes
    interest = cos(positive) - profile.negative_weight * fade * cos(negative)
    # The blend's other parts are the engine's own; compare the interest part.
    explained = engine.recommend("u", 40, as_of=T, include_seen=True, explain=True)
    for item in explained.items:
        row = engine.catalog.row_of[item.item_id]
        parts = item.explanation.score_parts
        share = blend.interest / (blend.interest + blend.cooccurrence + blend.popularity)
        assert parts["interest"] + parts.get("negative", 0.0) == pytest.approx(share * interest[row], abs=1e-5)
        assert scores[item.item_id] == pytest.approx(item.score, abs=1e-6)


def test_a_linear_kernel_forgets_events_beyond_its_reach(tmp_path):
    """linear, scale 5 days, decay 0.5: weight (10 - age) / 10, zero beyond 10 days."""
    short = Config(profile=ProfileConfig(mode="single", kernel="linear", kernel_scale_days=5.0, kernel_decay=0.5))
    engine = engine_with(short, tmp_path)
    events = {e.event_id: e for e in engine.store.user_events("u")}
    like = short.event_types["like"].weight
    expected = like * (0.9 * events["e0"].vector + 0.7 * events["e1"].vector)  # liked 1 and 3 days ago
    positive, negative, weight, negative_strength = single_profile(engine, "u", T)
    np.testing.assert_allclose(positive, expected, atol=1e-6)
    assert weight == pytest.approx(like * (0.9 + 0.7))
    dislike = -short.event_types["dislike"].weight
    np.testing.assert_allclose(negative, dislike * 0.8 * events["d"].vector, atol=1e-6)
    assert negative_strength == pytest.approx(dislike * 0.8)  # disliked 2 days ago
    # Ten days earlier, only the 30-day-old like (then 20 days old) is out of reach too.
    earlier = single_profile(engine, "u", T - 10 * DAY).positive
    np.testing.assert_allclose(earlier, like * 1.0 * events["e2"].vector, atol=1e-6)  # liked exactly then


def test_kernels_other_than_half_life_need_single_mode():
    with pytest.raises(ConfigError, match=r"^profile\.kernel:"):
        parse_config({"profile": {"kernel": "gauss"}})
    assert parse_config({"profile": {"kernel": "gauss", "mode": "single"}}).profile.kernel == "gauss"
    with pytest.raises(ConfigError, match=r"^profile\.kernel_decay:"):
        parse_config({"profile": {"kernel": "exp", "mode": "single", "kernel_decay": 1.0}})



def test_the_kernel_decides_between_personalised_and_trending(tmp_path):
    """The choice went by the event types' half-lives while the scores went
    by the kernel (an audit): a like beyond a linear kernel's reach made a
    'personalized' list of popularity alone, and a 1970 view inside a
    30,000-day kernel's reach (its 7-day half-life long decayed to 0) made
    a trending one."""
    short = Config(profile=ProfileConfig(mode="single", kernel="linear", kernel_scale_days=5.0, kernel_decay=0.5))
    engine = InterestEngine(short, SqliteStore(tmp_path / "short"), DIM, fake_embed, clock=lambda: T)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(10)])
    engine.record_events([EventInput("old", "u", LIKE, "i0", None, None, T - 30 * DAY),  # 10 days is its reach
                          EventInput("other", "v", LIKE, "i1", None, None, T - DAY)])
    beyond = engine.recommend("u", 5, as_of=T)
    assert beyond.strategy == "trending"
    assert engine.signals("u", T) is None  # what `halflife eval` blends: trending too
    trending = engine.recommend("nobody", 6, as_of=T)  # a user without events: the same list, less u's i0
    assert [(i.item_id, i.score) for i in beyond.items] == [(i.item_id, i.score) for i in trending.items
                                                            if i.item_id != "i0"][:5]
    assert engine.recommend("u", 5, as_of=T - 25 * DAY).strategy == "personalized"  # 5 days old then

    VIEW = 1
    wide = Config(profile=ProfileConfig(mode="single", kernel="linear", kernel_scale_days=30_000.0, kernel_decay=0.5))
    engine = InterestEngine(wide, SqliteStore(tmp_path / "wide"), DIM, fake_embed, clock=lambda: T)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(10)])
    engine.record_events([EventInput("1970", "u", VIEW, "i0", None, None, 0.0)])
    assert wide.event_types["view"].half_life_days < 30  # 2^(-19,700 days / h) is 0 in float64
    got = engine.recommend("u", 5, as_of=T, explain=True)
    assert got.strategy == "personalized" and engine.signals("u", T) is not None
    # The explanation weighs the event by the kernel too: (s - age) / s, s = 60,000 days.
    [event] = {e.event_id: e for item in got.items for e in item.explanation.events}.values()
    assert event.weight == pytest.approx(wide.event_types["view"].weight * (1 - T / (60_000 * DAY)))


def test_an_explanation_credits_no_event_the_kernel_weighs_at_zero(tmp_path):
    """A like beyond a linear kernel's reach weighs 0 and made nothing of the
    score; with fewer strong events than an explanation lists, it filled the
    list as the earliest of the ties at 0 (a review)."""
    short = Config(profile=ProfileConfig(mode="single", kernel="linear", kernel_scale_days=5.0, kernel_decay=0.5))
    engine = InterestEngine(short, SqliteStore(tmp_path), DIM, fake_embed, clock=lambda: T)
    mix = (fake_embed(["item 0"])[0] + fake_embed(["item 1"])[0]).astype(np.float32)
    engine.upsert_items([*(ItemInput(id=f"i{n}", text=f"item {n}") for n in range(4)),
                         ItemInput(id="mix", text="mix", vector=mix / np.linalg.norm(mix))])
    engine.record_events([EventInput("old", "u", LIKE, "i0", None, None, T - 30 * DAY),  # 10 days is its reach
                          EventInput("new", "u", LIKE, "i1", None, None, T - DAY)])
    got = engine.recommend("u", 3, as_of=T, explain=True)
    assert got.strategy == "personalized" and "mix" in [i.item_id for i in got.items]
    credited = {e.event_id: e.weight for item in got.items for e in item.explanation.events}
    assert set(credited) == {"new"} and credited["new"] > 0


def test_an_explanation_credits_no_event_whose_weight_reads_0_in_float32(tmp_path):
    """EventContribution.weight is a float: 1,100 days after a view (7-day
    half-life), its decayed weight ~5e-48 read 0.0, though the list was
    still personalised (a clients review)."""
    engine = InterestEngine(Config(), SqliteStore(tmp_path), DIM, fake_embed, clock=lambda: T)
    engine.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}") for n in range(6)])
    engine.record_events([EventInput("old", "u", 1, "i0", None, None, T - 1100 * DAY),
                          EventInput("older", "u", 1, "i1", None, None, T - 1200 * DAY)])
    got = engine.recommend("u", 3, as_of=T, explain=True)
    assert got.strategy == "personalized"
    assert [e for item in got.items for e in item.explanation.events] == []
    earlier = engine.recommend("u", 3, as_of=T - 200 * DAY, explain=True)  # 900 days: 1e-39, a float32 denormal
    assert all(np.float32(e.weight) > 0 for item in earlier.items for e in item.explanation.events)
    assert any(item.explanation.events for item in earlier.items)


def test_a_kernel_profile_is_read_from_the_log_without_the_engines_lock(tmp_path, monkeypatch):
    """Each read under a kernel passes over the user's log (a 1M-event
    user's: 15 s), which under the engine's lock held every other call up."""
    import threading

    config = Config(profile=ProfileConfig(mode="single", kernel="exp", kernel_scale_days=20.0))
    engine = engine_with(config, tmp_path)
    reading, release, chunks = threading.Event(), threading.Event(), engine._directed_chunks

    def held(user_id, *args):
        if user_id == "u":
            reading.set()
            assert release.wait(30)
        return chunks(user_id, *args)

    monkeypatch.setattr(engine, "_directed_chunks", held)
    heavy = []
    reader = threading.Thread(target=lambda: heavy.append(engine.recommend("u", 5, as_of=T)))
    reader.start()
    try:
        assert reading.wait(10)
        others = []
        other = threading.Thread(target=lambda: others.append(
            (engine.recommend("cold", 5, as_of=T).strategy, engine.profile("cold", as_of=T).interests)))
        other.start()
        other.join(10)  # under the lock, they waited for u's read
        assert others == [("trending", ())]
    finally:
        release.set()
        reader.join(30)
    assert heavy and heavy[0].strategy == "personalized"


def test_getprofile_under_a_kernel_reads_the_log_only_where_an_interest_may_be_listed(tmp_path, monkeypatch):
    """GetProfile needs the kernel profile's weight only to list interests: a
    user of dislikes alone (no interest to list) read their whole log each time."""
    config = Config(profile=ProfileConfig(mode="single", kernel="exp", kernel_scale_days=20.0))
    engine = engine_with(config, tmp_path)
    engine.record_events([EventInput(f"d{n}", "critic", DISLIKE, f"i{n}", None, None, T - n * DAY) for n in range(5)])
    reads, chunks = [], engine._directed_chunks
    monkeypatch.setattr(engine, "_directed_chunks", lambda user_id, *args: reads.append(user_id) or chunks(user_id, *args))
    assert engine.profile("critic", as_of=T).interests == () and engine.profile("nobody", as_of=T).interests == ()
    assert reads == ["nobody"]  # "critic"'s profile is cached, without interests; "nobody" has none at hand
    assert engine.profile("u", as_of=T).interests and reads == ["nobody", "u"]
