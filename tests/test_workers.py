"""`halflife serve --workers N`: processes sharing one port and one store."""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import json
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

import grpc
import numpy as np
import pytest

import halflife.locks
from halflife import workers as workers_module
from halflife.locks import LockHeldError, claim_data_dir, hold_lock, remove_lock
from halflife.signals import REPEAT_SIGNAL_WINDOW_S, StopSignals
from halflife.workers import RestartBudget, reserve_port
from halflife.v1 import embedding_pb2, embedding_pb2_grpc, interest_pb2, recommend_pb2
from halflife_client import Event, HalflifeClient, Item
from tests.serving import scrape_metrics, serve_once, signal_through_window, start_cli_server

CLIENTS = 16  # connections; the kernel hashes each to a worker, so all land on one with p = 2 * 2**-16
LIKE = interest_pb2.EVENT_TYPE_LIKE
NOW = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def connections_by_process(pids: list[int], port: int) -> dict[int, int]:
    """Established TCP connections to `port` held by each process (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
                inodes.add(fields[9])
    counts = {}
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        links = [os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()]
        counts[pid] = sum(link.startswith("socket:[") and link[8:-1] in inodes for link in links)
    return counts


def wait_exit(process: subprocess.Popen, seconds: float = 60) -> int:
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the server did not stop")


def test_two_workers_share_the_port_and_answer_alike(model_dir, tmp_path):
    process, address = start_cli_server(model_dir, tmp_path / "data", drain=True, workers=2,
                                        extra_args=("--metrics-port", "0"))
    try:
        workers = children(process.pid)
        assert len(workers) == 2
        # A local subchannel pool per channel: a TCP connection of its own each.
        channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CLIENTS)]
        clients = [HalflifeClient(channel=channel) for channel in channels]
        rng = np.random.default_rng(3)
        vectors = rng.standard_normal((24, 384)).astype(np.float32)
        assert clients[0].upsert_items([Item(id=f"i{n}", text=f"item {n}", vector=v) for n, v in enumerate(vectors)]) == (24, 0)
        for n, client in enumerate(clients):  # writes through every connection, so through both workers
            client.record_events([Event(f"e{n}", "u", LIKE, item_id=f"i{n}", event_time=NOW)])
        answers = {
            (tuple((count.type, count.count) for count in c.profile("u").event_counts),
             tuple((r.item_id, round(r.score, 5)) for r in c.recommend("u", 5, as_of=NOW).items))
            for c in clients
        }
        assert len(answers) == 1  # every connection, whichever worker serves it, says the same
        assert dict(next(iter(answers))[0]) == {LIKE: CLIENTS}
        held = connections_by_process(workers, int(address.rsplit(":", 1)[1]))
        assert all(count > 0 for count in held.values()), held
        # Each worker counts its own calls, on a metrics port of its own: together, every write.
        ports = [int(p) for p in re.findall(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", process.start_log)]
        written = [scrape_metrics(p).get("halflife_rpc_calls_total{code=OK,method=InterestService/RecordEvents}", 0)
                   for p in ports]
        assert len(set(ports)) == 2 and sum(written) == CLIENTS and all(written), written

        assert clients[-1].delete_user("u") == CLIENTS
        assert {len(c.profile("u").event_counts) for c in clients} == {0}  # gone on both workers
        assert {c.recommend("u", 5, as_of=NOW).strategy for c in clients} == {recommend_pb2.STRATEGY_TRENDING}
        for channel in channels:
            channel.close()

        process.send_signal(signal.SIGTERM)  # forwarded: both finish gracefully
        assert wait_exit(process) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        process.kill()


class LogLines:
    """A process's output, read on a thread so that every wait is bounded."""

    def __init__(self, process: subprocess.Popen):
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._lines.put(line) for line in process.stdout], daemon=True).start()

    def wait_for(self, pattern: str, seconds: float = 60) -> re.Match:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                found = re.search(pattern, self._lines.get(timeout=left))
            except queue.Empty:
                break
            if found:
                return found
        pytest.fail(f"no log line matching {pattern!r} within {seconds} s")


def test_a_worker_that_dies_after_it_served_is_started_again(model_dir, tmp_path):
    process, address = start_cli_server(model_dir, tmp_path / "data", workers=2)
    log = LogLines(process)
    try:
        first, second = children(process.pid)
        os.kill(first, signal.SIGKILL)
        index = log.wait_for(r"worker (\d) was killed by SIGKILL; starting it again").group(1)
        log.wait_for(rf"\[worker {index}\] .*serving on")
        workers = children(process.pid)
        assert second in workers and first not in workers and len(workers) == 2
        channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CLIENTS)]
        for channel in channels:  # both serve: the new one took its share of the connections
            HalflifeClient(channel=channel).upsert_items([Item(id="i", text="an item", vector=np.eye(384, dtype=np.float32)[0])])
        held = connections_by_process(workers, int(address.rsplit(":", 1)[1]))
        assert all(count > 0 for count in held.values()), held
        for channel in channels:
            channel.close()
        process.send_signal(signal.SIGTERM)
        assert wait_exit(process) == 0  # the restart was no failure
    finally:
        process.kill()


