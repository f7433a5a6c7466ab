"""Recommend cost vs catalogue size: Halflife's ranking core against exact search.

    python -m bench.ranking [--quick]

Catalogues of 10k, 100k and 1M random unit float32 vectors (384-d), k = 10:

1. one user, in-process: the engine's scoring path (`CatalogueScan.blend`
   of K = 8 centroids + `top_k` with an allowed mask) and its single-profile
   path (`CatalogueScan.blend` of one vector + `top_k`), each scan split into row blocks over
   `--threads` threads as the engine does (`RowBlocks`), against FAISS
   IndexFlatIP and NumPy GEMV + argpartition on the same matrix, each at 1
   and at `--threads` BLAS/OpenMP threads, and NumPy's vecdot + argpartition
   (NumPy's own loop, one thread) (target: core <= 1.2x the best);
2. 1,000 users (`batch_search`: `--threads` groups of queries, each through
   each tile of items as one GEMM + `batch_top_k` on a thread of its own at
   one BLAS thread, a (B, tile) score block <= 200 MB) against FAISS
   search of the 1,000 queries and NumPy GEMM + argpartition in chunks of
   queries under the same bound, all at `--threads` BLAS/OpenMP threads (target: >= 0.8x the
   better throughput);
3. the whole `InterestEngine.recommend` in-process (default config: the blend
   with co-occurrence and popularity on), what each blend signal costs, and
   a user without events (trending: the popularity prior alone, whose long
   tail of zeros is the worst case for argpartition), also before any event
   is recorded (every item ties at 0; the lowest ids win);
4. through gRPC: a `halflife serve` process loaded with the same vectors via
   UpsertItems (batches of 1000) at 10k and 100k; Recommend p50 at
   concurrency 1 against core time + grpc.health.v1.Health/Check p50, both
   measured in this run (target: Recommend p50 <= core + empty RPC);
5. memory per item.

All methods of a table are timed interleaved (round-robin), medians reported.
"""

from __future__ import annotations

import os

# FAISS's OpenMP workers spin after each call and, on a 2-core box, starve the
# OpenBLAS threads NumPy uses (measured: NumPy GEMV at 10k 16x slower after a
# FAISS search). Passive waiting must be set before OpenMP starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses
import datetime as dt
import gc
import time
import tracemalloc
from typing import Callable

from bench.common import require  # noqa: E402

require("faiss", "threadpoolctl")  # before faiss's import, which would not say how to get it
import faiss  # noqa: E402
import numpy as np  # noqa: E402

from halflife.config import Config
from halflife.core.ranking import RowBlocks, batch_search, cosine_scores, normalize, top_k
from halflife.cpu import physical_cores
from halflife.interest.blend import CatalogueScan
from halflife.interest import engine as engine_module
from halflife.interest.engine import InterestEngine
from halflife.interest.types import EventInput, ItemInput
from halflife.storage.base import ItemRecord

from bench._memstore import MemoryStore
from bench.server_process import ServerProcess, load_p50s, upsert_vectors
from bench.common import markdown_table, save_plot, summary, timings, write_results, zero_embedder

DIM = 384
K = 10
CENTROIDS = 8
USERS_BATCH = 1000
SEEN = 50  # items masked out of the allowed set (a user's seen items)
SCORE_BLOCK = 50_000_000  # max query-chunk x items per (b, N) score block (200 MB float32)
TURNOVER_ITEMS, TURNOVER_ROUNDS, TURNOVER_SHARE = 100_000, 10, 0.1  # live items; rounds that replace a share of them
BG_USERS, BG_EVENTS = 2000, 5  # background users (co-occurrence, popularity) and events each
CHECK = "grpc.health.v1.Health.Check"
RECOMMEND = "halflife.v1.RecommendService.Recommend"


def unit_rows(n: int, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    for s in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - s), DIM), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[s : s + block.shape[0]] = block
    return out


