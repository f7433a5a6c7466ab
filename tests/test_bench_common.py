"""bench/common.py's statistics, which every benchmark table is read from, and its check of what they need."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import summary

ROOT = Path(__file__).resolve().parents[1]


def test_percentiles_are_nearest_rank_samples():
    """p90 of ten samples is the ninth (it was the tenth, the maximum)."""
    stats = summary([float(v) for v in range(10, 0, -1)])
    assert (stats["p10_s"], stats["median_s"], stats["p90_s"], stats["n"]) == (1.0, 5.5, 9.0, 10)
    assert summary([2.0])["p90_s"] == 2.0 and summary([1.0, 3.0])["p10_s"] == 1.0


def _not_measured(*args, **kwargs):
    raise AssertionError("measured before its dependencies were checked")


@pytest.mark.parametrize("name, module, package, starts, args", [
    ("ingest", "threadpoolctl", "threadpoolctl", "ServerProcess", ()),
    ("embedding", "sentence_transformers", "sentence-transformers", "RawOrt", (Path("model"),)),
])
def test_a_missing_dependency_stops_a_benchmark_before_it_measures(monkeypatch, name, module, package, starts, args):
    """Without the bench extra, bench.ingest ran minutes of gRPC runs and then
    failed on threadpoolctl, and bench.embedding failed on sentence-transformers
    after its onnxruntime runs; neither wrote anything, nor said what to install."""
    bench = pytest.importorskip(f"bench.{name}")
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    monkeypatch.setattr(bench, starts, _not_measured)
    with pytest.raises(SystemExit, match=rf"{package} is missing: `.venv/bin/pip install -e '.\[bench\]'`"):
        bench.run(*args, quick=True)


def test_ranking_without_faiss_says_what_to_install():
    """It failed on `import faiss` with a bare ModuleNotFoundError, as did
    bench.workers, which imports it for its catalogue and users."""
    paths = [str(ROOT / p) for p in ("server", "clients/python", ".")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}
    for name in ("ranking", "workers"):
        out = subprocess.run([sys.executable, "-c", f"import sys; sys.modules['faiss'] = None; import bench.{name}"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("faiss-cpu is missing: `.venv/bin/pip install -e '.[bench]'` (`make bench` "
                                     "installs it; bench/README.md)"), out.stderr
