"""A `halflife serve` process on a free port of 127.0.0.1, for the gRPC benchmarks.

    with ServerProcess() as server:            # the model in HALFLIFE_BENCH_MODEL_DIR, a temporary data dir
        client = HalflifeClient(server.target)
        server.rss_bytes()

The load generator runs in the benchmark's own process, so it never shares
the server's GIL.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_MODEL_DIR = Path(os.environ.get("HALFLIFE_BENCH_MODEL_DIR", "var/models/all-MiniLM-L6-v2"))
_SERVING = re.compile(r"serving on ([\d.]+):(\d+)")


class ServerProcess:
    def __init__(self, model_dir: Path | str = DEFAULT_MODEL_DIR, *, data_dir: Path | str | None = None,
                 start_timeout: float = 120.0, env: dict[str, str] | None = None, workers: int = 1,
                 args: Sequence[str] = ()):
        self.env = env
        self.args = list(args)  # more `halflife serve` flags
        self.workers = workers
        self._tmp = tempfile.TemporaryDirectory(prefix="halflife-bench-") if data_dir is None else None
        self.data_dir = Path(self._tmp.name if self._tmp else data_dir)
        self.model_dir = Path(model_dir)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.target = ""
        self.log: list[str] = []

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "halflife.cli", "serve", "--port", "0",
               "--model-dir", str(self.model_dir), "--data-dir", str(self.data_dir), "--log-level", "INFO",
               "--workers", str(self.workers), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env={**os.environ, **(self.env or {})})
        # Its output is read on a thread of its own, for as long as it runs (so the pipe never blocks the
        # server), and handed here until it serves: a server that hangs silently still times out.
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        serving, why = 0, f"not serving after {self.start_timeout:g} s"
        while not self.target:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                why = "it exited"
                break
            m = _SERVING.search(line)
            serving += bool(m)
            if m and serving == self.workers:  # every worker serves
                self.target = f"{m.group(1)}:{m.group(2)}"
        if not self.target:
            self.stop()
            raise RuntimeError(f"server did not start ({why}):\n" + "\n".join(self.log[-30:]))
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.rstrip())
            del self.log[:-200]
            if not self.target:
                self._lines.put(line)
        self._lines.put(None)

    def rss_bytes(self) -> int:
        """VmRSS of the server process (with --workers: the parent only), from /proc/PID/status."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    @property
    def address(self) -> str:
        return self.target

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def load_p50s(target: str, calls: list[tuple[str, str]], *, rounds: int, per_round: int) -> dict[str, list[float]]:
    """p50 latency (s) of each (call, proto3-JSON data) at concurrency 1, per
    round; the calls alternate round by round so that machine noise hits
    them alike. Uses halflife.loadtest.run_load_test."""
    from halflife.cli import run_event_loop
    from halflife.loadtest import LoadTestOptions, run_load_test

    out: dict[str, list[float]] = {call: [] for call, _ in calls}

    async def go() -> None:
        for _ in range(rounds):
            for call, data in calls:
                report = await run_load_test(LoadTestOptions(call=call, data=data, target=target, concurrency=1,
                                                             total=per_round))
                if report["statusCodeDistribution"].get("OK", 0) != report["count"]:
                    raise RuntimeError(f"{call}: {report['errorDistribution']}")
                p50 = next(d["latency"] for d in report["latencyDistribution"] if d["percentage"] == 50)
                out[call].append(p50 / 1e9)

    run_event_loop(go())
    return out


def upsert_vectors(client, X: np.ndarray) -> None:
    """Items i0.. with the rows of X as precomputed vectors, through UpsertItems in batches of 1,000."""
    from halflife.v1 import catalog_pb2

    for s in range(0, len(X), 1000):
        client.upsert_items([catalog_pb2.Item(id=f"i{j}", vector=X[j].tolist()) for j in range(s, min(len(X), s + 1000))])