def interleaved(fns: dict, repeat: int, warmup: int = 1, min_seconds: float = 0.0, rounds: int = 3) -> dict[str, list[float]]:
    """Times several callables in blocks, round-robin: each round runs every
    callable `warmup` times untimed, then `repeat` timed calls (or more, for
    `min_seconds` / rounds), so machine noise hits all alike while thread pools
    (OpenBLAS, OpenMP) do not interfere within a block. {name: [seconds, ...]}."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    per = max(1, -(-repeat // rounds))
    for _ in range(rounds if repeat > 1 else 1):
        for name, fn in fns.items():
            out[name] += timings(fn, repeat=per, warmup=warmup, min_seconds=min_seconds / rounds)
    return out


def med(samples) -> float:
    return summary(samples)["median_s"]


# --------------------------------------------------------------------------- 1. per query

class ThreadCounts:
    """Wraps a callable so that each call first sets NumPy's BLAS and
    FAISS's OpenMP thread counts (a ctypes call each, ~1 us)."""

    def __init__(self) -> None:
        from threadpoolctl import ThreadpoolController

        self._blas = ThreadpoolController().select(user_api="blas").lib_controllers

    def set(self, threads: int) -> None:
        for lib in self._blas:
            lib.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)

    def __call__(self, threads: int, fn):
        def run():
            self.set(threads)
            return fn()
        return run


def core_scan(X: np.ndarray, threads: int, allowed: np.ndarray, **profile) -> Callable[[], tuple]:
    """The engine's scoring path for one user's `profile` (CatalogueScan
    fields: centroids and importances, or positive), interest only: its scan
    in row blocks on `threads` threads, each on one BLAS thread, then the top
    K of the `allowed` rows. Returns a callable."""
    blocks = RowBlocks(threads)
    weights = {"interest": 1.0}
    return ThreadCounts()(1, lambda: top_k(CatalogueScan(items=X, **profile).blend(blocks, weights).scores, K, allowed))


def core_multi(X: np.ndarray, threads: int, seed: int = 1) -> Callable[[], tuple]:
    """`core_scan` of K = 8 random centroids, 50 items masked (the same for a seed)."""
    n = X.shape[0]
    rng = np.random.default_rng(seed)
    allowed = np.ones(n, dtype=bool)
    allowed[rng.choice(n, SEEN, replace=False)] = False
    centroids = normalize(rng.standard_normal((CENTROIDS, DIM)))
    importances = rng.random(CENTROIDS) + 0.1
    return core_scan(X, threads, allowed, centroids=centroids, importances=importances)


def per_query(X: np.ndarray, index, rng, repeat: int, threads: int) -> dict:
    n = X.shape[0]
    allowed = np.ones(n, dtype=bool)
    allowed[rng.choice(n, SEEN, replace=False)] = False
    q = normalize(rng.standard_normal(DIM))
    q2 = q[None, :].copy()

    def numpy_top(s):
        idx = np.argpartition(-s, K - 1)[:K]
        return idx[np.argsort(-s[idx])]

    def numpy_gemv():
        return numpy_top(X @ q)

    def numpy_vecdot():  # NumPy's own loop, one thread: faster than OpenBLAS's sgemv on some CPUs
        return numpy_top(np.vecdot(X, q))

    with_threads = ThreadCounts()
    fns = {}
    for t in sorted({1, threads}):
        fns[f"core_multi_{t}"] = core_multi(X, t)
        fns[f"core_single_{t}"] = core_scan(X, t, allowed, positive=q)
        fns[f"faiss_{t}"] = with_threads(t, lambda: index.search(q2, K))
        fns[f"numpy_{t}"] = with_threads(t, numpy_gemv)
    fns["vecdot_1"] = with_threads(1, numpy_vecdot)
    # Same answer (no mask): the single-vector core vs NumPy and FAISS.
    same = bool(np.array_equal(top_k(cosine_scores(q, X), K)[0], numpy_gemv())
                and np.array_equal(numpy_vecdot(), numpy_gemv())
                and np.array_equal(index.search(q2, K)[1][0], numpy_gemv()))
    if not same:  # timing them would compare different work
        raise RuntimeError(f"at {n} items the core's top {K} differs from NumPy's or FAISS's")
    t = interleaved(fns, repeat, warmup=2, min_seconds=1.0)
    with_threads.set(threads)
    out = {name: summary(v) for name, v in t.items()}
    out["core_multi"], out["core_single"] = out[f"core_multi_{threads}"], out[f"core_single_{threads}"]
    for method in ("faiss", "numpy", "vecdot"):  # each at its better thread count
        out[method] = min((out[name] for name in fns if name.startswith(method + "_")), key=lambda s: s["median_s"])
    best = min(out[method]["median_s"] for method in ("faiss", "numpy", "vecdot"))
    out["best_baseline_s"] = best
    out["ratio_multi"] = out["core_multi"]["median_s"] / best
    out["ratio_single"] = out["core_single"]["median_s"] / best
    # Everything on one thread: the kernels alone, no thread counts involved.
    out["ratio_multi_1"] = out["core_multi_1"]["median_s"] / min(out[f"{m}_1"]["median_s"] for m in ("faiss", "numpy", "vecdot"))
    out["same_top10_as_numpy_faiss"] = same
    return out


