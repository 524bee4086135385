"""Assembles the gRPC server (loss service, health, reflection) and runs it until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from prometheus_client import CollectorRegistry

from lossd.server.admission import Admission
from lossd.server.batcher import Batcher, BatchLimits
from lossd.server.config import RECEIVE_WINDOW, ServerConfig
from lossd.server.engine import LossEngine, resolve_device
from lossd.server.engine.faults import DeviceFailure
from lossd.server.losses import LossCall, LossOutput
from lossd.server.memory import MemoryBudget
from lossd.server.metrics import ServerMetrics, multiprocess_enabled, serve_metrics
from lossd.server.resident import ResidentInfo, ResidentStore, finiteness, load_tensor
from lossd.server.rpc.auth import HEALTH_METHODS, Authenticator
from lossd.server.rpc.guard import HandlerCollector, guarded
from lossd.server.rpc.lifecycle import Lifecycle
from lossd.server.rpc.servicer import LossServicer
from lossd.server.tenants import Tenant, TenantDirectory
from lossd.v1 import loss_service_pb2 as pb
from lossd.wire import codec
from lossd.wire.resident import content_id
from lossd.wire.version import __version__

__all__ = ["LOSS_SERVICE", "LossServer", "serve"]

TENANTS_POLL_S = 0.5
"""How often the tenants and tokens files are looked at for changes (a reload takes effect within
this, plus the load)."""
TENANTS_REPORT_S = 1.0
"""How often the tenants' gauges and cost counter are brought up to date."""

CONTROL_MESSAGES = 16
"""Messages that health checks, reflection and metadata calls may be receiving at once."""

INLINE_BYTES = 16 * 1024
"""Batches of at most this many request bytes compute on the event loop (CPU only; see
`lossd.server.batcher.BatchLimits.inline_bytes`)."""

_LOGGER = logging.getLogger("lossd.server")

LOSS_SERVICE: str = pb.DESCRIPTOR.services_by_name["LossService"].full_name
"""'lossd.v1.LossService': the name under which health and reflection report the service."""
OPEN_INFERENCE_PROBES = frozenset(
    f"/inference.GRPCInferenceService/{method}" for method in ("ServerLive", "ServerReady", "ModelReady")
)
"""The Open Inference Protocol's probes, open like health checks (`--health-without-auth`)."""


