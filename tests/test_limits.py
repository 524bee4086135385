"""Limits enforced before memory is taken: the streams' byte budget, concurrent streams per
connection; each answered with ErrorInfo, and RetryInfo where waiting helps."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import torch

from lossd.client import LossClient, chunks, errors
from lossd.client._calls import prepare_call
from lossd.client._rpc_errors import from_rpc_error
from lossd.server.config import ServerConfig

from conftest import RunningServer, SlowEngine

STREAM = "/lossd.v1.LossService/StreamLoss"
RNG = np.random.default_rng(2)


def _header(rows: int, classes: int) -> bytes:
    call = prepare_call("cross_entropy", np.ones((rows, classes), np.float32), np.zeros(rows, np.int64))
    call.request.target.data = np.zeros(rows, np.int64).tobytes()
    return chunks.encode_header(call.request)


def test_a_stream_bigger_than_the_budget_is_refused_before_allocation(
    server_factory: Callable[..., RunningServer],
) -> None:
    running = server_factory(max_stream_bytes=1 << 20)
    with LossClient(running.target, timeout=30, stream_threshold_bytes=0) as client:
        with pytest.raises(errors.ResourceExhaustedError) as refused:
            client.cross_entropy(np.ones((1024, 512), np.float32), np.zeros(1024, np.int64))
        assert refused.value.reason == "STREAM_MEMORY_EXHAUSTED"
        assert refused.value.retry_after is None  # it will never fit: waiting does not help
        assert refused.value.metadata["maxStreamBytes"] == str(1 << 20)
        assert client.cross_entropy(np.ones((64, 512), np.float32), np.zeros(64, np.int64)).loss.shape == ()
    assert running.server.servicer._stream_budget.held == 0


def test_streams_share_the_budget_and_give_it_back(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(max_stream_bytes=3 << 20)
    rows, classes = 1024, 512  # 2 MiB of logits: one stream fits, two do not
    with grpc.insecure_channel(running.target) as channel:
        held: queue.Queue[bytes | None] = queue.Queue()
        held.put(_header(rows, classes))

        def messages() -> Iterator[bytes]:
            while (message := held.get()) is not None:
                yield message

        first = channel.stream_stream(STREAM)(messages(), timeout=30)
        deadline = time.monotonic() + 10
        while running.server.servicer._stream_budget.held == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running.server.servicer._stream_budget.held == rows * classes * 4
        with LossClient(running.target, timeout=30, stream_threshold_bytes=0, retry_attempts=1) as client:
            with pytest.raises(errors.ResourceExhaustedError) as refused:
                client.cross_entropy(np.ones((rows, classes), np.float32), np.zeros(rows, np.int64))
            assert refused.value.reason == "STREAM_MEMORY_EXHAUSTED"
            assert refused.value.retry_after == 1.0  # others hold it: retry later
            held.put(None)  # the first stream ends, incomplete
            with pytest.raises(grpc.RpcError) as incomplete:
                list(first)
            assert from_rpc_error(incomplete.value).reason == "STREAM_INCOMPLETE"
            assert running.server.servicer._stream_budget.held == 0
            client.cross_entropy(np.ones((rows, classes), np.float32), np.zeros(rows, np.int64))


def test_the_default_budget_is_half_the_machines_memory() -> None:
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert ServerConfig().stream_budget_bytes == memory // 2
    assert ServerConfig(max_stream_bytes=5).stream_budget_bytes == 5


def test_concurrent_streams_per_connection_are_bounded(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(engine=SlowEngine(delay=0.05), batching=False, max_concurrent_streams=4)
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, running.server.servicer.active)
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


def test_the_default_tensor_byte_limit_is_half_the_machines_memory() -> None:
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert ServerConfig().limits.max_bytes == memory // 2
    assert ServerConfig(max_tensor_bytes=7).limits.max_bytes == 7
