"""`halflife loadtest` against ghz's documented behaviour (ghz.sh/docs/options, calldata, and its
reporter): what -z does to calls in flight (--duration-stop), -z over -n, -x, config keys and
template actions, Go's status names, nearest-rank percentiles, Ctrl-C. A scripted health server
stands in for Halflife, so each test takes a second or two."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from halflife.cli import main
from halflife.loadtest import (
    GO_CODE_NAMES, LoadTestError, LoadTestOptions, latency_distribution, method_descriptor, options_from_flags,
    options_from_ghz_config, parse_duration, request_factory, run_load_test,
)
from tests.serving import silent_server, stand_in

HEALTH = "grpc.health.v1.Health.Check"
pytestmark = pytest.mark.timeout(60)


class ScriptedHealth(health_pb2_grpc.HealthServicer):
    """Check does what its `service` field says: "" answers at once, "sleep=S" after S
    seconds, "hang" when the caller gives up (or after HANG_LIMIT_S), "code=NAME"
    fails with that status. Keeps every `service` it was sent."""

    HANG_LIMIT_S = 30

    def __init__(self):
        self.received: list[str] = []
        self.first_call = threading.Event()

    def Check(self, request, context):
        self.received.append(request.service)
        self.first_call.set()
        command, _, argument = request.service.partition("=")
        if command == "sleep":
            time.sleep(float(argument))
        elif command == "hang":
            deadline = time.monotonic() + self.HANG_LIMIT_S
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.02)
        elif command == "code":
            context.abort(grpc.StatusCode[argument], "scripted")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture()
def scripted():
    """(servicer, address) of a ScriptedHealth server on 127.0.0.1."""
    servicer = ScriptedHealth()
    with stand_in(health_pb2_grpc.add_HealthServicer_to_server, servicer) as address:
        yield servicer, address


def run(**options) -> tuple[dict, float]:
    begin = time.monotonic()
    report = asyncio.run(run_load_test(LoadTestOptions(call=HEALTH, **options)))
    return report, time.monotonic() - begin


def cli(capsys, *args: str) -> tuple[int, dict]:
    status = main(["loadtest", "--call", HEALTH, *args])
    return status, json.loads(capsys.readouterr().out)


# -z and the calls in flight when it ends (ghz's --duration-stop). The calls hang, with a 3 s timeout:
# before the fix the run lasted until that timeout (with -t 20s, 21 s for -z 2s), whatever -z said.
def test_duration_stop_close_cancels_the_calls_in_flight_and_reports_them(scripted):
    _, address = scripted
    report, elapsed = run(target=address, data='{"service": "hang"}', concurrency=2, duration=0.5, timeout=3.0,
                          duration_stop="close")
    assert 0.5 <= elapsed < 2, elapsed
    assert report["endReason"] == "timeout"
    assert report["statusCodeDistribution"] == {"Canceled": 2}
    assert report["errorDistribution"] == {"rpc error: code = Canceled desc = grpc: the client connection is closing": 2}


def test_duration_stop_ignore_leaves_them_out(scripted):
    _, address = scripted
    report, elapsed = run(target=address, data='{"service": "hang"}', concurrency=2, duration=0.5, timeout=3.0,
                          duration_stop="ignore")
    assert 0.5 <= elapsed < 2 and report["count"] == 0, elapsed


def test_duration_stop_wait_lets_them_run_to_their_timeout_and_sends_no_more(scripted):
    servicer, address = scripted
    report, elapsed = run(target=address, data='{"service": "hang"}', concurrency=2, duration=0.3, timeout=1.0,
                          duration_stop="wait")
    assert 1.0 <= elapsed < 2.5, elapsed
    assert report["statusCodeDistribution"] == {"DeadlineExceeded": 2} and len(servicer.received) == 2


def test_a_stop_wakes_the_workers_waiting_for_their_rps_turn(scripted):
    """At 0.2 requests/s, workers 2 and 3 wait 5 and 10 s for their first
    turn: a stop (Ctrl-C) left them asleep until then, in "wait" mode."""
    _, address = scripted

    async def stopped_soon() -> dict:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, stop.set)
        return await run_load_test(LoadTestOptions(call=HEALTH, target=address, concurrency=3, rps=0.2,
                                                   duration=30.0, duration_stop="wait"), stop)

    begin = time.monotonic()
    report = asyncio.run(stopped_soon())
    assert time.monotonic() - begin < 3 and report["endReason"] == "cancel" and report["count"] == 1


def test_a_stop_while_the_connections_are_dialled_ends_the_run_at_once_without_calls():
    """A server that takes connections but never speaks HTTP/2: Ctrl-C
    waited out the 10 s connect timeout, then counted calls that never ran
    as Canceled (a loadtest review)."""

    with silent_server() as target:
        async def stopped_soon() -> dict:
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(0.3, stop.set)
            return await run_load_test(LoadTestOptions(call=HEALTH, target=target, concurrency=2, total=10), stop)

        begin = time.monotonic()
        report = asyncio.run(stopped_soon())
    assert time.monotonic() - begin < 3
    assert report["endReason"] == "cancel" and report["count"] == 0 and report["statusCodeDistribution"] == {}


def test_dialling_a_silent_server_counts_against_the_longest_run(monkeypatch):
    """The dial took up to the run's duration on top of MAX_DURATION_S, and
    the calls then given no time failed at once in a loop: a run of 1 s
    took 2 s and reported ~80k DeadlineExceeded calls (a loadtest review)."""
    from halflife import loadtest as loadtest_module

    monkeypatch.setattr(loadtest_module, "MAX_DURATION_S", 1.0)
    with silent_server() as target:
        begin = time.monotonic()
        report = asyncio.run(run_load_test(LoadTestOptions(call=HEALTH, target=target, concurrency=2, duration=1.0,
                                                           timeout=0)))
    assert time.monotonic() - begin < 1.8
    assert report["count"] == 0 and report["total"] <= 1.1e9


def test_the_cli_and_ghz_configs_default_to_close_as_ghz(tmp_path):
    assert options_from_flags(call=HEALTH, duration=1.0).duration_stop == "close"
    path = tmp_path / "z.json"
    path.write_text(json.dumps({"call": HEALTH, "duration": "1s"}))
    assert options_from_ghz_config(path).duration_stop == "close"
    assert options_from_ghz_config(path, duration_stop="wait").duration_stop == "wait"


# -z over -n, and -x ("If duration is specified, n is ignored"; -x keeps n).
def test_a_duration_wins_over_a_configs_total_and_over_n(scripted, tmp_path, capsys):
    _, address = scripted
    path = tmp_path / "ghz.json"
    path.write_text(json.dumps({"call": HEALTH, "host": address, "total": 3, "concurrency": 1, "insecure": True}))
    status, report = cli(capsys, "--config", str(path), "-z", "0.5s")
    assert status == 0 and report["count"] > 3 and report["total"] >= 0.45e9  # the event loop's timers: ~1 ms
    assert report["options"]["total"] is None and report["endReason"] == "timeout"
    status, report = cli(capsys, "--target", address, "-c", "1", "-n", "3", "-z", "0.5s")
    assert status == 0 and report["count"] > 3


def test_max_duration_keeps_the_total(scripted, tmp_path, capsys):
    _, address = scripted
    path = tmp_path / "ghz.json"
    path.write_text(json.dumps({"call": HEALTH, "host": address, "total": 3, "max-duration": "30s"}))
    status, report = cli(capsys, "--config", str(path))
    assert status == 0 and report["count"] == 3 and report["endReason"] == "normal"
    status, report = cli(capsys, "--target", address, "-c", "1", "-n", "100000", "-x", "0.3s")
    assert status == 0 and 3 < report["count"] < 100000 and report["endReason"] == "timeout"


# ghz config keys and template actions: the ones implemented work, any other is refused up front.
def refused(capsys, *args: str) -> str:
    assert main(["loadtest", *args]) == 2  # a usage error, as argparse's own
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("config, named", [
    ({"metadata": {"token": "x"}}, '"metadata"'),
    ({"load-schedule": "step", "skipFirst": 5}, '"load-schedule", "skipFirst"'),
    ({"insecure": False}, '"insecure": false'),
    ({"data": {}, "data-file": "d.json"}, '"data" or "data-file"'),
    ({"data-file": 5}, '"data-file"'),
    ({"duration-stop": "later"}, '"duration-stop"'),
    ({"max-duration": "-1s"}, '"max-duration"'),
    ({"data": {"service": "{{randomFoo}}"}}, "{{randomFoo}}"),
], ids=lambda v: repr(v)[:50])
def test_unsupported_ghz_config_keys_and_values_are_refused(tmp_path, capsys, config, named):
    path = tmp_path / "ghz.json"
    path.write_text(json.dumps({"call": HEALTH, "host": "127.0.0.1:1", **config}))
    err = refused(capsys, "--config", str(path))
    assert named in err and str(path) in err, err


def test_data_file_and_max_duration_are_read(tmp_path, monkeypatch):
    (tmp_path / "data.json").write_text('{"service": "from-file"}')
    path = tmp_path / "ghz.json"
    path.write_text(json.dumps({"call": HEALTH, "data-file": "data.json", "max-duration": "1m30s", "proto": "x.proto"}))
    monkeypatch.chdir(tmp_path)  # ghz reads the data file from the working directory
    options = options_from_ghz_config(path)
    assert options.data == '{"service": "from-file"}' and options.max_duration == 90.0


@pytest.mark.parametrize("action", [
    "{{.Nope}}", "{{randomFoo}}", "{{randomInt 5 1}}", "{{randomString x}}", '{{printf "%d" 1}}',
    "{{upper .UUID}}", "{{ .RequestNumber", "{{.WorkerID 3}}",
])
def test_template_actions_it_cannot_render_are_refused_never_sent(capsys, action):
    err = refused(capsys, "--call", HEALTH, "--target", "127.0.0.1:1", "-d", json.dumps({"service": action}))
    assert err.startswith("halflife loadtest: error: --data ") and ("{{" in err), err


def test_template_actions_are_rendered_per_request():
    make = request_factory(method_descriptor(HEALTH), json.dumps({"service": "|".join([
        "{{.WorkerID}}", "{{ .RequestNumber }}", "{{.TimestampUnixMilli}}", "{{.TimestampUnix}}", "{{randomString 8}}",
        "{{randomInt 3 4}}", "{{newUUID}}", "{{.UUID}}", "{{.MethodName}}", "{{.ServiceName}}", "{{.IsServerStreaming}}",
        "{{.FullyQualifiedName}}", "{{.InputName}}",
    ])}))
    now_ms = time.time() * 1000
    (worker, number, milli, unix, text, three, new_uuid, call_uuid, method, service, streaming, name, input_name) = (
        make(7, "g1c0").service.split("|"))
    assert (worker, number, three, method, service, streaming) == ("g1c0", "7", "3", "Check", "Health", "false")
    assert (name, input_name) == (HEALTH, "HealthCheckRequest")
    assert abs(int(milli) - now_ms) < 10_000 and int(unix) == int(milli) // 1000
    assert len(text) == 8 and text.isalnum()
    assert uuid.UUID(new_uuid) and uuid.UUID(call_uuid) and new_uuid != call_uuid
    assert make(8).service.split("|")[6] != new_uuid  # new values per request


def test_actions_that_stand_for_numbers_render_before_the_json_is_read():
    """As ghz renders the whole data first: an unquoted action is no JSON, and
    in an array it was refused as "not a JSON array" (an audit)."""
    data = '[{"user_id": "u{{randomInt 1 3}}", "limit": {{randomInt 1 5}}}, {"user_id": "x", "limit": {{.RequestNumber}}}]'
    make = request_factory(method_descriptor("halflife.v1.RecommendService.Recommend"), data)
    first, second, fourth = make(0), make(1), make(3)
    assert first.user_id in ("u1", "u2") and 1 <= first.limit < 5
    assert (second.user_id, second.limit, fourth.limit) == ("x", 1, 3)
    single = request_factory(method_descriptor("halflife.v1.RecommendService.Recommend"), '{"limit": {{.RequestNumber}}}')
    assert single(7).limit == 7


@pytest.mark.parametrize("data", [
    '[{"user_id": "a,b]{{.WorkerID}}", "limit": {{.RequestNumber}}}, {"user_id": "q\\"uote, [x] {", "limit": 2}]',
    '[{"user_id": "u", "filter": {"include_categories": ["a,b", "c]", "{{.MethodName}}"]}, "limit": {{.RequestNumber}}},'
    ' {"user_id": "{{.MethodName}}"}, {"user_id": "}]"}]',
    ' [\n {"user_id": "x\\\\"} ,\n{"user_id":"{{.WorkerID}}", "limit": 3}\n] \n',
])
def test_a_templated_array_renders_one_element_per_request_as_the_whole_array_would(monkeypatch, data):
    """Each request rendered and read the whole array to send one element (a
    generator's CPU with a big array); its own element's template gives the
    same message, whatever commas, brackets and quotes its strings hold."""
    from google.protobuf import json_format

    from halflife import loadtest as loadtest_module

    method = method_descriptor("halflife.v1.RecommendService.Recommend")
    make = request_factory(method, data)
    whole = loadtest_module._template(data, method)
    reads = []
    monkeypatch.setattr(loadtest_module, "_messages", lambda text: reads.append(text) or [])
    for number, worker in [(0, "g0c0"), (1, "g1c0"), (2, "g0c1"), (7, "g2c2")]:
        elements = json.loads(whole(number, worker))
        expected = json_format.Parse(json.dumps(elements[number % len(elements)]), make(0).__class__())
        assert make(number, worker) == expected
    assert reads == []  # no request read the whole array


def test_worker_ids_and_an_array_round_robin_reach_the_server(scripted, capsys):
    servicer, address = scripted
    data = json.dumps([{"service": "a-{{.WorkerID}}"}, {"service": "b-{{.WorkerID}}"}])
    status, report = cli(capsys, "--target", address, "-c", "2", "--connections", "2", "-n", "4", "-d", data)
    assert status == 0 and report["count"] == 4
    elements, workers = zip(*(service.split("-") for service in servicer.received))
    assert sorted(elements) == ["a", "a", "b", "b"] and set(workers) == {"g0c0", "g1c1"}


# The report: Go's status names, as ghz writes them; nearest-rank percentiles of observed latencies.
def test_status_and_error_names_are_gos(scripted, capsys):
    _, address = scripted
    data = json.dumps([{"service": ""}, {"service": "code=NOT_FOUND"}, {"service": "code=INVALID_ARGUMENT"}])
    status, report = cli(capsys, "--target", address, "-c", "1", "-n", "6", "-d", data)
    assert status == 0
    assert report["statusCodeDistribution"] == {"OK": 2, "NotFound": 2, "InvalidArgument": 2}
    assert report["errorDistribution"] == {"rpc error: code = NotFound desc = scripted": 2,
                                           "rpc error: code = InvalidArgument desc = scripted": 2}
    assert sorted(GO_CODE_NAMES.values()) == sorted([  # grpc-go's codes.Code.String()
        "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
        "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
        "Internal", "Unavailable", "DataLoss", "Unauthenticated"])


def test_percentiles_are_latencies_calls_had():
    latencies = [20] * 9 + [200]  # interpolated, p95 was 119: a latency no call had
    assert {d["percentage"]: d["latency"] for d in latency_distribution(latencies)} == {
        10: 20, 25: 20, 50: 20, 75: 20, 90: 20, 95: 200, 99: 200}
    # Nearest rank: p% of 1..100 is p (interpolation gave 10.9 for p10, 50.5 for p50).
    assert [d["latency"] for d in latency_distribution(list(range(100, 0, -1)))] == [10, 25, 50, 75, 90, 95, 99]


def test_reported_percentiles_and_extremes_come_from_the_ok_calls(scripted, capsys):
    _, address = scripted
    data = json.dumps([{"service": "sleep=0.5"}] + [{"service": ""}] * 8 + [{"service": "code=INTERNAL"}])
    status, report = cli(capsys, "--target", address, "-c", "1", "-n", "10", "-d", data)
    assert status == 0 and report["count"] == 10
    by_percentage = {d["percentage"]: d["latency"] for d in report["latencyDistribution"]}
    assert by_percentage[90] >= 0.5e9 and by_percentage[75] < 0.25e9  # 9 OK calls: p90 is the slow one
    assert report["slowest"] == by_percentage[99] >= 0.5e9


# The flags ghz has: -r, Go durations, -t 0, -d @.
@pytest.mark.parametrize("text, seconds", [
    ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5), ("300ms", 0.3), ("2us", 2e-6), ("2µs", 2e-6), ("1h2m3.5s", 3723.5),
    (".5s", 0.5), ("0", 0.0), ("10", 10.0),  # plain seconds: an extension ghz lacks
])
def test_durations_parse_as_gos(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def test_bad_durations_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["loadtest", "--call", HEALTH, "-z", "1m30"])
    assert exit_.value.code == 2 and "must be a duration such as 10s, 1m30s or 500ms, got '1m30'" in capsys.readouterr().err


def test_r_limits_the_rate_and_t_0_means_no_timeout(scripted, capsys):
    _, address = scripted
    begin = time.monotonic()
    status, report = cli(capsys, "--target", address, "-c", "2", "-r", "20", "-n", "10", "-t", "0")
    assert status == 0 and report["count"] == 10 and time.monotonic() - begin >= 0.4
    assert report["options"]["rps"] == 20 and report["options"]["timeout"] == 0


def test_the_reports_options_read_as_ghzs(scripted, capsys):
    """ghz's keys and units (an audit found "target" for ghz's "host", the
    call rewritten with a slash, and seconds where ghz writes nanoseconds)."""
    _, address = scripted
    status, report = cli(capsys, "--target", address, "-n", "2", "-t", "1.5s", "-x", "5s")
    assert status == 0
    options = report["options"]
    assert options["host"] == address and options["call"] == HEALTH and "target" not in options
    assert options["timeout"] == 1_500_000_000 and options["max-duration"] == 5_000_000_000
    assert options["duration"] is None and options["rps"] == 0


def test_a_rate_that_the_duration_cuts_short_ends_in_timeout(scripted, capsys):
    """-r 5 -z 1s sends 5 requests and stops, the 6th due at the deadline:
    ghz says "timeout", and so it was, not "normal" (an audit). (At -r 20 the
    20th was due 50 ms before the deadline: a stalled loop on CI missed it.)"""
    _, address = scripted
    status, report = cli(capsys, "--target", address, "-r", "5", "-z", "1s")
    assert status == 0 and report["count"] == 5 and report["endReason"] == "timeout"
    status, report = cli(capsys, "--target", address, "-r", "20", "-n", "5", "-x", "1s")
    assert status == 0 and report["count"] == 5 and report["endReason"] == "normal"  # -n came first


def test_data_from_stdin(scripted, capsys, monkeypatch):
    servicer, address = scripted
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"service": "stdin"}'))
    status, report = cli(capsys, "--target", address, "-n", "2", "-d", "@")
    assert status == 0 and servicer.received == ["stdin", "stdin"]


def test_a_target_port_out_of_range_is_refused():
    with pytest.raises(LoadTestError, match="^--target 127.0.0.1:70000: port must be 1 to 65535, got 70000$"):
        LoadTestOptions(call=HEALTH, target="127.0.0.1:70000")


# Ctrl-C: the load stops and the report of what ran is printed (exit 130).
def interrupted_run(scripted, calls: int, *flags: str) -> tuple[int, dict, str]:
    """A `halflife loadtest -z 50s -c 2` sent SIGINT once the server has
    received `calls` calls: (exit status, report, stderr)."""
    servicer, address = scripted
    process = subprocess.Popen(
        [sys.executable, "-m", "halflife.cli", "loadtest", "--call", HEALTH, "--target", address, "-z", "50s",
         "-c", "2", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        began = time.monotonic()
        while len(servicer.received) < calls and time.monotonic() - began < 30:
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    return process.returncode, json.loads(stdout), stderr


def test_ctrl_c_prints_the_report_of_what_ran(scripted):
    # Some calls answered (two workers: the third call came after the first answer).
    status, report, stderr = interrupted_run(scripted, 3)
    assert status == 130 and report["endReason"] == "cancel" and report["total"] < 40e9
    assert report["statusCodeDistribution"].get("OK", 0) >= 1
    assert stderr.strip() == f"halflife loadtest: interrupted; the report covers the {report['count']} calls made"


def test_ctrl_c_says_so_when_calls_in_flight_may_still_finish(scripted):
    """--duration-stop wait: after Ctrl-C the tool waits for the calls in flight (within -t), and said nothing
    meanwhile (an audit: a paused server kept it silent for up to -t)."""
    status, report, stderr = interrupted_run(scripted, 2, "--duration-stop", "wait", "-d", '{"service": "sleep=1"}')
    assert status == 130 and report["statusCodeDistribution"] == {"OK": 2}  # waited for, not cancelled
    assert stderr.splitlines()[0].startswith("halflife loadtest: stopping: the calls in flight may finish"), stderr


def test_the_summary_names_the_errors(scripted, capsys):
    """-O summary said 'status: InvalidArgument 5' and no more: the reason was
    in the JSON alone (an audit). ghz's summary lists the error distribution."""
    _, address = scripted
    status = main(["loadtest", "--call", HEALTH, "--target", address, "-n", "3", "-O", "summary",
                   "-d", '{"service": "code=INVALID_ARGUMENT"}'])
    out = capsys.readouterr().out
    assert status == 1 and "status: InvalidArgument 3" in out
    assert "error (3): rpc error: code = InvalidArgument desc = scripted" in out.splitlines(), out
    # No call succeeded: no fastest, slowest or percentiles of none (they read 0.00 ms and a blank line).
    lines = out.splitlines()
    assert "no call succeeded" in lines[0] and "fastest" not in out and all(line.strip() for line in lines)