def test_a_group_wide_signal_stops_the_workers_gracefully_and_a_second_one_to_the_parent_at_once(model_dir, tmp_path):
    """systemd (KillMode=control-group) and `kill -- -PGID` signal every
    worker beside the parent, which forwards its own: each worker took the
    two as a second signal and quit without its grace, and the group exited 1
    (a review). A worker takes its repeats as one; a second signal to the
    parent stops the group at once."""
    process, _ = start_cli_server(model_dir, tmp_path / "data", workers=2)
    log = LogLines(process)
    try:
        for pid in (process.pid, *children(process.pid)):
            os.kill(pid, signal.SIGTERM)
        assert wait_exit(process) == 0
        log.wait_for(r"all 2 workers stopped")
    finally:
        process.kill()
    # One intra-op thread per worker: seconds of a core, whatever the machine's core count (at the default,
    # cores / 2 each, the call ended before the second signal from ~18 cores up, and the group exited 0).
    process, address = start_cli_server(model_dir, tmp_path / "data", workers=2, extra_args=("--threads", "1"))
    log = LogLines(process)
    try:
        workers = children(process.pid)
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            # Seconds of model time in flight, so that the first signal's graceful stop is still waiting.
            big = embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed.future(
                embedding_pb2.EmbedRequest(inputs=["word " * 200] * 256), timeout=120)
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            time.sleep(REPEAT_SIGNAL_WINDOW_S + 0.2)  # within the window, the same stop delivered twice
            assert not big.done(), "the call ended before the second signal: too little model time to test it"
            process.send_signal(signal.SIGTERM)
            assert wait_exit(process) == 128 + signal.SIGTERM
            assert big.exception(timeout=60) is not None  # cut off, not finished
        log.wait_for(r"SIGTERM again: stopped the workers at once")
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        process.kill()


def test_a_repeat_within_the_window_after_the_group_stopped_still_exits_0(model_dir, tmp_path):
    """An idle group stops within ~0.3 s, then its parent takes a while more
    to exit without its handlers: a wrapper's repeated SIGTERM, within the
    window it is the same stop in, ended the parent by the signal after every
    worker had stopped (as a single server's, tests/test_server.py)."""
    process, _ = start_cli_server(model_dir, tmp_path / "data", workers=2, drain=True)
    try:
        assert signal_through_window(process, signal.SIGTERM, margin_s=0.05) == 0
    finally:
        process.kill()


def test_a_worker_listens_only_once_loaded(model_dir, tmp_path, monkeypatch):
    """The kernel spreads new connections over every listener on the port:
    a worker that listened while it (re)loaded answered its share UNAVAILABLE
    "still loading" (a workers review). A single server listens first, its
    health NOT_SERVING meanwhile."""
    import socket

    from halflife.api.server import HalflifeServer, ServerConfig
    from tests.serving import ServerThread

    loading = threading.Event()
    load = HalflifeServer._load_model

    async def slow_load(self):
        await asyncio.to_thread(loading.wait, 30)
        await load(self)

    monkeypatch.setattr(HalflifeServer, "_load_model", slow_load)

    def accepts(port: int) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    with reserve_port("127.0.0.1", 0) as reserved:  # as a --workers parent holds it
        port = reserved.getsockname()[1]
        worker = ServerThread(ServerConfig(port=port, model_dir=model_dir, data_dir=tmp_path / "w", reuse_port=True,
                                           follow_store=True))
        started = worker.start_in_background()
        try:
            time.sleep(0.5)
            assert not accepts(port)  # loading: no listener on the port
            loading.set()
            started.result(60)
            assert accepts(port)
        finally:
            loading.set()
            worker.stop()
    loading.clear()
    single = ServerThread(ServerConfig(port=0, model_dir=model_dir, data_dir=tmp_path / "s"))
    started = single.start_in_background()
    try:
        deadline = time.monotonic() + 30
        while not single.server.port and time.monotonic() < deadline:
            time.sleep(0.05)
        assert single.server.port and accepts(single.server.port)  # listening while it loads
        loading.set()
        started.result(60)
    finally:
        loading.set()
        single.stop()


def test_a_stop_signal_within_the_window_of_the_first_is_the_same_stop():
    """timeout(1) and wrapper scripts signal a process and then its group a
    millisecond apart: a --workers parent SIGKILLed its workers for it (a
    review), as a single server had dropped its calls."""
    now = [100.0]
    signals = StopSignals(clock=lambda: now[0])
    assert signals.count(signal.SIGTERM) and signals.counted == [signal.SIGTERM]
    now[0] += REPEAT_SIGNAL_WINDOW_S / 2
    assert not signals.count(signal.SIGTERM) and not signals.count(signal.SIGINT)
    now[0] += REPEAT_SIGNAL_WINDOW_S
    assert signals.count(signal.SIGINT) and signals.counted == [signal.SIGTERM, signal.SIGINT]  # the operator's "now"
    assert signals.count(signal.SIGTERM)  # and after it, every one counts


