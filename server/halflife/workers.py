"""`halflife serve --workers N`: N server processes sharing one port.

One Python process runs gRPC, protobuf and the engine's bookkeeping under
one GIL; SO_REUSEPORT lets the kernel spread incoming connections over N
processes instead. The parent here never creates a gRPC object: it reserves
the port (a bound, non-listening SO_REUSEPORT socket, so `--port 0` gets one
port for all), opens the store once so migrations run before anyone serves,
then starts each worker as a fresh interpreter (`halflife serve` with the
same flags plus `--worker-index`, in a session of its own, holding the data
directory's lock with it), stops them with SIGTERM when it gets SIGTERM,
SIGINT or SIGHUP, and waits.

Workers share the SQLite store and follow each other's writes
(`InterestEngine(follow_store=True)`). Each tells the parent through a pipe
once it serves. A worker that dies after that (a crash, an OOM kill) is
started again, with the same index, while the others serve on, up to
RESTART_LIMIT times within RESTART_WINDOW_S; so is such a replacement
killed by a signal while it reloads (the OOM killer again), or one that
finds the store unavailable for now (EXIT_TEMPORARY). One that exits
otherwise by itself before it served (a refused model, config or port), one killed
while the group starts, or one that dies again once those restarts are
spent, stops the group with exit status 1 instead, since starting it again
would only fail again: a supervisor (systemd, Kubernetes) sees the failure
and restarts the group, which reloads everything from the store.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Sequence

from halflife.locks import LockHeldError, hold_lock, remove_lock
from halflife.signals import STOP_SIGNALS, StopSignals
from halflife_client.client import host_port

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
RESTART_LIMIT = 3  # restarts of one worker within RESTART_WINDOW_S; its next death stops the group
RESTART_WINDOW_S = 300.0
# A worker's exit status for a start refused for now (EX_TEMPFAIL in sysexits.h): its store unavailable,
# such as locked past SQLite's busy timeout by a long write. A replacement that exits so is started again,
# within its restart budget, where any other refusal would only come again.
EXIT_TEMPORARY = 75


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[socket.socket]:
    """A bound SO_REUSEPORT socket holding `port` (0: a free one) for the
    workers, which bind it too. It never listens, so it takes no connections.

    SO_REUSEPORT would also let this group join another one serving the port
    (same user), silently splitting its traffic. Two checks refuse that: a
    lock file per port that a group's parent holds for its life (two groups
    started at once both passed the second check alone, before either one's
    workers listened), and a listener that answers a connection attempt (any
    other server). Raises OSError.

    Connections a stopped server closed (TIME_WAIT, ~60 s) refuse the bind
    too, where gRPC's SO_REUSEADDR listeners pass them: when nobody listens
    on the port, the bind is tried again with SO_REUSEADDR. Only then, as
    it never listens, another SO_REUSEADDR program could bind the port
    before the workers do (it would take it, and the group exit 1); without
    it none can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            try:
                sock.bind((host, port))
            except OSError as exc:
                if not port or exc.errno != errno.EADDRINUSE or _answers(host, port):
                    raise
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
        except OSError as exc:  # "[Errno 98] Address already in use" named no address
            raise OSError(f"cannot bind {host_port(host, port)}: {exc.strerror or exc}") from None
        bound = sock.getsockname()[1]
        path = Path(tempfile.gettempdir()) / f"halflife-{os.getuid()}-port-{bound}.lock"
        try:
            lock = hold_lock(path)
        except LockHeldError as held:
            raise OSError(f"{host_port(host, bound)} is already being served by another halflife --workers group "
                          f"({held.holder})") from None
        try:
            if port and _answers(host, port):
                raise OSError(f"{host_port(host, port)} is already being served by another process")
            yield sock
        finally:
            remove_lock(lock, path)


def _answers(host: str, port: int) -> bool:
    """Whether something listens on host:port (a connection attempt succeeds)."""
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return False
    return True


def worker_threads(requested: int | None, workers: int, cores: int) -> int:
    """Intra-op threads per worker: as asked, else the cores split between the workers."""
    return requested if requested is not None else max(1, cores // workers)


class RestartBudget:
    """At most `limit` restarts within any `window_s` seconds."""

    def __init__(self, limit: int = RESTART_LIMIT, window_s: float = RESTART_WINDOW_S):
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()

    def take(self, now: float) -> bool:
        """Spends one restart at time `now` (monotonic seconds); False when none is left."""
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


class _Worker:
    """One worker process, and the pipe on which it says that it serves."""

    def __init__(self, argv: Sequence[str], index: int, restarts: RestartBudget, keep_fds: Sequence[int] = ()):
        self.index = index
        self.restarts = restarts
        self.serving = False
        self.replacement = False  # started in place of one that died (see _supervise)
        read, write = os.pipe()
        try:
            # A session of its own: a terminal's Ctrl-C (SIGINT to the foreground group) reaches only
            # the parent, which forwards a stop; a worker still importing would otherwise raise
            # KeyboardInterrupt inside a C extension's import (onnxruntime's) and exit 1.
            self.process = subprocess.Popen([*argv, "--worker-index", str(index), "--ready-fd", str(write)],
                                            pass_fds=(write, *keep_fds), start_new_session=True)
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        os.set_blocking(read, False)
        self._ready: int | None = read

    def check_serving(self) -> bool:
        """Reads the pipe: True once the worker has said it serves."""
        if self._ready is not None:
            try:
                said = os.read(self._ready, 1)
            except BlockingIOError:
                return False  # not yet
            self.serving = bool(said)  # b"": it closed the pipe, i.e. exited, without saying so
            self.close()
        return self.serving

    def close(self) -> None:
        if self._ready is not None:
            os.close(self._ready)
            self._ready = None


def run_workers(serve_argv: Sequence[str], host: str, port: int, workers: int, threads: int,
                keep_fds: Sequence[int] = (), prepare: Callable[[], None] = lambda: None) -> int:
    """Runs `workers` copies of `halflife serve <serve_argv>` on one port until
    SIGTERM, SIGINT or SIGHUP (forwarded to them), restarting one that dies after it
    served (see the module's docstring for when the group stops instead).
    keep_fds: open in every worker for its life (the data directory's lock).
    prepare: run once the port is reserved, before any worker starts (so a
    port already taken fails before it made anything).
    Returns the exit status: 0 after a requested stop that every worker completed."""
    group: list[_Worker] = []
    signals = StopSignals()
    requested = signals.counted

    def forward(signum: int, _frame) -> None:
        # SIGTERM whatever arrived: a worker that has not yet set its handlers then dies of the
        # signal (-15, a clean stop) instead of raising KeyboardInterrupt wherever it is. A second
        # signal stops them at once (SIGKILL), as a second one stops a single server, and one within
        # the window is the same stop delivered twice (see halflife.signals): workers themselves take
        # their repeats as one, since a group-wide signal (systemd's, `kill -- -pgid`) reaches them
        # beside the parent's (a review: every worker quit without its grace).
        if not signals.count(signum):
            return
        for worker in group:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM if len(requested) == 1 else signal.SIGKILL)

    # Before the first worker starts: a stop asked for while they start must reach them all.
    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        with reserve_port(host, port) as reserved:
            port = reserved.getsockname()[1]
            prepare()
            argv = [sys.executable, "-m", "halflife.cli", "serve", *serve_argv, "--port", str(port),
                    "--threads", str(threads), "--workers", "1", "--parent-pid", str(os.getpid())]

            def start(index: int, restarts: RestartBudget, position: int) -> None:
                """Starts worker `index` into group[position] (appended at the end)."""
                worker = _Worker(argv, index, restarts, keep_fds)
                worker.replacement = position < len(group)
                if position == len(group):
                    group.append(worker)
                else:
                    group[position] = worker
                # After it is in the group: a stop that arrived while it started (which `forward`
                # could not send it) is sent now, one that arrives later by `forward`.
                if requested:
                    worker.process.send_signal(signal.SIGTERM)

            log.info("starting %d workers on %s, %d intra-op threads each", workers, host_port(host, port), threads)
            for index in range(workers):
                if requested:
                    break
                try:
                    start(index, RestartBudget(), index)
                except OSError:  # no process to be had (EMFILE, ENOMEM): stop those started, as _supervise does
                    for worker in group:
                        worker.process.terminate()
                    for worker in group:
                        worker.process.wait()
                    raise
            return _supervise(group, requested, start)
    finally:
        for worker in group:
            worker.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _ended(status: int) -> str:
    """How a worker ended, for the log: Popen's negative status is a signal, which "exited with status -9"
    did not say (the OOM killer's SIGKILL, most often)."""
    if status >= 0:
        return f"exited with status {status}"
    try:
        return f"was killed by {signal.Signals(-status).name}"
    except ValueError:
        return f"was killed by signal {-status}"


def _supervise(group: list[_Worker], requested: list[int], start) -> int:
    """Waits for the workers, starting again one that dies after it served;
    stops them all when one cannot be. `requested`: the signals forwarded to
    them so far (filled by a handler); `start(index, restarts, position)`
    puts a new worker into group[position]."""
    failed = False
    while True:
        for position, worker in enumerate(group):
            status = worker.process.poll()
            worker.check_serving()  # after poll: a worker that has exited left its word, or EOF, in the pipe
            if status is None or requested or failed:
                continue
            worker.close()
            # A replacement killed as it reloads says nothing against starting it (the OOM killer
            # struck again, at its peak memory): stopping its serving siblings for it took the whole
            # group down (a review). Nor does one whose store was unavailable for now (EXIT_TEMPORARY:
            # locked for over 10 s, in a review). One that exits otherwise before it serves would only
            # do so again.
            restartable = worker.serving or (worker.replacement and (status < 0 or status == EXIT_TEMPORARY))
            if restartable and worker.restarts.take(time.monotonic()):
                log.error("worker %d %s; starting it again", worker.index, _ended(status))
                try:
                    start(worker.index, worker.restarts, position)
                    continue
                except OSError as exc:  # no process to be had (EMFILE, ENOMEM): as if it failed to start
                    why = f"and could not be started again ({exc})"
            else:
                why = "before it served" if not restartable else (
                    f"after {worker.restarts.limit} restarts within {worker.restarts.window_s:.0f} s")
            log.error("worker %d %s %s; stopping the others", worker.index, _ended(status), why)
            failed = True
            for other in group:
                if other.process.poll() is None:
                    other.process.terminate()  # graceful: SIGTERM
        # Without a stop (asked for, or after a failure), every exit was handled above.
        if (requested or failed) and all(worker.process.poll() is not None for worker in group):
            break
        time.sleep(POLL_SECONDS)
    statuses = [worker.process.returncode for worker in group]
    if len(requested) > 1:  # stopped at once, as asked: the parent exits as a single server would
        log.warning("%s again: stopped the workers at once, without finishing in-flight calls",
                    signal.Signals(requested[-1]).name)
        return 128 + requested[-1]
    # A worker the forwarded SIGTERM reached before it could handle it died of it: still a requested stop.
    stopped = {0, -signal.SIGTERM}
    if failed or any(status not in stopped for status in statuses):
        log.error("workers ended: %s", ", ".join(f"worker {worker.index} {_ended(status)}"
                                                  for worker, status in zip(group, statuses)))
        return 1
    log.info("all %d workers stopped", len(group))
    return 0