class LossServer:
    """One lossd gRPC server: the loss service, the standard health service, server reflection.

    Health reports NOT_SERVING until `start()` has bound the port and set up the device, SERVING
    after, and NOT_SERVING again from the moment `stop()` begins, or from the moment the device
    fails for good: then every queued and later call fails `UNAVAILABLE` and `failed` is set, for
    `serve()` to stop and exit non-zero.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        engine: LossEngine | None = None,
        registry: CollectorRegistry | None = None,
        reuse_port: bool = False,
    ) -> None:
        """Builds the server; call `start()` from the event loop that will run it.

        `registry` receives the metrics (a fresh one by default); `reuse_port` lets several
        worker processes share the port (`lossd serve --workers`).
        """
        self.config = config
        self.engine = (
            engine
            if engine is not None
            else LossEngine(config.device, torch_threads(config), reject_nonfinite=config.reject_nonfinite)
        )
        self.failure: DeviceFailure | None = None
        self.failed = asyncio.Event()
        self.metrics = ServerMetrics(
            registry if registry is not None else CollectorRegistry(),
            build=_build_info(self.engine.device),
            device_memory=_memory_probe(self.engine.device),
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lossd-compute")
        # Large computations, and decoding and encoding large messages, run on threads of their own
        # at a lower CPU priority: the event loop and small calls go first when cores are short.
        self._large_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="lossd-compute-large", initializer=yield_cpu
        )
        self._wire = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lossd-wire", initializer=yield_cpu)
        # Probes and metadata calls (health, reflection, Open Inference metadata) get a budget of
        # their own, so that they answer while loss calls fill theirs.
        control = min(CONTROL_MESSAGES * config.max_message_bytes, config.admitted_bytes // 8)
        self.control_budget = MemoryBudget(control, admission_wait_s=config.admission_wait_s)
        self.budget = MemoryBudget(config.admitted_bytes - control, admission_wait_s=config.admission_wait_s)
        engine_ = self.engine
        self.batcher: Batcher[LossCall[Any], LossOutput] = Batcher(
            run=lambda calls: engine_.compute_batch(calls, merge=config.batching),
            key=engine_.merge_key,
            cost=engine_.cost,
            limits=BatchLimits(
                merge=config.batching,
                max_rows=config.max_batch_rows,
                max_bytes=config.max_batch_bytes,
                max_queue_delay_s=config.max_queue_delay_us / 1e6,
                max_queue_size=config.max_queue_size,
                slice_s=config.fair_slice_us / 1e6,
                # On the CPU a tiny call computes in tens of microseconds, less than handing it to
                # the compute thread and back; on a GPU copies and synchronisation stay off the loop.
                inline_bytes=INLINE_BYTES if self.engine.device.type == "cpu" else 0,
            ),
            executor=self._executor,
            large_executor=self._large_executor,
            observer=self.metrics,
            on_failure=self._on_batch_failure,
            work=engine_.work,
        )
        self._stop_metrics: Callable[[], None] | None = None
        self._stop_memory_watch: Callable[[], None] = lambda: None
        self._health = health_aio.HealthServicer()
        self._serving = False
        self.tenants = TenantDirectory(
            config.tenants_file, config.auth_token, config.auth_token_file, self.metrics.tenants_reloaded
        )
        self.metrics.tenants_reloaded(True)
        probes = HEALTH_METHODS | (OPEN_INFERENCE_PROBES if config.open_inference else frozenset())
        open_methods = probes if config.health_without_auth else frozenset()
        self.auth = Authenticator(self.tenants, on_refusal=self.metrics.auth_refused)
        self._watching: asyncio.Task[None] | None = None
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_concurrent_streams", config.max_concurrent_streams),
                # What a client can make gRPC hold before lossd admits its call: with window probing
                # off, RECEIVE_WINDOW per call, for max_concurrent_streams calls on each of at most
                # `connections` connections (see ServerConfig.admitted_bytes). Once lossd reads a
                # call, the window opens to the message being read.
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW),
                ("grpc.max_allowed_incoming_connections", config.connections),
                # Find dead clients (ping every minute), and let live ones ping us every 10 s or
                # more, idle or not, as lossd's client does to find dead servers.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_pings_without_data", 0),
                *_connection_age(config),
                # gRPC sets SO_REUSEPORT by default, which would let a second server silently share
                # (and steal calls from) a port already in use; only workers share on purpose.
                ("grpc.so_reuseport", 1 if reuse_port else 0),
            ],
        )
        self.lifecycle = Lifecycle(
            self.engine,
            self.batcher,
            config.limits,
            self.metrics,
            chunk_bytes=config.stream_chunk_bytes,
            max_request_s=config.max_request_s,
            idle_timeout_s=config.idle_timeout_s,
            budget=self.budget,
            max_message_bytes=config.max_message_bytes,
            wire=self._wire,
            resident=ResidentStore(
                config.resident_bytes,
                config.resident_policy,
                self.metrics.resident,
                self.engine.keep_resident,
                quota=self._resident_quota,
            ),
            auth=self.auth,
            admission=Admission(config.max_call_cost),
        )
        LossServicer(
            self.lifecycle, block_bytes=config.stream_block_bytes, max_batch_entries=config.max_batch_entries
        ).add_to_server(self._server, LOSS_SERVICE)
        self._services = [LOSS_SERVICE]
        if config.open_inference:
            # Imported only when served: its messages share names with other OIP clients' code.
            from lossd.server.rpc.open_inference import INFERENCE_SERVICE, InferenceServicer

            InferenceServicer(
                self.lifecycle, lambda: self._serving, self.control_budget, open_methods
            ).add_to_server(self._server)
            self._services.append(INFERENCE_SERVICE)
        # Health and reflection under the same budget and idle timeout as every other call.
        collector = HandlerCollector()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, collector)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer((*self._services, HEALTH_SERVICE, reflection.SERVICE_NAME)),
            collector,
        )
        self._server.add_generic_rpc_handlers(
            (guarded(self.lifecycle, collector.handlers, self.control_budget, open_methods),)
        )
        self.port = 0
        self.warm_up_s = 0.0

    def _resident_quota(self, tenant: Tenant) -> int:
        """What a tenant's resident tensors may hold: its `max_resident_bytes`, else its weight's
        share of the server's (all of it for a server of one tenant)."""
        if tenant.max_resident_bytes is not None:
            return tenant.max_resident_bytes
        tenancy = self.tenants.tenancy
        total = tenancy.total_weight if tenant.name in tenancy.tenants else 0.0
        if total <= tenant.weight:
            return self.config.resident_bytes
        return int(self.config.resident_bytes * tenant.weight / total)

    def reload_tenants(self) -> bool:
        """Reads the tenants (and tokens) files again (SIGHUP); False keeps the last good ones."""
        return self.tenants.reload()

    async def _watch_tenants(self) -> None:
        """Reloads the tenants within `TENANTS_POLL_S` of a change to their files, and reports the
        tenants' metrics every `TENANTS_REPORT_S`."""
        ticks = 0
        while True:
            await asyncio.sleep(TENANTS_POLL_S)
            ticks += 1
            try:
                if ticks % round(TENANTS_REPORT_S / TENANTS_POLL_S) == 0:
                    self.lifecycle.report_tenants()
                if self.tenants.watched and await asyncio.to_thread(self.tenants.changed):
                    self.tenants.reload()
            except Exception:  # a watcher that dies would leave keys unrotated: log and go on
                _LOGGER.exception("watching the tenants file failed")

    def _load_shared(self) -> None:
        """Loads the operator's shared tensors (start-up: a file that does not load fails it)."""
        for item in self.tenants.tenancy.shared:
            tensor = load_tensor(item.path)
            array, dtype = codec.to_wire(tensor, f"shared.{item.name}")
            shape = tuple(int(d) for d in tensor.shape)
            info = ResidentInfo(
                content_id(dtype, shape, codec.wire_view(array)),
                dtype,
                shape,
                tensor.nbytes,
                *finiteness(tensor),
            )
            shared = self.lifecycle.resident.share(self.engine.keep_resident(tensor), info, item.tenants)
            _LOGGER.info(
                "shared tensor %s (%s, %s) from %s for %s: %s",
                item.name,
                tensor.dtype,
                list(shape),
                item.path,
                ", ".join(sorted(item.tenants)) or "no tenant",
                shared.id,
            )

    @property
    def services(self) -> list[str]:
        """Every gRPC service on the port: lossd's, the Open Inference Protocol's if on, health
        and reflection."""
        return [*self._services, HEALTH_SERVICE, reflection.SERVICE_NAME]

    async def start(self) -> int:
        """Binds, starts and reports SERVING; returns the bound port (useful with port 0)."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            if self.config.tls:
                self.port = self._server.add_secure_port(self.config.address, server_credentials(self.config))
            else:
                self.port = self._server.add_insecure_port(self.config.address)
        except RuntimeError as exc:  # grpcio reports a failed bind this way
            raise OSError(f"could not bind {self.config.address}: {exc}") from None
        if self.port == 0:
            raise OSError(f"could not bind {self.config.address}")
        if self.config.metrics_port and not multiprocess_enabled():
            self._stop_metrics = serve_metrics(
                self.metrics.registry, self.config.host, self.config.metrics_port
            )
        # The device computes each loss once before the server says SERVING: a broken device fails
        # the start, and no caller pays for the CUDA context and the kernels' first load.
        started = time.perf_counter()
        self.engine.limit_memory(self.config.device_memory_share)
        await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.warm_up)
        self.warm_up_s = time.perf_counter() - started
        self.metrics.implementations(
            {loss: choice.chosen.name for loss, choice in self.engine.choices.items()}
        )
        self._stop_memory_watch = self.metrics.watch_device_memory()
        await asyncio.to_thread(self._load_shared)
        self._watching = asyncio.get_running_loop().create_task(self._watch_tenants())
        self.batcher.start()
        await self._server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._serving = True
        return self.port

    async def stop(self, grace: float | None = None) -> int:
        """NOT_SERVING at once and new calls refused, then lets the calls in progress (queued or
        computing) finish for `grace` seconds; returns how many were still unfinished then."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        self._serving = False
        if self._watching is not None:
            self._watching.cancel()
            self._watching = None
        await self._health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self._server.stop(grace))
        deadline = time.monotonic() + grace
        self.lifecycle.grace_ends = deadline
        while self.lifecycle.active and not stopping.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await stopping
        # Calls cancelled at the end of the grace period have finished (CANCELLED) by now.
        unfinished = self.lifecycle.cut_off + self.lifecycle.active
        await self.batcher.close()
        for executor in (self._executor, self._large_executor, self._wire):
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(self._stop_memory_watch)
        if self._stop_metrics is not None:
            await asyncio.to_thread(self._stop_metrics)
            self._stop_metrics = None
        return unfinished

    def _on_batch_failure(self, error: Exception) -> None:
        """A computation failed as a whole; if the device is gone, stop serving at once."""
        if not isinstance(error, DeviceFailure) or self.failure is not None:
            return
        _LOGGER.critical("%s; refusing every call and exiting", error.message, exc_info=error.__cause__)
        self.failure = error
        self._serving = False
        self.lifecycle.fail(error)
        self.batcher.abort(error)
        asyncio.get_running_loop().create_task(self._health.enter_graceful_shutdown())
        self.failed.set()

    async def wait_for_termination(self) -> None:
        """Returns once the server has stopped."""
        await self._server.wait_for_termination()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", *self._services):
            await self._health.set(name, status)


