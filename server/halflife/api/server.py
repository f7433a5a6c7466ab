"""The gRPC server: services, health, reflection, options and graceful shutdown."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import inspect
import logging
import math
import os
import signal
import socket
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from halflife.api.backend import Backend
from halflife.api.calls import answer_came_too_late
from halflife.api.catalog import CatalogServicer
from halflife.api.embedding import EmbeddingServicer
from halflife.api.errors import Received, parse_leniently, refuse_malformed, resource_exhausted
from halflife.api.interest import InterestServicer
from halflife.api.metrics import Metrics
from halflife.api.recommend import RecommendServicer
from halflife.api.reflection import reflection_servicer
from halflife.config import DEFAULT_DATA_DIR, DEFAULT_MAX_REQUESTS_MIB, DEFAULT_MODEL_DIR, Config
from halflife.embedding.batcher import BatchingConfig, DynamicBatcher
from halflife.embedding.engine import EmbeddingEngine
from halflife.embedding.manifest import ManifestError
from halflife.interest.engine import InterestEngine, refuse_other_models_store
from halflife.signals import STOP_SIGNALS, StopSignals
from halflife.storage.sqlite import SqliteStore, stored_vectors
from halflife.texts import readable_character
from halflife_client.client import MAX_STREAMS_PER_CONNECTION, host_port
from halflife.v1 import catalog_pb2, embedding_pb2, interest_pb2, recommend_pb2

log = logging.getLogger(__name__)

# How long a stop waits for queued profile snapshots to be saved (a snapshot
# not saved costs the user's next read a longer replay, nothing more).
SNAPSHOT_SAVE_GRACE_S = 5.0
MiB = 1 << 20


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (tests)
    model_dir: Path = DEFAULT_MODEL_DIR
    data_dir: Path = DEFAULT_DATA_DIR
    variant: str | None = None  # default: the manifest's choice for the provider
    provider: str = "auto"
    intra_op_threads: int | None = None  # default: physical cores
    scan_threads: int | None = None  # threads one Recommend's catalogue scan splits over; default: physical cores
    batching: BatchingConfig = dataclasses.field(default_factory=BatchingConfig)
    halflife: Config = dataclasses.field(default_factory=Config)  # decay, weights, ranking (--config)
    max_concurrent_rpcs: int = 1024  # API calls being handled (see Admission); health and reflection apart
    # Threads the calls' engine work runs on (asyncio's default executor). asyncio's own
    # default is cores + 4: 6 here, which 8 callers replaying long logs (as_of in the past)
    # held for 17 s, while every other call waited for a thread (found by an audit, 2026-12-05).
    call_threads: int = 32
    max_message_bytes: int = 64 * MiB  # above gRPC's 4 MiB default: 256 long inputs or big catalogue batches
    # Requests being handled at once, in bytes on the wire (see Admission). A handler holds several times
    # its request (parsed, its texts as Python strings, rows for the store): 40 upserts of 48 MiB sent at
    # once took the server to 4.6 GiB, 2.7 GiB with this bound (docs/serving.md).
    max_requests_bytes: int = DEFAULT_MAX_REQUESTS_MIB * MiB
    # Answers on one connection that its client has not read yet, in bytes on the wire (see UnreadAnswers).
    max_unread_answer_bytes: int = 64 * MiB
    grace_seconds: float = 30.0  # in-flight RPCs get this long to finish on shutdown
    reuse_port: bool = False  # True only when several worker processes share the port
    follow_store: bool = False  # other processes write to the same store (workers)
    model_identity: str | None = None  # a worker: the model its group serves (EmbeddingEngine.identity)
    metrics_port: int | None = None  # Prometheus /metrics on host:this (0: a free one); None: no metrics

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Keepalive: ping idle connections so dead peers are noticed.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Ping enforcement: clients pinging more often than every 10 s are
            # told off (GOAWAY after 2 strikes) instead of burning CPU.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 2),
            # Explicit: a second server on the same port is an error, not a silent share.
            ("grpc.so_reuseport", int(self.reuse_port)),
            # A call whose request never arrives holds its stream until its deadline, or for good without
            # one: an audit's 1,024 such calls on one connection took every slot, health checks too. Streams
            # are bounded per connection (a client's further calls queue on its side), and connections end:
            # silent ones after 5 min, any after 30 min, with 5 min for the calls in flight (clients
            # reconnect on their own).
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            # grpc's overload protection refuses a new stream (REFUSED_STREAM: UNAVAILABLE) while more than
            # that many calls are allocated, counting those whose handler has not let go of them yet, a while
            # after the client saw them end: a client keeping its connection full, within the limit, had
            # streams refused in that gap (30% of 6,000 Recommends at 256 calls on one connection, 7-61% of
            # Embeds at 200, whose batches end many calls at once; hundreds of a 5,000-call burst past the
            # clients' retries, and a CI failure). Off, the limit on the wire stays, and Admission and
            # grpc's count of calls (the backstop below) bound the handlers any client's streams start.
            ("grpc.http.overload_protection", 0),
            ("grpc.max_connection_idle_ms", 5 * 60_000),
            ("grpc.max_connection_age_ms", 30 * 60_000),
            ("grpc.max_connection_age_grace_ms", 5 * 60_000),
        ]


# The API's services: each one's descriptor and servicer class.
API_SERVICES = (
    (embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"], EmbeddingServicer),
    (catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"], CatalogServicer),
    (interest_pb2.DESCRIPTOR.services_by_name["InterestService"], InterestServicer),
    (recommend_pb2.DESCRIPTOR.services_by_name["RecommendService"], RecommendServicer),
)


def api_service_names() -> list[str]:
    return [service.full_name for service, _ in API_SERVICES]


# grpc's own services, registered the same way as the API's.
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION_SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]

_METHOD_HANDLERS = {  # (client streams, server streams) -> grpc's handler for that kind
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


# Streams (health Watch, reflection) last as long as their client keeps them:
# 1,024 idle Watch streams of one client left every other call
# RESOURCE_EXHAUSTED until they closed (found by an audit, 2026-12-05). Load
# balancers need a few.
MAX_OPEN_STREAMS = 100
# A request to grpc's own services (health, reflection) names a service, a
# file or a symbol: a Watch of a 40 MiB name held ~200 MiB for as long as
# it stayed open, uncounted, and 100 of them could exhaust memory (an audit).
MAX_NAME_REQUEST_BYTES = 64 * 1024
# grpc's own count of calls, from their headers on: a backstop for calls whose
# request never comes (see grpc_options), far above what Admission lets work.
OPEN_CALLS_BACKSTOP_FACTOR = 8


class Admission:
    """Refuses a call (RESOURCE_EXHAUSTED) while `limit` are in its hands:
    the API's unary calls once their request has arrived (grpc's
    maximum_concurrent_rpcs counts a call from its headers, so calls whose
    message never came took every slot and health checks failed: an audit),
    or the server-streaming calls while open. Unary calls are also refused
    while the requests in hand, with theirs, would pass `max_bytes` on the
    wire; one alone is always taken."""

    def __init__(self, limit: int, refusal: str, max_bytes: float = math.inf):
        self.limit = limit
        self.refusal = refusal  # formatted with {open}
        self.max_bytes = max_bytes
        self.open = 0
        self.open_bytes = 0

    def wrap(self, behavior: Callable) -> Callable:
        """`behavior` (refuse_malformed's, of a `Received` request) counted
        while it runs: an async generator (a stream), or a coroutine (a unary
        answer, or a stream written with context.write), whose request's
        bytes count too."""
        if inspect.isasyncgenfunction(behavior):
            async def stream(request, context):
                if (refusal := self._admit(0)) is not None:
                    await context.abort_with_status(refusal)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    self.open -= 1
            return stream

        async def written(received: Received, context):
            size = received.size
            if (refusal := self._admit(size)) is not None:
                # Not held by this frame, which the refusal's traceback holds in a cycle within grpc: a refused
                # request stayed until the garbage collector ran (tests/test_wire.py).
                del received
                await context.abort_with_status(refusal)
            try:
                call = behavior(received, context)
                del received  # held by the call alone, which lets go of it as soon as it can (refuse_malformed)
                return await call
            finally:
                self.open -= 1
                self.open_bytes -= size
        return written

    def _admit(self, size: int) -> grpc.Status | None:
        """Counts in a call whose request has `size` bytes, or returns the status that refuses it."""
        if self.open >= self.limit:
            return resource_exhausted(self.refusal.format(open=self.open)).to_status()
        if self.open and self.open_bytes + size > self.max_bytes:
            return resource_exhausted(
                f"requests of {self.open_bytes / MiB:.3g} MiB are being handled, and this one's {size / MiB:.3g} MiB "
                f"would pass the {self.max_bytes / MiB:.3g} MiB this server takes at once (serve "
                f"--max-requests-mib); retry with backoff, or send smaller requests").to_status()
        self.open += 1
        self.open_bytes += size
        return None


# An answer this small (every write's: counts) never waits for its connection's unread answers, nor is it
# refused for them, only counted: 256 of them, a connection's most, are 256 KiB.
SMALL_ANSWER_BYTES = 1024
# How long an answer that would take its connection's unread answers past their bound waits for room.
UNREAD_ANSWER_WAIT_S = 10.0


class _Unread:
    """One connection's answers that are not sent yet."""

    def __init__(self) -> None:
        self.bytes = 0
        self.sent = asyncio.Event()  # set, and replaced, as one of them is sent (wake)
        self.stalled = False  # one waited in vain for room: further calls are refused until one is sent

    def wake(self) -> None:
        """Wakes the answers waiting for room."""
        woken, self.sent = self.sent, asyncio.Event()
        woken.set()


class UnreadAnswers:
    """Bounds, per connection, the answers its client has not read yet. grpc
    sends a unary answer once its handler returned, and holds it (its bytes
    and core's copy; the message too, before `wrap` serialized it) until
    the client's HTTP/2 flow control takes it, which a stuck client that
    still answers keepalive pings never does: 30 pages of ListItems with
    vectors (56 MB each) asked for on one such connection took a server
    from 1.4 to 6.5 GB until it closed, up to its 35 minutes (a review). An
    answer counts from its handler's return until its call is over (sent,
    or the connection gone: grpc.aio calls a call's done callbacks only
    then). One that would take its connection past `max_bytes` waits for
    the others to be sent (a client that reads, however slowly, only waits
    its turn, as it would in grpc's buffers); when none is for `wait_s`, it
    is dropped, its call RESOURCE_EXHAUSTED, and so are the others waiting
    and the connection's further calls, before any work, until one is
    sent. A call on a connection whose unread answers fill the bound waits
    for room before its work. The connection's only answer, and a small
    one (a write's, whose work is done), never wait once built. Other
    connections are served as before."""

    def __init__(self, max_bytes: float, wait_s: float):
        self.max_bytes = max_bytes
        self.wait_s = wait_s
        self.connections: dict[str, _Unread] = {}  # by context.peer() (one a connection), while any is unsent

    def wrap(self, behavior: Callable) -> Callable:
        """A unary handler `behavior` whose answer counts for its connection,
        and which answers it serialized (register it with no serializer)."""
        async def bounded(request, context):
            peer = context.peer()
            # Before any work: refused on a stalled connection, and on one whose unread answers fill its bound
            # it waits for room (256 calls at once on a stuck one each built its answer, held while it waited:
            # a review).
            if (held := await self._room(peer, lambda unread: not unread.stalled and
                                         unread.bytes < self.max_bytes)) is not None:
                del request  # not held by the refusal's traceback (see Admission.wrap)
                await context.abort_with_status(self._refusal(held, "this call was refused"))
            call = behavior(request, context)
            del request  # held by the call alone
            # Its bytes, as grpc would have made them (add_service): their length for free (ByteSize costs a
            # serialization: 136 ms for a 56 MB page), and the message let go of at once.
            answer = (await call).SerializeToString()
            size = len(answer)
            if (held := await self._room(peer, lambda unread: size <= SMALL_ANSWER_BYTES or
                                         unread.bytes + size <= self.max_bytes)) is not None:
                del answer
                await context.abort_with_status(self._refusal(
                    held, f"this call's answer of {size / MiB:.3g} MiB, which would have passed it, was dropped"))
            unread = self.connections.setdefault(peer, _Unread())
            unread.bytes += size
            context.add_done_callback(lambda _: self._sent(peer, unread, size))
            return answer
        return bounded

    async def _room(self, peer: str, fits: Callable[[_Unread], bool]) -> int | None:
        """Waits until `peer`'s unread answers are none, or `fits` them;
        the bytes they hold once none has been sent for `wait_s` (this
        waiter, and the others, give up: the connection is stalled), else
        None."""
        while True:  # the entry goes once its connection's answers are all sent: looked up after each wait
            unread = self.connections.get(peer)
            if unread is None or not unread.bytes or fits(unread):
                return None
            if unread.stalled:
                return unread.bytes
            sent = unread.sent
            try:
                await asyncio.wait_for(sent.wait(), self.wait_s)
            except TimeoutError:
                if unread.sent is sent:  # none sent meanwhile: this one, and the others waiting, give up
                    unread.stalled = True
                    unread.wake()

    def _sent(self, peer: str, unread: _Unread, size: int) -> None:
        unread.bytes -= size
        unread.stalled = False
        unread.wake()
        if not unread.bytes and self.connections.get(peer) is unread:  # gone already where its answers were empty
            del self.connections[peer]

    def _refusal(self, held: int, outcome: str) -> grpc.Status:
        return resource_exhausted(
            f"answers of {held / MiB:.3g} MiB wait for this connection's client to read them, none read in the last "
            f"{self.wait_s:g} s, and this server holds at most {self.max_bytes / MiB:.3g} MiB for one connection: "
            f"{outcome}; read the answers (a client stuck, or on a slow link?), then retry with backoff").to_status()


def open_streams() -> Admission:
    return Admission(MAX_OPEN_STREAMS, "{open} streams are open (health Watch, reflection), the most this server "
                                       "keeps at once; close one, or poll with health Check")


def api_calls(limit: int, max_bytes: float = math.inf) -> Admission:
    return Admission(limit, "{open} calls are being handled, the most this server takes at once; retry with backoff",
                     max_bytes)


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer,
                streams: Admission | None = None, calls: Admission | None = None,
                metrics: Metrics | None = None, max_request_bytes: float = math.inf,
                answers: UnreadAnswers | None = None) -> None:
    """Registers `servicer` for `service` as the generated `add_*_to_server`
    does, but with a request parser that never raises: grpc.aio parses
    requests before a handler runs and would answer bytes that are not a
    valid message with UNKNOWN and an ERROR traceback; this way they get
    INVALID_ARGUMENT (`refuse_malformed`), the API's RPCs and grpc's health
    and reflection services alike. A method the servicer leaves to its
    generated base class (synchronous, "not implemented") is left out, so
    grpc answers UNIMPLEMENTED without a traceback.
    `streams` counts the server-streaming methods' calls, `calls` the
    unary ones, where given; `answers` bounds the unary calls' answers
    unread on each connection; `metrics` counts and times the unary calls,
    outermost, so that admission's refusals and malformed bytes count too.
    A request over `max_request_bytes` is refused unparsed, INVALID_ARGUMENT."""
    handlers = {}
    for method in service.methods:
        behavior = getattr(servicer, method.name)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            continue
        # GetMessageClass gives the generated class (tests check), as the servicers expect.
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        kind = (method.client_streaming, method.server_streaming)
        checked = refuse_malformed(behavior, *kind)
        admission = streams if method.server_streaming else calls
        if admission is not None:
            checked = admission.wrap(checked)
        serializer = response_class.SerializeToString
        if answers is not None and kind == (False, False):  # before Admission: a refused call takes no slot
            checked, serializer = answers.wrap(checked), None
        if metrics is not None and kind == (False, False):
            checked = metrics.counted(f"{service.name}/{method.name}", checked)
        handlers[method.name] = _METHOD_HANDLERS[kind](
            checked,
            request_deserializer=parse_leniently(request_class, max_request_bytes),
            response_serializer=serializer,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def service_names() -> list[str]:
    return [*api_service_names(), HEALTH_SERVICE.full_name, REFLECTION_SERVICE.full_name]


class _WatchEnded(Exception):
    """Raised out of grpc's health Watch loop once it told its watcher NOT_SERVING at shutdown."""


class _EndAfterNotServing:
    """A Watch's context whose write ends the stream after NOT_SERVING at shutdown."""

    def __init__(self, context, health: "ShutdownHealthServicer"):
        self._context, self._health = context, health

    def __getattr__(self, name):
        return getattr(self._context, name)

    async def write(self, response) -> None:
        # Final if the shutdown had begun when it was sent: a SERVICE_UNKNOWN
        # sent just before, whose write returned after, is followed by the
        # shutdown's NOT_SERVING. A NOT_SERVING is final either way: grpc does
        # not send a status twice, so the shutdown's would never come.
        final = self._health.shutting_down and response.status in _FINAL_STATUSES
        await self._context.write(response)
        if final or (self._health.shutting_down and response.status == health_pb2.HealthCheckResponse.NOT_SERVING):
            raise _WatchEnded


# What a Watch answers last at shutdown: NOT_SERVING, or SERVICE_UNKNOWN to one started then for a name never set.
_FINAL_STATUSES = (health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)


class ShutdownHealthServicer(health.aio.HealthServicer):
    """grpc's health service, but a Watch ends (OK) once it has told its
    watcher NOT_SERVING at shutdown. A Watch never ends by itself, so one
    open stream (Envoy, client-side health checking, grpc-health-probe
    -watch) held every shutdown for the whole grace period: 30 s instead of
    0.1 s idle (found by an audit, 2026-12-05)."""

    shutting_down = False

    def __init__(self) -> None:
        super().__init__()
        self._watched: collections.Counter = collections.Counter()  # service name -> open Watch streams
        self._named = {""}  # the services this server gives a status (List's), not the names only watched

    async def Watch(self, request, context) -> None:
        self._watched[request.service] += 1
        try:
            await super().Watch(request, _EndAfterNotServing(context, self))
        except _WatchEnded:
            pass
        finally:
            self._watched[request.service] -= 1
            if not self._watched[request.service]:
                del self._watched[request.service]

    async def set(self, service: str, status) -> None:
        if not self.shutting_down:  # at shutdown a watched name is set too, to end its Watch
            self._named.add(service)
        await super().set(service, status)

    async def List(self, request, context) -> health_pb2.HealthListResponse:
        """Every service's status at once (health.proto's List, which grpc's
        servicer leaves unimplemented though reflection lists it): "" for
        the server, then each service this server sets; not a name a
        client only watched, which the shutdown sets NOT_SERVING to end its
        Watch (a review)."""
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items() if name in self._named})

    async def enter_graceful_shutdown(self) -> None:
        self.shutting_down = True  # before the watchers wake to NOT_SERVING
        # grpc's turns only the names set so far NOT_SERVING: a watcher of another name would never wake.
        for service in list(self._watched):
            await self.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await super().enter_graceful_shutdown()