def test_the_summary_says_which_calls_each_latency_is_of_where_some_failed():
    """The average is of every call, the rest of the OK ones (as ghz's): with
    fast failures, "average 0.58 ms  fastest 25.92 ms" read as a
    contradiction (an onboarding review)."""
    from halflife.loadtest import summary

    report = {"count": 4, "rps": 2.0, "average": 580_000, "fastest": 25_920_000, "slowest": 30_000_000,
              "endReason": "normal", "latencyDistribution": [{"percentage": 50, "latency": 26_000_000}],
              "statusCodeDistribution": {"OK": 1, "Unavailable": 3}, "errorDistribution": {"refused": 3}}
    first = summary(report).splitlines()[0]
    assert "average (all calls) 0.58 ms  OK calls: fastest 25.92 ms  slowest 30.00 ms" in first, first
    every = summary(report | {"statusCodeDistribution": {"OK": 4}, "errorDistribution": {}}).splitlines()[0]
    assert "average 0.58 ms  fastest 25.92 ms" in every, every


def test_a_run_cancelled_while_it_dials_leaves_no_channel_or_task_behind(monkeypatch):
    """Cancelled there (a second Ctrl-C), its dialling tasks ran on and its channels stayed open (a review)."""

    from grpc.aio import _channel

    closed = []

    real_close = _channel.Channel.close

    async def counting_close(self, grace=None):
        closed.append(self)
        return await real_close(self, grace)

    monkeypatch.setattr(_channel.Channel, "close", counting_close)
    with silent_server() as target:
        async def cancelled_while_dialling() -> set:
            run = asyncio.ensure_future(run_load_test(LoadTestOptions(call=HEALTH, target=target, concurrency=2,
                                                                      connections=2, total=10)))
            await asyncio.sleep(0.3)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
            await asyncio.sleep(0)
            return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

        left = asyncio.run(cancelled_while_dialling())
    assert left == set() and len(closed) == 2
