"""Event ingest: RecordEvents throughput against raw SQLite, profile memory and rebuild cost.

    python -m bench.ingest [--quick]

1. RecordEvents through gRPC to a `halflife serve` process, batches of 500
   item-reference events (durable: committed with synchronous=FULL before the
   reply), from 1 and from 4 concurrent client streams; against raw SQLite
   inserting the same rows into the same events table (WAL, synchronous=FULL,
   the store's own multi-row INSERT, one transaction per 500) in the same
   run, rounds interleaved.
   Targets: >= 20,000 events/s and >= 0.5x raw SQLite. From empty files
   (each run's users new, so its index entries land in a fresh part of
   events(user_id, seq)), and at scale: another server and raw file first
   filled with the same 500,000 events of 10,000 users, whose users the runs
   then add to, as a service's returning users do. There each batch dirties
   pages all over that index, which SQLite's commit writes whole to the WAL
   for both. At scale twice: with event ids that grow with time (UUIDv7,
   ULID, snowflake ids, counters), whose index entries append, and with
   random UUIDs (version 4), which dirty pages all over the event-id index too.
2. Per-user profile state: ProfileState + MultiInterestState .nbytes after 50
   events of 3 half-lives (K = 8; the state holds every rate group of the
   config), and the whole cached _UserState.
3. Server RSS (/proc/PID/status VmRSS) as users with 3 events each are
   recorded and read (Recommend): 10k, 100k, then 1M users. Profiles live in
   an LRU of `profile.cache_users` (10,000) and are rebuilt from the log on a
   miss. At 1M users: Recommend latency (one caller) alone, while another
   stream records events, which is when the blend's indexes change under it,
   and after one event stamped an hour ahead of the server's clock (a client
   clock running ahead), which reads at the clock must not count yet.
4. The miss: rebuilding the profile of a user with 50 and with 500 events
   (SQLite read + replay), in-process.
5. Misses do not stall other calls: a cached user's Recommend latency while
   another thread takes profile misses of 500-event users, in-process (the
   replay runs without the engine lock).
6. Catalogue re-sync: UpsertItems of 1,000 items by text (no vectors) through
   gRPC, the first time (every text embedded: the baseline, in the same run),
   re-sent unchanged (a retry, or a nightly full re-sync), and with a tenth of
   the texts changed; each round with new ids, on a server of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import sqlite3
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import grpc
import numpy as np

from halflife.cli import run_event_loop
from halflife.config import Config
from halflife.core.profiles import MultiInterestState, ProfileState
from halflife.core.ranking import normalize
from halflife.interest.engine import InterestEngine
from halflife.interest.types import EventInput
from halflife.storage.base import EventRecord, ItemRecord
from halflife.storage.sqlite import MIGRATIONS, WRITER_PRAGMAS, SqliteStore, _insert
from halflife.v1 import interest_pb2, interest_pb2_grpc, recommend_pb2, recommend_pb2_grpc

from bench.server_process import ServerProcess, upsert_vectors
from bench.common import (markdown_table, profile_miss, require, save_plot, summary, timings, write_results,
                          zero_embedder)

DIM = 384
BATCH = 500
N_ITEMS = 2000
EVENTS_PER_USER = 3
PREFILL = 500_000  # events already stored (server and raw file alike) before the at-scale runs
SCALE_USERS = 10_000
TYPES = (1, 2, 3)  # view, click, like


def _ts(seconds: float):
    from halflife_client.client import to_timestamp

    return to_timestamp(dt.datetime.fromtimestamp(seconds, dt.timezone.utc))


def requests_for(prefix: str, n_events: int, n_users: int, start: float, rng, users_prefix: str | None = None,
                 random_ids: bool = False) -> list[interest_pb2.RecordEventsRequest]:
    """Batches of BATCH item-reference events, times ascending (1 ms apart),
    from n_users users named `users_prefix` (default `prefix`) + "u" + k.
    Event ids `prefix`-j, which grow with time, or random UUIDs (version 4)."""
    out = []
    items = rng.integers(0, N_ITEMS, n_events)
    users = rng.integers(0, n_users, n_events)
    who = prefix if users_prefix is None else users_prefix
    for s in range(0, n_events, BATCH):
        req = interest_pb2.RecordEventsRequest()
        for j in range(s, min(n_events, s + BATCH)):
            event_id = str(uuid.UUID(bytes=rng.bytes(16), version=4)) if random_ids else f"{prefix}-{j}"
            e = req.events.add(event_id=event_id, user_id=f"{who}u{users[j]}", type=TYPES[j % 3],
                               item_id=f"i{items[j]}")
            e.event_time.CopyFrom(_ts(start + j * 1e-3))
        out.append(req)
    return out


def user_requests(first: int, last: int, start: float) -> list[interest_pb2.RecordEventsRequest]:
    """EVENTS_PER_USER events for each of users first..last-1 (u{i}), in batches of BATCH."""
    out, req = [], interest_pb2.RecordEventsRequest()
    rng = np.random.default_rng(first)
    for u in range(first, last):
        for j in range(EVENTS_PER_USER):
            e = req.events.add(event_id=f"m{u}-{j}", user_id=f"u{u}", type=TYPES[j], item_id=f"i{rng.integers(N_ITEMS)}")
            e.event_time.CopyFrom(_ts(start + u * 1e-3 + j * 1e-4))
            if len(req.events) == BATCH:
                out.append(req)
                req = interest_pb2.RecordEventsRequest()
    if len(req.events):
        out.append(req)
    return out


async def send(target: str, requests: list, streams: int) -> float:
    """Sends the requests over `streams` concurrent callers (one channel each); returns seconds."""
    channels = [grpc.aio.insecure_channel(target, options=[("bench.stream", i), ("grpc.max_send_message_length", 64 << 20)])
                for i in range(streams)]
    stubs = [interest_pb2_grpc.InterestServiceStub(c) for c in channels]
    for channel in channels:  # connect first
        await asyncio.wait_for(channel.channel_ready(), 30)

    async def worker(i: int) -> None:
        for req in requests[i::streams]:
            reply = await stubs[i].RecordEvents(req, timeout=120)
            if reply.accepted_count != len(req.events):  # a duplicate would count as ingested
                raise RuntimeError(f"RecordEvents accepted {reply.accepted_count} of {len(req.events)} new events")

    began = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(streams)))
    elapsed = time.perf_counter() - began
    for c in channels:
        await c.close()
    return elapsed


def raw_connection(path: Path) -> sqlite3.Connection:
    """The raw baseline's file, as the store's writer opens its own: WAL,
    synchronous=FULL, the store's writer pragmas, the store's schema. Kept open
    across runs, as the server keeps its writer: a connection closed after each
    run checkpointed the run's WAL untimed in close() (9-10% of the timed
    inserts, found by a review), where the server's commits pay theirs."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    for pragma in WRITER_PRAGMAS:  # the store's checkpoint interval and cache: the best raw can do
        conn.execute(f"PRAGMA {pragma}")
    if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
        conn.execute("BEGIN")
        for step in MIGRATIONS:
            step(conn)
        conn.execute("PRAGMA user_version = %d" % len(MIGRATIONS))
        conn.execute("INSERT INTO vectors(hash, data) VALUES (?, ?)", (b"h", bytes(4 * DIM)))
        conn.execute("COMMIT")
    return conn