class EndedCallAnswers(logging.Filter):
    """For grpc.aio's server logger: drops the ERROR traceback it logs
    ("ExecuteBatchError raised in core by servicer method") for an answer
    that its core could not send because the call had ended there first (the
    client cancelled, closed its channel or went away, or the deadline
    passed), with a DEBUG line instead: the call is over, nothing to act on.

    grpc.aio means to keep quiet then (it checks whether it saw the client
    leave), but its check races the failure: an answer still waiting on the
    client's flow control as the client goes away fails before grpc sees the
    leaving (an ERROR, in grpc's own frames alone, 39 times in 40 that a
    client with 100 answers waiting was killed). A batch that core refused
    outright ("Failed grpc_call_start_batch": a misuse) keeps its ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and answer_came_too_late(record.exc_info[1]):
            log.debug("%s: the call ended before its answer was sent", record.getMessage())
            return False
        return True


GRPC_SERVER_LOGGER = "grpc._cython.cygrpc"  # where grpc.aio's server logs its handlers' failures
_ENDED_CALL_ANSWERS = EndedCallAnswers()


class HalflifeServer:
    """Starts listening at once (health NOT_SERVING), then loads the model,
    the store and the catalogue, and flips health to SERVING."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.port: int | None = None
        self.metrics: Metrics | None = None  # config.metrics_port's, once started
        self.metrics_port: int | None = None  # where /metrics is served
        self.backend = Backend(embedding_write_threads=config.call_threads)
        self.store: SqliteStore | None = None
        self._server: grpc.aio.Server | None = None
        self._health = ShutdownHealthServicer()
        self._calls: concurrent.futures.ThreadPoolExecutor | None = None  # the loop's default executor while serving
        self._servicers = [servicer(self.backend) for _, servicer in API_SERVICES]
        self.unread_answers = UnreadAnswers(config.max_unread_answer_bytes, UNREAD_ANSWER_WAIT_S)
        self._stopping: asyncio.Event | None = None  # start's: set to stop the server from within
        self.failure: str | None = None  # why the server stopped itself (`_model_died`), for serve to exit with
        self._failing: asyncio.Task | None = None  # the health change a failure makes (the loop holds tasks weakly)

    @property
    def embedding(self) -> EmbeddingEngine | None:
        return self.backend.embedding

    @property
    def interest(self) -> InterestEngine | None:
        return self.backend.interest

    async def _set_health(self, status) -> None:
        for name in ("", *api_service_names()):
            await self._health.set(name, status)

    async def start(self, stopping: asyncio.Event | None = None) -> int:
        """Binds, serves health and reflection, loads everything (a worker:
        loads, then binds); returns the port.

        Raises (after closing the port) when the model or the store cannot be loaded.
        Health stays NOT_SERVING where `stopping` was set meanwhile (a signal
        during the load: it turned SERVING, then NOT_SERVING again).
        """
        config = self.config
        self._stopping = stopping
        logging.getLogger(GRPC_SERVER_LOGGER).addFilter(_ENDED_CALL_ANSWERS)  # once: addFilter skips one it has
        if config.metrics_port is not None:  # first: a port in use fails the start before anything else runs
            self.metrics = Metrics()
            self.metrics.watch(self.backend)
            try:
                self.metrics_port = self.metrics.serve(config.host, config.metrics_port)
            except (OSError, OverflowError) as exc:
                self.metrics = None
                raise OSError(f"cannot serve metrics on {host_port(config.host, config.metrics_port)}: {exc}") from None
            log.info("metrics on http://%s/metrics", host_port(config.host, self.metrics_port))
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self._calls = concurrent.futures.ThreadPoolExecutor(config.call_threads, thread_name_prefix="halflife-call")
        asyncio.get_running_loop().set_default_executor(self._calls)
        server = grpc.aio.server(options=config.grpc_options(),
                                 maximum_concurrent_rpcs=OPEN_CALLS_BACKSTOP_FACTOR * config.max_concurrent_rpcs)
        streams, calls = open_streams(), api_calls(config.max_concurrent_rpcs, config.max_requests_bytes)
        for (service, _), servicer in zip(API_SERVICES, self._servicers):
            add_service(server, service, servicer, streams, calls, self.metrics, answers=self.unread_answers)
        add_service(server, HEALTH_SERVICE, self._health, streams, max_request_bytes=MAX_NAME_REQUEST_BYTES)
        add_service(server, REFLECTION_SERVICE, reflection_servicer(service_names()), streams,
                    max_request_bytes=MAX_NAME_REQUEST_BYTES)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # A single server listens first, its health NOT_SERVING while it loads. A worker listens once
        # loaded: the kernel spreads new connections over every listener on the port, and a worker that
        # listened while it (re)loaded answered its share UNAVAILABLE "still loading" (a workers review);
        # its siblings, or the parent's reservation, hold the port meanwhile.
        if not config.reuse_port:
            await self._listen(server)
        await self._load()
        if config.reuse_port:
            await self._listen(server)
        if stopping is None or not stopping.is_set():
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _listen(self, server: grpc.aio.Server) -> None:
        """Binds the port and starts taking calls; OSError (all stopped) where it cannot bind."""
        config = self.config
        # Workers share the port with SO_REUSEPORT, which a probe of ours would have to set too.
        failure = None if config.reuse_port else _bind_failure(config.host, config.port)
        if failure is None:
            try:  # grpcio >= 1.6x raises where older ones returned 0
                self.port = server.add_insecure_port(host_port(config.host, config.port))
            except RuntimeError:
                self.port = 0
            if self.port == 0:
                failure = _bind_failure(config.host, config.port) or f"cannot bind {host_port(config.host, config.port)}"
        if failure is not None:
            await self.stop(grace=0)  # the metrics server, the call threads and what loaded
            raise OSError(failure)
        self._server = server
        await server.start()
        log.info("listening on %s%s", host_port(config.host, self.port),
                 "" if config.reuse_port else " (health NOT_SERVING while loading)")

    async def _load(self) -> None:
        """The model, the store and the interest engine; on failure, everything stopped."""
        config = self.config
        try:
            # The table validation reads non-ASCII texts with (~0.2 s), alongside the model, not at a first call.
            await asyncio.gather(self._load_model(), asyncio.to_thread(readable_character))
            embedding = self.backend.embedding
            # Refused before the open migrates the store or the feed is pruned: a refused start changes nothing.
            refuse_other_models_store(*await asyncio.to_thread(stored_vectors, config.data_dir), embedding.dimension,
                                      embedding.named_vector_space, embedding.former_vector_spaces)
            self.store = await asyncio.to_thread(SqliteStore, config.data_dir)
            if not config.follow_store:  # alone on the store (a workers group's parent prunes for its workers)
                await asyncio.to_thread(self.store.prune_change_feed)
            self.backend.interest = await asyncio.to_thread(
                InterestEngine, config.halflife, self.store, embedding.dimension,
                self.backend.embed_blocking, follow_store=config.follow_store, scan_threads=config.scan_threads,
                embedder_id=embedding.identity,
                vector_space=embedding.named_vector_space, former_vector_spaces=embedding.former_vector_spaces,
            )
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _load_model(self) -> None:
        config = self.config
        engine = await asyncio.to_thread(
            EmbeddingEngine.load,
            config.model_dir,
            variant=config.variant,
            provider=config.provider,
            intra_op_threads=config.intra_op_threads,
        )
        if config.model_identity is not None and engine.identity != config.model_identity:
            # A worker started again after its group started must embed as its siblings do.
            raise ManifestError(f"{config.model_dir} changed since this worker's group started (the group serves "
                                f"model {config.model_identity[:12]}, the directory now holds "
                                f"{engine.identity[:12]}): restart the group to serve it")
        await asyncio.to_thread(engine.warm_up)
        manifest = engine.manifest
        batching = config.batching
        if batching.max_batch_tokens is None:
            batching = dataclasses.replace(batching, max_batch_tokens=engine.batch_tokens)
        log.info(
            "loaded %s from %s: variant %s (%s), %d-d, %s pooling, max %d tokens, provider %s, "
            "batches of at most %d padded tokens",
            manifest.model_id,
            config.model_dir,
            engine.variant.name,
            engine.variant.precision,
            manifest.dimension,
            manifest.pooling,
            manifest.max_input_tokens,
            engine.provider,
            batching.max_batch_tokens,
        )
        batcher = DynamicBatcher(engine.forward, batching, on_idle=engine.release_memory, on_death=self._model_died)
        batcher.start()
        self.backend.attach(engine, batcher, asyncio.get_running_loop())

    def _model_died(self, exc: BaseException) -> None:
        """The model thread died: the server embeds nothing any more, so it
        says NOT_SERVING and stops, for `serve` to exit with a failure that
        its supervisor (or its --workers parent) starts it again after. It
        stayed SERVING, every text answered UNAVAILABLE, for good (a review).
        On the event loop."""
        if self._stopping is not None and self._stopping.is_set():  # in a stop asked for: it ends as asked
            log.error("the embedding model's thread died while the server stopped (%r)", exc)
            return
        self.failure = f"the embedding model's thread died ({exc!r}): stopped, to be started again"
        log.error("%s", self.failure)
        self._failing = asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        if self._stopping is not None:
            self._stopping.set()

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets in-flight ones finish within `grace` seconds."""
        grace = self.config.grace_seconds if grace is None else grace
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.backend.batcher is not None:
            await self.backend.batcher.stop()
        if self.backend.interest is not None:  # profile snapshots queued by the last calls, briefly
            await asyncio.to_thread(self.backend.interest.snapshots.close, SNAPSHOT_SAVE_GRACE_S)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
            self.store = None
        # Last: scrapes read no store (InterestEngine.sizes), and a drain is when they are wanted (closed
        # first, /metrics was down for the whole grace period, and NOT_SERVING came up to 0.5 s later: a review).
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
        self.backend.close()
        if self._calls is not None:
            self._calls.shutdown(wait=False)  # idle by now; its threads end
            self._calls = None


def _bind_failure(host: str, port: int) -> str | None:
    """Why host:port cannot be bound, or None where it can: a bind of each
    address the host resolves to (SO_REUSEADDR, as gRPC's listeners; like
    gRPC, one that binds will do). Asked before gRPC tries: gRPC's failure
    says no more than that it failed, and its C core logs a raw line of its
    own before serve's error (a newcomer's review); a name that does not
    resolve was reported as a port in use (an operations review). Unlike
    gRPC, "::" whose port another socket holds on IPv6 is refused: gRPC fell
    back to 0.0.0.0 and served IPv4 alone, which nobody asked for."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        return f"cannot bind {host_port(host, port)}: {host!r} does not resolve ({e.strerror or e})"
    reasons = []
    for family, kind, protocol, _, address in addresses:
        try:
            with socket.socket(family, kind, protocol) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
            return None
        except OSError as e:
            reasons.append(e.strerror or str(e))
    return f"cannot bind {host_port(host, port)}: {'; '.join(dict.fromkeys(reasons))}"


