"""`halflife loadtest`: an asyncio gRPC load generator with ghz's flags and JSON report.

    halflife loadtest --call halflife.v1.EmbeddingService.Embed \\
        --data '{"inputs": ["hello"]}' --concurrency 32 --total 2000

    halflife loadtest --config clients/ghz/recommend.json

Requests are given as proto3 JSON (the mapping ghz and grpcurl use) and
resolved against the generated descriptors, so every Halflife RPC and the
health check can be driven. ghz config files work as they are, including
ghz's per-request template variables ({{.RequestNumber}},
{{.TimestampUnix}}, {{.TimestampUnixNano}}, {{.UUID}}). Bounded in count and
time, and loopback only unless --allow-remote.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import ipaddress
import json
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
from google.protobuf import descriptor_pool, json_format, message_factory

import halflife.v1.catalog_pb2  # noqa: F401  (registers the descriptors)
import halflife.v1.embedding_pb2  # noqa: F401
import halflife.v1.interest_pb2  # noqa: F401
import halflife.v1.recommend_pb2  # noqa: F401
from grpc_health.v1 import health_pb2  # noqa: F401

MAX_DURATION_S = 600.0
MAX_TOTAL = 10_000_000
DEFAULT_TOTAL = 200  # ghz's -n when neither a total nor a duration is given
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)


class LoadTestError(ValueError):
    pass


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


def method_descriptor(call: str):
    service, sep, name = call.replace("/", ".").rpartition(".")
    if not sep:
        raise LoadTestError(f"--call {call!r}: expected package.Service.Method")
    try:
        return descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        raise LoadTestError(f"--call {call!r}: no such method in Halflife's API or grpc.health.v1") from None


def _check_target(target: str, allow_remote: bool) -> None:
    host = target.rsplit(":", 1)[0].strip("[]")
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise LoadTestError(f"--target {target} is not a loopback address; pass --allow-remote to load it")


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
            raise LoadTestError(f"data does not fit {method.input_type.full_name}: {exc}") from None

    if not _TEMPLATE.search(data):
        fixed = parse(data)
        return lambda n: fixed
    parse(_render(data, 0))  # fail before the load starts, not during it
    return lambda n: parse(_render(data, n))


def options_from_ghz_config(path: Path, **overrides) -> LoadTestOptions:
    """LoadTestOptions from a ghz JSON config file; keyword overrides win."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise LoadTestError(f"cannot read ghz config {path}: {exc}") from None
    duration = config.get("duration")
    values = {
        "call": config["call"],
        "data": json.dumps(config.get("data", {})),
        "target": config.get("host", LoadTestOptions.target),
        "concurrency": config.get("concurrency", LoadTestOptions.concurrency),
        "total": config.get("total"),
        "duration": parse_duration(duration) if duration else None,
        "connections": config.get("connections", LoadTestOptions.connections),
        "rps": float(config.get("rps", 0)),
        "timeout": parse_duration(config["timeout"]) if "timeout" in config else LoadTestOptions.timeout,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return LoadTestOptions(**values)


async def run_load_test(options: LoadTestOptions) -> dict:
    """Runs the load; returns a ghz-shaped report (durations in nanoseconds)."""
    if options.concurrency < 1 or options.connections < 1:
        raise LoadTestError("--concurrency and --connections must be at least 1")
    if (options.total is not None and options.total < 1) or (options.duration is not None and options.duration <= 0):
        raise LoadTestError("--total and --duration must be positive")
    if options.total is not None:
        total = min(options.total, MAX_TOTAL)
    else:
        total = MAX_TOTAL if options.duration is not None else DEFAULT_TOTAL
    duration = min(options.duration or MAX_DURATION_S, MAX_DURATION_S)
    _check_target(options.target, options.allow_remote)
    method = method_descriptor(options.call)
    make_request = request_factory(method, options.data)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    channels = [
        # Distinct channel args keep gRPC from sharing one TCP connection.
        grpc.aio.insecure_channel(options.target, options=[("halflife.loadtest.connection", i)])
        for i in range(options.connections)
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

    async def worker(index: int) -> None:
        nonlocal issued
        call = calls[index % len(calls)]
        while issued < total and time.perf_counter() < deadline:
            n = issued
            issued += 1
            if options.rps > 0:
                wait = started + n / options.rps - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            request = make_request(n)
            begin = time.perf_counter_ns()
            try:
                await call(request, timeout=options.timeout)
                statuses["OK"] += 1
            except grpc.aio.AioRpcError as error:
                statuses[error.code().name] += 1
                errors[f"rpc error: code = {error.code().name} desc = {error.details()}"] += 1
            latencies.append(time.perf_counter_ns() - begin)

    try:
        await asyncio.gather(*(worker(i) for i in range(options.concurrency)))
    finally:
        for channel in channels:
            await channel.close()
    elapsed_ns = int((time.perf_counter() - started) * 1e9)
    lat = np.array(latencies, dtype=np.int64)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "options": {"call": path.lstrip("/"), "target": options.target, "concurrency": options.concurrency,
                    "connections": options.connections, "rps": options.rps, "total": options.total,
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

