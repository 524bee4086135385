"""Assembles the gRPC server (loss service, health, reflection) and runs it until a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from lossd.client._version import __version__
from lossd.server.config import ServerConfig
from lossd.server.engine import LossEngine
from lossd.server.servicer import LossServicer
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc

__all__ = ["LOSS_SERVICE", "LossServer", "serve"]

_LOGGER = logging.getLogger("lossd.server")

LOSS_SERVICE: str = pb.DESCRIPTOR.services_by_name["LossService"].full_name
"""'lossd.v1.LossService': the name under which health and reflection report the service."""


class LossServer:
    """One lossd gRPC server: the loss service, the standard health service, server reflection.

    Health reports NOT_SERVING until `start()` has bound the port and set up the device, SERVING
    after, and NOT_SERVING again from the moment `stop()` begins.
    """

    def __init__(self, config: ServerConfig, *, engine: LossEngine | None = None) -> None:
        self.config = config
        self.engine = engine if engine is not None else LossEngine(config.device)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lossd-compute")
        self._health = health_aio.HealthServicer()
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                # gRPC sets SO_REUSEPORT by default, which would let a second server silently share
                # (and steal calls from) a port already in use.
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_LossServiceServicer_to_server(
            LossServicer(self.engine, config.limits, self._executor), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (LOSS_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), self._server
        )
        self.port = 0

    async def start(self) -> int:
        """Binds, starts and reports SERVING; returns the bound port (useful with port 0)."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.port = self._server.add_insecure_port(self.config.address)
        except RuntimeError as exc:  # grpcio reports a failed bind this way
            raise OSError(f"could not bind {self.config.address}: {exc}") from None
        if self.port == 0:
            raise OSError(f"could not bind {self.config.address}")
        await self._server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, then lets in-flight calls finish for `grace` seconds."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.config.shutdown_grace_s if grace is None else grace)
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    async def wait_for_termination(self) -> None:
        """Returns once the server has stopped."""
        await self._server.wait_for_termination()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", LOSS_SERVICE):
            await self._health.set(name, status)


async def serve(config: ServerConfig) -> None:
    """Runs a server until SIGINT or SIGTERM, then drains it within the configured grace period."""
    server = LossServer(config)
    port = await server.start()
    _LOGGER.info(
        "lossd %s serving %s on %s:%d (device %s, torch %s, grpcio %s)",
        __version__,
        LOSS_SERVICE,
        config.host,
        port,
        server.engine.device,
        torch.__version__,
        grpc.__version__,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    _LOGGER.info("lossd stopping: draining for up to %.1f s", config.shutdown_grace_s)
    await server.stop()
    _LOGGER.info("lossd stopped")
