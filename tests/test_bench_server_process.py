"""bench/server_process: the `halflife serve` process the gRPC benchmarks start."""

from __future__ import annotations

import sys
import time
import types

import pytest

import bench.server_process as server_process


def test_a_server_that_never_says_it_serves_fails_within_its_start_timeout(tmp_path, monkeypatch):
    """The timeout was checked only when the server printed a line: one that
    hung silently (here, a silent sleep) held the benchmark until it exited."""
    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\nexec sleep 60\n")
    silent.chmod(0o755)
    monkeypatch.setattr(server_process, "sys", types.SimpleNamespace(executable=str(silent)))
    server = server_process.ServerProcess(tmp_path / "model", data_dir=tmp_path, start_timeout=1.0)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not start \(not serving after 1 s\)"):
        server.start()
    assert time.monotonic() - began < 15
    assert server.proc.poll() is not None  # stopped, not left behind


def test_a_server_that_exits_says_so(tmp_path, monkeypatch):
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho 'error: no model in the model dir'\nexit 2\n")
    failing.chmod(0o755)
    monkeypatch.setattr(server_process, "sys", types.SimpleNamespace(executable=str(failing)))
    with pytest.raises(RuntimeError, match=r"did not start \(it exited\):\nerror: no model in the model dir"):
        server_process.ServerProcess(tmp_path / "model", data_dir=tmp_path).start()
