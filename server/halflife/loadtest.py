"""`halflife loadtest`: an asyncio gRPC load generator with ghz's flags and JSON report.

    halflife loadtest --call halflife.v1.EmbeddingService.Embed \\
        --data '{"inputs": ["hello"]}' --concurrency 32 --total 2000

    halflife loadtest --config clients/ghz/recommend.json -z 30s

Requests are given as proto3 JSON (the mapping ghz and grpcurl use), one
message or an array of them sent in turn, and resolved against the generated
descriptors, so every Halflife RPC and the health check can be driven. ghz
config files work as they are, with ghz's stopping rules (-z wins over -n; -x
stops at whichever comes first; --duration-stop for the calls in flight then)
and ghz's call-data template actions (TEMPLATE_VARIABLES, newUUID,
randomString, randomInt). A config key or template action this tool does not
implement is refused up front, never ignored or sent literally. Bounded in
count and time, and loopback only unless --allow-remote: every option is
checked when LoadTestOptions is made (flags, ghz configs and library callers
alike), and the run never outlasts MAX_DURATION_S, rate limit and call
timeouts included.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import ipaddress
import json
import math
import random
import re
import string
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory

from grpc_health.v1 import health_pb2
from halflife.v1 import catalog_pb2, embedding_pb2, interest_pb2, recommend_pb2
from halflife_client.client import (
    DEFAULT_TARGET, MAX_STREAMS_PER_CONNECTION, TRANSPORT_OPTIONS, server_target,
)

# Imported only to register their descriptors in the default pool (named here so linters see a use).
_APIS = (catalog_pb2, embedding_pb2, interest_pb2, recommend_pb2, health_pb2)

MAX_DURATION_S = 600.0
CONNECT_TIMEOUT_S = 10.0  # ghz's --connect-timeout default
MAX_TOTAL = 10_000_000
MAX_CONCURRENCY = 10_000  # a million workers took 10 s just to start; this many is plenty for loopback
DEFAULT_TOTAL = 200  # ghz's -n when neither a total nor a duration is given
SUMMARY_ERRORS = 5  # kinds of error the summary lists, most frequent first
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
# What happens to the calls in flight when -z or -x ends the run (ghz's --duration-stop):
# close cancels them and counts them as Canceled, wait lets them finish within their
# timeout, ignore cancels them and leaves them out of the report.
DURATION_STOPS = ("close", "wait", "ignore")
GHZ_DURATION_STOP = "close"  # ghz's default, used by the CLI and ghz configs
# What ghz reports for a call its closed connection ended (grpc-go's message).
CONNECTION_CLOSING = "grpc: the client connection is closing"
# Go's names for the status codes (codes.Code.String()), which ghz's report uses: InvalidArgument, Canceled...
GO_CODE_NAMES = {
    code: {"OK": "OK", "CANCELLED": "Canceled"}.get(code.name, code.name.title().replace("_", ""))
    for code in grpc.StatusCode
}


class LoadTestError(ValueError):
    pass


class InvalidOption(LoadTestError):
    """A bad value for one option: says `--field problem`, and keeps the field so
    that options_from_ghz_config can name the config key instead."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"--{field.replace('_', '-')} {problem}")
        self.field = field
        self.problem = problem


def _is_finite_number(value) -> bool:
    # nan slips through `<= 0` checks (`-z nan` ran nothing and exited 0), so finiteness is explicit.
    # A bool is an int but no count or rate; an int too big for a float (JSON allows one) is not finite.
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:
        return False