BACKGROUND_NICENESS = 10
"""How much lower than the event loop's the large-work threads' CPU priority is (Linux nice)."""


def yield_cpu() -> None:
    """Lowers the calling thread's CPU priority (Linux: niceness is per thread); elsewhere, or
    where it is not allowed, nothing changes."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)


def _connection_age(config: ServerConfig) -> list[tuple[str, int]]:
    """GOAWAY after max_connection_age_s (with some jitter from gRPC), then as long as the longest
    call may take for the calls in progress: clients reconnect and ask DNS again."""
    if not config.max_connection_age_s:
        return []
    grace = config.max_request_s or 3600.0
    return [
        ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(grace * 1000)),
    ]


def _read(path: str, setting: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise OSError(f"{setting} {path!r} cannot be read: {exc.strerror}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    """TLS from the config's PEM files; with a client CA, mutual TLS (a client certificate it signed
    is required)."""
    key = _read(config.tls_key_file, "tls_key_file")
    chain = _read(config.tls_cert_file, "tls_cert_file")
    client_ca = _read(config.tls_client_ca_file, "tls_client_ca_file") if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def torch_threads(config: ServerConfig) -> int:
    """Intra-op threads for large computations: the setting, or by default every core but one on
    the CPU (that one keeps the event loop and small calls going while a large computation runs)
    and one with CUDA (small computations always use one; see `LossEngine`)."""
    if config.torch_threads:
        return config.torch_threads
    if resolve_device(config.device).type == "cuda":
        return 1
    return max(1, (os.cpu_count() or 1) - 1)


def _build_info(device: torch.device) -> dict[str, str]:
    return {
        "version": __version__,
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "device": device.type,
    }


def _memory_probe(device: torch.device) -> Callable[[], tuple[int, int] | None] | None:
    if device.type != "cuda":
        return None
    return lambda: (torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


DEVICE_FAILED_EXIT = 3
"""`lossd serve`'s exit status after its device failed for good (a supervisor should restart it)."""


