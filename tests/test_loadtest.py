"""`halflife loadtest` against a live Halflife server: its stopping rules, as ghz's (-n requests; -z seconds, -n then
ignored; -x seconds or -n, whichever comes first; 200 requests without any), the rate limit within them, and its checks
of flags and ghz configs (one line and a non-zero exit, never a traceback). tests/test_loadtest_ghz.py has the rest."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from halflife import loadtest as loadtest_module
from halflife.api.server import ServerConfig
from halflife.cli import main
from halflife.loadtest import DEFAULT_TOTAL, LoadTestError, LoadTestOptions, options_from_ghz_config
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


def test_a_duration_alone_runs_for_that_long(server, capsys, monkeypatch):
    """-z without -n: the run ends at the deadline, not after the default total of requests; the calls
    in flight then (2 at most) are cancelled and reported as such (ghz's --duration-stop close)."""
    monkeypatch.setattr(loadtest_module, "DEFAULT_TOTAL", 20)  # far below what 1.5 s serves on a slow machine
    report = loadtest(server, capsys, "-z", "1.5s")
    assert report["total"] >= 1.4e9, report["count"]
    statuses = report["statusCodeDistribution"]
    assert statuses["OK"] > 20 and statuses.get("Canceled", 0) <= 2 and set(statuses) <= {"OK", "Canceled"}


def test_a_total_alone_or_first_stops_the_run(server, capsys):
    assert loadtest(server, capsys)["count"] == DEFAULT_TOTAL
    report = loadtest(server, capsys, "-n", "30", "-x", "60s")
    assert report["count"] == 30 and report["total"] < 30e9


def test_a_run_cut_by_its_bounds_says_so(server, capsys, monkeypatch):
    """The bounds keep every run finite; one that cuts what was asked says
    which, or a report of fewer calls reads as the run that was asked for."""
    monkeypatch.setattr(loadtest_module, "MAX_TOTAL", 40)
    monkeypatch.setattr(loadtest_module, "MAX_CONCURRENCY", 3)
    assert main(["loadtest", "--call", HEALTH, "--target", server.address, "-n", "100", "-c", "5"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["count"] == 40
    assert captured.err.splitlines() == ["halflife loadtest: note: total 100 is past the bound: at most 40 calls",
                                         "halflife loadtest: note: concurrency 5 is past the bound: at most 3 workers"]
    monkeypatch.setattr(loadtest_module, "MAX_DURATION_S", 0.5)
    assert main(["loadtest", "--call", HEALTH, "--target", server.address, "-z", "3s", "-c", "2"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["total"] < 2e9
    assert captured.err.strip() == "halflife loadtest: note: duration 3 s is past the bound: the run stops after 0.5 s"
    # A total the rate stretches past the bound (it stopped there without a word: a review).
    assert main(["loadtest", "--call", HEALTH, "--target", server.address, "-n", "10", "-r", "4", "-c", "1"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["count"] < 10
    assert captured.err.strip() == "halflife loadtest: note: 10 calls at 4/s take past the bound: the run stops after 0.5 s"
    assert loadtest(server, capsys, "-n", "30") and capsys.readouterr().err == ""  # within the bounds: no note


@pytest.mark.parametrize("flags", [("-n", "0"), ("-c", "0")])
def test_bounds_that_would_send_nothing_are_refused(server, capsys, flags):
    assert main(["loadtest", "--call", HEALTH, "--target", server.address, *flags]) == 2
    assert "must be" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [("-z", "0s"), ("-x", "0"), ("-z", "0", "-n", "7")])
def test_a_zero_duration_is_none_as_in_ghz(server, capsys, flags):
    """-z's default in ghz, which configs may spell out ("duration": "0s"): it was refused."""
    assert loadtest(server, capsys, *flags)["count"] == (7 if "-n" in flags else DEFAULT_TOTAL)


def test_a_config_may_write_ghz_s_zero_durations_as_numbers_and_its_duration_stop_in_capitals(tmp_path):
    """ghz reads `"duration": 0` and `"duration-stop": "Close"`; both were refused (a review)."""
    path = tmp_path / "ghz.json"
    path.write_text(json.dumps({"call": HEALTH, "duration": 0, "max-duration": 0.0, "timeout": 0,
                                "duration-stop": "Close"}))
    options = options_from_ghz_config(path)
    assert (options.duration, options.max_duration, options.timeout, options.duration_stop) == (None, None, 0, "close")


# Bad input: one line naming the flag or ghz key, a non-zero exit, no traceback, and no load sent.
# The target is a closed loopback port, so a check that regressed fails fast instead of loading anything.
CLOSED = "127.0.0.1:1"


def refused(capsys, *args: str) -> str:
    assert main(["loadtest", *args]) == 2  # a usage error, as argparse's own
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, named", [
    (("-z", "nan"), "--duration"),
    (("-z", "inf"), "--duration"),
    (("--rps", "-5"), "--rps"),
    (("--rps", "nan"), "--rps"),
    (("--rps", "inf"), "--rps"),
    (("-t", "nan"), "--timeout"),
    (("--max-duration=-1s",), "--max-duration"),
    (("--timeout=-1s",), "--timeout"),
    (("--connections", "0"), "--connections"),
])
def test_nonsense_flag_values_are_refused(capsys, flags, named):
    assert named in refused(capsys, "--call", HEALTH, "--target", CLOSED, *flags)


@pytest.mark.parametrize("config, named", [
    ({"total": 3}, '"call"'),
    ([1, 2], "JSON object"),
    ({"call": 5}, '"call"'),
    ({"call": HEALTH, "concurrency": "abc"}, '"concurrency"'),
    ({"call": HEALTH, "concurrency": True}, '"concurrency"'),
    ({"call": HEALTH, "total": 1.5}, '"total"'),
    ({"call": HEALTH, "duration": "5x"}, '"duration"'),
    ({"call": HEALTH, "duration": 5}, '"duration"'),
    ({"call": HEALTH, "duration": "nan"}, '"duration"'),
    ({"call": HEALTH, "timeout": "abc"}, '"timeout"'),
    ({"call": HEALTH, "timeout": "-1s"}, '"timeout"'),
    ({"call": HEALTH, "rps": "fast"}, '"rps"'),
    ({"call": HEALTH, "rps": -5}, '"rps"'),
    ({"call": HEALTH, "rps": 10**400}, '"rps"'),  # a JSON integer too big for a float
    ({"call": HEALTH, "host": 5}, '"host"'),
    ({"call": HEALTH, "data": {"service": 5}}, '"data"'),
    # The message's text where the message belongs: it had "no field named "{"" (a review).
    ({"call": HEALTH, "data": '{"service": ""}'}, '"data" must be a JSON object or a non-empty array of objects, not a string'),
], ids=lambda v: repr(v)[:60])
def test_wrong_ghz_configs_name_the_key_and_file(tmp_path, capsys, config, named):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"host": CLOSED, **config} if isinstance(config, dict) else config))
    err = refused(capsys, "--config", str(path))
    assert named in err and str(path) in err


@pytest.mark.parametrize("data, kind", [('""', "a string"), ('"service"', "a string"), ("null", "null"), ("5", "a number")])
def test_data_that_is_no_json_object_is_refused_as_such(capsys, data, kind):
    """json_format read "" as an empty request, sent without a word, and a string as fields named by its characters."""
    err = refused(capsys, "--call", HEALTH, "--target", CLOSED, "-d", data)
    assert f"--data must be a JSON object or a non-empty array of objects, not {kind}" in err


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_a_ghz_config_in_toml_or_yaml_is_refused_as_such(tmp_path, capsys, suffix):
    """ghz reads them too; here they failed as "Expecting value: line 1 column 1" (a review)."""
    path = tmp_path / f"config{suffix}"
    path.write_text(f'call = "{HEALTH}"\n' if suffix == ".toml" else f"call: {HEALTH}\n")
    err = refused(capsys, "--config", str(path))
    assert "reads JSON configs only" in err and str(path) in err


def test_flags_fill_in_or_override_a_ghz_config(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"total": 0, "rps": "fast"}))
    options = options_from_ghz_config(path, call=HEALTH, total=5, rps=2.0)
    assert (options.call, options.total, options.rps) == (HEALTH, 5, 2.0)
    # A bad value given as a flag is named as the flag, not as the file's key.
    with pytest.raises(LoadTestError, match="^--rps"):
        options_from_ghz_config(path, call=HEALTH, total=5, rps=-1.0)


@pytest.mark.parametrize("field, value", [
    ("total", True), ("total", 2.0), ("concurrency", None), ("duration", "10s"), ("rps", None), ("allow_remote", "no"),
])
def test_library_callers_get_the_same_checks(field, value):
    with pytest.raises(LoadTestError, match=f"--{field.replace('_', '-')}"):
        LoadTestOptions(call=HEALTH, **{field: value})


def test_a_streaming_method_is_refused_before_any_load():
    # Sent as a unary call, Health.Watch waited out -t on every call (20 s each by default).
    with pytest.raises(LoadTestError, match="streaming method"):
        LoadTestOptions(call="grpc.health.v1.Health.Watch")


def timed_loadtest(server, capsys, *flags: str) -> tuple[dict, float]:
    begin = time.monotonic()
    report = loadtest(server, capsys, *flags)
    return report, time.monotonic() - begin


def test_the_rate_limit_never_waits_past_the_deadline(server, capsys):
    # Request 1 is due at 5 s, after the 1 s deadline: the run ends at the deadline (was: 10 s), and its
    # rate is over the whole of it (it ended once request 0 was answered: 3 calls a second under --rps 1).
    report, elapsed = timed_loadtest(server, capsys, "-z", "1s", "--rps", "0.2", "-n", "3")
    assert report["count"] == 1 and 1 <= elapsed < 5 and report["total"] >= 1e9, elapsed
    assert report["endReason"] == "timeout"
    # Without -z the deadline is MAX_DURATION_S; request 1 would be due at 10,000 s.
    report, elapsed = timed_loadtest(server, capsys, "--rps", "0.0001", "-n", "2")
    assert report["count"] == 1 and elapsed < 5, elapsed