def raw_sqlite(conn: sqlite3.Connection, requests: list) -> float:
    """The same rows into the store's events table, raw (`raw_connection`), one
    transaction per batch, through the store's own multi-row INSERT (`_insert`:
    1.28 ms a batch against executemany's 1.93). Returns seconds for the inserts."""
    batches = [[(e.event_id, e.user_id, e.type, e.item_id, None, None, e.event_time.ToNanoseconds() / 1e9, 1)
                for e in req.events] for req in requests]
    began = time.perf_counter()
    for rows in batches:
        conn.execute("BEGIN")
        _insert(conn, "INSERT INTO events(event_id, user_id, type, item_id, text, value, event_time, vector_id)", rows)
        conn.execute("COMMIT")
    return time.perf_counter() - began


def throughput(target: str, raw: sqlite3.Connection, rounds: int, per_run: int, start: float, rng, n_users: int = 1000,
               users_prefix: str | None = None, random_ids: bool = False) -> dict:
    """RecordEvents events/s at 1 and 4 streams against raw SQLite into
    `raw` (`raw_connection`), rounds interleaved (gRPC x1, raw, gRPC x4), each run its own
    events of n_users users (new ones per run unless `users_prefix` names a
    shared population). Medians, and gRPC's ratios to raw."""
    tp: dict[str, list[float]] = {"grpc_1": [], "grpc_4": [], "raw_sqlite": []}
    for r in range(rounds):
        for mode in ("grpc_1", "raw_sqlite", "grpc_4"):
            reqs = requests_for(f"{mode}{r}", per_run, n_users, start + r * 1000 + len(tp[mode]) * 100, rng,
                                users_prefix, random_ids)
            if mode == "raw_sqlite":
                secs = raw_sqlite(raw, reqs)
            else:
                secs = run_event_loop(send(target, reqs, int(mode[-1])))
            tp[mode].append(per_run / secs)
            print(mode, round(per_run / secs), "events/s", flush=True)
    out = {m: {"events_per_s": float(np.median(v)), "runs": v} for m, v in tp.items()}
    for m in ("grpc_1", "grpc_4"):
        out[m]["ratio_vs_raw"] = out[m]["events_per_s"] / out["raw_sqlite"]["events_per_s"]
    return out


