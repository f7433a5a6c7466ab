"""What an erasure costs the other calls of a worker.

    python -m bench.erasure [--quick]

Another worker's erasure: it names no user in the store's change feed, so
every other worker rebuilds its popularity and co-occurrence from the whole
log. Two engines in-process over one SQLite store (as two workers), a log of
500k and 2M item events (`--quick`: 100k and 300k) of 50k users over 10k
items (384-d, Zipf-popular): engine A erases a user, then engine B answers
Recommends for other users, one after another, until its rebuild is in.
Under the lock (the rebuild as it was, and as it still is below
BACKGROUND_REBUILD_EVENTS) the first call waits for the whole pass; off it,
B answers meanwhile. Baseline: the rebuild under the lock, same store, same
run; and the pass itself (a worker's start).

This worker's own erasure of a heavy user (300k and 1M events; `--quick`:
30k and 100k) beside 100k events of light users: other users' Recommends
run one after another on another thread through the DeleteUser. The store's
delete runs without the engine lock; until 2026-12-07 it ran under it, so
the calls waited for it whole. Baseline: that delete, timed in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import numpy as np

from bench.common import markdown_table, save_plot, write_results, zero_embedder
from halflife.config import Config
from halflife.core.ranking import normalize
from halflife.interest import engine as engine_module
from halflife.interest.engine import InterestEngine
from halflife.interest.types import EventInput, ItemInput
from halflife.storage.sqlite import SqliteStore

DIM = 384
ITEMS = 10_000
USERS = 50_000
BATCH = 5_000
LIKE = 3
T = 1_700_000_000.0
MIN_WATCH_S = 0.5  # calls go on at least this long after the erasure, rebuild or not
LIGHT_EVENTS = 100_000  # beside the heavy user whose erasure `own_erasure` times


def _worker(path) -> InterestEngine:
    return InterestEngine(Config(), SqliteStore(path), DIM, zero_embedder(DIM), clock=lambda: T, follow_store=True)


def _fill(engine: InterestEngine, events: int, rng) -> list[str]:
    """The catalogue and `events` likes; returns the users, heaviest first."""
    vectors = normalize(rng.standard_normal((ITEMS, DIM))).astype(np.float32)
    engine.upsert_items([ItemInput(id=f"i{n}", text="", vector=vectors[n]) for n in range(ITEMS)])
    users, items = rng.integers(0, USERS, events), rng.zipf(1.3, events) % ITEMS
    times = T - rng.uniform(0, 300 * 86400, events)
    for start in range(0, events, BATCH):
        engine.record_events([EventInput(f"e{k}", f"u{users[k]}", LIKE, f"i{items[k]}", None, None, float(times[k]))
                              for k in range(start, min(start + BATCH, events))])
    counts = np.bincount(users, minlength=USERS)
    return [f"u{u}" for u in np.argsort(-counts) if counts[u]]


def _after_an_erasure(a: InterestEngine, b: InterestEngine, victim: str, readers: list[str]) -> dict:
    """B's Recommend latencies from A's erasure of `victim` until B's rebuild
    is in (and MIN_WATCH_S have passed), and when it was in."""
    a.delete_user(victim)
    started, latencies, rebuilt_s = time.perf_counter(), [], None
    while rebuilt_s is None or time.perf_counter() - started <= MIN_WATCH_S:
        t = time.perf_counter()
        b.recommend(readers[len(latencies) % len(readers)], 10)
        latencies.append(time.perf_counter() - t)
        if rebuilt_s is None and not b._rebuilding:
            rebuilt_s = time.perf_counter() - started
    lat = np.array(latencies)
    return {"calls": len(lat), "until_rebuilt_s": rebuilt_s, "first_s": float(lat[0]),
            "max_s": float(lat.max()), "p50_s": float(np.median(lat))}


def one_log(events: int, rng) -> dict:
    with tempfile.TemporaryDirectory(prefix="halflife-bench-erasure-") as d:
        a = _worker(d)
        users = _fill(a, events, rng)
        started = time.perf_counter()
        b = _worker(d)
        start_s = time.perf_counter() - started
        readers = users[-200:]  # light users: their calls are cheap, the wait is what shows
        for user in readers[:20]:
            b.recommend(user, 10)
        row = {"events": events, "start_s": start_s}
        threshold = engine_module.BACKGROUND_REBUILD_EVENTS
        try:
            for mode, at, victim in (("locked", 1 << 62, users[1]), ("off_lock", 0, users[2])):
                engine_module.BACKGROUND_REBUILD_EVENTS = at
                row[mode] = _after_an_erasure(a, b, victim, readers)
        finally:
            engine_module.BACKGROUND_REBUILD_EVENTS = threshold
        a.store.close()
        b.store.close()
    return row


def own_erasure(heavy_events: int, rng) -> dict:
    """Other users' Recommend latencies while this engine erases a user of `heavy_events` events."""
    with tempfile.TemporaryDirectory(prefix="halflife-bench-erasure-") as d:
        engine = _worker(d)
        readers = _fill(engine, LIGHT_EVENTS, rng)[-200:]
        items = rng.zipf(1.3, heavy_events) % ITEMS
        for start in range(0, heavy_events, BATCH):
            engine.record_events([EventInput(f"h{k}", "heavy", LIKE, f"i{items[k]}", None, None, T - k)
                                  for k in range(start, min(start + BATCH, heavy_events))])
        for user in readers:  # cached: the calls read nothing from the store
            engine.recommend(user, 10)
        delete, delete_s = engine.store.delete_user, []

        def timed_delete(*args, **kwargs):  # what calls waited for whole until it ran without the lock
            started = time.perf_counter()
            try:
                return delete(*args, **kwargs)
            finally:
                delete_s.append(time.perf_counter() - started)

        latencies, erasing = [], threading.Event()

        def calls() -> None:
            while erasing.is_set():
                t = time.perf_counter()
                engine.recommend(readers[len(latencies) % len(readers)], 10)
                latencies.append(time.perf_counter() - t)

        erasing.set()
        caller = threading.Thread(target=calls)
        caller.start()
        engine.store.delete_user = timed_delete
        started = time.perf_counter()
        deleted = engine.delete_user("heavy")
        erasure_s = time.perf_counter() - started
        erasing.clear()
        caller.join()
        engine.store.delete_user = delete
        engine.store.close()
    assert deleted == heavy_events
    lat = np.array(latencies)
    return {"events": heavy_events, "erasure_s": erasure_s, "store_delete_s": delete_s[0], "calls": len(lat),
            "p50_s": float(np.median(lat)), "max_s": float(lat.max())}