def test_a_request_its_template_cannot_build_midway_is_reported_not_the_whole_run(server, capsys, monkeypatch):
    """Only request 0 is built before the run: one later whose data does not
    fit ({{randomInt}} past an int32, say) ended the run with no report, the
    load sent (a review). It counts as an InvalidArgument that was not sent."""
    def factory(method, data):
        def make(number, worker_id="g0c0"):
            if number == 3:
                raise LoadTestError("--data does not fit: request 3's limit is out of range")
            return health_pb2.HealthCheckRequest()
        return make

    monkeypatch.setattr(loadtest_module, "request_factory", factory)
    report = loadtest(server, capsys, "-n", "10", "-c", "1")
    assert report["count"] == 10 and report["statusCodeDistribution"] == {"OK": 9, "InvalidArgument": 1}
    assert list(report["errorDistribution"]) == [
        "rpc error: code = InvalidArgument desc = a request was not sent: --data does not fit: request 3's limit is out of range"]
    # Every request failing so: the run still ends at its duration, not at MAX_TOTAL (it never yielded: a review).
    monkeypatch.setattr(loadtest_module, "request_factory", lambda method, data: (
        lambda number, worker_id="g0c0": health_pb2.HealthCheckRequest() if number == 0 else factory(method, data)(3)))
    report = loadtest(server, capsys, "-z", "0.5s", "-c", "1")
    assert report["endReason"] == "timeout" and report["total"] < 5e9 and len(report["errorDistribution"]) == 1


def test_the_first_call_on_each_connection_does_not_time_its_set_up(server, capsys, monkeypatch):
    """Connections are made before the clock starts, as ghz dials them: each
    first call timed the TCP and HTTP/2 set-up (a review)."""
    dialled = []
    dial = loadtest_module._dial

    async def counting(channel, timeout):
        await dial(channel, timeout)
        dialled.append(channel.get_state())

    monkeypatch.setattr(loadtest_module, "_dial", counting)
    loadtest(server, capsys, "-n", "8", "--connections", "2")
    assert dialled == [grpc.ChannelConnectivity.READY] * 2


def test_the_rate_limit_still_paces(server, capsys):
    report, elapsed = timed_loadtest(server, capsys, "--rps", "20", "-n", "10")  # due at 0, 0.05, ..., 0.45 s
    assert report["count"] == 10 and elapsed >= 0.4, elapsed