def _check_whole(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOption(field, f"must be a whole number of at least 1, not {value!r}")


def _check_seconds(field: str, value) -> None:
    if not (_is_finite_number(value) and value > 0):
        raise InvalidOption(field, f"must be a positive, finite number of seconds, not {value!r}")


@dataclass(frozen=True)
class LoadTestOptions:
    call: str  # "package.Service.Method" or "package.Service/Method"
    data: str = "{}"  # proto3 JSON of the request, or a JSON array of requests sent in turn
    target: str = DEFAULT_TARGET  # one without a port gets serve's (a ghz config's "host" too), not gRPC's 443
    concurrency: int = 8
    # As ghz: `duration` seconds (total ignored); `max_duration` seconds or `total`
    # requests, whichever comes first; only a total, or neither: DEFAULT_TOTAL requests.
    total: int | None = None
    duration: float | None = None
    max_duration: float | None = None
    # ghz's default is "close"; library callers (the benches) count every call they
    # started, so theirs is "wait".
    duration_stop: str = "wait"
    connections: int = 1
    rps: float = 0.0  # 0: as fast as possible
    timeout: float = 20.0  # per-call deadline, seconds; 0: none (MAX_DURATION_S still bounds the run)
    allow_remote: bool = False

    def __post_init__(self) -> None:
        # The one place options are checked, so every way in gives one clear line, not a traceback.
        for field in ("call", "data", "target"):
            if not isinstance(getattr(self, field), str):
                raise InvalidOption(field, f"must be a string, not {getattr(self, field)!r}")
        try:
            object.__setattr__(self, "target", server_target(self.target))
        except ValueError as exc:
            raise InvalidOption("target", f"{self.target}: {exc}") from None
        if not isinstance(self.allow_remote, bool):
            raise InvalidOption("allow_remote", f"must be true or false, not {self.allow_remote!r}")
        _check_whole("concurrency", self.concurrency)
        _check_whole("connections", self.connections)
        if self.total is not None:
            _check_whole("total", self.total)
        for field in ("duration", "max_duration"):
            value = getattr(self, field)
            if value == 0 and not isinstance(value, bool):  # ghz's "not set" (-z's default), in configs too
                object.__setattr__(self, field, None)
            elif value is not None:
                _check_seconds(field, value)
        if self.duration_stop not in DURATION_STOPS:
            raise InvalidOption("duration_stop", f"must be one of {', '.join(DURATION_STOPS)}, not {self.duration_stop!r}")
        if not (_is_finite_number(self.timeout) and self.timeout >= 0):
            raise InvalidOption("timeout", f"must be a finite number of seconds (0: no timeout), not {self.timeout!r}")
        if not (_is_finite_number(self.rps) and self.rps >= 0):
            raise InvalidOption("rps", f"must be a finite number of requests per second (0: no limit), not {self.rps!r}")
        _check_loopback(self.target, self.allow_remote)
        request_factory(method_descriptor(self.call), self.data)


def method_descriptor(call: str):
    service, sep, name = call.replace("/", ".").rpartition(".")
    if not sep:
        raise InvalidOption("call", f"{call!r}: expected package.Service.Method")
    try:
        method = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        raise InvalidOption("call", f"{call!r}: no such method in Halflife's API or grpc.health.v1") from None
    if method.client_streaming or method.server_streaming:
        # Sent as a unary call, grpc.health.v1.Health.Watch waited out every call's -t (a review).
        raise InvalidOption("call", f"{call!r} is a streaming method: halflife loadtest makes unary calls only")
    return method


def _check_loopback(target: str, allow_remote: bool) -> None:
    host = target.rsplit(":", 1)[0].strip("[]")
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InvalidOption("target", f"{target} is not a loopback address; pass --allow-remote to load it")


FIRST_WORKER = "g0c0"  # ghz's WorkerID for worker 0 (g) on connection 0 (c)


@dataclass(frozen=True)
class _CallData:
    """What a template action sees for one request (ghz's CallData)."""
    method: object  # its MethodDescriptor
    number: int
    worker_id: str
    now_ns: int
    uuid: str


def _rfc3339(ns: int) -> str:
    # Go's time.RFC3339 in local time, as ghz writes {{.Timestamp}}: "Z" for UTC.
    text = dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).astimezone().isoformat(timespec="seconds")
    return text[: -len("+00:00")] + "Z" if text.endswith("+00:00") else text


