"""`halflife serve --workers N`: N server processes sharing one port.

One Python process runs gRPC, protobuf and the engine's bookkeeping under
one GIL; SO_REUSEPORT lets the kernel spread incoming connections over N
processes instead. The parent here never creates a gRPC object: it reserves
the port (a bound, non-listening SO_REUSEPORT socket, so `--port 0` gets one
port for all), opens the store once so migrations run before anyone serves,
then starts each worker as a fresh interpreter (`halflife serve` with the same
flags plus `--worker-index`), forwards SIGTERM/SIGINT to them and waits.

Workers share the SQLite store and follow each other's writes
(`InterestEngine(follow_store=True)`). If a worker dies on its own, the others
are stopped and the exit status is 1: a supervisor (systemd, Kubernetes)
restarts the group, which reloads everything from the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from halflife.locks import LockHeldError, hold_lock

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[socket.socket]:
    """A bound SO_REUSEPORT socket holding `port` (0: a free one) for the
    workers, which bind it too. It never listens, so it takes no connections.

    SO_REUSEPORT would also let this group join another one serving the port
    (same user), silently splitting its traffic. Two checks refuse that: a
    lock file per port that a group's parent holds for its life (two groups
    started at once both passed the second check alone, before either one's
    workers listened), and a listener that answers a connection attempt (any
    other server). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        bound = sock.getsockname()[1]
        try:
            lock = hold_lock(Path(tempfile.gettempdir()) / f"halflife-{os.getuid()}-port-{bound}.lock")
        except LockHeldError as held:
            raise OSError(f"{host}:{bound} is already being served by another halflife --workers group "
                          f"({held.holder})") from None
        with lock:
            if port:
                try:
                    socket.create_connection((host, port), timeout=1.0).close()
                except OSError:
                    pass  # nobody listens: the port is ours
                else:
                    raise OSError(f"{host}:{port} is already being served by another process")
            yield sock


def worker_threads(requested: int | None, workers: int, cores: int) -> int:
    """Intra-op threads per worker: as asked, else the cores split between the workers."""
    return requested if requested is not None else max(1, cores // workers)


def run_workers(serve_argv: Sequence[str], host: str, port: int, workers: int, threads: int) -> int:
    """Runs `workers` copies of `halflife serve <serve_argv>` on one port until
    SIGTERM/SIGINT (forwarded to them) or until one exits on its own. Returns
    the exit status: 0 after a requested stop that every worker completed."""
    processes: list[subprocess.Popen] = []
    requested: list[int] = []

    def forward(signum: int, _frame) -> None:
        requested.append(signum)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    # Before the first worker starts: a stop asked for while they start must reach them all.
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with reserve_port(host, port) as reserved:
            port = reserved.getsockname()[1]
            log.info("starting %d workers on %s:%d, %d intra-op threads each", workers, host, port, threads)
            for index in range(workers):
                if requested:
                    break
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "halflife.cli", "serve", *serve_argv, "--port", str(port),
                     "--threads", str(threads), "--workers", "1", "--worker-index", str(index),
                     "--parent-pid", str(os.getpid())]
                ))
                if requested:  # it arrived while this one started
                    processes[-1].send_signal(requested[0])
            return _supervise(processes, requested)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _supervise(processes: list[subprocess.Popen], requested: list[int]) -> int:
    """Waits for the workers; stops them all when one exits unasked.
    `requested`: the signals forwarded to them so far (filled by a handler)."""
    failed = False
    while any(process.poll() is None for process in processes):
        ended = [(i, p.returncode) for i, p in enumerate(processes) if p.returncode is not None]
        if ended and not requested and not failed:
            index, status = ended[0]
            log.error("worker %d exited with status %s; stopping the others", index, status)
            failed = True
            for process in processes:
                if process.poll() is None:
                    process.terminate()  # graceful: SIGTERM
        time.sleep(POLL_SECONDS)
    statuses = [process.returncode for process in processes]
    # A worker the forwarded signal reached before it could handle it died of it: still a requested stop.
    stopped = {0, *(-signum for signum in requested)}
    if failed or any(status not in stopped for status in statuses):
        log.error("workers exited with statuses %s", statuses)
        return 1
    log.info("all %d workers stopped", len(processes))
    return 0
