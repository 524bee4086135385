"""The metrics say what happened: every path read back from the server's registry after real calls.

Queue wait is the time a call waited before its computation began, once per call, never more than
the call took; every call is counted under its loss (or `unknown` when it ended before its loss was
read); a CPU server exports no device-memory gauges.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from lossd.client import LossClient
from lossd.client._calls import prepare_call
from lossd.server.rpc.lifecycle import UNKNOWN_LOSS
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd.v1.oip import open_inference_pb2 as oip
from lossd.v1.oip import open_inference_pb2_grpc as oip_grpc
from lossd.wire import chunks

from conftest import RunningServer

STREAM = "/lossd.v1.LossService/StreamLoss"
RNG = np.random.default_rng(11)
LOGITS = RNG.standard_normal((8, 4)).astype(np.float32)
LABELS = np.array([0, 1, 2, 3, 0, 1, 2, 3])


class Reading:
    """The registry's samples before and after some calls."""

    def __init__(self, running: RunningServer) -> None:
        self.value = running.server.metrics.registry.get_sample_value
        self.start = self.snapshot()

    def snapshot(self) -> dict[str, float]:
        names = ("lossd_queue_wait_seconds_count", "lossd_queue_wait_seconds_sum")
        return {name: self.value(name, {"tenant": "default"}) or 0.0 for name in names}

    def waits(self) -> tuple[float, float]:
        """(observations, seconds) of queue wait since the start."""
        now = self.snapshot()
        return (
            now["lossd_queue_wait_seconds_count"] - self.start["lossd_queue_wait_seconds_count"],
            now["lossd_queue_wait_seconds_sum"] - self.start["lossd_queue_wait_seconds_sum"],
        )

    def duration(self, loss: str) -> float:
        return self.value("lossd_request_duration_seconds_sum", {"loss": loss}) or 0.0

    def calls(self, loss: str, code: str) -> float:
        return self.value("lossd_requests_total", {"loss": loss, "code": code}) or 0.0


def test_a_streamed_call_in_many_blocks_waits_once_and_never_longer_than_it_took(
    server_factory: Callable[..., RunningServer],
) -> None:
    running = server_factory(stream_block_bytes=4096, stream_chunk_bytes=2048)
    reading = Reading(running)
    logits = RNG.standard_normal((512, 64)).astype(np.float32)  # 128 KiB: 32 blocks of 4 KiB
    labels = RNG.integers(0, 64, 512)
    with LossClient(running.target, timeout=60, stream_threshold_bytes=0) as client:
        result = client.cross_entropy(logits, labels, return_grad=True)
    assert result.grad is not None and result.grad.shape == logits.shape
    computed = reading.value("lossd_batch_requests_sum") or 0.0
    assert computed >= 16, "the call was computed in blocks"
    observations, waited = reading.waits()
    assert observations == 1
    assert waited <= reading.duration("cross_entropy")
    assert reading.calls("cross_entropy", "OK") == 1


def test_unary_batch_and_open_inference_calls_wait_once_each(
    server_factory: Callable[..., RunningServer],
) -> None:
    running = server_factory()
    reading = Reading(running)
    with LossClient(running.target, timeout=30) as client:
        for _ in range(3):
            client.cross_entropy(LOGITS, LABELS)
    with grpc.insecure_channel(running.target) as channel:
        entries = [prepare_call("nll_loss", LOGITS, LABELS).unary() for _ in range(5)]
        answer = pb_grpc.LossServiceStub(channel).ComputeLossBatch(
            pb.ComputeLossBatchRequest(requests=entries), timeout=30
        )
        assert len(answer.results) == 5
        assert reading.waits()[0] == 3 + 5
        request = oip.ModelInferRequest(model_name="cross_entropy")
        for name, array, datatype in (("input", LOGITS, "FP32"), ("target", LABELS, "INT64")):
            request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
            request.raw_input_contents.append(array.tobytes())
        oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    observations, waited = reading.waits()
    assert observations == 3 + 5 + 1
    total = sum(reading.duration(loss) for loss in ("cross_entropy", "batch"))
    assert waited <= total
    assert reading.calls("cross_entropy", "OK") == 4  # three unary calls and the OIP one
    assert reading.calls("batch", "OK") == 1
    value = running.server.metrics.registry.get_sample_value
    assert value("lossd_batch_entries_total", {"loss": "nll_loss", "code": "OK"}) == 5


def _messages(pending: queue.Queue[bytes | None]) -> Iterator[bytes]:
    while (message := pending.get()) is not None:
        yield message


def _cancelled_stream(target: str, first: bytes | None) -> None:
    """A StreamLoss call that sends `first` (or nothing) and is then cancelled by its client."""
    with grpc.insecure_channel(target) as channel:
        pending: queue.Queue[bytes | None] = queue.Queue()
        if first is not None:
            pending.put(first)
        stream = channel.stream_stream(STREAM)(_messages(pending), timeout=30)
        time.sleep(0.3)
        stream.cancel()
        pending.put(None)


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_cancelled_streams_are_counted_under_their_loss_or_unknown(
    server_factory: Callable[..., RunningServer],
) -> None:
    running = server_factory()
    reading = Reading(running)
    call = prepare_call("kl_div", np.zeros((64, 32), np.float32), np.full((64, 32), 1 / 32, np.float32))
    _cancelled_stream(running.target, chunks.encode_header(call.request))  # its header, then nothing
    assert _wait_for(lambda: reading.calls("kl_div", "CANCELLED") == 1)
    _cancelled_stream(running.target, None)  # not even a header: its loss is never known
    assert _wait_for(lambda: reading.calls(UNKNOWN_LOSS, "CANCELLED") == 1)
    assert reading.calls("unset", "CANCELLED") == 0
    assert reading.waits()[0] == 0, "neither call reached the queue"


def test_a_request_naming_no_loss_is_counted_as_unknown(server_factory: Callable[..., RunningServer]) -> None:
    from lossd.client import errors

    running = server_factory()
    reading = Reading(running)
    with LossClient(running.target, timeout=30) as client, pytest.raises(errors.InvalidArgumentError):
        client.compute(pb.ComputeLossRequest())
    assert reading.calls(UNKNOWN_LOSS, "INVALID_ARGUMENT") == 1


def test_a_cpu_server_exports_no_device_memory_gauges(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory()
    with LossClient(running.target, timeout=30) as client:
        client.cross_entropy(LOGITS, LABELS)
    running.server.metrics.read_device_memory()
    names = {metric.name for metric in running.server.metrics.registry.collect()}
    assert "lossd_requests" in names
    assert not any(name.startswith("lossd_device_memory") for name in names)