# ghz's template variables ({{.Name}}), rendered as Go's text/template prints them.
TEMPLATE_VARIABLES: dict[str, Callable[[_CallData], str]] = {
    "WorkerID": lambda c: c.worker_id,
    "RequestNumber": lambda c: str(c.number),
    "FullyQualifiedName": lambda c: c.method.full_name,
    "MethodName": lambda c: c.method.name,
    "ServiceName": lambda c: c.method.containing_service.name,
    "InputName": lambda c: c.method.input_type.name,
    "OutputName": lambda c: c.method.output_type.name,
    "IsClientStreaming": lambda c: str(c.method.client_streaming).lower(),
    "IsServerStreaming": lambda c: str(c.method.server_streaming).lower(),
    "Timestamp": lambda c: _rfc3339(c.now_ns),
    "TimestampUnix": lambda c: str(c.now_ns // 10**9),
    "TimestampUnixMilli": lambda c: str(c.now_ns // 10**6),
    "TimestampUnixNano": lambda c: str(c.now_ns),
    "UUID": lambda c: c.uuid,
}
_ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)


def _random_string(length: int) -> str:
    # ghz's randomString: letters and digits; a length <= 0 picks one from 2 to 16.
    return "".join(random.choices(string.ascii_letters + string.digits, k=length if length > 0 else random.randint(2, 16)))


def _action(source: str) -> Callable[[_CallData], str]:
    """The template action {{source}} as a function of the call. Refused (InvalidOption)
    unless it is one of ghz's that this tool renders: a variable, newUUID, randomString N
    or randomInt MIN MAX (ghz's sprig functions are not)."""
    name, *args = source.split() or [""]
    numbers = [int(arg) for arg in args] if all(re.fullmatch(r"-?[0-9]+", arg) for arg in args) else []
    if name.startswith(".") and name[1:] in TEMPLATE_VARIABLES and not args:
        return TEMPLATE_VARIABLES[name[1:]]
    if name == "newUUID" and not args:
        return lambda c: str(uuid.uuid4())
    if name == "randomString" and len(numbers) == 1:
        return lambda c: _random_string(numbers[0])
    if name == "randomInt" and len(numbers) == 2 and numbers[0] < numbers[1]:
        return lambda c: str(random.randrange(*numbers))  # [min, max), as ghz
    raise InvalidOption("data", f"has the template action {{{{{source}}}}}, which halflife loadtest does not support "
                                "(clients/ghz/README.md lists those it does)")


def _template(text: str, method) -> Callable[[int, str], str]:
    """`text` rendered for request `number` of worker `worker_id`."""
    pieces = _ACTION.split(text)  # literal, action, literal, ..., literal
    if any("{{" in literal for literal in pieces[::2]):
        raise InvalidOption("data", "has a {{ with no }}: an unfinished template action")
    actions = [_action(source) for source in pieces[1::2]]

    def render(number: int, worker_id: str) -> str:
        call = _CallData(method, number, worker_id, time.time_ns(), str(uuid.uuid4()))
        rendered = list(pieces)
        rendered[1::2] = [action(call) for action in actions]
        return "".join(rendered)

    return render


_MESSAGES_EXPECTED = "must be a JSON object or a non-empty array of objects"
_JSON_KINDS = {str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def _messages(data: str) -> list[str]:
    """The proto3 JSON texts in `data`: one message, or each element of an array of them."""
    start = data.lstrip()[:1]
    if start == "{":
        return [data]
    if start != "[":
        # json_format read "" as an empty message, and a string as fields named by its characters: a
        # config's "data": "{\"user_id\": \"1\"}" (the message's text, not the message) had no field named "{".
        try:
            kind = _JSON_KINDS[type(json.loads(data))]
        except (ValueError, RecursionError):
            return [data]  # no JSON: json_format's parse says where
        raise InvalidOption("data", f"{_MESSAGES_EXPECTED}, not {kind}")
    try:
        elements = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InvalidOption("data", f"is not a JSON array: {exc}") from None
    if not elements or not all(isinstance(element, dict) for element in elements):
        raise InvalidOption("data", _MESSAGES_EXPECTED)
    return [json.dumps(element) for element in elements]


def _array_elements(data: str) -> list[str] | None:
    """Each element of `data`, a JSON array whose text may hold template
    actions, as a template of its own, so that a request renders and reads
    its one element instead of the whole array. Split at the commas between
    the array's elements (outside strings and nested values), actions kept
    whole; None when `data` is no array, or not one this split can read."""
    if "\0" in data or not data.lstrip().startswith("["):
        return None
    actions = _ACTION.findall(data)
    numbers = iter(range(len(actions)))
    text = _ACTION.sub(lambda _: f"\0{next(numbers)}\0", data)  # actions: no quote, bracket or comma in them
    elements: list[str] = []
    depth, in_string, escaped, start = 0, False, False, text.index("[") + 1
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:  # the array's end
                elements.append(text[start:i])
                break
        elif char == "," and depth == 1:
            elements.append(text[start:i])
            start = i + 1
    else:
        return None
    if text[i + 1:].strip():
        return None
    return [re.sub("\0(\\d+)\0", lambda m: "{{" + actions[int(m.group(1))] + "}}", e) for e in elements]


def request_factory(method, data: str) -> Callable[..., object]:
    """make(n, worker_id): request n's message from proto3 JSON `data` (an array's
    elements in turn, as ghz sends them for a unary call) with ghz's template
    actions rendered per request. Raises LoadTestError, before any load is sent,
    when `data` does not fit the method or has an action this tool lacks."""
    request_class = message_factory.GetMessageClass(method.input_type)

    def parse(text: str):
        try:
            return json_format.Parse(text, request_class())
        except json_format.ParseError as exc:
            raise InvalidOption("data", f"does not fit {method.input_type.full_name}: {exc}") from None

    if "{{" not in data:
        fixed = [parse(text) for text in _messages(data)]
        return lambda number, worker_id=FIRST_WORKER: fixed[number % len(fixed)]
    # Rendered before it is read as JSON, as ghz does: an action may stand for
    # a number ({"limit": {{randomInt 1 10}}}), in an array's elements too.
    render = _template(data, method)
    rendered = _messages(render(0, FIRST_WORKER))
    for text in rendered:
        parse(text)  # fail before the load starts, not during it
    elements = _array_elements(data)
    if elements is not None and len(elements) == len(rendered):
        # One element rendered and read per request (the whole array was: a load generator's CPU is the load's).
        renders = [_template(element, method) for element in elements]
        for element_render in renders:
            parse(element_render(0, FIRST_WORKER))
        return lambda number, worker_id=FIRST_WORKER: parse(renders[number % len(renders)](number, worker_id))

    def make(number: int, worker_id: str = FIRST_WORKER):
        texts = _messages(render(number, worker_id))
        return parse(texts[number % len(texts)])

    return make


# LoadTestOptions field -> the ghz config key it is read from.
GHZ_KEYS = {
    "call": "call", "data": "data", "target": "host", "concurrency": "concurrency", "total": "total",
    "duration": "duration", "max_duration": "max-duration", "duration_stop": "duration-stop",
    "connections": "connections", "rps": "rps", "timeout": "timeout",
}
# ghz keys with nothing to do here: the API's descriptors are built in, and connections are plaintext.
GHZ_NEEDLESS_KEYS = {"proto", "protoset", "import-paths", "insecure"}
GHZ_DATA_FILE = "data-file"  # read into "data", as ghz's -D


def _ghz_duration(where: str, key: str, value) -> float:
    """Seconds of a config's duration, a Go duration string. ghz also reads a JSON number, in nanoseconds:
    0 is 0 in any unit (it was refused, a review), where `"duration": 5` meant 5 ns to ghz and, likely, 5 s
    to whoever wrote it, so other numbers are refused."""
    if value == 0 and isinstance(value, (int, float)) and not isinstance(value, bool):
        return 0.0
    try:
        if isinstance(value, str):
            return parse_duration(value)
    except ValueError:
        pass
    raise LoadTestError(f'{where}: "{key}" must be a duration such as "10s", "1m30s" or "500ms", not {value!r}')


def read_data_file(path) -> str:
    """The request JSON in file `path` (ghz's -D / "data-file"); a relative path is from the working directory, as in ghz."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadTestError(f"cannot read data file {path}: {exc}") from None


def options_from_ghz_config(path: Path, **overrides) -> LoadTestOptions:
    """LoadTestOptions from a ghz JSON config file; keyword overrides (not None) win.
    Raises LoadTestError naming the file and key for a value of the wrong type or
    range, or a key this tool does not implement."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        # ghz also reads TOML and YAML, which failed here as "Expecting value" (a loadtest review).
        other = "" if Path(path).suffix.lower() not in {".toml", ".yaml", ".yml"} else (
            "; halflife loadtest reads JSON configs only (ghz's TOML and YAML ones: convert them to JSON)")
        raise LoadTestError(f"cannot read ghz config {path}: {exc}{other}") from None
    if not isinstance(config, dict):
        raise LoadTestError(f"ghz config {path}: expected a JSON object, not {type(config).__name__}")
    return _ghz_options(config, f"ghz config {path}", overrides)


def options_from_flags(**flags) -> LoadTestOptions:
    """LoadTestOptions from the CLI's flags (those not None), with ghz's defaults where this tool has them."""
    return _ghz_options({}, None, flags)


def _ghz_options(config: dict, where: str | None, flags: dict) -> LoadTestOptions:
    given = {field: value for field, value in flags.items() if value is not None}
    keys = dict(GHZ_KEYS)
    found = {key for key, value in config.items() if value is not None}  # JSON null: not set, as ghz reads it
    unknown = sorted(found - set(keys.values()) - GHZ_NEEDLESS_KEYS - {GHZ_DATA_FILE})
    if unknown:
        raise LoadTestError(f"{where}: halflife loadtest does not support {', '.join(map(json.dumps, unknown))} "
                            "(clients/ghz/README.md lists the keys it does)")
    if config.get("insecure") is False:
        raise LoadTestError(f'{where}: "insecure": false asks for TLS, which halflife loadtest does not do')
    if {"data", GHZ_DATA_FILE} <= found:
        raise LoadTestError(f'{where}: give "data" or "{GHZ_DATA_FILE}", not both')
    if GHZ_DATA_FILE in found:
        keys["data"] = GHZ_DATA_FILE
    values = {"duration_stop": GHZ_DURATION_STOP}
    for field, key in keys.items():
        if field in given or key not in found:
            continue
        value = config[key]
        if key == GHZ_DATA_FILE:
            if not isinstance(value, str):
                raise LoadTestError(f'{where}: "{key}" must be a file path, not {value!r}')
            value = read_data_file(value)
        elif field == "data":
            value = json.dumps(value)
        elif field in ("duration", "max_duration", "timeout"):
            value = _ghz_duration(where, key, value)
        elif field == "duration_stop" and isinstance(value, str):
            value = value.lower()  # as ghz takes it ("Close")
        values[field] = value
    values.update(given)
    if "call" not in values:
        raise LoadTestError(f'{where}: no "call" (give it there or with --call)' if where else "give --call (or --config)")
    try:
        return LoadTestOptions(**values)
    except InvalidOption as exc:
        if where is None or exc.field not in values or exc.field in given:  # the flag's value was bad, not the file's
            raise
        raise LoadTestError(f'{where}: "{keys[exc.field]}" {exc.problem}') from None


class _Tally:
    """The calls' outcomes, kept as ghz's reporter keeps them."""

    def __init__(self) -> None:
        self.latencies: list[int] = []  # ns, every call
        self.ok_latencies: list[int] = []
        self.statuses: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()

    def add(self, begin_ns: int, code: grpc.StatusCode, details: str = "") -> None:
        latency = time.perf_counter_ns() - begin_ns
        self.latencies.append(latency)
        self.statuses[GO_CODE_NAMES[code]] += 1
        if code == grpc.StatusCode.OK:
            self.ok_latencies.append(latency)
        else:  # grpc-go's status error text, as ghz reports it
            self.errors[f"rpc error: code = {GO_CODE_NAMES[code]} desc = {details}"] += 1


def nearest_rank(ordered, fraction: float):
    """The value at rank ceil(fraction × n) of the sorted, non-empty `ordered`
    (nearest rank, as ghz's reporter computes percentiles): always a sample,
    never an interpolation."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def latency_distribution(latencies: list[int]) -> list[dict] | None:
    """ghz's percentiles of the latencies (`nearest_rank`), so every latency
    reported is one a call had; None (JSON null, as ghz writes) for none."""
    ordered = sorted(latencies)
    if not ordered:
        return None
    return [{"percentage": p, "latency": nearest_rank(ordered, p / 100)} for p in PERCENTILES]


def _total_counts(options: LoadTestOptions) -> bool:
    """Whether the run stops at a number of calls: ghz's -z alone ignores -n
    ("If duration is specified, n is ignored"); -x keeps it."""
    return options.duration is None or options.max_duration is not None


def bounds_applied(options: LoadTestOptions) -> list[str]:
    """What of `options` the run's bounds cut (MAX_TOTAL, MAX_DURATION_S,
    MAX_CONCURRENCY), as notes for the user: a silent cut read as a run
    that had done what was asked."""
    notes = []
    if options.total is not None and options.total > MAX_TOTAL and _total_counts(options):
        notes.append(f"total {options.total} is past the bound: at most {MAX_TOTAL} calls")
    asked = options.max_duration or options.duration
    if asked is not None and asked > MAX_DURATION_S:
        notes.append(f"duration {asked:g} s is past the bound: the run stops after {MAX_DURATION_S:g} s")
    elif asked is None and (total := _total(options)) and options.rps and (total - 1) / options.rps >= MAX_DURATION_S:
        # -n 1000 -r 1 stopped at 600 calls without a word (a loadtest review).
        notes.append(f"{total} calls at {options.rps:g}/s take past the bound: the run stops after "
                     f"{MAX_DURATION_S:g} s")
    if options.concurrency > MAX_CONCURRENCY:
        notes.append(f"concurrency {options.concurrency} is past the bound: at most {MAX_CONCURRENCY} workers")
    if (needed := _connections(options.connections, _workers(options))) > options.connections:
        notes.append(f"{_workers(options)} workers on {options.connections} connection(s): {needed} connections, "
                     f"as the server carries at most {MAX_STREAMS_PER_CONNECTION} calls on one")
    return notes


def _total(options: LoadTestOptions) -> int | None:
    """The calls a run makes at most; None where only its duration ends it."""
    return min(options.total or DEFAULT_TOTAL, MAX_TOTAL) if _total_counts(options) else None


def _workers(options: LoadTestOptions) -> int:
    """A run's workers: as asked, but no more than its calls nor MAX_CONCURRENCY."""
    return min(options.concurrency, _total(options) or MAX_TOTAL, MAX_CONCURRENCY)


def _connections(asked: int, concurrency: int) -> int:
    """The connections a run opens: those asked for, no more than its workers
    (extras only cost start-up time), and enough for the server's limit of
    calls on one, where gRPC Python had the extra calls refused, reported
    Unavailable (ghz's client queues them; an audit at -c 1000 saw 352 of
    3,000 health checks fail)."""
    return max(min(asked, concurrency), math.ceil(concurrency / MAX_STREAMS_PER_CONNECTION))


async def run_load_test(options: LoadTestOptions, stop: asyncio.Event | None = None) -> dict:
    """Runs the load; returns a ghz-shaped report (durations in nanoseconds).
    Setting `stop` (on Ctrl-C, say) ends the run as its duration would, with
    endReason "cancel". The options were checked when they were made
    (LoadTestOptions.__post_init__)."""
    total = _total(options)
    # ghz's -x is a -z that keeps -n, and the one that counts when both are given.
    duration = min(options.max_duration or options.duration or MAX_DURATION_S, MAX_DURATION_S)
    concurrency = _workers(options)
    connections = _connections(options.connections, concurrency)
    method = method_descriptor(options.call)
    make_request = request_factory(method, options.data)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    channels = [
        # Distinct channel args keep gRPC from sharing one TCP connection.
        # The client's transport without its retries: gRPC's 4 MiB default failed GetItems of big items, and its
        # reconnection backoff read a restart as seconds more downtime (a review).
        grpc.aio.insecure_channel(options.target, options=[*TRANSPORT_OPTIONS, ("halflife.loadtest.connection", i)])
        for i in range(connections)
    ]
    calls = [
        channel.unary_unary(path, request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString)
        for channel in channels
    ]
    tally = _Tally()
    issued = 0
    cut_short = False  # a worker stopped because its next request was due past the deadline (--rps)
    halt = asyncio.Event()  # the run ends: no new calls, and workers waiting for their --rps turn wake
    hard_end = time.perf_counter() + MAX_DURATION_S  # no call outlives the longest run, the dialling included
    stop = stop or asyncio.Event()
    dialling = asyncio.ensure_future(asyncio.gather(*(_dial(channel, min(CONNECT_TIMEOUT_S, duration))
                                                      for channel in channels)))
    stop_waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((dialling, stop_waiter), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this coroutine cancelled (a second Ctrl-C): no run, its channels closed (a review)
        for channel in channels:
            await channel.close()
        raise
    finally:
        for future in (dialling, stop_waiter):
            future.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await future
    started = time.perf_counter()
    # Dialling a silent server takes up to `duration` of its own: the run ends at hard_end all the same
    # (it ran to twice MAX_DURATION_S, its last calls each given no time and failing at once: a review).
    deadline = min(started + duration, hard_end)

    async def worker(index: int) -> None:
        nonlocal issued, cut_short
        call = calls[index % connections]
        worker_id = f"g{index}c{index % connections}"
        while not halt.is_set() and issued < (total or MAX_TOTAL):
            n = issued
            issued += 1
            if options.rps > 0:
                due = started + n / options.rps
                if due >= deadline:
                    cut_short = True
                    break  # request n, and every later one, is due after the deadline: none would be sent
                wait = due - time.perf_counter()
                if wait > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(halt.wait(), wait)
                    if halt.is_set():
                        break
            try:
                request = make_request(n, worker_id)
            except LoadTestError as error:  # data request 0 rendered to fits, this one's does not: nothing sent
                tally.add(time.perf_counter_ns(), grpc.StatusCode.INVALID_ARGUMENT, f"a request was not sent: {error}")
                await asyncio.sleep(0)  # no call awaited: without it the deadline and Ctrl-C never ran (a review)
                continue
            left = hard_end - time.perf_counter()
            if left <= 0:
                break  # a call given no time would fail at once, unsent
            begin = time.perf_counter_ns()
            try:
                await call(request, timeout=min(options.timeout or MAX_DURATION_S, left))
                tally.add(begin, grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as error:
                tally.add(begin, error.code(), error.details())
            except asyncio.CancelledError:  # the run stopped with this call in flight
                if options.duration_stop == "close":  # ghz closes its connections: the call fails
                    tally.add(begin, grpc.StatusCode.CANCELLED, CONNECTION_CLOSING)
                raise

    # Stopped while dialling: no call is made (none would have had a chance to finish).
    tasks = [asyncio.ensure_future(worker(i)) for i in range(0 if stop.is_set() else concurrency)]
    finished = asyncio.ensure_future(asyncio.wait(tasks) if tasks else asyncio.sleep(0))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait((finished, stopped), timeout=deadline - time.perf_counter(),
                                     return_when=asyncio.FIRST_COMPLETED)
        end_reason = "normal" if finished in done else "cancel" if stopped in done else "timeout"
        if not tasks:  # stopped while dialling
            end_reason = "cancel"
        if end_reason == "normal" and cut_short:
            if options.duration or options.max_duration:
                # --rps left nothing to send before the asked-for deadline: the run lasts until it, as ghz's
                # timer ends it (ended early, its rate read up to a request interval over the --rps it kept).
                await asyncio.wait((stopped,), timeout=max(0.0, deadline - time.perf_counter()))
            end_reason = "cancel" if stopped.done() else "timeout"
        if end_reason != "normal":
            halt.set()  # the calls in flight as --duration-stop says
            if options.duration_stop != "wait":
                for task in tasks:
                    task.cancel()
        await finished
    finally:
        finished.cancel()
        stopped.cancel()
        for task in tasks:  # only left running when this coroutine was cancelled itself
            task.cancel()
        for channel in channels:
            await channel.close()
    for task in tasks:
        if not task.cancelled():
            task.result()  # a worker's own error surfaces here
    elapsed_ns = int((time.perf_counter() - started) * 1e9)
    count, ok = len(tally.latencies), tally.ok_latencies
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z"),  # as Go's RFC 3339
        "endReason": end_reason,
        # ghz's keys and units (durations in ns); the counts are those the run used.
        "options": {"call": options.call, "host": options.target, "concurrency": concurrency,
                    "connections": connections, "rps": options.rps, "total": total,
                    "duration": _ns(options.duration), "max-duration": _ns(options.max_duration),
                    "duration-stop": options.duration_stop, "timeout": _ns(options.timeout)},
        "count": count,
        "total": elapsed_ns,
        # As ghz: the average over every call; fastest, slowest and percentiles over the OK ones.
        "average": sum(tally.latencies) // count if count else 0,
        "fastest": min(ok, default=0),
        "slowest": max(ok, default=0),
        "rps": count / (elapsed_ns / 1e9) if elapsed_ns else 0.0,
        "latencyDistribution": latency_distribution(ok),
        "statusCodeDistribution": dict(tally.statuses),
        "errorDistribution": dict(tally.errors),
    }


async def _dial(channel: grpc.aio.Channel, timeout: float) -> None:
    """Connects `channel` before the clock starts, as ghz dials its
    connections: the first call on each timed the TCP and HTTP/2 set-up
    (~5 ms here), which set a short run's high percentiles (a review).
    Gives up at a failure or after `timeout`: the calls then report it."""
    end = time.perf_counter() + timeout
    state = channel.get_state(try_to_connect=True)
    while state not in _DIALLED and (left := end - time.perf_counter()) > 0:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(channel.wait_for_state_change(state), left)
        state = channel.get_state()


_DIALLED = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)


def _ns(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1e9)


def summary(report: dict) -> str:
    """A short human-readable line set, like ghz's summary: the errors too."""
    ms = lambda ns: f"{ns / 1e6:.2f} ms"
    # Fastest, slowest and the percentiles are of the calls that succeeded, as ghz's, the average of all: where
    # some failed, each says which ("average 0.58 ms  fastest 25.92 ms" read as a contradiction: a review).
    some_failed = report["statusCodeDistribution"].get("OK", 0) != report["count"]
    average = f"average{' (all calls)' if some_failed else ''} {ms(report['average'])}"
    latencies = (f"{'OK calls: ' if some_failed else ''}fastest {ms(report['fastest'])}  slowest {ms(report['slowest'])}"
                 if report["latencyDistribution"] else "no call succeeded")
    lines = [
        f"count {report['count']}  rps {report['rps']:.1f}  {average}  {latencies}  end {report['endReason']}",
        *(["  ".join(f"p{d['percentage']} {ms(d['latency'])}" for d in report["latencyDistribution"])]
          if report["latencyDistribution"] else []),
        "status: " + ", ".join(f"{k} {v}" for k, v in report["statusCodeDistribution"].items()),
    ]
    errors = sorted(report["errorDistribution"].items(), key=lambda error: -error[1])
    lines += [f"error ({n}): {message}" for message, n in errors[:SUMMARY_ERRORS]]
    if len(errors) > SUMMARY_ERRORS:
        lines.append(f"... {len(errors) - SUMMARY_ERRORS} more kinds of error in the JSON report")
    return "\n".join(lines)


_GO_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_DURATION_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION = re.compile(rf"[-+]?(?:{_GO_DURATION_PART.pattern})+")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration, as ghz reads them (time.ParseDuration: "1m30s",
    "1.5h", "300ms", "2us", "0"), or in a plain number of seconds ("10", an
    extension). Raises ValueError for anything else."""
    if not _GO_DURATION.fullmatch(text):
        return float(text)
    sign = -1.0 if text.startswith("-") else 1.0
    return sign * sum(float(number) * _GO_UNIT_SECONDS[unit] for number, unit in _GO_DURATION_PART.findall(text))
