"""Runs a real Halflife gRPC server on 127.0.0.1 in a background thread, for tests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from halflife.api.server import HalflifeServer, ServerConfig
from halflife.cli import new_event_loop

START_TIMEOUT_S = 120


def repeat_min_cosine(precision: str) -> float:
    """The least cosine two embeddings of one text may have when they went
    through the model in different batches: the float variants agree to
    ~1e-6; int8 quantizes activations with one scale per batch
    (docs/embedding.md), so it is held to its export bar instead."""
    return 0.99 if precision == "int8" else 0.9999


@contextlib.contextmanager
def stand_in(add_servicer, servicer, threads: int = 8):
    """A plain grpc server of one `servicer` (added by its generated
    add_XServicer_to_server) on 127.0.0.1, for tests that script a server's
    answers: yields its address."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(threads))
    add_servicer(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


class ServerThread:
    """A HalflifeServer on its own event loop in a daemon thread."""

    def __init__(self, config: ServerConfig):
        config.host = "127.0.0.1"
        self.server = HalflifeServer(config)
        self._loop = new_event_loop()  # serve's kind of loop
        self._thread = threading.Thread(target=self._loop.run_forever, name="halflife-test-server", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(START_TIMEOUT_S)
        return self

    def start_in_background(self):
        """Starts without waiting for the model: returns the start future."""
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.server.start(), self._loop)

    def stop(self, grace: float = 5.0) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(grace + 30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """The address of a listener on 127.0.0.1 that takes connections (the
    kernel completes the handshakes) and never speaks HTTP/2: a call waits."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        yield f"127.0.0.1:{silent.getsockname()[1]}"


def serve_once(model_dir: Path, data_dir: Path, *args: str, port: str = "0", workers: int = 1,
               timeout: float = 60) -> subprocess.CompletedProcess:
    """`halflife serve` run to its end (a start it refuses), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "halflife.cli", "serve", "--workers", str(workers), "--port", port,
         "--model-dir", str(model_dir), "--data-dir", str(data_dir), *args],
        capture_output=True, text=True, timeout=timeout,
    )


def start_cli_server(
    model_dir: Path, data_dir: Path, *, drain: bool = False, workers: int = 1, extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """`halflife serve --port 0 [--workers N]` in a subprocess (in `env`, or
    this process's environment); returns it and its address once it (every
    worker) serves; its log up to then is in the process's `start_log`.
    With `drain`, a thread keeps reading its log so the server never blocks
    on a full pipe (leave it off to read the rest of the log with
    communicate())."""
    process = subprocess.Popen(
        [sys.executable, "-m", "halflife.cli", "serve", "--port", "0", "--model-dir", str(model_dir),
         "--data-dir", str(data_dir), "--workers", str(workers), *extra_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    lines = []
    serving = 0
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"serving on (127\.0\.0\.1:\d+)", line)
        serving += bool(found)
        if found and serving == workers:
            process.start_log = "".join(lines)
            if drain:
                threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, found.group(1)
    process.kill()
    pytest.fail("server did not start:\n" + "".join(lines))


def signal_through_window(process: subprocess.Popen, signum: int, margin_s: float) -> int:
    """Sends `signum`, then again every 10 ms until `margin_s` before the
    end of the window in which a repeat is the same stop (or until the
    process is gone); returns its exit status."""
    from halflife.signals import REPEAT_SIGNAL_WINDOW_S

    process.send_signal(signum)
    until = time.monotonic() + REPEAT_SIGNAL_WINDOW_S - margin_s
    while time.monotonic() < until and process.poll() is None:
        time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
    return process.wait(timeout=60)

def scrape_metrics(port: int) -> dict[str, float]:
    """The samples of a server's /metrics page on 127.0.0.1:`port`, as
    {'name{label=value,...}': value}, labels sorted."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
