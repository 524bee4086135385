"""Hostile and careless clients: what any client can make the server hold is bounded, before auth
and before parsing; small calls are not starved; errors and accounting are exact.

Raw HTTP/2 (`rawh2`) sends what a gRPC library will not: partial messages, stalls, unread answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rawh2 import RawConnection, grpc_frame

from lossd.client import LossClient, errors
from lossd.client._calls import prepare_call
from lossd.server.batcher import Batcher, BatchLimits
from lossd.server.config import RECEIVE_WINDOW
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import tensor_pb2
from lossd.v1.oip import open_inference_pb2 as oip
from lossd.wire import chunks
from lossd.wire.status import from_rpc_error

from conftest import RunningServer
from processes import ServeProcess, free_port

COMPUTE = "/lossd.v1.LossService/ComputeLoss"
STREAM = "/lossd.v1.LossService/StreamLoss"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def _budget_server(server_factory: Callable[..., RunningServer], **overrides: object) -> RunningServer:
    settings: dict[str, object] = {
        "max_memory_bytes": 256 << 20,
        "max_message_bytes": 8 << 20,
        "max_connections": 8,
        "idle_timeout_s": 1.0,
        "admission_wait_s": 2.0,
        **overrides,
    }
    return server_factory(**settings)


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_call_refused_by_auth_never_gets_its_message_read(
    server_factory: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before a token is checked, a call can make gRPC buffer one HTTP/2 window, not its message."""
    monkeypatch.setenv("LOSSD_AUTH_TOKEN", "")
    running = _budget_server(server_factory, auth_token="s3cret")
    connection = RawConnection("127.0.0.1", running.port)
    try:
        calls = [connection.open(COMPUTE) for _ in range(10)]
        sent = [call.send(grpc_frame(b"\0" * (4 << 20)), timeout=0.5) for call in calls]
        assert connection.wait(calls, 10)
        assert {call.status for call in calls} == {str(grpc.StatusCode.UNAUTHENTICATED.value[0])}
        assert max(sent) <= 2 * RECEIVE_WINDOW, sent
        assert running.server.budget.held == 0
    finally:
        connection.close()


def test_a_message_declared_over_the_limit_is_refused_by_grpc(
    server_factory: Callable[..., RunningServer],
) -> None:
    running = _budget_server(server_factory)
    connection = RawConnection("127.0.0.1", running.port)
    try:
        call = connection.open(COMPUTE)
        call.send(grpc_frame(b"\0" * (1 << 20), declared=100 << 20), timeout=0.5)
        assert connection.wait([call], 10)
        assert call.status == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    finally:
        connection.close()


def test_partial_unary_messages_are_held_in_the_budget_and_cut_off_when_idle(
    server_factory: Callable[..., RunningServer],
) -> None:
    running = _budget_server(server_factory)
    budget = running.server.budget
    connection = RawConnection("127.0.0.1", running.port)
    try:
        calls = [connection.open(COMPUTE) for _ in range(8)]
        for call in calls:  # declare 6 MiB, send 3 MiB, stall
            call.send(grpc_frame(b"\0" * (3 << 20), declared=6 << 20), timeout=2)
        assert _wait(lambda: budget.held >= 8 * (8 << 20))  # each reserved a whole message
        assert budget.held <= budget.limit
        assert connection.wait(calls, 15)  # idle_timeout_s 1 s
        assert {call.status for call in calls} == {str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])}
        assert "idle_timeout_s" in calls[0].message
        assert _wait(lambda: budget.held == 0)
    finally:
        connection.close()
    with LossClient(running.target, timeout=30) as client:  # and the server serves on
        assert client.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1])).loss.shape == ()


def _stream_messages(pending: queue.Queue[bytes | None]) -> Iterator[bytes]:
    while (message := pending.get()) is not None:
        yield message


