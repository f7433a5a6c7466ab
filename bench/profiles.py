"""Heavy users' profile misses: a replay of the whole log against the user's
snapshot and the events after it.

    python -m bench.profiles [--quick]

For users with 1k, 10k and 50k events (384-d vectors over a 2,000-item
catalogue in 40 topics, each user's events in 6 of them, a year of views,
clicks, likes, purchases and ratings), in-process over
the SQLite store: the miss (store read + replay, `InterestEngine._user_state`
after dropping the cached profile) without a snapshot, the first miss that
replays and saves one (`_cache_profile`), the miss with the snapshot, and
with the snapshot and 100 events recorded after it. The baseline is the
full replay in the same run; the answers (top 10) must be the same.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from bench.common import markdown_table, profile_miss, summary, timings, write_results, zero_embedder
from halflife.config import Config
from halflife.core.ranking import normalize
from halflife.interest import replay
from halflife.interest.engine import InterestEngine
from halflife.interest.state import snapshot_bytes, state_from_snapshot
from halflife.storage.base import EventRecord, ItemRecord
from halflife.storage.sqlite import SqliteStore

DIM = 384
ITEMS = 2_000
TAIL = 100
YEAR = 365 * 86400.0
TYPES = (1, 2, 3, 5, 6)  # view, click, like, purchase, rate
TOPICS = 40  # the catalogue's; an item's vector is its topic's plus noise (cosine ~0.8 to it)
USER_TOPICS = 6


def _events(user: str, n: int, first: int, start: float, end: float, rng, items: np.ndarray,
            pool: np.ndarray) -> list[EventRecord]:
    times = np.sort(rng.uniform(start, end, n))
    picks = rng.choice(pool, n)
    kinds = rng.choice(TYPES, n)
    return [EventRecord(f"{user}-{first + j}", user, int(kinds[j]), f"i{picks[j]}", None,
                        float(rng.integers(1, 6)) if kinds[j] == 6 else None, float(times[j]), items[picks[j]])
            for j in range(n)]


def _snapshot(store, user: str):
    with store.user_history(user) as (snapshot, _):
        return snapshot


def one_user(engine: InterestEngine, user: str, n: int, repeat: int, rng, items: np.ndarray,
             item_topics: np.ndarray) -> dict:
    store = engine.store
    pool = np.flatnonzero(np.isin(item_topics, rng.choice(TOPICS, USER_TOPICS, replace=False)))
    now = engine.now()
    span = YEAR - 7200.0  # the log ends 2 h ago: the tail below comes after it, not late
    for chunk in range(0, n, 5_000):
        store.record_events(_events(user, min(5_000, n - chunk), chunk, now - YEAR + chunk / n * span,
                                    now - YEAR + min(n, chunk + 5_000) / n * span, rng, items, pool))

    def miss():
        return profile_miss(engine, user)

    def top10() -> list[str]:
        return [i.item_id for i in engine.recommend(user, 10).items]

    assert _snapshot(store, user) is None
    full = timings(miss, repeat=repeat, warmup=1)
    full_top = top10()
    with engine._lock:
        engine._users.pop(user, None)
    began = time.perf_counter()
    engine._cache_profile(user)  # replays, queues the snapshot's save
    engine.snapshots.wait()
    first = time.perf_counter() - began
    snapshot = _snapshot(store, user)
    assert snapshot is not None and snapshot.through_seq == engine._users[user].max_seq
    state = engine._users[user]
    pack = timings(lambda: snapshot_bytes(state), repeat=repeat)
    unpack = timings(lambda: state_from_snapshot(snapshot.data), repeat=repeat)
    with_snapshot = timings(miss, repeat=repeat, warmup=1)
    snapshot_top = top10()
    store.record_events(_events(user, TAIL, n, now - 3600.0, now - 60.0, rng, items, pool))
    with_tail = timings(miss, repeat=repeat, warmup=1)
    assert _snapshot(store, user).through_seq == snapshot.through_seq  # a tail too short to rewrite it
    return {
        "events": n, "full_miss": summary(full), "first_miss_saving": first, "snapshot_miss": summary(with_snapshot),
        "snapshot_and_tail_miss": summary(with_tail), "pack": summary(pack), "unpack": summary(unpack),
        "snapshot_bytes": len(snapshot.data), "clusters": state.multi.n_clusters,
        "same_top10": full_top == snapshot_top,
        "ratio": summary(with_snapshot)["median_s"] / summary(full)["median_s"],
    }


def run(quick: bool = False) -> dict:
    counts, repeat = ((1_000, 5_000), 3) if quick else ((1_000, 10_000, 50_000), 5)
    rng = np.random.default_rng(3)
    item_topics = rng.integers(0, TOPICS, ITEMS)
    items = normalize(normalize(rng.standard_normal((TOPICS, DIM)))[item_topics] + 0.04 * rng.standard_normal((ITEMS, DIM)))
    results: dict = {"quick": quick, "snapshot_events": replay.SNAPSHOT_EVENTS, "users": []}
    with tempfile.TemporaryDirectory(prefix="halflife-bench-profiles-") as d:
        store = SqliteStore(d)
        store.upsert_items([ItemRecord(f"i{j}", "", (), {}, None, v) for j, v in enumerate(items)])
        engine = InterestEngine(Config(), store, DIM, embed=zero_embedder(DIM))
        for n in counts:
            row = one_user(engine, f"u{n}", n, repeat if n < 50_000 else 3, rng, items, item_topics)
            print(n, "events:", {k: row[k] for k in ("ratio", "snapshot_bytes", "same_top10")}, flush=True)
            results["users"].append(row)
        store.close()
    write(results)
    return results


def write(results: dict) -> None:
    ms = 1e3
    rows = [[u["events"], u["full_miss"]["median_s"] * ms, u["first_miss_saving"] * ms,
             u["snapshot_miss"]["median_s"] * ms, u["snapshot_and_tail_miss"]["median_s"] * ms,
             round(u["ratio"], 4), u["pack"]["median_s"] * ms, u["unpack"]["median_s"] * ms,
             round(u["snapshot_bytes"] / 1024), u["clusters"], "yes" if u["same_top10"] else "NO"]
            for u in results["users"]]
    table = markdown_table(
        ["user events", "miss, full replay ms", "first miss + save ms", "miss with snapshot ms",
         f"miss with snapshot + {TAIL} events ms", "snapshot / full", "pack ms", "unpack ms", "snapshot KiB",
         "clusters", "same top 10"], rows)
    notes = (
        f"Medians. In-process over the SQLite store, {DIM}-d vectors, {ITEMS:,} items in {TOPICS} topics (each user's "
        f"events in {USER_TOPICS}); a miss reads the store and "
        f"builds the profile (`_user_state` after dropping the cached one). A replay of at least "
        f"{results['snapshot_events']:,} events saves a snapshot (`SNAPSHOT_EVENTS`); the first miss + save is "
        "one run (replay, serialise, commit). Baseline: the full replay, same run.\n"
    )
    write_results("profiles", results, table, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k and 5k events; under a minute")
    run(parser.parse_args().quick)


if __name__ == "__main__":
    main()
