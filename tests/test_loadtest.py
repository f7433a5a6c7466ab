"""`halflife loadtest`'s stopping rules, as ghz's: -n requests, -z seconds, whichever comes first, 200 requests without either."""

from __future__ import annotations

import json

import pytest

from halflife.api.server import ServerConfig
from halflife.cli import main
from halflife.loadtest import DEFAULT_TOTAL
from tests.serving import ServerThread

HEALTH = "grpc.health.v1.Health.Check"
# Unbounded runs were the bug (`-n 0`, `-z 0s`: 10 minutes); fail long before that.
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with ServerThread(ServerConfig(port=0, model_dir=model_dir, data_dir=tmp_path_factory.mktemp("load"))) as running:
        yield running


def loadtest(server, capsys, *flags: str) -> dict:
    assert main(["loadtest", "--call", HEALTH, "-c", "2", "--target", server.address, *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_duration_alone_runs_for_that_long(server, capsys):
    """-z without -n: the run ends at the deadline, not after the default 200 requests."""
    report = loadtest(server, capsys, "-z", "1.5s")
    assert report["total"] >= 1.4e9, report["count"]
    assert report["count"] > DEFAULT_TOTAL
    assert report["statusCodeDistribution"] == {"OK": report["count"]}


def test_a_total_alone_or_first_stops_the_run(server, capsys):
    assert loadtest(server, capsys)["count"] == DEFAULT_TOTAL
    report = loadtest(server, capsys, "-n", "30", "-z", "60s")
    assert report["count"] == 30 and report["total"] < 30e9


@pytest.mark.parametrize("flags", [("-n", "0"), ("-z", "0s"), ("-c", "0")])
def test_bounds_that_would_send_nothing_are_refused(server, capsys, flags):
    assert main(["loadtest", "--call", HEALTH, "--target", server.address, *flags]) != 0
    assert "must be" in capsys.readouterr().err