class ServingFailedError(Exception):
    """The server stopped itself: a part it cannot serve without failed."""


async def serve(config: ServerConfig, parent_pid: int | None = None, ready_fd: int | None = None) -> None:
    """Runs until SIGTERM, SIGINT or SIGHUP (or, for a worker, until the process with
    `parent_pid` that started it has died), then shuts down gracefully. A
    worker writes to `ready_fd`, its pipe to that parent, once it serves.
    Raises ServingFailedError, once stopped, where the server stopped itself."""
    server = HalflifeServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    signals = StopSignals()

    def on_signal(signum: int) -> None:
        if not signals.count(signum):  # the same stop delivered twice
            return
        if len(signals.counted) == 1:
            stop.set()
            return
        if parent_pid is not None:  # a worker: its parent decides (a group-wide signal reaches it twice)
            return
        # A second signal: the operator will not wait for the grace period. Acknowledged writes are on
        # disk already (as after a kill -9); calls in flight end without an answer.
        log.warning("%s again: exiting now, without finishing in-flight calls", signal.Signals(signum).name)
        logging.shutdown()
        os._exit(128 + signum)

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    # Kept referenced until shutdown: the event loop holds tasks only weakly.
    watch = asyncio.create_task(_stop_when_orphaned(parent_pid, stop)) if parent_pid is not None else None
    port = await server.start(stop)
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"1")
        except BrokenPipeError:  # the parent died while this worker loaded: it exited 1 on "Broken pipe", unstopped
            _orphaned(stop)
        finally:
            os.close(ready_fd)
    # Logged once the parent knows: a worker killed after this line is one that served, and is started again.
    if not stop.is_set():
        # The store it serves, as a path from /: nothing else named it once a start had no migration to log,
        # and the default (var/data) is relative to a working directory a supervisor picks (a review).
        log.info("serving on %s, data in %s", host_port(config.host, port), config.data_dir.resolve())
    await stop.wait()
    if watch is not None:
        watch.cancel()
    log.info("shutting down: finishing in-flight calls (up to %.0f s)", config.grace_seconds)
    await server.stop()
    log.info("stopped")
    if server.failure is not None:
        raise ServingFailedError(server.failure)


async def _stop_when_orphaned(parent_pid: int, stop: asyncio.Event) -> None:
    """A worker whose parent was killed (SIGKILL forwards nothing) stops too."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            _orphaned(stop)
        await asyncio.sleep(1.0)


def _orphaned(stop: asyncio.Event) -> None:
    """Stops a worker whose parent is gone (once)."""
    if not stop.is_set():
        log.warning("the process that started this worker is gone; stopping")
        stop.set()