def test_a_restarted_worker_serves_the_config_its_group_started_with(model_dir, tmp_path):
    """The config file edited after the group started (an audit): the worker
    started again read it anew, refused limits its sibling took and ranked
    otherwise. Every worker reads the copy taken at the start."""
    config = tmp_path / "halflife.toml"
    config.write_text("[ranking]\nmax_limit = 5\n")
    process, address = start_cli_server(model_dir, tmp_path / "data", workers=2, extra_args=("--config", str(config)))
    log = LogLines(process)
    try:
        config.write_text("[ranking]\nmax_limit = 2\n")
        os.kill(children(process.pid)[0], signal.SIGKILL)
        index = log.wait_for(r"worker (\d) was killed by SIGKILL; starting it again").group(1)
        log.wait_for(rf"\[worker {index}\] .*serving on")
        channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CLIENTS)]
        for channel in channels:  # through both workers: limit 5 is within the group's max_limit
            assert HalflifeClient(channel=channel).recommend("u", 5).strategy == recommend_pb2.STRATEGY_TRENDING
        held = connections_by_process(children(process.pid), int(address.rsplit(":", 1)[1]))
        assert len(held) == 2 and all(count > 0 for count in held.values()), held
        for channel in channels:
            channel.close()
        process.send_signal(signal.SIGTERM)
        assert wait_exit(process) == 0
    finally:
        process.kill()


def test_the_workers_config_copy_lives_in_the_data_dir_for_the_groups_life_and_errors_name_the_file(tmp_path):
    """The copy sat in /tmp, where a cleaner could delete it under a
    long-running group, and errors named it, gone by then (a review)."""
    from halflife.cli import WORKERS_CONFIG, _config_for_workers
    from halflife.config import ConfigError

    config, data = tmp_path / "halflife.toml", tmp_path / "data"
    data.mkdir()
    config.write_text("[ranking]\nmax_limit = 5\n")
    with _config_for_workers(config, data) as flags:
        assert flags == ["--config", str((data / WORKERS_CONFIG).absolute())]
        assert (data / WORKERS_CONFIG).read_text() == config.read_text()
    assert not (data / WORKERS_CONFIG).exists()
    config.write_text("[ranking\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(config))}: not valid TOML"):
        with _config_for_workers(config, data):
            pass
    assert list(data.iterdir()) == []
    with _config_for_workers(None, data) as flags:
        assert flags == []


def test_a_restarted_worker_refuses_a_model_directory_changed_under_its_group(model_dir, tmp_path):
    """A worker started again loaded whatever the model directory held by
    then: another default variant (a re-export) would embed differently from
    its siblings. It refuses, and the group stops for its supervisor to
    start it again whole (as for any worker that cannot start)."""
    model = tmp_path / "model"
    model.mkdir()
    for path in model_dir.iterdir():
        (model / path.name).symlink_to(path.resolve())
    manifest = json.loads((model_dir / "manifest.json").read_text())
    (model / "manifest.json").unlink()
    (model / "manifest.json").write_text(json.dumps(manifest))
    # The CPU provider's default is what changes below (under "auto", a CUDA machine would serve fp16).
    process, _ = start_cli_server(model, tmp_path / "data", workers=2, extra_args=("--provider", "cpu"))
    log = LogLines(process)
    try:
        other = next(v["name"] for v in manifest["variants"]
                     if "CPUExecutionProvider" in v["execution_providers"]
                     and v["name"] != manifest["default_variants"]["CPUExecutionProvider"])
        manifest["default_variants"]["CPUExecutionProvider"] = other
        (model / "manifest.json").write_text(json.dumps(manifest))
        os.kill(children(process.pid)[0], signal.SIGKILL)
        log.wait_for(r"worker \d was killed by SIGKILL; starting it again")
        log.wait_for(r"changed since this worker's group started .*restart the group")
        log.wait_for(r"worker \d exited with status 1 before it served; stopping the others")
        assert wait_exit(process) == 1
    finally:
        process.kill()


READY_BEFORE_THE_LINE = """
import asyncio, logging, os, sys
from pathlib import Path
from halflife.api.server import ServerConfig, serve

read, write = os.pipe()
os.set_blocking(read, False)

class Check(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("serving on"):
            try:
                said = os.read(read, 1)
            except BlockingIOError:
                said = b""
            print(f"parent told before the line: {said == b'1'}", flush=True)
            os._exit(0)

logging.getLogger("halflife.api.server").addHandler(Check())
logging.getLogger("halflife.api.server").setLevel(logging.INFO)
asyncio.run(serve(ServerConfig(port=0, model_dir=Path(sys.argv[1]), data_dir=Path(sys.argv[2])), ready_fd=write))
"""


def test_a_worker_tells_its_parent_it_serves_before_it_logs_so(model_dir, tmp_path):
    """Logged first, a worker killed between its "serving on" line and its
    word to the parent counted as one that never served, and the group
    stopped (the test above failed so, under load)."""
    result = subprocess.run([sys.executable, "-c", READY_BEFORE_THE_LINE, str(model_dir), str(tmp_path / "data")],
                            capture_output=True, text=True, timeout=120)
    assert "parent told before the line: True" in result.stdout, result.stdout + result.stderr