async def serve(config: ServerConfig, *, worker: str = "", engine: LossEngine | None = None) -> int:
    """Runs a server until SIGINT or SIGTERM, then drains it within the configured grace period;
    returns the exit status: 0, or `DEVICE_FAILED_EXIT` if the device failed.

    `worker` ("2/4") marks one of several processes sharing the port (`lossd serve --workers`);
    `engine` replaces the default one (fault-injection tests).
    """
    # Signals are ours from the start: a SIGTERM during start-up drains (nothing) and exits 0.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    threads = torch_threads(config)
    torch.set_num_threads(1)  # until a large computation asks for more
    server = LossServer(config, engine=engine, reuse_port=bool(worker))
    loop.add_signal_handler(signal.SIGHUP, server.reload_tenants)
    port = await server.start()
    # Everything allocated so far lives as long as the process: keep the collector from walking
    # torch's and gRPC's hundred thousand objects again and again under load.
    gc.collect()
    gc.freeze()
    _LOGGER.info(
        "lossd %s serving %s on %s:%d (device %s, torch %s, grpcio %s, batching %s, %d torch threads%s)",
        __version__,
        LOSS_SERVICE,
        config.host,
        port,
        server.engine.device,
        torch.__version__,
        grpc.__version__,
        "on" if config.batching else "off",
        threads,
        f", worker {worker} pid {os.getpid()}" if worker else "",
    )
    _LOGGER.info(
        "lossd also serves %s on that port; metrics %s; memory budget %d MiB, messages up to %d MiB; "
        "device warmed up in %.2f s",
        ", ".join(name for name in server.services if name != LOSS_SERVICE),
        f"on http://{config.host}:{config.metrics_port}/metrics" if config.metrics_port else "off",
        config.memory_bytes >> 20,
        config.max_message_bytes >> 20,
        server.warm_up_s,
    )
    for loss, choice in server.engine.choices.items():
        _LOGGER.info("%s computed by %s (%s)", loss, choice.chosen.name, choice.describe())
    waits = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(server.failed.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    if server.failure is not None:
        # Nothing more can be computed: answer what is in progress (UNAVAILABLE) and go.
        await server.stop(min(config.shutdown_grace_s, 1.0))
        _LOGGER.critical("lossd exiting with status %d: its device failed", DEVICE_FAILED_EXIT)
        return DEVICE_FAILED_EXIT
    _LOGGER.info(
        "lossd stopping: health NOT_SERVING, new calls refused, %d in progress get up to %.1f s",
        server.lifecycle.active,
        config.shutdown_grace_s,
    )
    unfinished = await server.stop()
    answered = server.lifecycle.answered
    _LOGGER.info(
        "lossd stopped: %d calls ended (%s); %d of them cut off at the end of the grace period",
        sum(answered.values()),
        ", ".join(f"{code} {count}" for code, count in sorted(answered.items())) or "none",
        unfinished,
    )
    return 0
