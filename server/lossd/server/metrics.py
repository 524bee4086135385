"""Prometheus metrics: names `lossd_*`, base units, `_total` counters, labels of low cardinality.

Every metric lives in the `CollectorRegistry` given to `ServerMetrics` (no global state). With
`lossd serve --workers N`, each worker records into prometheus_client's multiprocess files and the
parent serves their aggregate (`multiprocess_registry`), so the numbers stay right across
processes: counters and histograms add up, gauges sum over the live workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.exposition import MetricsHandler

_LOGGER = logging.getLogger(__name__)

__all__ = ["MULTIPROCESS_ENV", "ServerMetrics", "multiprocess_registry", "serve_metrics", "start_exporter"]

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


MEMORY_READ_S = 1.0
"""How often a thread of its own reads the device's memory for the gauges."""


class ServerMetrics:
    """The server's metrics; also the batcher's `BatchObserver`.

    `device_memory` returns (allocated, reserved) bytes on the compute device, or None off CUDA;
    `watch_device_memory` reads it every `MEMORY_READ_S` on a thread of its own: each read builds
    torch's whole allocator statistics, which the event loop should not wait for.
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
        self._waits: dict[str, Any] = {}
        self._calls: dict[tuple[str, str], Any] = {}
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
            "Time a loss call (or batch entry) waited in the fair queue before its computation began, "
            "by tenant; once per call: a streamed call's first block.",
            ["tenant"],
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
        self.resident_bytes = Gauge(
            "lossd_resident_bytes",
            "Bytes of resident tensors: uploaded once, named by requests.",
            multiprocess_mode="livesum",
            **kw,
        )
        self.resident_tensors = Gauge(
            "lossd_resident_tensors",
            "Resident tensors held: uploaded once, named by requests.",
            multiprocess_mode="livesum",
            **kw,
        )
        self.resident_events = Counter(
            "lossd_resident_events",
            "Resident tensors' events: upload (a new one held), hit (a request named a held one), miss "
            "(a request named one not held: NOT_FOUND), eviction (let go to make room), delete.",
            ["event"],
            **kw,
        )
        # By tenant: the names in the tenants file, `default` and `unauthenticated`; never a token.
        self.tenant_calls = Counter(
            "lossd_tenant_calls",
            "Calls answered, by tenant and gRPC status code (every method, probes aside).",
            ["tenant", "code"],
            **kw,
        )
        self.tenant_cost = Counter(
            "lossd_tenant_cost_flops",
            "Estimated floating-point operations of the calls admitted, by tenant (the losses' own "
            "estimates from the shapes: the fair queue's measure).",
            ["tenant"],
            **kw,
        )
        self.tenant_refusals = Counter(
            "lossd_tenant_refusals",
            "Calls that failed, by tenant and reason (TENANT_CALLS, TENANT_MEMORY, TENANT_COST_RATE, "
            "CALL_TOO_COSTLY, QUEUE_FULL, MEMORY_EXHAUSTED, TOKEN_INVALID, ..., or the status code "
            "where lossd gave no reason).",
            ["tenant", "reason"],
            **kw,
        )
        self.tenant_resident_bytes = Gauge(
            "lossd_tenant_resident_bytes",
            "Bytes of resident tensors each tenant holds.",
            ["tenant"],
            multiprocess_mode="livesum",
            **kw,
        )
        self.tenant_inflight_bytes = Gauge(
            "lossd_tenant_inflight_bytes",
            "Memory reserved by each tenant's calls in progress (read once a second).",
            ["tenant"],
            multiprocess_mode="livesum",
            **kw,
        )
        self.tenant_calls_in_progress = Gauge(
            "lossd_tenant_calls_in_progress",
            "Each tenant's calls in progress.",
            ["tenant"],
            multiprocess_mode="livesum",
            **kw,
        )
        self.tenants_reloads = Counter(
            "lossd_tenants_reloads",
            "Loads of the tenants (and tokens) files, by result: ok, or error (the last good "
            "configuration stays; the log says why).",
            ["result"],
            **kw,
        )
        self.tenants_config_ok = Gauge(
            "lossd_tenants_config_ok",
            "1 while the tenants files as they are now loaded; 0 after a reload failed (the last good "
            "configuration serves).",
            multiprocess_mode="min",
            **kw,
        )
        self.batch_entries = Counter(
            "lossd_batch_entries",
            "Entries of ComputeLossBatch calls answered, by loss and status code (the calls themselves "
            'count in lossd_requests_total as loss="batch").',
            ["loss", "code"],
            **kw,
        )
        self.implementation = Gauge(
            "lossd_loss_implementation",
            "1 for the implementation chosen at start-up for each loss that has several (Liger Kernel, "
            "cut-cross-entropy, torch.compile or lossd's own torch chunks); the start-up log says why.",
            ["loss", "implementation"],
            multiprocess_mode="max",
            **kw,
        )
        self.implementation_calls = Counter(
            "lossd_loss_implementation_calls",
            "Calls computed by each implementation of a loss that has several: the chosen one, or the "
            "loss's own for calls with options the chosen one lacks.",
            ["loss", "implementation"],
            **kw,
        )
        # Only where there is a device memory to read: a CPU server exports no such gauges (a 0
        # would read as an empty GPU).
        self.memory_allocated: Gauge | None = None
        self.memory_reserved: Gauge | None = None
        if device_memory is not None:
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

    # -- the servicer's side ------------------------------------------------------------------------

    def resident(
        self, tenant: str, event: str, tenant_bytes: int, held_bytes: int, held_tensors: int
    ) -> None:
        """A resident-tensor event (`lossd.server.resident.ResidentStore`) of `tenant`'s and what
        is held after it (by the tenant, and in all)."""
        self.resident_events.labels(event).inc()
        self.resident_bytes.set(held_bytes)
        self.resident_tensors.set(held_tensors)
        if event not in ("hit", "miss"):
            self.tenant_resident_bytes.labels(tenant).set(tenant_bytes)

    def tenant_call(self, tenant: str, code: str, reason: str = "") -> None:
        """One call of `tenant` answered with `code` (and, failed, `reason`)."""
        child = self._calls.get((tenant, code))
        if child is None:
            child = self._calls[tenant, code] = self.tenant_calls.labels(tenant, code)
        child.inc()
        if code != "OK":
            self.tenant_refusals.labels(tenant, reason or code).inc()

    def tenant_holding(self, tenant: str, calls: int, inflight_bytes: int, cost: float) -> None:
        """What `tenant`'s calls in progress hold now, and the estimated cost admitted since the
        last report (read once a second, not per call: each update is a write to a shared file
        with several workers)."""
        self.tenant_calls_in_progress.labels(tenant).set(calls)
        self.tenant_inflight_bytes.labels(tenant).set(inflight_bytes)
        if cost:
            self.tenant_cost.labels(tenant).inc(cost)

    def tenants_reloaded(self, ok: bool) -> None:
        self.tenants_reloads.labels("ok" if ok else "error").inc()
        self.tenants_config_ok.set(1 if ok else 0)

    def batch_entries_answered(self, counts: Mapping[tuple[str, str], int]) -> None:
        """The entries of a ComputeLossBatch call by (loss, code) they were answered with: one
        increment per label pair, not per entry."""
        for (loss, code), count in counts.items():
            self.batch_entries.labels(loss, code).inc(count)

    def implementations(self, chosen: Mapping[str, str]) -> None:
        """The implementation chosen for each loss that has several (loss -> implementation)."""
        for loss, implementation in chosen.items():
            self.implementation.labels(loss, implementation).set(1)

    def implementation_call(self, loss: str, implementation: str, calls: int = 1) -> None:
        """`calls` calls computed by `implementation` (nothing for a loss with one: "")."""
        if implementation:
            self.implementation_calls.labels(loss, implementation).inc(calls)

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

    def batch(
        self, requests: int, rows: int, compute_s: float, queue_waits_s: Sequence[tuple[str, float]]
    ) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.compute_seconds.observe(compute_s)
        for tenant, wait in queue_waits_s:
            child = self._waits.get(tenant)
            if child is None:
                child = self._waits[tenant] = self.queue_wait_seconds.labels(tenant)
            child.observe(wait)

    def dropped(self, reason: str) -> None:
        self.dropped_requests.labels(reason).inc()

    def read_device_memory(self) -> None:
        """Sets the device memory gauges from one read."""
        if self._device_memory is None or self.memory_allocated is None or self.memory_reserved is None:
            return
        memory = self._device_memory()
        if memory is not None:
            self.memory_allocated.set(memory[0])
            self.memory_reserved.set(memory[1])

    def watch_device_memory(self, interval_s: float = MEMORY_READ_S) -> Callable[[], None]:
        """Reads the device's memory every `interval_s` on a daemon thread until the returned
        function is called; nothing off CUDA."""
        if self._device_memory is None:
            return lambda: None
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                try:
                    self.read_device_memory()
                except Exception:  # a failed device: the engine reports it; the gauges keep their value
                    _LOGGER.debug("reading the device's memory failed", exc_info=True)
                stop.wait(interval_s)

        thread = threading.Thread(target=watch, name="lossd-device-memory", daemon=True)
        thread.start()

        def stop_watching() -> None:
            stop.set()
            thread.join(5)

        return stop_watching


def multiprocess_registry() -> CollectorRegistry:
    """A registry that reads every worker's multiprocess files (for the parent's metrics port)."""
    registry = CollectorRegistry()
    prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def multiprocess_enabled() -> bool:
    """Whether this process records into prometheus_client's multiprocess files."""
    return bool(os.environ.get(MULTIPROCESS_ENV))