# --------------------------------------------------------------------------- 2. batch

def batch(X: np.ndarray, index, rng, repeat: int, warmup: int, threads: int) -> dict:
    n = X.shape[0]
    allowed = np.ones(n, dtype=bool)
    allowed[rng.choice(n, SEEN, replace=False)] = False
    Q = normalize(rng.standard_normal((USERS_BATCH, DIM)))
    chunk = max(1, min(USERS_BATCH, SCORE_BLOCK // n))
    spans = [(s, min(s + chunk, USERS_BATCH)) for s in range(0, USERS_BATCH, chunk)]

    def core():  # all queries through each tile of items, at most SCORE_BLOCK scores at a time
        return batch_search(Q, X, K, allowed, max_block=SCORE_BLOCK, threads=threads)

    def numpy_gemm():
        out = []
        for a, b in spans:
            S = Q[a:b] @ X.T
            idx = np.argpartition(-S, K - 1, axis=1)[:, :K]
            part = np.take_along_axis(S, idx, axis=1)
            out.append(np.take_along_axis(idx, np.argsort(-part, axis=1), axis=1))
        return out

    # The core's groups of queries each take one BLAS thread (batch_search); the baselines take all.
    with_threads = ThreadCounts()
    fns = {"core": with_threads(1, core), "faiss": with_threads(threads, lambda: index.search(Q, K)),
           "numpy": with_threads(threads, numpy_gemm)}
    t = interleaved(fns, repeat, warmup=warmup)
    out = {name: {**summary(v), "users_per_s": USERS_BATCH / med(v)} for name, v in t.items()}
    best = max(out["faiss"]["users_per_s"], out["numpy"]["users_per_s"])
    out["chunk"] = chunk
    out["ratio"] = out["core"]["users_per_s"] / best
    return out


# --------------------------------------------------------------------------- events

def make_events(n_items: int, seed: int, now: float) -> list[tuple[str, str, int, str, float]]:
    """(event id, user, API type, item id, time): background users consuming a
    Zipf-ish head of the catalogue, then user u0's 5 events."""
    rng = np.random.default_rng(seed)
    head = min(n_items, 5000)
    p = 1.0 / np.arange(1, head + 1)
    p /= p.sum()
    out = []
    for u in range(BG_USERS):
        for j, row in enumerate(rng.choice(head, BG_EVENTS, replace=False, p=p)):
            out.append((f"bg{u}-{j}", f"bg{u}", int(rng.choice([1, 2, 3])), f"i{row}",
                        now - float(rng.uniform(0, 14 * 86400))))
    for j, row in enumerate(rng.choice(head, 5, replace=False, p=p)):
        out.append((f"u0-{j}", "u0", [1, 2, 3, 5, 1][j], f"i{row}", now - 3600.0 * (5 - j)))
    return out


# --------------------------------------------------------------------------- 3. engine in-process

def engine_inprocess(X: np.ndarray, repeat: int, trace: bool, threads: int) -> dict:
    n = X.shape[0]
    config = Config()
    ThreadCounts().set(1)  # as in the server (cli.SERVER_BLAS_THREADS); its scans split over `threads`
    engine = InterestEngine(config, MemoryStore(), DIM, embed=zero_embedder(DIM),
                            scan_threads=threads)
    records = [ItemRecord(f"i{j}", "", (), {}, None, X[j]) for j in range(n)]
    if trace:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    engine.catalog.upsert(records)
    engine._resize_blend()
    traced = (tracemalloc.get_traced_memory()[0] - before) if trace else None
    if trace:
        tracemalloc.stop()
    del records
    # Before any event every item ties at popularity 0: the cut runs through the whole catalogue.
    no_events = interleaved({"trending_no_events": lambda: engine.recommend("cold", K)}, repeat=5, rounds=1)
    now = time.time()
    events = [EventInput(e, u, t, i, None, None, when) for e, u, t, i, when in make_events(n, 1, now)]
    for s in range(0, len(events), 500):
        engine.record_events(events[s : s + 500])
    engine.recommend("u0", K)  # builds the profile and the co-occurrence index
    off = dataclasses.replace(config, blend=dataclasses.replace(config.blend, cooccurrence=0.0, popularity=0.0))

    def with_config(c):
        def run():
            engine.config = c
            return engine.recommend("u0", K)
        return run

    def signal(name):
        def run():
            with engine._lock:
                t = time.time()
                scan = engine._signal_sources("u0", engine._user_state("u0", t), t, [name])
            return scan.blend(engine._blocks, engine._blend_weights())
        return run

    def trending():  # a user without events: the popularity prior alone
        engine.config = config
        return engine.recommend("cold", K)

    fns = {"recommend": with_config(config), "recommend_blend_off": with_config(off), "trending": trending,
           "cooccurrence": signal("cooccurrence"), "popularity": signal("popularity"), "interest": signal("interest")}
    t = interleaved(fns, repeat, warmup=1, min_seconds=1.0)
    engine.config = config
    ThreadCounts().set(threads)
    out = {name: summary(v) for name, v in (t | no_events).items()}
    out["traced_bytes_per_item"] = traced / n if traced is not None else None
    out["cooccurrence_pairs"] = len(engine._blend.cooccurrence)
    out["array_bytes_per_item"] = array_bytes(engine) / n
    out["matrix_capacity_rows"] = int(engine.catalog._matrix.shape[0])
    return out


def array_bytes(engine: InterestEngine) -> int:
    """Bytes of the arrays the engine holds per item: every per-row array of
    the catalogue, over its whole capacity, and the blend's per-item arrays."""
    return (sum(array.nbytes for array, _ in engine.catalog._per_row_arrays())
            + engine._blend.popularity.counts.nbytes + engine._blend.cooccurrence.item_counts().nbytes)


def turnover(X: np.ndarray, rounds: int, share: float, threads: int) -> dict:
    """A catalogue that turns over (news, listings): len(X) live items; each
    round `share` of them come new (UpsertItems with vectors, then read by
    five users) and as many of the oldest go (DeleteItems), through the
    engine as it runs (compacting) and with compaction held off (every dead
    row kept until a restart, as before compaction). Per round: the rows the
    index holds, u0's Recommend in-process (median of 9), and DeleteItems'
    time (a compaction included, when one runs)."""
    n, per = X.shape[0], int(X.shape[0] * share)
    out: dict = {}
    ThreadCounts().set(1)  # as engine_inprocess
    for mode, min_dead in (("compacting", engine_module.COMPACT_MIN_DEAD_ROWS), ("never", 2**62)):
        saved, engine_module.COMPACT_MIN_DEAD_ROWS = engine_module.COMPACT_MIN_DEAD_ROWS, min_dead
        try:
            engine = InterestEngine(Config(), MemoryStore(), DIM, embed=zero_embedder(DIM), scan_threads=threads)
            engine.upsert_items([ItemInput(id=f"i{j}", text="", vector=X[j]) for j in range(n)])
            now, rows = time.time(), []
            for r in range(rounds):
                fresh = range(n + r * per, n + (r + 1) * per)
                engine.upsert_items([ItemInput(id=f"i{j}", text="", vector=X[j % n]) for j in fresh])
                engine.record_events([EventInput(f"r{r}-u{u}-{k}", f"u{u}", 3, f"i{fresh[(7 * u + k) % per]}", None,
                                                 None, now - 60.0 * (rounds - r) - k) for u in range(5) for k in range(4)])
                started = time.perf_counter()
                engine.delete_items([f"i{j}" for j in range(r * per, (r + 1) * per)])
                deleted_s = time.perf_counter() - started
                rows.append({"round": r + 1, "rows": engine.catalog.size, "live": len(engine.catalog),
                             "delete_s": deleted_s, "compactions": engine.catalog.epoch,
                             "recommend": summary(timings(lambda: engine.recommend("u0", K), repeat=9, warmup=1))})
            out[mode] = rows
        finally:
            engine_module.COMPACT_MIN_DEAD_ROWS = saved
    ThreadCounts().set(threads)
    return out


# --------------------------------------------------------------------------- 4. gRPC

def record_background(client, n_items: int) -> None:
    """make_events' users (background and u0), through RecordEvents in batches of 500."""
    from halflife_client.client import to_timestamp
    from halflife.v1 import interest_pb2

    events = [interest_pb2.Event(event_id=e, user_id=u, type=t, item_id=i,
                                 event_time=to_timestamp(dt.datetime.fromtimestamp(when, dt.timezone.utc)))
              for e, u, t, i, when in make_events(n_items, 1, time.time())]
    for s in range(0, len(events), 500):
        client.record_events(events[s : s + 500])


def grpc_run(X: np.ndarray, rounds: int, per_round: int, threads: int) -> dict:
    """Recommend and the empty RPC through a server process, round by round
    with the core paced at the empty RPC's cadence (`timings(pause_s=)`):
    one caller's requests reach the server that far apart, and a 10k
    catalogue (15 MB) leaves the caches of this shared machine within a
    millisecond or two, which a tight loop never sees."""
    from halflife_client.client import HalflifeClient

    n = X.shape[0]
    with ServerProcess(args=["--threads", str(threads)]) as server:  # BLAS: one thread (the server's default)
        client = HalflifeClient(server.target, timeout=300)
        time.sleep(0.5)
        rss0 = server.rss_bytes()
        began = time.perf_counter()
        upsert_vectors(client, X)
        load_s = time.perf_counter() - began
        gc.collect()
        rss1 = server.rss_bytes()
        record_background(client, n)
        client.recommend("u0", K)
        core = core_multi(X, threads)
        p50s: dict[str, list[float]] = {CHECK: [], RECOMMEND: [], "core_paced": []}
        for _ in range(rounds):
            for call, seconds in load_p50s(server.target, [(CHECK, "{}"), (RECOMMEND, '{"user_id": "u0", "limit": 10}')],
                                           rounds=1, per_round=per_round).items():
                p50s[call] += seconds
            p50s["core_paced"].append(med(timings(core, repeat=per_round, pause_s=p50s[CHECK][-1])))
        rss2 = server.rss_bytes()
        client.close()
    return {
        "load_items_per_s": n / load_s,
        "rss_start_bytes": rss0,
        "rss_after_items_bytes": rss1,
        "rss_after_events_bytes": rss2,
        "rss_bytes_per_item": (rss1 - rss0) / n,
        "empty_p50_s": float(np.median(p50s[CHECK])),
        "recommend_p50_s": float(np.median(p50s[RECOMMEND])),
        "core_paced_s": float(np.median(p50s["core_paced"])),
        "rounds": p50s,
    }


# --------------------------------------------------------------------------- main

def run(quick: bool = False, threads: int | None = None) -> dict:
    threads = threads or physical_cores()
    ThreadCounts().set(threads)  # NumPy's OpenBLAS and FAISS's OpenMP
    sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
    grpc_sizes = [10_000] if quick else [10_000, 100_000]
    rng = np.random.default_rng(42)
    M = unit_rows(max(sizes))
    results: dict = {"quick": quick, "dim": DIM, "k": K, "threads": threads, "sizes": {}}
    for n in sizes:
        print(f"--- {n} items", flush=True)
        X = M[:n]
        index = faiss.IndexFlatIP(DIM)
        index.add(X)
        r: dict = {}
        r["per_query"] = per_query(X, index, rng, repeat=7 if n >= 1_000_000 else 15, threads=threads)
        print("per query", {k: v for k, v in r["per_query"].items() if "ratio" in k}, flush=True)
        big = n >= 1_000_000
        r["batch"] = batch(X, index, rng, repeat=1 if big or quick else 3, warmup=1 if n <= 10_000 else 0,
                           threads=threads)
        print("batch ratio", r["batch"]["ratio"], flush=True)
        del index
        gc.collect()
        r["engine"] = engine_inprocess(X, repeat=5 if big else 15, trace=n <= 100_000, threads=threads)
        print("engine", {k: v["median_s"] for k, v in r["engine"].items() if isinstance(v, dict)}, flush=True)
        gc.collect()
        if n in grpc_sizes:
            r["grpc"] = grpc_run(X, rounds=3 if quick else 5, per_round=30 if quick else 40, threads=threads)
            core = r["per_query"]["core_multi"]["median_s"]
            g = r["grpc"]
            g["core_plus_empty_s"] = core + g["empty_p50_s"]
            g["ratio"] = g["recommend_p50_s"] / g["core_plus_empty_s"]
            g["paced_core_plus_empty_s"] = g["core_paced_s"] + g["empty_p50_s"]
            g["ratio_vs_paced"] = g["recommend_p50_s"] / g["paced_core_plus_empty_s"]
            g["engine_plus_empty_s"] = r["engine"]["recommend"]["median_s"] + g["empty_p50_s"]
            g["ratio_vs_engine"] = g["recommend_p50_s"] / g["engine_plus_empty_s"]
            print("grpc", {k: v for k, v in g.items() if k != "rounds"}, flush=True)
        results["sizes"][str(n)] = r
    print("--- turnover", flush=True)
    results["turnover"] = turnover(M[:TURNOVER_ITEMS], rounds=4 if quick else TURNOVER_ROUNDS, share=TURNOVER_SHARE,
                                   threads=threads)
    write(results)
    return results


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _plot(ax, sizes: dict) -> None:
    """Per-query milliseconds against items, log-log: core, baselines, engine, gRPC."""
    items = [int(n) for n in sizes]
    series = {
        "core, K=8 interests": [r["per_query"]["core_multi"]["median_s"] for r in sizes.values()],
        "NumPy GEMV + argpartition": [r["per_query"]["numpy"]["median_s"] for r in sizes.values()],
        "NumPy vecdot + argpartition": [r["per_query"]["vecdot"]["median_s"] for r in sizes.values()],
        "FAISS IndexFlatIP": [r["per_query"]["faiss"]["median_s"] for r in sizes.values()],
        "engine.recommend (default blend)": [r["engine"]["recommend"]["median_s"] for r in sizes.values()],
    }
    for label, seconds in series.items():
        ax.plot(items, [s * 1e3 for s in seconds], marker="o", label=label)
    grpc = [(int(n), r["grpc"]["recommend_p50_s"] * 1e3) for n, r in sizes.items() if "grpc" in r]
    if grpc:
        ax.plot(*zip(*grpc), marker="s", linestyle="--", label="gRPC Recommend p50")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("catalogue items (384-d float32)")
    ax.set_ylabel("ms per query (median)")
    ax.legend(fontsize=8)


def write(results: dict) -> None:
    ms = lambda s: s * 1e3
    sizes = results["sizes"]
    thread_counts = sorted({1, results["threads"]})
    rows = []
    for n, r in sizes.items():
        q = r["per_query"]
        by_threads = lambda method: " / ".join(f"{ms(q[f'{method}_{t}']['median_s']):.3g}" for t in thread_counts)
        rows.append([n, by_threads("core_multi"), by_threads("core_single"), by_threads("faiss"), by_threads("numpy"),
                     ms(q["vecdot_1"]["median_s"]), q["ratio_multi"], verdict(q["ratio_multi"] <= 1.2), q["ratio_single"],
                     verdict(q["ratio_single"] <= 1.2), q["ratio_multi_1"]])
    counts = " / ".join(map(str, thread_counts))
    t1 = markdown_table([f"items ({counts} threads)", "core K=8 ms", "core single ms", "FAISS ms", "NumPy GEMV ms",
                         "NumPy vecdot ms (1 thread)",
                         f"K=8 / best (core at {results['threads']})", "target <=1.2", "single / best", "target <=1.2",
                         "K=8 / best, all at 1 thread"], rows)
    rows = []
    for n, r in sizes.items():
        b = r["batch"]
        rows.append([n, USERS_BATCH, b["chunk"], round(b["core"]["users_per_s"]), round(b["faiss"]["users_per_s"]),
                     round(b["numpy"]["users_per_s"]), b["ratio"], verdict(b["ratio"] >= 0.8), b["core"]["n"]])
    t2 = markdown_table(["items", "users", "NumPy query chunk", "core users/s", "FAISS users/s", "NumPy users/s",
                         "core / best", "target >=0.8", "runs"], rows)
    rows = []
    for n, r in sizes.items():
        e = r["engine"]
        core = r["per_query"]["core_multi"]["median_s"]
        rows.append([n, ms(core), ms(e["interest"]["median_s"]), ms(e["recommend_blend_off"]["median_s"]),
                     ms(e["recommend"]["median_s"]), ms(e["cooccurrence"]["median_s"]), ms(e["popularity"]["median_s"]),
                     e["recommend"]["median_s"] / core, ms(e["trending"]["median_s"]),
                     ms(e["trending_no_events"]["median_s"])])
    t3 = markdown_table(["items", "core K=8 ms", "interest signal ms", "recommend, blend off ms",
                         "recommend, default blend ms", "co-occurrence signal ms", "popularity signal ms",
                         "recommend / core", "recommend, user without events (trending) ms",
                         "trending before any event ms"], rows)
    rows = []
    for n, r in sizes.items():
        if "grpc" not in r:
            continue
        g = r["grpc"]
        rows.append([n, ms(g["recommend_p50_s"]), ms(g["empty_p50_s"]), ms(r["per_query"]["core_multi"]["median_s"]),
                     ms(g["core_plus_empty_s"]), g["ratio"], verdict(g["ratio"] <= 1.0),
                     ms(g["core_paced_s"]), g["ratio_vs_paced"],
                     ms(g["engine_plus_empty_s"]), g["ratio_vs_engine"]])
    t4 = markdown_table(["items", "Recommend p50 ms", "empty RPC p50 ms", "core ms", "core + empty ms",
                         "p50 / (core+empty)", "target <=1", "core paced ms", "p50 / (paced core+empty)",
                         "engine + empty ms", "p50 / (engine+empty)"], rows)
    rows = []
    for n, r in sizes.items():
        e = r["engine"]
        g = r.get("grpc", {})
        rows.append([n, round(e["array_bytes_per_item"]), round(e["traced_bytes_per_item"]) if e["traced_bytes_per_item"] else "-",
                     round(g["rss_bytes_per_item"]) if g else "-", round(g["load_items_per_s"]) if g else "-"])
    t5 = markdown_table(["items", "array bytes/item (incl. capacity slack)", "traced Python bytes/item (catalogue + blend)",
                         "server RSS bytes/item", "UpsertItems items/s"], rows)
    churn = results.get("turnover")
    t6 = ""
    if churn:
        rows = [[a["round"], a["live"], a["rows"], b["rows"], a["compactions"], ms(a["recommend"]["median_s"]),
                 ms(b["recommend"]["median_s"]), a["delete_s"], b["delete_s"]]
                for a, b in zip(churn["compacting"], churn["never"])]
        t6 = ("\n## Catalogue turnover\n\n" + markdown_table(
            ["round", "live items", "rows held (compacting)", "rows held (never)", "compactions so far",
             "Recommend ms (compacting)", "Recommend ms (never)", "DeleteItems s (compacting)",
             "DeleteItems s (never)"], rows))
    table = ("## Per query (one user, k = 10)\n\n" + t1 + "\n" + save_plot("ranking", lambda ax: _plot(ax, sizes),
                                                                          "Recommend cost vs catalogue size (k = 10)") + "\n## Batch (1,000 users)\n\n" + t2
             + "\n## InterestEngine.recommend in-process (signal costs)\n\n" + t3
             + "\n## Through gRPC (server process, concurrency 1)\n\n" + t4 + "\n## Memory per item\n\n" + t5 + t6)
    notes = (
        f"Threads: {results['threads']} (physical cores unless --threads). Per query, the core splits each scan "
        "into row blocks on that many threads (`RowBlocks`, each block one BLAS thread), as the engine and the "
        "server (`--threads`, BLAS at one thread) do; FAISS and NumPy's GEMV run at 1 and at that many BLAS/OpenMP "
        "threads, NumPy's vecdot (its own loop, no BLAS) at 1, and the best counts as the baseline. OpenBLAS's and OpenMP's own threads spin for a core, "
        "and on this shared box a second one often waits a scheduler slice. "
        "Batch: FAISS and NumPy at that many BLAS/OpenMP threads, the core as that many groups of queries on threads of their own, each at one BLAS thread. "
        "Random unit float32 vectors, 384-d; the allowed mask excludes 50 items. FAISS IndexFlatIP is unmasked "
        "(its best case). Batch: one score block stays <= 200 MB: the core (`batch_search`) takes all queries "
        "through tiles of items, NumPy takes chunks of queries through all items; FAISS blocks internally. At 1M the batch is timed once per method (about 10-30 s each). "
        f"Blend: {BG_USERS} background users x {BG_EVENTS} events over a Zipf head of 5,000 items, user u0 has 5 "
        "events and user cold none (trending); the default config blends interest 1.0, co-occurrence 0.5 (cosine), popularity 0.1. "
        "Core paced: the core timed in this process between the gRPC rounds, each call after a sleep of that "
        "round's empty-RPC p50, the cadence at which one caller's requests reach the server: a 10k catalogue "
        "(15 MB) leaves this shared machine's caches between such calls, which a tight loop never sees. "
        "gRPC at 1M was not run (loading 1M items through UpsertItems does not fit the 5-minute budget). "
        "Memory: array bytes = the catalogue's per-row arrays (vectors, alive, create times and sequences, "
        "last rewrite; per allocated row, the matrix grows 1.5x) + popularity + co-occurrence per-item arrays; "
        "traced = tracemalloc of CatalogIndex.upsert + blend resize (ids, dicts, lists included); server RSS = growth of the server process while loading the items "
        "(includes SQLite page cache and transient buffers). "
        f"Turnover: {TURNOVER_ITEMS:,} live items, each round {TURNOVER_SHARE:.0%} new (UpsertItems with vectors, "
        "20 events of 5 users on them) and as many of the oldest deleted, in-process over an in-memory store; "
        "compacting as the engine does (dead rows >= 4,096 and a quarter of the live ones), and with compaction "
        "held off, as before it existed (dead rows kept until a restart). Recommend: u0's, median of 9."
    )
    write_results("ranking", results, table, notes)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k and 100k only, gRPC at 10k; under a minute")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every method: the core's scan blocks (in-process and the server's --threads), "
                             "the baselines' BLAS/OpenMP threads (default: physical cores; see README)")
    args = parser.parse_args()
    run(args.quick, args.threads)


if __name__ == "__main__":
    main()