def test_inline_header_data_counts_and_a_stalled_stream_is_cut_off(
    server_factory: Callable[..., RunningServer],
) -> None:
    running = _budget_server(server_factory)
    budget = running.server.budget
    rows, classes = 1024, 1536  # 6 MiB of logits, inline in the header; the target still to come
    call = prepare_call("nll_loss", np.ones((rows, classes), np.float32), np.zeros(rows, np.int64))
    call.request.input.data = np.ones((rows, classes), np.float32).tobytes()
    header = chunks.encode_header(call.request)
    assert len(header) > 6 << 20
    with grpc.insecure_channel(
        running.target, options=[("grpc.max_send_message_length", 16 << 20)]
    ) as channel:
        pending: queue.Queue[bytes | None] = queue.Queue()
        pending.put(header)
        stream = channel.stream_stream(STREAM)(_stream_messages(pending), timeout=30)
        assert _wait(lambda: budget.held >= 2 * len(header))
        with pytest.raises(grpc.RpcError) as ended:
            list(stream)  # nothing more is sent: idle after 1 s
        pending.put(None)
    assert from_rpc_error(ended.value).reason == "IDLE_TIMEOUT"
    assert _wait(lambda: budget.held == 0)


def test_concurrent_unary_calls_stay_within_the_budget(server_factory: Callable[..., RunningServer]) -> None:
    running = _budget_server(server_factory, max_memory_bytes=128 << 20, max_connections=4)
    budget = running.server.budget
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.standard_normal((512, 1024)).astype(np.float32))  # 2 MiB: one message
    labels = torch.from_numpy(rng.integers(0, 1024, 512))
    expected = F.cross_entropy(logits, labels)
    outcomes: list[str] = []

    def one(_: int) -> None:
        with LossClient(running.target, timeout=60, retry_attempts=1) as client:
            try:
                result = client.cross_entropy(logits, labels, return_grad=True)
            except errors.ResourceExhaustedError as refused:
                assert refused.reason == "MEMORY_EXHAUSTED" and refused.retry_after
                outcomes.append("refused")
            else:
                assert torch.equal(result.loss, expected)
                outcomes.append("ok")

    with ThreadPoolExecutor(24) as pool:
        list(pool.map(one, range(48)))
    assert outcomes.count("ok") >= 1 and len(outcomes) == 48
    assert budget.peak <= budget.limit
    assert budget.held == 0


def test_an_answer_too_large_for_a_message_is_refused_before_computing_and_counted(
    server_factory: Callable[..., RunningServer],
) -> None:
    running = _budget_server(server_factory, max_message_bytes=2 << 20)
    student = torch.log_softmax(torch.randn(64, 1, 128), -1)
    teacher = torch.softmax(torch.randn(128, 128), -1)  # broadcasts to (64, 128, 128): 4 MiB of loss
    request = prepare_call("kl_div", student, teacher, reduction="none").unary()
    with grpc.insecure_channel(running.target) as channel, pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(COMPUTE)(request.SerializeToString(), timeout=30)
    error = from_rpc_error(refused.value)
    assert error.reason == "RESPONSE_TOO_LARGE" and error.code == "RESOURCE_EXHAUSTED"
    assert error.metadata["answerBytes"] == str(64 * 128 * 128 * 4)
    registry = running.server.metrics.registry
    assert (
        registry.get_sample_value("lossd_requests_total", {"loss": "kl_div", "code": "RESOURCE_EXHAUSTED"})
        == 1
    )
    # lossd's client streams it instead (after the same refusal: its threshold is 4 MiB).
    with LossClient(running.target, timeout=30) as client:
        result = client.kl_div(student, teacher, reduction="none")
    assert torch.equal(result.loss, F.kl_div(student, teacher, reduction="none"))


