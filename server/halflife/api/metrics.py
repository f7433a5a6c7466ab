"""Prometheus metrics of one server process (`serve --metrics-port`).

API calls by method and the status code they were answered with, and their
time in the server (counted around everything the server does with a call:
admission, malformed bytes, the handler; health checks and reflection
apart), and, read when scraped, the embedding batcher's work and queue and
the interest engine's catalogue and profile cache. Off unless asked for:
nothing here runs per call then.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import socketserver
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from halflife.api.calls import answer_came_too_late

if TYPE_CHECKING:
    from halflife.api.backend import Backend

log = logging.getLogger(__name__)

# Seconds: from a health-check-sized call (~0.5 ms here) to a long bulk embed.
CALL_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# Seconds a /metrics connection may wait on its client, to read the request or send the answer. The server
# runs a thread per connection, and prometheus_client's waits for good: 700 connections opened and never
# written to held 700 threads for as long as they stayed open, and a client gone without closing (a host
# crashed) one thread for the life of the process. A scrape sends its request at once.
HTTP_TIMEOUT_S = 10.0


class Metrics:
    """One process's metrics, in a registry of their own (tests run several
    servers in one process), served over HTTP from a thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds
        self._calls = Counter("halflife_rpc_calls", "API calls answered, by method and gRPC status code",
                              ["method", "code"], registry=self.registry)
        self._seconds = Histogram("halflife_rpc_duration_seconds", "Time API calls took in the server, by method",
                                  ["method"], buckets=CALL_SECONDS_BUCKETS, registry=self.registry)
        self._http = None

    def counted(self, method: str, behavior: Callable) -> Callable:
        """A unary handler `behavior` whose calls count under `method`
        ("EmbeddingService/Embed") with the code the call was answered with:
        OK, the code of an abort (an API error, admission, malformed bytes),
        or, where grpc ended the call before the handler answered (it
        cancelled the handler, or the abort found the call ended: a client
        gone as the handler was busy), DEADLINE_EXCEEDED once the deadline
        passed, else CANCELLED."""
        seconds = self._seconds.labels(method)

        async def handler(request, context):
            started, code = time.perf_counter(), "UNKNOWN"
            call = behavior(request, context)
            del request  # held by the call alone, which lets go of it before it aborts (errors.translate_errors)
            try:
                response = await call
                code = "OK"
                return response
            except grpc.aio.AbortError:
                code = _code_name(context.code())
                raise
            except (asyncio.CancelledError, grpc.aio.InternalError) as error:
                if isinstance(error, asyncio.CancelledError) or answer_came_too_late(error):
                    # An abort that found the call ended was counted UNKNOWN, a server bug's code (1-2 calls
                    # of a 300-call stress run, their client gone or their deadline passed as the handler answered).
                    remaining = context.time_remaining()
                    code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
                raise
            finally:
                self._calls.labels(method, code).inc()
                seconds.observe(time.perf_counter() - started)

        return handler

    def watch(self, backend: Backend) -> None:
        """Reports the backend's batcher and interest engine at each scrape."""
        self.registry.register(_BackendCollector(backend))

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics on host:port (0: a free port) from a thread; returns the port."""
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsServer", (_MetricsServer,), {"address_family": family})
        self._http = make_server(host, port, make_wsgi_app(self.registry), server_class, _MetricsHandler)
        threading.Thread(target=self._http.serve_forever, name="halflife-metrics", daemon=True).start()
        return self._http.server_address[1]

    def close(self) -> None:
        """Stops serving (waits up to the HTTP server's 0.5 s poll: call it off the event loop)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _MetricsServer(socketserver.ThreadingMixIn, WSGIServer):
    """prometheus_client's server (a daemon thread per connection), whose
    connections that time out (HTTP_TIMEOUT_S) or that the client drops end
    without a traceback on stderr: the client's doing, not the server's."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("metrics: connection from %s ended: %r", client_address, error)
        else:
            super().handle_error(request, client_address)


class _MetricsHandler(WSGIRequestHandler):
    timeout = HTTP_TIMEOUT_S

    def log_message(self, format, *args) -> None:
        """Logs no request."""


def _code_name(code) -> str:
    """A status code as grpc.aio's context.code() gives it (a StatusCode, or its int value), by name."""
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")


class _BackendCollector:
    """The backend's state, read when scraped (nothing is kept up to date per
    call), without the store: a scrape must answer while the store fails."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._failed = False

    def collect(self) -> Iterator[Metric]:
        batcher, interest = self._backend.batcher, self._backend.interest
        if batcher is not None:
            yield GaugeMetricFamily("halflife_embedding_queued_inputs",
                                    "Inputs waiting for the embedding model", batcher.queued_inputs)
            yield GaugeMetricFamily("halflife_embedding_tokenizing_inputs",
                                    "Inputs of Embed calls being tokenized, not queued yet", batcher.tokenizing_inputs)
            yield CounterMetricFamily("halflife_embedding_batches", "Forward passes the model ran",
                                      batcher.batches_run)
            yield CounterMetricFamily("halflife_embedding_inputs", "Inputs the model embedded",
                                      batcher.inputs_run)
            yield CounterMetricFamily("halflife_embedding_forward_seconds",
                                      "Time the model spent in forward passes (its rate: the share of time busy)",
                                      batcher.forward_seconds)
        if interest is not None:
            try:
                sizes = interest.sizes()
            except Exception:  # a bug here must not take the process and call metrics down with it
                if not self._failed:
                    log.exception("metrics: reading the interest engine's sizes failed")
                self._failed = True
                return
            yield GaugeMetricFamily("halflife_catalog_items", "Items in the catalogue", sizes["items"])
            yield GaugeMetricFamily("halflife_cached_profiles", "User profiles in the cache", sizes["cached_users"])