def record_users(target: str, first: int, last: int, start: float, chunk: int = 50_000) -> float:
    """Records users first..last-1 over 4 streams, building requests a chunk of
    users at a time (1M users' requests at once would take GBs). Returns seconds sending."""
    return sum(run_event_loop(send(target, user_requests(a, min(a + chunk, last), start), 4))
               for a in range(first, last, chunk))


async def recommend_latencies(target: str, users: list[str], while_sending: list | None = None) -> dict:
    """Recommend latency of one caller over `users`, alone or while one stream
    sends `while_sending` (then the reads stop when the writes do)."""
    channel = grpc.aio.insecure_channel(target)
    stub = recommend_pb2_grpc.RecommendServiceStub(channel)
    await asyncio.wait_for(channel.channel_ready(), 30)
    writer = asyncio.ensure_future(send(target, while_sending, 1)) if while_sending else None
    latencies = []
    for user in users:
        if writer is not None and writer.done():
            break
        began = time.perf_counter()
        await stub.Recommend(recommend_pb2.RecommendRequest(user_id=user, limit=10), timeout=60)
        latencies.append(time.perf_counter() - began)
    if writer is not None:
        await writer
    await channel.close()
    lat = np.array(latencies)
    return {"calls": int(lat.size), "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99))}


async def read_users(target: str, users: list[str], concurrency: int = 4) -> float:
    channel = grpc.aio.insecure_channel(target)
    stub = recommend_pb2_grpc.RecommendServiceStub(channel)
    queue = list(reversed(users))

    async def worker() -> None:
        while queue:
            await stub.Recommend(recommend_pb2.RecommendRequest(user_id=queue.pop(), limit=10), timeout=60)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await channel.close()
    return time.perf_counter() - began


# --------------------------------------------------------------------------- in-process parts

def profile_sizes() -> dict:
    """ProfileState + MultiInterestState bytes after 50 events of 3 half-lives, K = 8
    (the state is sized for every rate group of the config: `rates`)."""
    config = Config()
    types = config.decay_types()
    rng = np.random.default_rng(0)
    names = list(types.names) if hasattr(types, "names") else None
    # view (7 d), like (90 d), purchase (180 d): three distinct half-lives.
    type_ids = np.array([0, 2, 4] * 17)[:50]
    times = time.time() - np.sort(rng.uniform(0, 30 * 86400, 50))[::-1]
    vectors = normalize(rng.standard_normal((50, DIM)))
    single = ProfileState.empty(types, DIM)
    single.add(types, type_ids, times, vectors)
    multi = MultiInterestState.empty(types, DIM, config.profile.max_interests, config.profile.cluster_threshold)
    multi.add(types, type_ids, times, vectors)
    return {"rates": int(types.rates.shape[0]), "clusters": multi.n_clusters, "single_bytes": single.nbytes,
            "multi_bytes": multi.nbytes, "total_bytes": single.nbytes + multi.nbytes, "type_names": names}


def rebuild_costs(counts=(50, 500), repeat: int = 10) -> dict:
    """The cache miss (`profile_miss`: the log read a chunk at a time and
    replayed) and its parts apart, a read of the whole log (store.user_events)
    and the replay, for users with `counts` events."""
    rng = np.random.default_rng(1)
    out = {}
    with tempfile.TemporaryDirectory(prefix="halflife-bench-rebuild-") as d:
        store = SqliteStore(d)
        now = time.time()
        # Items first: the events reference them, as a service's do.
        store.upsert_items([ItemRecord(f"i{j}", "", (), {}, None, v)
                            for j, v in enumerate(normalize(rng.standard_normal((max(counts), DIM))))])
        for n in counts:
            vecs = normalize(rng.standard_normal((n, DIM)))
            times = now - np.sort(rng.uniform(0, 60 * 86400, n))[::-1]
            store.record_events([EventRecord(f"r{n}-{j}", f"r{n}", TYPES[j % 3], f"i{j}", None, None, float(times[j]), vecs[j])
                                 for j in range(n)])
        engine = InterestEngine(Config(), store, DIM, embed=zero_embedder(DIM))
        for n in counts:
            user = f"r{n}"

            events = store.user_events(user)
            t_miss, t_read, t_build = (
                timings(fn, repeat=repeat, warmup=1)
                for fn in (lambda: profile_miss(engine, user), lambda: store.user_events(user),
                           lambda: engine._builder.build([events], engine.now()))
            )
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            state = engine._builder.build([events], engine.now())[0]
            traced = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            out[str(n)] = {"miss": summary(t_miss), "read": summary(t_read), "replay": summary(t_build),
                           "user_state_traced_bytes": traced, "clusters": state.multi.n_clusters}
        store.close()
    return out


def recommend_during_misses(heavy_users: int = 20, events: int = 500, items: int = 10_000) -> dict:
    """Recommend latency of a cached user while another thread forces profile
    misses of `heavy_users` users with `events` events each (SQLite store).
    One BLAS thread, as `halflife serve` runs by default."""
    import threading

    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(2)
    with tempfile.TemporaryDirectory(prefix="halflife-bench-misses-") as d:
        store = SqliteStore(d)
        store.upsert_items([ItemRecord(f"i{j}", "", (), {}, None, v)
                            for j, v in enumerate(normalize(rng.standard_normal((items, DIM))))])
        engine = InterestEngine(Config(), store, DIM, embed=zero_embedder(DIM))
        now = time.time()
        heavy = [f"h{k}" for k in range(heavy_users)]
        for user in heavy:
            times = now - np.sort(rng.uniform(0, 60 * 86400, events))[::-1]
            engine.record_events([EventInput(f"{user}-{j}", user, TYPES[j % 3], f"i{rng.integers(items)}", None, None,
                                             float(times[j])) for j in range(events)])
        engine.record_events([EventInput(f"light-{j}", "light", TYPES[2], f"i{j}", None, None, now - 3600.0 * j)
                              for j in range(5)])
        engine.recommend("light", 10)  # cached from here on
        done = threading.Event()

        def misses() -> None:
            for user in heavy:
                with engine._lock:
                    engine._users.pop(user, None)
                engine.recommend(user, 10)
            done.set()

        latencies = []
        thread = threading.Thread(target=misses)
        with threadpool_limits(1):
            began = time.perf_counter()
            thread.start()
            while not done.is_set():
                b = time.perf_counter()
                engine.recommend("light", 10)
                latencies.append(time.perf_counter() - b)
            thread.join()
            elapsed = time.perf_counter() - began
        store.close()
    lat = np.array(latencies)
    return {"heavy_users": heavy_users, "events_per_user": events, "items": items, "calls": int(lat.size),
            "misses_s": elapsed, "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
            "max_s": float(lat.max())}


# --------------------------------------------------------------------------- main

def rss_slopes(memory: list[dict]) -> dict:
    """From `run`'s memory stages: RSS growth per recorded user over the last
    stage's recording alone, and per profile the first read cached. The slope
    starts after the reads that precede that recording: the LRU took their
    profiles (at --quick, where it is not full, 1,000 more, which read as 2.6x
    the growth per recorded user)."""
    recorded_from, recorded, unread, read = memory[-2], memory[-1], memory[1], memory[2]
    return {"rss_bytes_per_recorded_user": (recorded["rss_bytes"] - recorded_from["rss_bytes"])
            / (recorded["users"] - recorded_from["users"]),
            "rss_bytes_per_cached_profile": (read["rss_bytes"] - unread["rss_bytes"]) / read["users"]}


def catalogue_resync(target: str, rounds: int, items: int = 1000) -> dict:
    """Seconds of an UpsertItems of `items` texts: first, re-sent unchanged, a tenth changed (section 6)."""
    from halflife_client.client import HalflifeClient, Item

    seconds: dict[str, list[float]] = {"first": [], "unchanged": [], "tenth_changed": []}
    with HalflifeClient(target, timeout=600) as client:
        for r in range(rounds):
            texts = [f"catalogue item {r}-{n}: walking boots in size {n % 13}, a leather upper and a rubber sole"
                     for n in range(items)]
            changed = [text + " (new)" if n % 10 == 0 else text for n, text in enumerate(texts)]
            for name, batch in (("first", texts), ("unchanged", texts), ("tenth_changed", changed)):
                began = time.perf_counter()
                client.upsert_items([Item(id=f"r{r}-i{n}", text=text) for n, text in enumerate(batch)])
                seconds[name].append(time.perf_counter() - began)
    return {"items": items} | {name: summary(values) for name, values in seconds.items()}


def run(quick: bool = False) -> dict:
    from halflife_client.client import HalflifeClient

    require("threadpoolctl")  # section 5's, after minutes of gRPC runs
    rounds = 1 if quick else 2
    per_run = 10_000 if quick else 20_000
    prefill = 100_000 if quick else PREFILL
    users_small, users_big, users_huge, extra_reads = (
        (2_000, 10_000, 30_000, 1_000) if quick else (10_000, 100_000, 1_000_000, 5_000))
    results: dict = {"quick": quick, "batch": BATCH, "items": N_ITEMS}
    rng = np.random.default_rng(7)
    start = time.time() - 86400.0
    vecs = normalize(rng.standard_normal((N_ITEMS, DIM)))
    with tempfile.TemporaryDirectory(prefix="halflife-bench-ingest-") as tmp:
        tmp = Path(tmp)
        # 1a. throughput at scale, with event ids that grow with time and with
        # random ones: for each, a server and raw file of their own, both first
        # given the same `prefill` events of SCALE_USERS users, whose users the
        # timed runs then add to.
        results["throughput_at_scale"] = []
        for event_ids in ("growing", "uuid4"):
            random_ids = event_ids == "uuid4"
            with ServerProcess(data_dir=tmp / f"server-at-scale-{event_ids}") as server:
                with HalflifeClient(server.target, timeout=300) as client:
                    upsert_vectors(client, vecs)
                fill = requests_for("fill", prefill, SCALE_USERS, start - 3600.0, rng, "p", random_ids)
                began = time.perf_counter()
                run_event_loop(send(server.target, fill, 4))
                print("prefill", prefill, event_ids, round(prefill / (time.perf_counter() - began)), "events/s", flush=True)
                with contextlib.closing(raw_connection(tmp / f"raw-at-scale-{event_ids}.sqlite3")) as raw:
                    raw_sqlite(raw, fill)
                    del fill
                    at_scale = throughput(server.target, raw, rounds, per_run, start, rng, SCALE_USERS, "p", random_ids)
            results["throughput_at_scale"].append(
                at_scale | {"stored_before": prefill, "users": SCALE_USERS, "event_ids": event_ids})
        with ServerProcess(data_dir=tmp / "server") as server:
            client = HalflifeClient(server.target, timeout=300)
            upsert_vectors(client, vecs)
            # 1b. throughput from empty (each run's 1,000 users new to both files).
            with contextlib.closing(raw_connection(tmp / "raw.sqlite3")) as raw:
                results["throughput"] = throughput(server.target, raw, rounds, per_run, start, rng)

            # 3. memory as users grow.
            mem = [("start (after throughput runs)", server.rss_bytes(), 0)]
            t0 = time.time() - 3600.0
            record_users(server.target, 0, users_small, t0)
            mem.append((f"{users_small} users recorded", server.rss_bytes(), users_small))
            read_s = run_event_loop(read_users(server.target, [f"u{i}" for i in range(users_small)]))
            mem.append((f"{users_small} users read (profiles cached)", server.rss_bytes(), users_small))
            record_users(server.target, users_small, users_big, t0)
            mem.append((f"{users_big} users recorded", server.rss_bytes(), users_big))
            run_event_loop(read_users(server.target, [f"u{i}" for i in range(users_small, users_small + extra_reads)]))
            mem.append((f"{users_big} users, {users_small + extra_reads} read (LRU holds "
                        f"{min(users_small + extra_reads, Config().profile.cache_users)})", server.rss_bytes(), users_big))
            huge_s = record_users(server.target, users_big, users_huge, t0)
            mem.append((f"{users_huge} users recorded", server.rss_bytes(), users_huge))
            readers = [f"u{i}" for i in range(users_huge - extra_reads, users_huge)]
            run_event_loop(read_users(server.target, readers))  # cached, as for the reads below
            results["recommend_at_most_users"] = {
                "users": users_huge,
                "alone": run_event_loop(recommend_latencies(server.target, readers)),
                "while_recording": run_event_loop(recommend_latencies(
                    server.target, readers[::-1], requests_for("late", 200 * BATCH, 1000, t0 + 10, rng))),
            }
            # One client whose clock runs an hour ahead (event times may lie up to 24 h ahead).
            run_event_loop(send(server.target, requests_for("skew", 1, 1, time.time() + 3600.0, rng), 1))
            results["recommend_at_most_users"]["after_an_event_an_hour_ahead"] = run_event_loop(
                recommend_latencies(server.target, readers))
            client.close()
        results["memory"] = [{"stage": s, "rss_bytes": b, "users": u} for s, b, u in mem]
        results["read_ms_per_user_c4"] = read_s / users_small * 1e3
        results["record_events_per_s_to_most_users"] = (users_huge - users_big) * EVENTS_PER_USER / huge_s
        results |= rss_slopes(results["memory"])
        with ServerProcess(data_dir=tmp / "server-resync") as server:
            results["catalogue_resync"] = catalogue_resync(server.target, rounds=1 if quick else 3)
    results["profile_state"] = profile_sizes()
    results["rebuild"] = rebuild_costs()
    results["during_misses"] = recommend_during_misses()
    write(results)
    return results


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def write(results: dict) -> None:
    phases = [("empty (each run: 1,000 new users)", results["throughput"])]
    for tp in results.get("throughput_at_scale", []):
        ids = "ids growing with time" if tp["event_ids"] == "growing" else "random UUID ids"
        phases.append((f"{tp['stored_before']:,} events of {tp['users']:,} users, {ids}", tp))
    rows = []
    for stored, tp in phases:
        rows.append([stored, "raw SQLite (1 writer)", round(tp["raw_sqlite"]["events_per_s"]), "-", "-", "-", "-"])
        for m, label in (("grpc_1", "gRPC RecordEvents, 1 stream"), ("grpc_4", "gRPC RecordEvents, 4 streams")):
            v = tp[m]
            rows.append([stored, label, round(v["events_per_s"]), verdict(v["events_per_s"] >= 20_000),
                         v["ratio_vs_raw"], verdict(v["ratio_vs_raw"] >= 0.5), len(v["runs"])])
    t1 = markdown_table(["store before the runs", "path", "events/s (median)", "target >=20k", "vs raw SQLite",
                         "target >=0.5x", "runs"], rows)
    p = results["profile_state"]
    t2 = markdown_table(["rates R", "clusters", "ProfileState B", "MultiInterestState B", "both B"],
                        [[p["rates"], p["clusters"], p["single_bytes"], p["multi_bytes"], p["total_bytes"]]])
    t3 = markdown_table(["stage", "server RSS MiB"], [[m["stage"], m["rss_bytes"] / 2**20] for m in results["memory"]])
    rows = [[n, r["miss"]["median_s"] * 1e3, r["read"]["median_s"] * 1e3, r["replay"]["median_s"] * 1e3,
             r["clusters"], round(r["user_state_traced_bytes"])] for n, r in results["rebuild"].items()]
    t4 = markdown_table(["user events", "miss (read + replay) ms", "SQLite read ms", "replay ms", "clusters",
                         "cached _UserState bytes (traced)"], rows)
    m = results["during_misses"]
    mem_users = [m_["users"] for m_ in results["memory"]]
    r = results["recommend_at_most_users"]
    t5 = markdown_table(
        [f"Recommend at {r['users']:,} users, one caller", "calls", "p50 ms", "p99 ms"],
        [[label, r[key]["calls"], r[key]["p50_s"] * 1e3, r[key]["p99_s"] * 1e3]
         for key, label in (("alone", "alone"), ("while_recording", "while one stream records events"),
                            ("after_an_event_an_hour_ahead", "alone, after one event stamped 1 h ahead of the clock"))
         if key in r])

    def plot_throughput(ax) -> None:
        paths = (("raw_sqlite", "raw SQLite", "gray"), ("grpc_1", "gRPC, 1 stream", "tab:blue"),
                 ("grpc_4", "gRPC, 4 streams", "tab:cyan"))
        width = 0.8 / len(paths)
        for i, (key, name, color) in enumerate(paths):
            ax.bar([p + i * width for p in range(len(phases))], [tp[key]["events_per_s"] for _, tp in phases],
                   width, label=name, color=color)
        for p, (_, tp) in enumerate(phases):
            ax.hlines(0.5 * tp["raw_sqlite"]["events_per_s"], p - width / 2, p + 2.5 * width, color="tab:orange",
                      linestyle=":", label="target 0.5x raw SQLite" if p == 0 else None)
        ax.axhline(20_000, color="tab:red", linestyle="--", label="target 20,000 events/s")
        ax.set_xticks([p + width for p in range(len(phases))], [stored.replace(", ", ",\n") for stored, _ in phases],
                      fontsize=7)
        ax.set_xlabel("the store before the runs", fontsize=8)
        ax.set_ylabel("events/s (median)")
        ax.legend(fontsize=8)

    def plot_memory(ax) -> None:
        stages = results["memory"]
        ax.plot(range(len(stages)), [m["rss_bytes"] / 2**20 for m in stages], marker="o")
        ax.set_xticks(range(len(stages)), [m["stage"] for m in stages], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("server RSS MiB")

    c = results["catalogue_resync"]
    t6 = markdown_table(
        [f"UpsertItems of {c['items']:,} items by text", "seconds (median)", "items/s", "vs the first time", "runs"],
        [[label, c[key]["median_s"], round(c["items"] / c[key]["median_s"]),
          round(c[key]["median_s"] / c["first"]["median_s"], 3), c[key]["n"]]
         for key, label in (("first", "the first time (every text embedded)"), ("unchanged", "re-sent unchanged"),
                            ("tenth_changed", "a tenth of the texts changed"))])
    table = ("## RecordEvents throughput (batches of 500, durable)\n\n" + t1 + "\n"
             + save_plot("ingest", plot_throughput, "RecordEvents, batches of 500 item events, durable")
             + "\n## Profile state per user (50 events of 3 half-lives, K = 8)\n\n" + t2
             + "\n## Server memory as users grow (3 events each)\n\n" + t3 + "\n"
             + save_plot("ingest_memory", plot_memory, "Server RSS as users are recorded and read")
             + f"\nRSS per recorded user (no profile cached): {results['rss_bytes_per_recorded_user']:.0f} B; "
             f"per cached profile: {results['rss_bytes_per_cached_profile']:.0f} B. "
             f"Recording the users from {mem_users[3]:,} to {mem_users[5]:,} ran at "
             f"{results['record_events_per_s_to_most_users']:,.0f} events/s.\n\n" + t5 + "\n"
             + "\n## Profile cache miss (rebuild from the log, in-process)\n\n" + t4
             + f"\nMeanwhile, other calls go on (the replay runs without the engine lock): a cached user's Recommend "
             f"({m['items']} items) while another thread takes {m['heavy_users']} misses of {m['events_per_user']}-event "
             f"users ({m['misses_s']:.2f} s): {m['calls']} calls, p50 {m['p50_s'] * 1e3:.2f} ms, "
             f"p99 {m['p99_s'] * 1e3:.2f} ms, max {m['max_s'] * 1e3:.1f} ms.\n"
             + "\n## Catalogue re-sync (UpsertItems by text)\n\n" + t6
             + "\nAn item whose stored text is the same and whose vector this model embedded keeps it "
             "(docs/interest.md): a re-sent batch reads the items instead of embedding them.\n")
    notes = (
        f"Catalogue of {results['items']} items; throughput events reference random items, event times given. "
        "From empty: each run's events come from 1,000 users new to both files. At scale: a second server and raw "
        "file first hold the same events, and each run's events come from the same population of users (returning "
        "users), so every batch dirties index pages all over events(user_id, seq). Raw SQLite writes the store's own "
        "schema (halflife.storage.sqlite.MIGRATIONS) with all of its indexes and the store's writer pragmas "
        "(WRITER_PRAGMAS: checkpoint interval, page cache) and its multi-row INSERT; its rows reference one pre-inserted vector, as the "
        "store's item events reference their item's stored vector row, and commits each batch of 500 alone: from 4 streams "
        "the server's writer commits the batches that wait together in one transaction (group commit), so the 4-stream "
        "ratios are against the per-request baseline, not raw SQLite's best (grouping 4 batches a transaction, raw ran "
        "1.35x faster from empty and 1.49x at 200k events, 2026-12-07). gRPC runs include the client (same 2 cores). Memory: RSS of "
        "the server process; growth per recorded user is the blend's per-user state (user row, co-occurrence pairs, "
        "popularity log), which is not bounded by the profile cache; cached profiles are bounded by "
        "profile.cache_users. RSS per recorded user is the slope over recording users 100k to 1M (after the "
        "reads at 100k), over which the writer's "
        "page cache (at most 64 MiB) also fills."
    )
    write_results("ingest", results, table, notes)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events and users; under a minute")
    args = parser.parse_args()
    run(args.quick)


if __name__ == "__main__":
    main()
