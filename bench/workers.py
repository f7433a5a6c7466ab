"""When does `halflife serve --workers N` help? The same load against 1 and N workers.

    python -m bench.workers [--quick] [--workers N]

One server per worker count, started in turn (rounds alternate 1, N, 1, N so
that machine noise hits both alike), each loaded with the same 10k-item
catalogue (precomputed vectors) and 2,000 background users. Measured per run,
with the load generator (halflife.loadtest, 8 TCP connections so SO_REUSEPORT
spreads them) in this process on the same cores:

- empty RPC (health Check) at concurrency 32: the gRPC stack alone;
- Recommend for one user at concurrency 1 (p50) and 16 (throughput);
- Embed of one short sentence at concurrency 32 (the dynamic batcher's case);
- RecordEvents, batches of 500 item events from 4 streams (writers share SQLite).

Workers split the cores' intra-op threads (`--threads` default: cores / N).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import markdown_table, save_plot, write_results
from bench.empty_rpc import CHECK, load, percentile_s
from bench.ingest import requests_for, send
from bench.ranking import record_background, unit_rows
from bench.server_process import ServerProcess, upsert_vectors
from halflife.cli import run_event_loop
from halflife_client import HalflifeClient

ITEMS = 10_000
CONNECTIONS = 8
RECOMMEND = "halflife.v1.RecommendService.Recommend"
EMBED = "halflife.v1.EmbeddingService.Embed"
SENTENCE = "a small bakery on the corner sells fresh bread every morning"


def measure(workers: int, vectors: np.ndarray, duration: float, run_index: int) -> dict:
    def rps(call: str, concurrency: int, data: str = "{}") -> dict:
        report = load(server.target, concurrency, duration, data=data, call=call, connections=CONNECTIONS)
        return {"rps": report["rps"], "p50_s": percentile_s(report, 50), "count": report["count"]}

    with ServerProcess(workers=workers) as server:
        with HalflifeClient(server.target, timeout=300) as client:
            upsert_vectors(client, vectors)
            record_background(client, len(vectors))
        recommend = '{"user_id": "u0", "limit": 10}'
        out = {
            "empty_c32": rps(CHECK, 32),
            "recommend_c1": rps(RECOMMEND, 1, recommend),
            "recommend_c16": rps(RECOMMEND, 16, recommend),
            "embed_c32": rps(EMBED, 32, '{"inputs": ["%s"]}' % SENTENCE),
        }
        requests = requests_for(f"w{workers}r{run_index}", 20 * 500, 1000, time.time() - 86400, np.random.default_rng(run_index))
        seconds = run_event_loop(send(server.target, requests, 4))
        out["ingest_events_per_s"] = 20 * 500 / seconds
    return out


# (label, summary key, measured field, higher is better)
METRICS = [
    ("empty RPC c32, RPC/s", "empty_c32", "rps", True),
    ("Recommend c1 p50 ms", "recommend_c1", "p50_s", False),
    ("Recommend c16, RPC/s", "recommend_c16", "rps", True),
    ("Embed 1 sentence c32, /s", "embed_c32", "rps", True),
    ("RecordEvents 4 streams, events/s", "ingest", "events_per_s", True),
]


def run(quick: bool = False, workers: int = 2) -> dict:
    duration = 2.0 if quick else 6.0
    rounds = 1 if quick else 2
    vectors = unit_rows(ITEMS, seed=5)
    runs: dict[int, list[dict]] = {1: [], workers: []}
    for r in range(rounds):
        for count in (1, workers):
            runs[count].append(measure(count, vectors, duration, r))
    value = lambda run, key, field: run["ingest_events_per_s"] if key == "ingest" else run[key][field]
    summary = {key: {side: float(np.median([value(run, key, field) for run in runs[count]]))
                     for side, count in (("one", 1), ("many", workers))}
               for _, key, field, _ in METRICS}
    results = {"quick": quick, "workers": workers, "rounds": rounds, "duration_s": duration,
               "summary": summary, "runs": {str(k): v for k, v in runs.items()}}
    write(results)
    return results


def write(results: dict) -> None:
    workers, summary = results["workers"], results["summary"]
    rows = []
    for label, key, field, higher_is_better in METRICS:
        one, many = summary[key]["one"], summary[key]["many"]
        scale = 1e3 if field == "p50_s" else 1.0
        rows.append([label, one * scale, many * scale, many / one if higher_is_better else one / many])
    table = markdown_table(["load", "1 worker", f"{workers} workers", "gain (> 1: better)"], rows)

    def plot(ax) -> None:
        gains = [row[3] for row in rows]
        ax.barh([row[0] for row in rows], gains, color=["tab:green" if g >= 1 else "tab:red" for g in gains])
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xlabel(f"gain with {workers} workers (throughput ratio; for p50, 1 worker's over {workers}')")
        ax.invert_yaxis()

    table += "\n" + save_plot("workers", plot, f"{workers} worker processes vs 1, same load")
    notes = (f"Medians of {results['rounds']} run(s) per worker count, alternated; {results['duration_s']:.0f} s per "
             f"load; {CONNECTIONS} TCP connections; 10k items, 2,000 background users. The load generator runs in "
             "the benchmark's process on the same cores as the server(s), so on a small machine it competes with "
             "them: read the ratios, not the absolute numbers.")
    write_results("workers", results, table, notes)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    run(args.quick, args.workers)


if __name__ == "__main__":
    main()