def test_a_large_computation_does_not_hold_up_small_ones() -> None:
    """Large items run in a lane of their own: a small item is computed while a large one runs."""

    async def scenario() -> None:
        release = threading.Event()
        order: list[str] = []

        def run(items: list[str]) -> list[str]:
            if items[0].startswith("large"):
                release.wait(10)
            order.extend(items)
            return items

        with ThreadPoolExecutor(1) as small, ThreadPoolExecutor(1) as large:
            batcher: Batcher[str, str] = Batcher(
                run,
                key=lambda item: None,
                cost=lambda item: (1, 10 << 20 if item.startswith("large") else 10),
                limits=BatchLimits(),
                executor=small,
                large_executor=large,
            )
            batcher.start()
            slow = asyncio.ensure_future(batcher.submit("large"))
            await asyncio.sleep(0.05)
            assert await asyncio.wait_for(batcher.submit("small"), 5) == "small"
            assert order == ["small"]
            release.set()
            assert await slow == "large"
            await batcher.close()

    asyncio.run(scenario())


def _zero_size_request(shape: list[int]) -> pb.ComputeLossRequest:
    request = pb.ComputeLossRequest(cross_entropy=pb.CrossEntropyLossOptions())
    request.input.dtype = tensor_pb2.DATA_TYPE_FLOAT32
    request.input.shape.extend(shape)
    request.target.dtype = tensor_pb2.DATA_TYPE_INT64
    request.target.shape.extend([0])
    return request