class _Handler(MetricsHandler):
    timeout = 10.0  # a client that stalls mid-request is dropped (socket timeout)


class _BoundedServer(ThreadingHTTPServer):
    """prometheus_client's HTTP server with bounds: at most `MAX_SCRAPES` connections handled at
    once (more are closed at once), each with a socket timeout, so stalled or flooding clients
    cannot pile up threads."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], family: int) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


MAX_SCRAPES = 8
"""Scrapes served at once by the metrics port; Prometheus needs one."""


def port_error(port: int, reason: object) -> str:
    """Why the metrics port cannot be served, naming the setting that chose it."""
    setting = "--metrics-port, LOSSD_METRICS_PORT; 0 turns metrics off"
    return f"cannot serve metrics on port {port} ({setting}): {reason}"


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> Callable[[], None]:
    """Serves `registry` over HTTP at host:port/metrics; returns the function that stops it."""
    address = host.strip("[]") if host not in ("[::]", "::") else "::"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        server = _BoundedServer((address, port), _Handler.factory(registry), family)
    except OSError as exc:
        raise OSError(port_error(port, exc.strerror or exc)) from None
    thread = threading.Thread(target=server.serve_forever, name="lossd-metrics", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


def _export(host: str, port: int, directory: str, parent: int, ready: Any) -> None:
    """The exporter process: serves the multiprocess files in `directory` until `parent` is gone."""
    os.environ[MULTIPROCESS_ENV] = directory
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it, after its last scrape
    try:
        stop = serve_metrics(multiprocess_registry(), host, port)
    except OSError as exc:
        ready.send(str(exc))
        return
    ready.send("")
    while os.getppid() == parent:
        time.sleep(0.5)
    stop()


def start_exporter(host: str, port: int) -> Callable[[], None]:
    """Serves this process's metrics from a separate process, so that scrapes (whatever their
    number or speed) never take the server's CPU time or its interpreter lock; this process records
    into prometheus_client's multiprocess files, in the directory that `MULTIPROCESS_ENV` names (set
    before prometheus_client was imported). Returns the function that stops the exporter and
    removes the files."""
    directory = os.environ[MULTIPROCESS_ENV]
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=_export, args=(host, port, directory, os.getpid(), send), name="lossd-metrics", daemon=True
    )
    process.start()
    failure = receive.recv() if receive.poll(60) else "the metrics exporter did not start"
    if failure:
        process.kill()
        shutil.rmtree(directory, ignore_errors=True)
        raise OSError(failure)

    def stop() -> None:
        process.terminate()
        process.join(5)
        shutil.rmtree(directory, ignore_errors=True)
        os.environ.pop(MULTIPROCESS_ENV, None)

    return stop