def test_a_replacement_killed_while_it_reloads_is_started_again_and_its_siblings_serve_on(model_dir, tmp_path):
    """The OOM killer striking again at a replacement's reload (its peak
    memory) stopped the serving siblings too, the whole group down (a
    review): it draws on the worker's restart budget instead."""
    process, _ = start_cli_server(model_dir, tmp_path / "data", workers=2)
    log = LogLines(process)
    try:
        first, second = children(process.pid)
        os.kill(first, signal.SIGKILL)
        index = log.wait_for(r"worker (\d) was killed by SIGKILL; starting it again").group(1)
        deadline = time.monotonic() + 60
        while not (new := set(children(process.pid)) - {first, second}) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(new.pop(), signal.SIGKILL)  # within milliseconds of its start: long before it serves
        log.wait_for(rf"worker {index} was killed by SIGKILL; starting it again")
        log.wait_for(rf"\[worker {index}\] .*serving on")
        assert second in children(process.pid)
        process.send_signal(signal.SIGTERM)
        assert wait_exit(process) == 0
    finally:
        process.kill()


def test_a_worker_is_restarted_at_most_limit_times_within_the_window():
    budget = RestartBudget(limit=3, window_s=300)
    assert [budget.take(t) for t in (0, 10, 20, 30)] == [True, True, True, False]
    assert not budget.take(299.9)
    assert budget.take(300)  # the restart at 0 has left the window
    assert not budget.take(305)  # 10, 20 and 300 have not


class FakeProcess:
    def __init__(self, returncode=None):
        self.returncode = returncode
        self.terminated = self.waited = False

    def poll(self):
        return self.returncode

    def wait(self):
        self.waited = True
        return self.returncode

    def terminate(self):
        self.terminated = True
        self.returncode = -signal.SIGTERM


class FakeWorker:
    def __init__(self, index: int, restarts: RestartBudget, returncode=None, serving: bool = True,
                 replacement: bool = False):
        self.index, self.restarts, self.serving, self.replacement = index, restarts, serving, replacement
        self.process = FakeProcess(returncode)

    def check_serving(self) -> bool:
        return self.serving

    def close(self) -> None:
        pass


@pytest.mark.parametrize("serving", [True, False], ids=["served", "replacement-reloading"])
def test_a_worker_whose_restarts_are_spent_stops_the_group(monkeypatch, caplog, serving):
    monkeypatch.setattr(workers_module, "POLL_SECONDS", 0)
    spent = RestartBudget(limit=1)
    assert spent.take(time.monotonic())
    dead = FakeWorker(0, spent, returncode=-9, serving=serving, replacement=not serving)
    alive = FakeWorker(1, RestartBudget())
    started = []
    with caplog.at_level("ERROR", logger="halflife.workers"):
        assert workers_module._supervise([dead, alive], [], lambda *args: started.append(args)) == 1
    assert started == [] and alive.process.terminated  # not started again; the other one stopped
    # Why: the budget, also for a replacement killed as it reloaded (it said "before it served").
    assert "was killed by SIGKILL after 1 restarts within 300 s; stopping the others" in caplog.text, caplog.text


@pytest.mark.parametrize("replacement, returncode", [(False, -9), (True, 1)])
def test_a_worker_that_could_only_fail_again_before_it_serves_stops_the_group(monkeypatch, replacement, returncode):
    """Killed while the group starts (memory too small to load them all), or
    a replacement that exits by itself (a refused model or config): starting
    it again would only fail again. The group stops, exit status 1, for a
    supervisor to see."""
    monkeypatch.setattr(workers_module, "POLL_SECONDS", 0)
    dead = FakeWorker(0, RestartBudget(), returncode=returncode, serving=False, replacement=replacement)
    alive = FakeWorker(1, RestartBudget())
    started = []
    assert workers_module._supervise([dead, alive], [], lambda *args: started.append(args)) == 1
    assert started == [] and alive.process.terminated


def test_a_replacement_that_found_the_store_unavailable_for_now_is_started_again(monkeypatch, caplog):
    """A replacement that met the store locked past SQLite's busy timeout
    exited 1 "database is locked" and took the serving group down, where a
    second try would have served (a review)."""
    monkeypatch.setattr(workers_module, "POLL_SECONDS", 0)
    budget = RestartBudget(limit=1)

    def locked_out(restarts):
        return FakeWorker(0, restarts, returncode=workers_module.EXIT_TEMPORARY, serving=False, replacement=True)

    group = [locked_out(budget), FakeWorker(1, RestartBudget())]
    started = []

    def start(index, restarts, position):
        started.append((index, restarts, position))
        group[position] = locked_out(restarts)  # locked out again: its budget, not its status, stops the group

    with caplog.at_level("ERROR", logger="halflife.workers"):
        assert workers_module._supervise(group, [], start) == 1
    assert started == [(0, budget, 0)] and group[1].process.terminated, caplog.text
    assert "worker 0 exited with status 75; starting it again" in caplog.text
    assert "exited with status 75 after 1 restarts within 300 s; stopping the others" in caplog.text
    # The last line says how each ended, a signal by name (it gave Popen's statuses, [75, -15]).
    assert "workers ended: worker 0 exited with status 75, worker 1 was killed by SIGTERM" in caplog.text


