"""`halflife loadtest`: an asyncio gRPC load generator with ghz's flags and JSON report.

    halflife loadtest --call halflife.v1.EmbeddingService.Embed \\
        --data '{"inputs": ["hello"]}' --concurrency 32 --total 2000

    halflife loadtest --config clients/ghz/recommend.json

Requests are given as proto3 JSON (the mapping ghz and grpcurl use) and
resolved against the generated descriptors, so every Halflife RPC and the
health check can be driven. ghz config files work as they are, including
ghz's per-request template variables ({{.RequestNumber}},
{{.TimestampUnix}}, {{.TimestampUnixNano}}, {{.UUID}}). Bounded in count and
time, and loopback only unless --allow-remote: every option is checked when
LoadTestOptions is made (flags, ghz configs and library callers alike), and
the run never outlasts MAX_DURATION_S, rate limit and call timeouts included.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import ipaddress
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
from google.protobuf import descriptor_pool, json_format, message_factory

from grpc_health.v1 import health_pb2
from halflife.v1 import catalog_pb2, embedding_pb2, interest_pb2, recommend_pb2

# Imported only to register their descriptors in the default pool (named here so linters see a use).
_APIS = (catalog_pb2, embedding_pb2, interest_pb2, recommend_pb2, health_pb2)

MAX_DURATION_S = 600.0
MAX_TOTAL = 10_000_000
MAX_CONCURRENCY = 10_000  # a million workers took 10 s just to start; this many is plenty for loopback
DEFAULT_TOTAL = 200  # ghz's -n when neither a total nor a duration is given
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)


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
    data: str = "{}"  # proto3 JSON of the request
    target: str = "127.0.0.1:50051"
    concurrency: int = 8
    # Stop after `total` requests or `duration` seconds, whichever comes first;
    # neither given: DEFAULT_TOTAL requests.
    total: int | None = None
    duration: float | None = None
    connections: int = 1
    rps: float = 0.0  # 0: as fast as possible
    timeout: float = 20.0  # per-call deadline, seconds
    allow_remote: bool = False

    def __post_init__(self) -> None:
        # The one place options are checked, so every way in gives one clear line, not a traceback.
        for field in ("call", "data", "target"):
            if not isinstance(getattr(self, field), str):
                raise InvalidOption(field, f"must be a string, not {getattr(self, field)!r}")
        if not isinstance(self.allow_remote, bool):
            raise InvalidOption("allow_remote", f"must be true or false, not {self.allow_remote!r}")
        _check_whole("concurrency", self.concurrency)
        _check_whole("connections", self.connections)
        if self.total is not None:
            _check_whole("total", self.total)
        if self.duration is not None:
            _check_seconds("duration", self.duration)
        _check_seconds("timeout", self.timeout)
        if not (_is_finite_number(self.rps) and self.rps >= 0):
            raise InvalidOption("rps", f"must be a finite number of requests per second (0: no limit), not {self.rps!r}")
        _check_target(self.target, self.allow_remote)
        request_factory(method_descriptor(self.call), self.data)


def method_descriptor(call: str):
    service, sep, name = call.replace("/", ".").rpartition(".")
    if not sep:
        raise InvalidOption("call", f"{call!r}: expected package.Service.Method")
    try:
        return descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        raise InvalidOption("call", f"{call!r}: no such method in Halflife's API or grpc.health.v1") from None


def _check_target(target: str, allow_remote: bool) -> None:
    host = target.rsplit(":", 1)[0].strip("[]")
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InvalidOption("target", f"{target} is not a loopback address; pass --allow-remote to load it")


_TEMPLATE = re.compile(r"\{\{\s*\.(RequestNumber|TimestampUnix|TimestampUnixNano|UUID)\s*\}\}")


def _render(data: str, number: int) -> str:
    values = {
        "RequestNumber": lambda: str(number),
        "TimestampUnix": lambda: str(int(time.time())),
        "TimestampUnixNano": lambda: str(time.time_ns()),
        "UUID": lambda: str(uuid.uuid4()),
    }
    return _TEMPLATE.sub(lambda m: values[m.group(1)](), data)


def request_factory(method, data: str) -> Callable[[int], object]:
    """Request n's message from proto3 JSON `data` (with ghz templates rendered
    per request). Raises LoadTestError when the JSON does not fit the method."""
    request_class = message_factory.GetMessageClass(method.input_type)

    def parse(text: str):
        try:
            return json_format.Parse(text, request_class())
        except json_format.ParseError as exc:
            raise InvalidOption("data", f"does not fit {method.input_type.full_name}: {exc}") from None

    if not _TEMPLATE.search(data):
        fixed = parse(data)
        return lambda n: fixed
    parse(_render(data, 0))  # fail before the load starts, not during it
    return lambda n: parse(_render(data, n))


# LoadTestOptions field -> the ghz config key it is read from.
GHZ_KEYS = {
    "call": "call", "data": "data", "target": "host", "concurrency": "concurrency", "total": "total",
    "duration": "duration", "connections": "connections", "rps": "rps", "timeout": "timeout",
}


def _ghz_duration(path: Path, key: str, value) -> float:
    try:
        if isinstance(value, str):
            return parse_duration(value)
    except ValueError:
        pass
    raise LoadTestError(f'ghz config {path}: "{key}" must be a duration such as "10s" or "500ms", not {value!r}')


def options_from_ghz_config(path: Path, **overrides) -> LoadTestOptions:
    """LoadTestOptions from a ghz JSON config file; keyword overrides (not None) win.
    Raises LoadTestError naming the file and key for a value of the wrong type or range."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise LoadTestError(f"cannot read ghz config {path}: {exc}") from None
    if not isinstance(config, dict):
        raise LoadTestError(f"ghz config {path}: expected a JSON object, not {type(config).__name__}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {}
    for field, key in GHZ_KEYS.items():
        if field in given or config.get(key) is None:  # JSON null: not set, as ghz reads it
            continue
        value = config[key]
        if field == "data":
            value = json.dumps(value)
        elif field in ("duration", "timeout"):
            value = _ghz_duration(path, key, value)
        values[field] = value
    values.update(given)
    if "call" not in values:
        raise LoadTestError(f'ghz config {path}: no "call" (give it there or with --call)')
    try:
        return LoadTestOptions(**values)
    except InvalidOption as exc:
        if exc.field not in values or exc.field in given:  # the flag's value was bad, not the file's
            raise
        raise LoadTestError(f'ghz config {path}: "{GHZ_KEYS[exc.field]}" {exc.problem}') from None


async def run_load_test(options: LoadTestOptions) -> dict:
    """Runs the load; returns a ghz-shaped report (durations in nanoseconds).
    The options were checked when they were made (LoadTestOptions.__post_init__)."""
    if options.total is not None:
        total = min(options.total, MAX_TOTAL)
    else:
        total = MAX_TOTAL if options.duration is not None else DEFAULT_TOTAL
    duration = min(options.duration or MAX_DURATION_S, MAX_DURATION_S)
    # No more workers than requests, no more connections than workers: extras only cost start-up time.
    concurrency = min(options.concurrency, total, MAX_CONCURRENCY)
    connections = min(options.connections, concurrency)
    method = method_descriptor(options.call)
    make_request = request_factory(method, options.data)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    channels = [
        # Distinct channel args keep gRPC from sharing one TCP connection.
        grpc.aio.insecure_channel(options.target, options=[("halflife.loadtest.connection", i)])
        for i in range(connections)
    ]
    calls = [
        channel.unary_unary(path, request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString)
        for channel in channels
    ]
    latencies: list[int] = []
    statuses: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    issued = 0
    started = time.perf_counter()
    deadline = started + duration
    hard_end = started + MAX_DURATION_S  # no call outlives the longest run either

    async def worker(index: int) -> None:
        nonlocal issued
        call = calls[index % len(calls)]
        while issued < total and time.perf_counter() < deadline:
            n = issued
            issued += 1
            if options.rps > 0:
                due = started + n / options.rps
                if due >= deadline:
                    break  # request n, and every later one, is due after the deadline: none would be sent
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            request = make_request(n)
            begin = time.perf_counter_ns()
            try:
                await call(request, timeout=min(options.timeout, hard_end - time.perf_counter()))
                statuses["OK"] += 1
            except grpc.aio.AioRpcError as error:
                statuses[error.code().name] += 1
                errors[f"rpc error: code = {error.code().name} desc = {error.details()}"] += 1
            latencies.append(time.perf_counter_ns() - begin)

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        for channel in channels:
            await channel.close()
    elapsed_ns = int((time.perf_counter() - started) * 1e9)
    lat = np.array(latencies, dtype=np.int64)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "options": {"call": path.lstrip("/"), "target": options.target, "concurrency": concurrency,
                    "connections": connections, "rps": options.rps, "total": options.total,
                    "duration": options.duration},
        "count": int(lat.size),
        "total": elapsed_ns,
        "average": int(lat.mean()) if lat.size else 0,
        "fastest": int(lat.min()) if lat.size else 0,
        "slowest": int(lat.max()) if lat.size else 0,
        "rps": lat.size / (elapsed_ns / 1e9) if elapsed_ns else 0.0,
        "latencyDistribution": [
            {"percentage": p, "latency": int(np.percentile(lat, p))} for p in PERCENTILES
        ] if lat.size else [],
        "statusCodeDistribution": dict(statuses),
        "errorDistribution": dict(errors),
    }


def summary(report: dict) -> str:
    """A short human-readable line set, like ghz's summary."""
    ms = lambda ns: f"{ns / 1e6:.2f} ms"
    lines = [
        f"count {report['count']}  rps {report['rps']:.1f}  average {ms(report['average'])}  "
        f"fastest {ms(report['fastest'])}  slowest {ms(report['slowest'])}",
        "  ".join(f"p{d['percentage']} {ms(d['latency'])}" for d in report["latencyDistribution"]),
        "status: " + ", ".join(f"{k} {v}" for k, v in report["statusCodeDistribution"].items()),
    ]
    return "\n".join(lines)


def parse_duration(text: str) -> float:
    """'10s', '500ms', '2m' or plain seconds."""
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)

