"""Limits enforced before memory is taken: the memory budget, concurrent streams per connection;
each answered with ErrorInfo, and RetryInfo where waiting helps."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import torch

from lossd.client import LossClient, errors
from lossd.client._calls import prepare_call
from lossd.server.config import ServerConfig
from lossd.wire import chunks
from lossd.wire.status import from_rpc_error

from conftest import RunningServer, SlowEngine

STREAM = "/lossd.v1.LossService/StreamLoss"
RNG = np.random.default_rng(2)


def _header(rows: int, classes: int, loss: str = "cross_entropy") -> bytes:
    call = prepare_call(loss, np.ones((rows, classes), np.float32), np.zeros(rows, np.int64))  # type: ignore[arg-type]
    call.request.target.data = np.zeros(rows, np.int64).tobytes()
    return chunks.encode_header(call.request)


def _budget_server(server_factory: Callable[..., RunningServer], **overrides: object) -> RunningServer:
    """A server with a small memory budget: 96 MiB, 2 MiB messages, 4 connections of 16 calls."""
    settings: dict[str, object] = {
        "max_memory_bytes": 96 << 20,
        "max_message_bytes": 2 << 20,
        "max_connections": 4,
        "max_concurrent_streams": 16,
        **overrides,
    }
    return server_factory(**settings)


def test_a_stream_bigger_than_a_clients_share_is_refused_before_allocation(
    server_factory: Callable[..., RunningServer],
) -> None:
    running = _budget_server(server_factory)
    budget = running.server.budget
    with LossClient(running.target, timeout=30, stream_threshold_bytes=0) as client:
        with pytest.raises(errors.ResourceExhaustedError) as refused:
            client.cross_entropy(np.ones((8192, 1024), np.float32), np.zeros(8192, np.int64))
        assert refused.value.reason == "MEMORY_EXHAUSTED"
        assert refused.value.retry_after is None  # it will never fit: waiting does not help
        assert refused.value.metadata["maxClientBytes"] == str(budget.peer_limit)
        assert client.cross_entropy(np.ones((64, 512), np.float32), np.zeros(64, np.int64)).loss.shape == ()
    assert budget.held == 0


def test_a_stalled_stream_is_evicted_for_a_client_that_waits(
    server_factory: Callable[..., RunningServer],
) -> None:
    running = _budget_server(server_factory, admission_wait_s=10.0)
    budget = running.server.budget
    rows, classes = 4096, 1024  # 16 MiB of logits: two such streams fit, three do not
    # A connection each (gRPC would otherwise share one between channels to the same target).
    channels = [
        grpc.insecure_channel(running.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(2)
    ]
    held: list[queue.Queue[bytes | None]] = [queue.Queue(), queue.Queue()]
    streams = []
    try:
        for channel, pending in zip(channels, held, strict=True):
            pending.put(_header(rows, classes, "nll_loss"))

            def messages(pending: queue.Queue[bytes | None] = pending) -> Iterator[bytes]:
                while (message := pending.get()) is not None:
                    yield message

            streams.append(channel.stream_stream(STREAM)(messages(), timeout=30))
        deadline = time.monotonic() + 10
        while len(budget._by_peer) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        first_held = budget.held
        assert first_held >= 2 * rows * classes * 4
        with LossClient(running.target, timeout=30, stream_threshold_bytes=0, retry_attempts=1) as client:
            labels = np.zeros(rows, np.int64)
            result = client.nll_loss(np.ones((rows, classes), np.float32), labels)
            assert float(result.loss) == -1.0
        evicted = 0
        for stream, pending in zip(streams, held, strict=True):
            pending.put(None)
            with pytest.raises(grpc.RpcError) as ended:
                list(stream)
            error = from_rpc_error(ended.value)
            evicted += error.reason == "MEMORY_EXHAUSTED"
            assert error.reason in ("MEMORY_EXHAUSTED", "STREAM_INCOMPLETE"), error
        assert evicted >= 1
        assert budget.evictions >= 1
        assert budget.held == 0
    finally:
        for channel in channels:
            channel.close()


def test_the_default_budget_is_a_quarter_of_the_machines_memory() -> None:
    from lossd.server.config import machine_memory

    assert ServerConfig().memory_bytes == machine_memory() // 4
    assert ServerConfig(max_memory_bytes=5 << 30).memory_bytes == 5 << 30
    config = ServerConfig(max_memory_bytes=2 << 30)
    # What unadmitted connections may buffer comes out of the budget, a quarter at most.
    assert config.connections * config.stream_bytes_per_connection <= (2 << 30) // 4
    assert config.admitted_bytes >= (2 << 30) * 3 // 4
    with pytest.raises(ValueError, match="max_memory_bytes"):
        ServerConfig(max_memory_bytes=16 << 20).check()


def test_concurrent_streams_per_connection_are_bounded(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(engine=SlowEngine(delay=0.05), batching=False, max_concurrent_streams=4)
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, running.server.lifecycle.active)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    logits, labels = RNG.standard_normal((4, 3)).astype(np.float32), np.array([0, 1, 2, 0])
    try:
        with LossClient(running.target, timeout=60) as client:
            futures = [
                client._stub.ComputeLoss.future(prepare_call("cross_entropy", logits, labels).unary())
                for _ in range(24)
            ]
            results = [future.result() for future in futures]  # beyond 4 wait, or are retried
    finally:
        done.set()
        watcher.join()
    assert len(results) == 24
    assert 1 <= peak <= 4, peak


def test_a_broadcast_is_held_to_the_tensor_limits(server_factory: Callable[..., RunningServer]) -> None:
    """A few kilobytes of kl_div operands can broadcast to gigabytes: refused before compute."""
    running = server_factory(max_tensor_bytes=1 << 30)
    student = torch.randn(35, 1000, 1, dtype=torch.float64)
    teacher = torch.rand(70000, dtype=torch.float64)  # broadcasts to (35, 1000, 70000): 19.6 GB
    with LossClient(running.target, timeout=30) as client:
        with pytest.raises(errors.ResourceExhaustedError) as refused:
            client.kl_div(student, teacher, reduction="sum")
        assert refused.value.reason == "TENSOR_TOO_LARGE"
        assert refused.value.field == "target.shape"
        assert refused.value.metadata["shape"] == "[35, 1000, 70000]"
        assert refused.value.metadata["bytes"] == str(35 * 1000 * 70000 * 8)
        small = client.kl_div(student[:2, :3], teacher[:5], reduction="sum")  # a modest broadcast
        expected = torch.nn.functional.kl_div(student[:2, :3], teacher[:5], reduction="sum")
        assert torch.equal(small.loss, expected)


def test_the_default_tensor_byte_limit_is_half_the_budget() -> None:
    assert ServerConfig().limits.max_bytes == ServerConfig().memory_bytes // 2
    assert ServerConfig(max_tensor_bytes=7).limits.max_bytes == 7