def test_a_workers_start_refused_by_an_unavailable_store_exits_temporary(monkeypatch, tmp_path, capsys):
    """What the parent reads to start it again; other refusals exit 1, and a
    server of its own (no group) exits 1 for either."""
    from halflife import cli
    from halflife.api import server as server_module
    from halflife.storage.base import StoreError, StoreUnavailableError

    model = tmp_path / "model"
    args = ["serve", "--port", "0", "--model-dir", str(model), "--data-dir", str(tmp_path / "data")]
    for error, status in ((StoreUnavailableError("cannot open x: database is locked"), 75),
                          (StoreError("cannot open x: not a halflife store"), 1)):
        async def refused(config, parent_pid=None, ready_fd=None, error=error):
            raise error

        monkeypatch.setattr(server_module, "serve", refused)
        assert cli.main([*args, "--worker-index", "0", "--parent-pid", str(os.getpid())]) == status
        assert capsys.readouterr().err.endswith(f"[worker 0] halflife serve: error: {error}\n")
    monkeypatch.setattr(cli, "_check_model", lambda args: None)
    assert cli.main(args) == 1  # StoreError; and an unavailable store:

    async def unavailable(config, parent_pid=None, ready_fd=None):
        raise StoreUnavailableError("cannot open x: database is locked")

    monkeypatch.setattr(server_module, "serve", unavailable)
    assert cli.main(args) == 1 and "error: cannot open x: database is locked" in capsys.readouterr().err


def test_a_restarted_worker_keeps_its_index_and_budget(monkeypatch):
    monkeypatch.setattr(workers_module, "POLL_SECONDS", 0)
    budget = RestartBudget(limit=2)
    group = [FakeWorker(0, budget, returncode=-9), FakeWorker(1, RestartBudget())]
    started = []

    def start(index, restarts, position):
        started.append((index, restarts, position))
        group[position] = FakeWorker(index, restarts, returncode=0)  # then stops on its own too: spent after two

    assert workers_module._supervise(group, [], start) == 1
    assert started == [(0, budget, 0), (0, budget, 0)] and group[1].process.terminated


def test_a_worker_that_cannot_be_started_again_stops_the_group(monkeypatch):
    monkeypatch.setattr(workers_module, "POLL_SECONDS", 0)
    dead, alive = FakeWorker(0, RestartBudget(), returncode=-9), FakeWorker(1, RestartBudget())

    def start(index, restarts, position):
        raise OSError(24, "Too many open files")

    assert workers_module._supervise([dead, alive], [], start) == 1  # not an escaped exception: the others stop first
    assert alive.process.terminated


def test_workers_started_before_one_cannot_be_are_stopped(monkeypatch):
    """EMFILE on the third: the parent exited 1 and left the first two serving, unsupervised."""
    started = []

    class Worker(FakeWorker):
        def __init__(self, argv, index, restarts, keep_fds):
            if index == 2:
                raise OSError(24, "Too many open files")
            super().__init__(index, restarts)
            started.append(self)

    monkeypatch.setattr(workers_module, "_Worker", Worker)
    with pytest.raises(OSError, match="Too many open files"):
        workers_module.run_workers([], "127.0.0.1", 0, workers=4, threads=1)
    assert len(started) == 2 and all(worker.process.terminated and worker.process.waited for worker in started)


def test_a_second_group_on_a_served_port_is_refused(model_dir, tmp_path):
    process, address = start_cli_server(model_dir, tmp_path / "data", drain=True, workers=2)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "halflife.cli", "serve", "--workers", "2", "--port", address.rsplit(":", 1)[1],
             "--model-dir", str(model_dir), "--data-dir", str(tmp_path / "other" / "data")],
            capture_output=True, text=True, timeout=60,
        )
        assert second.returncode == 1
        assert f"{address} is already being served by another" in second.stderr
        assert "Traceback" not in second.stderr
        assert not (tmp_path / "other").exists()  # it made the directory, and a migrated store in it (an audit)
    finally:
        process.send_signal(signal.SIGTERM)
        wait_exit(process)


def test_two_groups_started_at_once_cannot_share_a_port():
    # Both used to pass the listener check, each before the other's workers
    # listened, and then split the port's traffic between two data dirs.
    with reserve_port("127.0.0.1", 0) as first:
        port = first.getsockname()[1]
        with pytest.raises(OSError, match=rf"127.0.0.1:{port} is already being served by another halflife "
                                          rf"--workers group \(pid {os.getpid()}\)"):
            with reserve_port("127.0.0.1", port):
                pass
    with reserve_port("127.0.0.1", port):  # released with the first group
        pass
    # Each group deletes its port's lock file (they piled up by the thousand in /tmp).
    assert not (Path(tempfile.gettempdir()) / f"halflife-{os.getuid()}-port-{port}.lock").exists()


