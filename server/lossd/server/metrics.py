"""Prometheus metrics: names `lossd_*`, base units, `_total` counters, labels of low cardinality.

Every metric lives in the `CollectorRegistry` given to `ServerMetrics` (no global state). With
`lossd serve --workers N`, each worker records into prometheus_client's multiprocess files and the
parent serves their aggregate (`multiprocess_registry`), so the numbers stay right across
processes: counters and histograms add up, gauges sum over the live workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import multiprocess as prometheus_multiprocess

__all__ = ["MULTIPROCESS_ENV", "ServerMetrics", "multiprocess_registry", "serve_metrics"]

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's switch to multiprocess mode; `lossd serve --workers N` sets it."""

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_BATCH_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_BATCH_ROW_BUCKETS = (1, 8, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


class ServerMetrics:
    """The server's metrics; also the batcher's `BatchObserver`.

    `device_memory` returns (allocated, reserved) bytes on the compute device, or None off CUDA;
    it is read after each batch.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        build: dict[str, str],
        device_memory: Callable[[], tuple[int, int] | None] | None = None,
    ) -> None:
        self.registry = registry
        self._device_memory = device_memory
        kw: dict[str, Any] = {"registry": registry}
        self.requests = Counter(
            "lossd_requests", "Loss requests answered, by loss and gRPC status code.", ["loss", "code"], **kw
        )
        self.request_seconds = Histogram(
            "lossd_request_duration_seconds",
            "Whole-request latency inside the server, by loss.",
            ["loss"],
            buckets=_LATENCY_BUCKETS,
            **kw,
        )
        self.queue_wait_seconds = Histogram(
            "lossd_queue_wait_seconds",
            "Time requests waited in the batching queue.",
            buckets=_LATENCY_BUCKETS,
            **kw,
        )
        self.compute_seconds = Histogram(
            "lossd_compute_duration_seconds",
            "Time one batch took to compute (device and host work).",
            buckets=_LATENCY_BUCKETS,
            **kw,
        )
        self.batch_requests = Histogram(
            "lossd_batch_requests",
            "Requests merged into one computation.",
            buckets=_BATCH_REQUEST_BUCKETS,
            **kw,
        )
        self.batch_rows = Histogram(
            "lossd_batch_rows",
            "Rows (samples x positions) in one computation.",
            buckets=_BATCH_ROW_BUCKETS,
            **kw,
        )
        self.queue_depth_gauge = Gauge(
            "lossd_queue_depth", "Requests waiting for compute.", multiprocess_mode="livesum", **kw
        )
        self.in_flight = Gauge(
            "lossd_in_flight_requests", "Requests being handled.", multiprocess_mode="livesum", **kw
        )
        self.received_bytes = Counter("lossd_received_bytes", "Bytes of loss requests received.", **kw)
        self.sent_bytes = Counter("lossd_sent_bytes", "Bytes of loss responses sent.", **kw)
        self.dropped_requests = Counter(
            "lossd_dropped_requests", "Requests dropped before compute, by reason.", ["reason"], **kw
        )
        self.nonfinite_requests = Counter(
            "lossd_nonfinite_requests",
            "Requests whose tensors held NaN or infinity, by loss and request field (computed as torch "
            "does, or refused with --reject-nonfinite).",
            ["loss", "field"],
            **kw,
        )
        self.retried_requests = Counter(
            "lossd_retried_requests",
            "Loss calls that arrived as a client's retry of an earlier failed attempt (from any server).",
            **kw,
        )
        self.auth_refusals = Counter(
            "lossd_auth_refusals",
            "Calls refused for a missing or unaccepted bearer token, by reason.",
            ["reason"],
            **kw,
        )
        self.memory_allocated = Gauge(
            "lossd_device_memory_allocated_bytes",
            "Device memory held by tensors (CUDA only).",
            multiprocess_mode="livesum",
            **kw,
        )
        self.memory_reserved = Gauge(
            "lossd_device_memory_reserved_bytes",
            "Device memory reserved by the caching allocator (CUDA only).",
            multiprocess_mode="livesum",
            **kw,
        )
        info = Gauge(
            "lossd_build_info",
            "Always 1; the labels say what runs.",
            sorted(build),
            multiprocess_mode="max",
            **kw,
        )
        info.labels(**build).set(1)
        self._update_memory()

    # -- the servicer's side ------------------------------------------------------------------------

    def request(self, loss: str, code: str, seconds: float, received: int, sent: int) -> None:
        """One answered request."""
        self.requests.labels(loss, code).inc()
        self.request_seconds.labels(loss).observe(seconds)
        self.received_bytes.inc(received)
        if sent:
            self.sent_bytes.inc(sent)

    def nonfinite(self, loss: str, fields: Sequence[str]) -> None:
        """A request with NaN or infinity in `fields` (nothing when empty)."""
        for field in fields:
            self.nonfinite_requests.labels(loss, field).inc()

    def auth_refused(self, reason: str) -> None:
        self.auth_refusals.labels(reason).inc()

    # -- the batcher's side (BatchObserver) ---------------------------------------------------------

    def queue_depth(self, depth: int) -> None:
        self.queue_depth_gauge.set(depth)

    def batch(self, requests: int, rows: int, compute_s: float, queue_waits_s: Sequence[float]) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.compute_seconds.observe(compute_s)
        for wait in queue_waits_s:
            self.queue_wait_seconds.observe(wait)
        self._update_memory()

    def dropped(self, reason: str) -> None:
        self.dropped_requests.labels(reason).inc()

    def _update_memory(self) -> None:
        memory = self._device_memory() if self._device_memory else None
        if memory is not None:
            self.memory_allocated.set(memory[0])
            self.memory_reserved.set(memory[1])


def multiprocess_registry() -> CollectorRegistry:
    """A registry that reads every worker's multiprocess files (for the parent's metrics port)."""
    registry = CollectorRegistry()
    prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def multiprocess_enabled() -> bool:
    """Whether this process records into prometheus_client's multiprocess files."""
    return bool(os.environ.get(MULTIPROCESS_ENV))


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> Callable[[], None]:
    """Serves `registry` over HTTP at host:port/metrics; returns the function that stops it."""
    address = host.strip("[]") if host not in ("[::]", "::") else "::"
    server, thread = start_http_server(port, addr=address, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop
