"""Fixtures: a real lossd server on an ephemeral loopback port, and clients for it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import grpc
import pytest
import torch

from lossd.client import LossClient
from lossd.server.app import LossServer
from lossd.server.config import ServerConfig
from lossd.server.engine import LossEngine

pytest_plugins = ["processes"]  # the serve_process fixture


class RunningServer:
    """A `LossServer` serving from its own event loop in a background thread."""

    def __init__(self, config: ServerConfig, engine: LossEngine | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lossd-test-server", daemon=True)
        self._thread.start()
        self.server: LossServer = self.run(self._make(config, engine))
        self.port: int = self.run(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    @staticmethod
    async def _make(config: ServerConfig, engine: LossEngine | None) -> LossServer:
        return LossServer(config, engine=engine)  # grpc.aio objects belong to the loop that runs them

    def run(self, coroutine: Any, timeout: float = 60) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def make_config(**overrides: Any) -> ServerConfig:
    return ServerConfig(**{"host": "127.0.0.1", "port": 0, "device": "cpu", "metrics_port": 0, **overrides})


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    running = RunningServer(make_config())
    yield running
    running.close()


@pytest.fixture
def server_factory() -> Iterator[Callable[..., RunningServer]]:
    """Starts servers with custom settings; stops them after the test."""
    started: list[RunningServer] = []

    def start(engine: LossEngine | None = None, **overrides: Any) -> RunningServer:
        running = RunningServer(make_config(**overrides), engine)
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


@pytest.fixture(scope="session")
def client(server: RunningServer) -> Iterator[LossClient]:
    with LossClient(server.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def exact_server() -> Iterator[RunningServer]:
    """Batching off: every call is computed alone, as torch would."""
    running = RunningServer(make_config(batching=False))
    yield running
    running.close()


@pytest.fixture(scope="session")
def exact_client(exact_server: RunningServer) -> Iterator[LossClient]:
    with LossClient(exact_server.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


class SlowEngine(LossEngine):
    """Takes `delay` seconds per call, to hold a computation in flight."""

    def __init__(self, delay: float) -> None:
        super().__init__("cpu")
        self.delay = delay
        self.calls = 0

    def compute_batch(self, calls: Any, merge: bool = True) -> Any:
        self.calls += len(calls)
        time.sleep(self.delay)
        return super().compute_batch(calls, merge)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