def test_a_lock_file_deleted_by_its_holder_between_open_and_lock_is_not_held(tmp_path, monkeypatch):
    """A holder deletes its lock file as it lets go: a process that opened the
    file just before must not hold a lock on the deleted file while a third
    one locks the new file at the path."""
    path = tmp_path / "port.lock"
    path.write_text("pid 1\n")
    third = []
    real_flock = fcntl.flock

    def flock_after_the_swap(file, operation):
        if not third:  # between our open and our flock: the holder let go, a third process took the path
            path.unlink()
            third.append(None)
            third[0] = hold_lock(path)
        return real_flock(file, operation)

    monkeypatch.setattr(halflife.locks.fcntl, "flock", flock_after_the_swap)
    with pytest.raises(LockHeldError):
        hold_lock(path)
    remove_lock(third[0], path)
    assert not path.exists()


def gone_within(pids: list[int], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_workers_stop_when_their_parent_is_killed_and_hold_the_data_dir_till_then(model_dir, tmp_path):
    """The directory's lock was the parent's alone: after a SIGKILL of it, a new
    server took the directory while orphaned workers still committed writes
    it never saw (an audit). Stopped, the workers outlive the parent for sure."""
    process, _ = start_cli_server(model_dir, tmp_path / "data", drain=True, workers=2)
    workers = children(process.pid)
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        process.kill()  # SIGKILL: nothing is forwarded
        process.wait(30)
        with pytest.raises(OSError, match=rf"in use by another halflife process \(pid {process.pid} and the workers"):
            claim_data_dir(tmp_path / "data")
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    assert gone_within(workers)
    claim_data_dir(tmp_path / "data").close()  # free once the last one has gone


def test_a_missing_model_fails_once_before_any_worker_starts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "halflife.cli", "serve", "--workers", "2", "--port", "0",
         "--model-dir", str(tmp_path / "nope"), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.count("is not an exported model directory") == 1
    assert "starting" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_unknown_variant_fails_before_the_port_is_bound(model_dir, tmp_path, workers):
    """It logged "listening on ..." first, then refused (an audit)."""
    result = subprocess.run(
        [sys.executable, "-m", "halflife.cli", "serve", "--workers", workers, "--port", "0", "--variant", "nope",
         "--model-dir", str(model_dir), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1 and result.stderr.startswith("halflife serve: error: no variant 'nope'"), result.stderr
    assert "listening" not in result.stderr and "starting" not in result.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("flag", ["--workers", "--threads"])
def test_worker_and_thread_counts_must_be_positive(flag):
    result = subprocess.run(
        [sys.executable, "-m", "halflife.cli", "serve", flag, "0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"{flag}: must be at least 1, got 0" in result.stderr


def test_a_thread_count_past_any_machine_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "halflife.cli", "serve", "--threads", "2147483648"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--threads: must be at most 1024, got 2147483648" in result.stderr


def unset_blas_threads(monkeypatch) -> None:
    """Unsets the thread counts `serve` gives defaults to, for this test only
    (monkeypatch records them: the teardown restores what was there)."""
    from halflife import cli

    for name in cli.SERVER_BLAS_THREADS:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


# The threads of a process started as the `halflife` script and `python -m halflife.cli` are (sys.argv set before
# the import), once cli's imports have loaded numpy: OpenBLAS starts its threads then, one fewer than it runs on.
_THREADS_AS_LOADED = """
import os, sys
sys.argv = ["halflife", *sys.argv[1:]]
import halflife.cli
print(len(os.listdir("/proc/self/task")))
"""


def test_serve_loads_openblas_with_one_thread():
    """The defaults were set in main(), after cli's imports had loaded numpy
    and OpenBLAS had read its thread count: `serve` ran a BLAS thread per
    core (a review). Another command keeps OpenBLAS's own default, which
    shows that the count sees OpenBLAS's threads."""
    from halflife import cli

    if not os.path.isdir("/proc/self/task") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("counts threads in /proc on a machine of 2 cores or more (OpenBLAS starts none on one)")
    env = {name: value for name, value in os.environ.items() if name not in cli.SERVER_BLAS_THREADS}

    def threads(command: str) -> int:
        run = subprocess.run([sys.executable, "-c", _THREADS_AS_LOADED, command], env=env, capture_output=True,
                             text=True, timeout=60, check=True)
        return int(run.stdout)

    assert threads("serve") < threads("recommend")


def test_serve_ranks_with_one_blas_thread_unless_told_otherwise(monkeypatch):
    from halflife import cli

    unset_blas_threads(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with pytest.raises(SystemExit):
        cli.main(["serve", "--workers", "0"])  # stops at argument checking, after the defaults are set
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_serve_and_loadtest_run_on_uvloop_unless_it_is_missing(monkeypatch):
    """cli.run_event_loop, which `serve` and `loadtest` run in, and
    cli.new_event_loop (the test servers' loop): uvloop (a dependency
    everywhere but Windows), else asyncio's own loop."""
    import asyncio

    from halflife import cli

    async def loop_module():
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    def new_loop_module():
        loop = cli.new_event_loop()
        loop.close()
        return type(loop).__module__

    if sys.platform != "win32":
        assert cli.run_event_loop(loop_module()).startswith("uvloop")
        assert new_loop_module().startswith("uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails
    assert cli.run_event_loop(loop_module()).startswith("asyncio")
    assert new_loop_module().startswith("asyncio")


def test_serve_fixes_glibcs_mmap_threshold(monkeypatch):
    """`serve` sets glibc's mmap threshold before anything big is allocated
    (big arrays then go back to the OS when freed; see cli.SERVER_MMAP_THRESHOLD)."""
    import platform

    from halflife import cli

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt's mmap threshold is a glibc setting")
    calls = []
    monkeypatch.setattr(cli, "_fix_mmap_threshold", lambda: calls.append(True) or True)
    unset_blas_threads(monkeypatch)
    with pytest.raises(SystemExit):
        cli.main(["serve", "--workers", "0"])
    assert calls == [True]
    monkeypatch.undo()
    assert cli._fix_mmap_threshold() is True  # glibc accepted the value


def test_serve_raises_its_open_files_limit_to_the_hard_one(monkeypatch):
    """Each connection is a file: at a soft limit of 1,024, about that many
    idle connections left new clients waiting (an audit)."""
    from halflife import cli

    calls = []
    monkeypatch.setattr(cli, "_raise_open_files_limit", lambda: calls.append(True) or 0)
    unset_blas_threads(monkeypatch)
    with pytest.raises(SystemExit):
        cli.main(["serve", "--workers", "0"])
    assert calls == [True]
    probe = ("import resource; from halflife import cli; "
             "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
             "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard)); "
             "print(cli._raise_open_files_limit() == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout.strip() == "True"


_ALLOCATE_AND_FREE = """
import ctypes, sys
import numpy as np
from halflife import cli
libc = ctypes.CDLL(None)
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
if sys.argv[1] == "serve":
    assert cli._fix_mmap_threshold()
else:  # the mmap threshold alone
    libc.mallopt(cli._M_MMAP_THRESHOLD, cli.SERVER_MMAP_THRESHOLD)
a = np.ones(100_000)
trims = 0
for _ in range(200):  # 800 KB temporaries, as a Recommend at 100k items makes
    b = a * 2.0
    c = b + 1.0
    top = libc.sbrk(0)
    del b, c
    trims += libc.sbrk(0) < top
print(trims)
"""


def test_serve_keeps_freed_arrays_under_the_threshold_mapped():
    """With only the mmap threshold fixed, glibc's trim threshold stays at
    128 KiB and each freed temporary gives the heap top back, so the next one
    faults its pages in again; `serve` sets the trim threshold too. Counted
    as the frees that lower the program break, not as page faults: where
    transparent huge pages are "always" (CI's machine), the faults are ~30
    instead of ~400 a round and say little."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt's thresholds are glibc settings")

    # glibc's malloc settings from the environment (GLIBC_TUNABLES, MALLOC_TOP_PAD_...) would set what is tested.
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}

    def trims(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", _ALLOCATE_AND_FREE, mode], capture_output=True, text=True,
                             check=True, timeout=60, env=env)
        return int(run.stdout)

    assert trims("mmap only") > 150  # nearly every one of the 200 rounds
    assert trims("serve") == 0


@pytest.mark.parametrize("first_workers, second_workers", [(1, 1), (2, 1), (1, 2)])
def test_a_second_server_on_a_data_dir_in_use_is_refused(model_dir, tmp_path, first_workers, second_workers):
    # Only one group's workers follow each other's writes: a second server on
    # the same files would answer from a memory that misses them.
    process, _ = start_cli_server(model_dir, tmp_path / "data", drain=True, workers=first_workers)
    try:
        second = serve_once(model_dir, tmp_path / "data", workers=second_workers)
        assert second.returncode == 1
        holder = f"pid {process.pid}" + (" and the workers it started" if first_workers > 1 else "")
        assert f"is in use by another halflife process ({holder})" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr and "starting" not in second.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        assert wait_exit(process) == 0
    again, _ = start_cli_server(model_dir, tmp_path / "data", drain=True)  # free again once it stopped
    again.send_signal(signal.SIGTERM)
    assert wait_exit(again) == 0


def test_a_single_server_on_a_busy_port_fails_in_one_line(model_dir, tmp_path):
    process, address = start_cli_server(model_dir, tmp_path / "data", drain=True)
    try:
        second = serve_once(model_dir, tmp_path / "other", port=address.rsplit(":", 1)[1])
        assert second.returncode == 1
        assert "Traceback" not in second.stderr, second.stderr
        # Nothing of gRPC's: its C core logged a raw "add_port.cc ... Failed to add port" line first.
        assert [line for line in second.stderr.splitlines() if "bind" in line or "port" in line] == [
            f"halflife serve: error: cannot bind {address}: Address already in use"], second.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        wait_exit(process)


def test_a_single_server_on_a_name_that_does_not_resolve_says_so(model_dir, tmp_path):
    """It said "in use by another process, or not an address of this machine?" (an operations review)."""
    result = serve_once(model_dir, tmp_path / "data", "--host", "nonexistent.invalid")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "'nonexistent.invalid' does not resolve" in result.stderr.splitlines()[-1], result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("delay", [0.0, 0.1, 0.2, 0.3])
def test_a_stop_while_the_workers_start_is_a_clean_stop(model_dir, tmp_path, signum, delay):
    """At once and while the workers import (0.1-0.3 s): a SIGINT forwarded as SIGINT once raised
    KeyboardInterrupt inside onnxruntime's import there, and the group exited 1."""
    process = subprocess.Popen(
        [sys.executable, "-m", "halflife.cli", "serve", "--workers", "2", "--port", "0",
         "--model-dir", str(model_dir), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        for line in process.stdout:  # bounded: the process ends or logs this within seconds
            if "starting 2 workers" in line:
                break
        time.sleep(delay)
        process.send_signal(signum)  # the workers have not installed their handlers yet
        output = process.communicate(timeout=60)[0]
        assert process.returncode == 0 and "Traceback" not in output, output
    finally:
        process.kill()


def test_a_worker_whose_parent_died_before_it_started_stops(model_dir, tmp_path):
    # The worker once read its parent's pid itself: if the parent was already
    # gone, that read gave init's pid, and the orphan served on for good.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    worker = subprocess.Popen(
        [sys.executable, "-m", "halflife.cli", "serve", "--port", "0", "--model-dir", str(model_dir),
         "--data-dir", str(tmp_path / "data"), "--worker-index", "0", "--parent-pid", str(gone.pid)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output = worker.communicate(timeout=120)[0]
    finally:
        worker.kill()
    assert worker.returncode == 0 and "worker is gone; stopping" in output, output


def test_a_worker_whose_parent_died_while_it_loaded_stops_cleanly(model_dir, tmp_path):
    """Its word to the parent (`--ready-fd`) found the pipe's reading end
    gone with the parent (SIGKILLed while the worker loaded): the worker
    exited 1 on "halflife serve: error: [Errno 32] Broken pipe", its server
    never stopped, where one orphaned later stops gracefully."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    read, write = os.pipe()
    os.close(read)  # as the dead parent's end
    try:
        worker = subprocess.Popen(
            [sys.executable, "-m", "halflife.cli", "serve", "--port", "0", "--model-dir", str(model_dir),
             "--data-dir", str(tmp_path / "data"), "--worker-index", "0", "--parent-pid", str(gone.pid),
             "--ready-fd", str(write)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, pass_fds=(write,),
        )
    finally:
        os.close(write)
    try:
        output = worker.communicate(timeout=120)[0]
    finally:
        worker.kill()
    assert worker.returncode == 0 and "Broken pipe" not in output, output
    assert "worker is gone; stopping" in output and "stopped" in output, output


def test_a_workers_error_line_says_which_worker(tmp_path):
    """docs/serving.md: each worker's lines carry `[worker i]`. Its log lines
    did; the one line a failed start prints did not, in a group's shared log."""
    worker = subprocess.run(
        [sys.executable, "-m", "halflife.cli", "serve", "--port", "0", "--model-dir", str(tmp_path / "no-model"),
         "--data-dir", str(tmp_path / "data"), "--worker-index", "3", "--parent-pid", str(os.getpid())],
        capture_output=True, text=True, timeout=120,
    )
    assert worker.returncode == 1, worker.stderr
    assert worker.stderr.splitlines()[-1].startswith("[worker 3] halflife serve: error: "), worker.stderr
    assert "is not an exported model directory" in worker.stderr


def listening_socket(reuse_address: bool):
    """A listener on a free port of 127.0.0.1, without SO_REUSEPORT: the port is its alone."""
    import socket

    listener = socket.socket()
    if reuse_address:  # as gRPC's listeners
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


@pytest.mark.parametrize("reuse_address", [False, True], ids=["plain", "SO_REUSEADDR"])
def test_a_port_another_program_holds_is_named_in_the_error(reuse_address):
    """It was "[Errno 98] Address already in use", naming no address (an audit)."""
    with listening_socket(reuse_address) as other:
        port = other.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot bind 127.0.0.1:{port}: Address already in use"):
            with reserve_port("127.0.0.1", port):
                pass


def test_connections_a_stopped_server_closed_do_not_hold_the_port():
    """`serve --workers` right after a single `serve` on the port failed for a
    minute with "Address already in use" (an audit): the server's ends of its
    closed connections waited in TIME_WAIT, which gRPC's SO_REUSEADDR
    listeners pass and the group's reservation did not."""
    import socket

    with listening_socket(reuse_address=True) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            served, _ = listener.accept()
            served.close()  # the server's end closes first: it waits in TIME_WAIT
    with reserve_port("127.0.0.1", port) as reserved:
        assert reserved.getsockname()[1] == port


def test_a_reserved_port_refuses_other_programs_until_the_workers_listen():
    """The reservation never listens: with SO_REUSEADDR always set, another
    SO_REUSEADDR program (any gRPC server) could bind the port and listen
    before the workers did, and the group exited 1 (a review)."""
    import socket

    with reserve_port("127.0.0.1", 0) as reserved, socket.socket() as intruder:
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError, match="Address already in use"):
            intruder.bind(("127.0.0.1", reserved.getsockname()[1]))
