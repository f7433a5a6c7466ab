"""Prometheus metrics of one server process (`serve --metrics-port`).

API calls by method and status code and their time in the server (counted
where `translate_errors` answers them: health checks and reflection apart),
and, read when scraped, the embedding batcher's work and queue and the
interest engine's catalogue and profile cache. Off unless asked for: nothing
here runs per call then.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from halflife.api.backend import Backend

# Seconds: from a health-check-sized call (~0.5 ms here) to a long bulk embed.
CALL_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    """One process's metrics, in a registry of their own (tests run several
    servers in one process), served over HTTP by `serve`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds
        self._calls = Counter("halflife_rpc_calls", "API calls answered, by method and gRPC status code",
                              ["method", "code"], registry=self.registry)
        self._seconds = Histogram("halflife_rpc_seconds", "Time API calls took in the server, by method",
                                  ["method"], buckets=CALL_SECONDS_BUCKETS, registry=self.registry)
        self._http = None

    def observe(self, method: str, code: str, started: float) -> None:
        """Counts a call to `method` answered with `code` (a grpc.StatusCode
        name), begun at time.perf_counter() `started`."""
        self._calls.labels(method, code).inc()
        self._seconds.labels(method).observe(time.perf_counter() - started)

    def watch(self, backend: Backend) -> None:
        """Reports the backend's batcher and interest engine at each scrape."""
        self.registry.register(_BackendCollector(backend))

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics on host:port (0: a free port) from a thread; returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _BackendCollector:
    """The backend's state, read when scraped (nothing is kept up to date per call)."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def collect(self) -> Iterator[Metric]:
        batcher, interest = self._backend.batcher, self._backend.interest
        if batcher is not None:
            yield GaugeMetricFamily("halflife_embedding_queued_inputs",
                                    "Inputs waiting for the embedding model", batcher.queued_inputs)
            yield CounterMetricFamily("halflife_embedding_batches", "Forward passes the model ran",
                                      batcher.batches_run)
            yield CounterMetricFamily("halflife_embedding_inputs", "Inputs the model embedded",
                                      batcher.inputs_run)
        if interest is not None:
            stats = interest.stats()
            yield GaugeMetricFamily("halflife_catalog_items", "Items in the catalogue", stats["items"])
            yield GaugeMetricFamily("halflife_cached_profiles", "User profiles in the cache",
                                    stats["cached_users"])