@pytest.mark.parametrize("shape", [[0, 2**62], [0, 2**40, 2**40]])
def test_empty_shapes_with_huge_dimensions_are_invalid_arguments(
    server: RunningServer, channel: grpc.Channel, shape: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(COMPUTE)(_zero_size_request(shape).SerializeToString(), timeout=30)
    assert from_rpc_error(refused.value).reason == "SHAPE_INVALID"
    infer = oip.ModelInferRequest(model_name="cross_entropy")
    infer.inputs.add(name="input", datatype="FP32", shape=shape)
    infer.inputs.add(name="target", datatype="INT64", shape=[0])
    infer.raw_input_contents.extend([b"", b""])
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(INFER)(infer.SerializeToString(), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "failed unexpectedly" not in caplog.text


def test_a_long_model_name_is_echoed_only_as_a_prefix(channel: grpc.Channel) -> None:
    infer = oip.ModelInferRequest(model_name="m" * 10240)
    with pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(INFER)(infer.SerializeToString(), timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(refused.value.details()) < 300


def test_large_messages_are_decoded_off_the_event_loop(
    server: RunningServer, channel: grpc.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lossd.server.rpc import open_inference

    threads: list[str] = []
    original = open_inference.loss_request

    def recording(request: oip.ModelInferRequest, raw: list[memoryview] | None = None) -> object:
        threads.append(threading.current_thread().name)
        return original(request, raw)

    monkeypatch.setattr(open_inference, "loss_request", recording)
    infer = oip.ModelInferRequest(model_name="cross_entropy")
    values = np.zeros(1 << 20, np.uint32)
    values[-1] = 300  # one UINT8 value out of range, found by numpy, not a Python loop
    given = infer.inputs.add(name="input", datatype="FP32", shape=[1024, 1024])
    given.contents.fp32_contents.extend(np.zeros(1 << 20, np.float32))
    target = infer.inputs.add(name="target", datatype="UINT8", shape=[1024, 1024])
    target.contents.uint_contents.extend(values)
    with pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(INFER)(infer.SerializeToString(), timeout=30)
    assert from_rpc_error(refused.value).reason == "VALUE_OUT_OF_RANGE"
    assert threads and threads[0].startswith("lossd-wire"), threads


def test_a_one_element_target_for_a_vector_input_follows_torch(exact_client: LossClient) -> None:
    """torch computes F.cross_entropy((C,), (1,)) but refuses its gradient: so does lossd."""
    logits, label = torch.randn(5), torch.tensor([2])
    for name in ("nll_loss", "cross_entropy"):
        function = getattr(F, name)
        assert torch.equal(getattr(exact_client, name)(logits, label).loss, function(logits, label))
        leaf = logits.clone().requires_grad_()
        with pytest.raises(RuntimeError, match="size mismatch"):
            function(leaf, label).backward()
        with pytest.raises(errors.InvalidArgumentError) as refused:
            getattr(exact_client, name)(logits, label, return_grad=True)
        assert refused.value.reason == "TARGET_SHAPE_MISMATCH"


def test_a_stream_cancelled_while_its_answer_is_written_counts_as_cancelled(
    server_factory: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    running = server_factory()
    logits = np.random.default_rng(1).standard_normal((4096, 1024)).astype(np.float32)
    call = prepare_call("cross_entropy", logits, np.zeros(4096, np.int64), return_grad=True)
    with caplog.at_level(logging.ERROR), grpc.insecure_channel(running.target) as channel:
        for _ in range(5):
            stream = channel.stream_stream(STREAM)(
                prepare_call("cross_entropy", logits, np.zeros(4096, np.int64), return_grad=True).stream(
                    1 << 20
                ),
                timeout=30,
            )
            next(stream)  # the answer has begun
            stream.cancel()
        del call
    servicer = running.server.lifecycle
    assert _wait(lambda: servicer.active == 0)
    assert servicer.answered["CANCELLED"] == 5, servicer.answered
    assert "failed unexpectedly" not in caplog.text


def test_metrics_are_served_from_another_process(serve_process: Callable[..., ServeProcess]) -> None:
    metrics_port = free_port()
    server = serve_process("--port", "0", "--device", "cpu", "--metrics-port", str(metrics_port))
    target = server.serving()
    before = len(os.listdir(f"/proc/{server.process.pid}/task"))
    stalled = []
    for _ in range(40):  # connections that never send a request
        sock = socket.create_connection(("127.0.0.1", metrics_port), timeout=5)
        stalled.append(sock)
    with LossClient(
        target.replace("[::]", "127.0.0.1").replace("0.0.0.0", "127.0.0.1"), timeout=30
    ) as client:
        client.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]))
    assert len(os.listdir(f"/proc/{server.process.pid}/task")) <= before + 2
    for sock in stalled:
        sock.close()
    import urllib.request

    text = ""
    deadline = time.monotonic() + 20
    while "lossd_requests_total" not in text and time.monotonic() < deadline:
        try:
            text = (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            )
        except OSError:
            time.sleep(0.2)
    assert 'lossd_requests_total{code="OK",loss="cross_entropy"} 1.0' in text
    server.process.send_signal(signal.SIGTERM)
    status, _ = server.finish()
    assert status == 0


def test_the_drain_report_counts_streams_cut_off_by_the_grace_period(
    serve_process: Callable[..., ServeProcess],
) -> None:
    server = serve_process("--port", "0", "--device", "cpu", "--metrics-port", "0", "--shutdown-grace-s", "1")
    port = int(server.serving().rsplit(":", 1)[1])
    connection = RawConnection("127.0.0.1", port)
    call = prepare_call("cross_entropy", np.ones((1024, 1024), np.float32), np.zeros(1024, np.int64))
    header = chunks.encode_header(call.request)
    streams = [connection.open(STREAM) for _ in range(3)]
    for stream in streams:  # a header, then nothing: still arriving when the server stops
        stream.send(grpc_frame(header))
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)
    status, log = server.finish()
    connection.close()
    assert status == 0
    assert "calls ended (CANCELLED 3); 3 of them cut off at the end of the grace period" in log, log


def test_connections_beyond_the_limit_are_refused(server_factory: Callable[..., RunningServer]) -> None:
    running = _budget_server(server_factory, max_connections=2)
    connections = [RawConnection("127.0.0.1", running.port) for _ in range(2)]
    try:
        for connection in connections:
            call = connection.open("/grpc.health.v1.Health/Check")
            call.send(grpc_frame(b""), end=True)
            assert connection.wait([call], 10) and call.status == "0"
        refused = False
        try:
            third = RawConnection("127.0.0.1", running.port)
            try:
                call = third.open("/grpc.health.v1.Health/Check")
                call.send(grpc_frame(b""), end=True)
                refused = not third.wait([call], 2) or call.status != "0"
            finally:
                third.close()
        except OSError:  # gRPC closed it before the handshake
            refused = True
        assert refused
    finally:
        for connection in connections:
            connection.close()


def test_health_watch_is_served_under_the_guard(channel: grpc.Channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
    first = next(stream)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    stream.cancel()