def run(quick: bool = False) -> dict:
    rng = np.random.default_rng(7)
    sizes = (100_000, 300_000) if quick else (500_000, 2_000_000)
    results = {"quick": quick, "items": ITEMS, "users": USERS, "logs": [], "own": []}
    for events in sizes:
        row = one_log(events, rng)
        print(events, "events:", {k: row[k] for k in ("start_s", "locked", "off_lock")}, flush=True)
        results["logs"].append(row)
    for heavy in (30_000, 100_000) if quick else (300_000, 1_000_000):
        results["own"].append(own_erasure(heavy, rng))
        print("own erasure:", results["own"][-1], flush=True)
    write(results)
    return results


def write(results: dict) -> None:
    ms = 1e3
    rows = [[r["events"], r["start_s"], r["locked"]["first_s"] * ms, r["off_lock"]["first_s"] * ms,
             r["off_lock"]["p50_s"] * ms, r["off_lock"]["max_s"] * ms, r["off_lock"]["calls"],
             r["locked"]["until_rebuilt_s"], r["off_lock"]["until_rebuilt_s"],
             r["locked"]["first_s"] / r["off_lock"]["max_s"]]
            for r in results["logs"]]
    table = markdown_table(
        ["log events", "pass (a start) s", "first Recommend, under the lock ms", "first Recommend, off it ms",
         "off it: p50 ms", "off it: slowest ms", "off it: calls answered", "rebuilt in, under the lock s",
         "rebuilt in, off it s", "longest wait: locked / off"], rows)

    def plot(ax) -> None:
        events = [r["events"] for r in results["logs"]]
        ax.plot(events, [r["locked"]["first_s"] * ms for r in results["logs"]], "o-", label="under the lock: first call")
        ax.plot(events, [r["off_lock"]["max_s"] * ms for r in results["logs"]], "o-", label="off it: slowest call")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("events in the log")
        ax.set_ylabel("Recommend latency after an erasure elsewhere (ms)")
        ax.legend()

    table += "\n" + save_plot("erasure", plot, "A worker's Recommend after another worker's erasure")
    table += "\n\n## This worker's own erasure of a heavy user\n\n" + markdown_table(
        ["user's events", "DeleteUser s", "store's delete s (under the lock until 2026-12-07)",
         "other calls answered", "p50 ms", "longest wait ms", "longest wait / store's delete"],
        [[r["events"], r["erasure_s"], r["store_delete_s"], r["calls"], r["p50_s"] * ms, r["max_s"] * ms,
          r["max_s"] / r["store_delete_s"]] for r in results["own"]])
    notes = (f"One run per log. Two engines in-process on one SQLite store, {ITEMS:,} items, {USERS:,} users (Zipf "
             "items, 300 days of likes); engine B answers Recommends of light users one after another from A's "
             f"erasure until its rebuild is in (at least {MIN_WATCH_S} s). Off the lock B answers during the "
             "rebuild, whose Python shares the GIL with the calls (so its pass takes longer). Baseline: the "
             "rebuild under the lock, same store and run. Own erasure: one run per size, one engine, "
             f"{LIGHT_EVENTS:,} events of light users beside the heavy one, whose Recommends run one after another "
             "on another thread; what is left of the longest wait is the take-back of the user's popularity and "
             "pairs under the lock.")
    write_results("erasure", results, table, notes)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="logs of 100k and 300k events, heavy users of 30k and 100k; about two minutes")
    run(parser.parse_args().quick)


if __name__ == "__main__":
    main()