def test_a_ghz_command_line_runs_as_it_is(server, capsys):
    """ghz's --insecure, --proto and -i have nothing to do here (as in a config), and its target is the last argument."""
    assert main(["loadtest", "--insecure", "--proto", "protos/halflife/v1/embedding.proto", "-i", "protos",
                 "--call", HEALTH, "-n", "3", server.address]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 3
    assert main(["loadtest", "--call", HEALTH, "--target", server.address, server.address]) == 2
    assert "give the target once" in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [
    (("-m", '{"k": "v"}'), "-m/--metadata"),  # was "argument host: port must be 1 to 65535, got "v"}""
    (("--name", "smoke"), "--name"),  # was "unrecognized arguments: --name 127.0.0.1:1": the target named
    (("--skipTLS",), "--skipTLS"),
])
def test_ghz_flags_it_lacks_are_refused_by_name_not_read_as_the_target(capsys, flags, named):
    with pytest.raises(SystemExit) as exit_:
        main(["loadtest", "--call", HEALTH, *flags, CLOSED])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {named}: is ghz's, which halflife loadtest does not support" in err


def test_enough_connections_for_the_servers_calls_per_connection(server, capsys):
    """Past the server's 256 calls on one connection, gRPC Python had the
    extra ones refused, reported Unavailable, where ghz queues them (an
    audit at -c 1000: 352 of 3,000 health checks): the run opens more."""
    assert main(["loadtest", "--call", HEALTH, "--target", server.address, "-c", "600", "-n", "1200"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["options"]["connections"] == 3 and report["statusCodeDistribution"] == {"OK": 1200}
    assert "600 workers on 1 connection(s): 3 connections" in captured.err


def test_no_more_workers_than_requests(server, capsys, monkeypatch):
    # A million workers for one request took 10 s to start.
    report, elapsed = timed_loadtest(server, capsys, "-c", "1000000", "-n", "1")
    assert report["count"] == 1 and report["options"]["concurrency"] == 1 and elapsed < 5, elapsed
    report = loadtest(server, capsys, "-c", "2", "--connections", "50", "-n", "4")
    assert report["count"] == 4 and report["options"]["connections"] == 2
    # With no total, MAX_CONCURRENCY caps the workers (lowered here to keep the test light).
    monkeypatch.setattr(loadtest_module, "MAX_CONCURRENCY", 3)
    report = loadtest(server, capsys, "-c", "1000000", "-z", "0.3s")
    assert report["options"]["concurrency"] == 3 and report["count"] > 0


@pytest.mark.parametrize("call, data, target", [
    ("halflife.v1.RecommendService.Recommend", '{"user_id": ""}', None),  # refused by the server: INVALID_ARGUMENT
    (HEALTH, "{}", CLOSED),  # no server: UNAVAILABLE
])
def test_a_run_in_which_no_call_succeeded_exits_non_zero_after_its_report(server, capsys, call, data, target):
    assert main(["loadtest", "--call", call, "-d", data, "-n", "4", "-c", "2", "-t", "2s",
                 "--target", target or server.address]) != 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["count"] == 4 and "OK" not in report["statusCodeDistribution"]
    assert report["latencyDistribution"] is None  # ghz's null: percentiles of no call
    assert captured.err.strip() == "halflife loadtest: error: none of the 4 calls succeeded"


def test_answers_up_to_the_apis_64_mib_get_through(server, capsys, tmp_path):
    """The API answers up to 64 MiB, as its clients take: the load tool kept
    gRPC's 4 MiB and reported GetItems of large items ResourceExhausted (a
    loadtest review)."""
    import numpy as np

    from halflife_client import HalflifeClient, Item

    ids = [f"big-{n}" for n in range(140)]  # 140 x 32 KiB of text: ~4.6 MB an answer
    with HalflifeClient(server.address) as client:
        client.upsert_items([Item(id=i, text="x" * 32_768, vector=np.eye(384, dtype=np.float32)[n % 384])
                             for n, i in enumerate(ids)])
    data = tmp_path / "ids.json"
    data.write_text(json.dumps({"ids": ids}))
    assert main(["loadtest", "--call", "halflife.v1.CatalogService.GetItems", "-D", str(data), "-n", "2", "-c", "1",
                 "--target", server.address]) == 0
    assert json.loads(capsys.readouterr().out)["statusCodeDistribution"] == {"OK": 2}
