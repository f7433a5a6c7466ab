"""The cost of gRPC itself: grpc.health.v1.Health/Check through a real server process.

    python -m bench.empty_rpc [--quick] [--model-dir DIR]

p50/p90 latency at concurrency 1 and throughput at concurrency 32, driven by
halflife.loadtest.run_load_test from this process against a separate
`halflife serve` process. Other benchmarks import `empty_rpc_p50` to put their
latencies next to the floor gRPC itself sets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from halflife.cli import run_event_loop
from halflife.loadtest import LoadTestOptions, run_load_test

from bench.common import markdown_table, save_plot, write_results
from bench.server_process import DEFAULT_MODEL_DIR, ServerProcess

CHECK = "grpc.health.v1.Health.Check"


def load(target: str, concurrency: int, duration: float, data: str = "{}", call: str = CHECK,
         timeout: float = 20.0, strict: bool = True, connections: int = 1) -> dict:
    """One ghz-shaped report of `call` at `concurrency` for `duration` seconds
    (after a few untimed warm-up calls). Calls still in flight at the end run
    to completion or to `timeout`. strict: raise when any call failed."""
    # Over twice the connections: with --workers each lands on a worker of its own choosing, and a worker
    # first called in the timed run would put its catch-up there.
    spread = 2 * connections if connections > 1 else 1
    warm = LoadTestOptions(call=call, data=data, target=target, concurrency=max(min(concurrency, 4), spread),
                           connections=spread, total=max(8, 2 * spread), max_duration=1.0, timeout=timeout)
    run_event_loop(run_load_test(warm))
    options = LoadTestOptions(call=call, data=data, target=target, concurrency=concurrency, duration=duration,
                              timeout=timeout, connections=connections)
    report = run_event_loop(run_load_test(options))
    bad = {k: v for k, v in report["statusCodeDistribution"].items() if k != "OK"}
    if bad and strict:
        raise RuntimeError(f"{call} at concurrency {concurrency} failed: {bad} {report['errorDistribution']}")
    return report


def percentile_s(report: dict, p: int) -> float:
    """The report's p-th percentile latency, in seconds: over the OK calls
    (ghz's rule), NaN when none was OK."""
    return next((d["latency"] / 1e9 for d in report["latencyDistribution"] or () if d["percentage"] == p),
                float("nan"))


def empty_rpc_p50(target: str, duration: float = 3.0) -> float:
    """Median seconds of one health Check at concurrency 1 against `target`."""
    return percentile_s(load(target, 1, duration), 50)


def run(model_dir: Path, quick: bool = False) -> dict:
    duration = 2.0 if quick else 8.0
    with ServerProcess(model_dir) as server:
        c1 = load(server.target, 1, duration)
        c32 = load(server.target, 32, duration)
    results = {
        "quick": quick,
        "duration_s": duration,
        "c1": {"p50_s": percentile_s(c1, 50), "p90_s": percentile_s(c1, 90), "rps": c1["rps"], "count": c1["count"]},
        "c32": {"p50_s": percentile_s(c32, 50), "p90_s": percentile_s(c32, 90), "rps": c32["rps"], "count": c32["count"]},
        "reports": {"c1": c1, "c32": c32},
    }
    rows = [
        [1, results["c1"]["p50_s"] * 1e3, results["c1"]["p90_s"] * 1e3, round(c1["rps"]), c1["count"]],
        [32, results["c32"]["p50_s"] * 1e3, results["c32"]["p90_s"] * 1e3, round(c32["rps"]), c32["count"]],
    ]
    table = markdown_table(["concurrency", "p50 ms", "p90 ms", "RPC/s", "calls"], rows)

    def plot(ax) -> None:
        names = ["concurrency 1", "concurrency 32"]
        for offset, (label, key) in zip((-0.2, 0.2), (("p50", "p50_s"), ("p90", "p90_s"))):
            ax.bar([i + offset for i in range(2)], [results[c][key] * 1e3 for c in ("c1", "c32")], 0.4, label=label)
        ax.set_xticks(range(2), [f"{n}\n{round(results[c]['rps'])} RPC/s" for n, c in zip(names, ("c1", "c32"))])
        ax.set_ylabel("ms per call")
        ax.legend()

    table += "\n" + save_plot("empty_rpc", plot, "Health/Check latency (the cost of gRPC itself)")
    notes = ("grpc.health.v1.Health/Check against a `halflife serve` process over loopback; the load generator "
             "(halflife.loadtest, grpc.aio) runs in a second process on the same cores, so RPC/s is a floor "
             "for the server alone.")
    write_results("empty_rpc", results, table, notes)
    print(table)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, for smoke testing")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    run(args.model_dir, args.quick)


if __name__ == "__main__":
    main()
