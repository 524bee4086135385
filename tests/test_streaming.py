"""StreamLoss: streamed results equal unary ones and local torch; every malformed stream; the client's
switch-over; memory released after a failed stream; one input over 2 GiB."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.rpc import error_details_pb2, status_pb2

from lossd.client import AsyncLossClient, LossClient, errors
from lossd.client import torch as lossd_torch
from lossd.client._calls import prepare_call
from lossd.v1 import loss_service_pb2 as pb
from lossd.wire import chunks

from cases import Case, all_cases, reference
from conftest import RunningServer
from test_parity import check_result, remote

STREAM = "/lossd.v1.LossService/StreamLoss"


@pytest.fixture(scope="module")
def block_server() -> Iterator[RunningServer]:
    """Computes streamed calls in blocks of a few hundred bytes, so that small tests cut many."""
    from conftest import make_config

    running = RunningServer(make_config(stream_block_bytes=256, stream_chunk_bytes=96))
    yield running
    running.close()


@pytest.fixture(scope="module")
def streaming_client(block_server: RunningServer) -> Iterator[LossClient]:
    """Streams every call, every tensor over 64 bytes in chunks of 64 bytes."""
    with LossClient(
        block_server.target, timeout=60, stream_threshold_bytes=0, stream_chunk_bytes=64
    ) as client:
        yield client


STREAM_CASES = all_cases()[::3]


@pytest.mark.parametrize("case", STREAM_CASES, ids=[case.id for case in STREAM_CASES])
def test_streamed_equals_local_torch(streaming_client: LossClient, case: Case) -> None:
    tensors = case.tensors()
    check_result(remote(streaming_client, case, tensors), reference(case, tensors), case)


def test_streamed_equals_unary(streaming_client: LossClient, client: LossClient) -> None:
    logits, labels = torch.randn(40, 7, dtype=torch.float64), torch.randint(0, 7, (40,))
    streamed = streaming_client.cross_entropy(logits, labels, label_smoothing=0.1, return_grad=True)
    unary = client.cross_entropy(logits, labels, label_smoothing=0.1, return_grad=True)
    torch.testing.assert_close(streamed.loss, unary.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(streamed.grad, unary.grad, rtol=1e-12, atol=1e-15)


def test_a_large_call_streams_and_a_small_one_does_not(server: RunningServer) -> None:
    with LossClient(server.target, timeout=60, stream_threshold_bytes=1 << 16) as client:
        streams: list[int] = []
        original = client._stream_call

        def counting(requests: Any, **kwargs: Any) -> Any:
            streams.append(1)
            return original(requests, **kwargs)

        client._stream_call = counting  # type: ignore[assignment]
        small = client.cross_entropy(torch.randn(8, 4), torch.randint(0, 4, (8,)))
        assert streams == []
        logits, labels = torch.randn(256, 128), torch.randint(0, 128, (256,))  # 128 KiB of logits
        big = client.cross_entropy(logits, labels, return_grad=True)
        assert streams == [1]
    assert small.loss.shape == ()
    expected = logits.clone().requires_grad_()
    F.cross_entropy(expected, labels).backward()
    torch.testing.assert_close(big.grad, expected.grad, rtol=1e-6, atol=1e-9)


def test_autograd_through_streams(streaming_client: LossClient) -> None:
    for reduction in ("mean", "sum", "none"):
        x = torch.randn(12, 5, requires_grad=True)
        target = torch.softmax(torch.randn(12, 5), 1).requires_grad_()
        loss = lossd_torch.cross_entropy(x, target, reduction=reduction, client=streaming_client)
        upstream = torch.randn_like(loss)
        loss.backward(upstream)
        x2, t2 = x.detach().clone().requires_grad_(), target.detach().clone().requires_grad_()
        F.cross_entropy(x2, t2, reduction=reduction).backward(upstream)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(target.grad, t2.grad, rtol=1e-6, atol=1e-7)


def test_async_client_streams(block_server: RunningServer) -> None:
    async def main() -> Any:
        async with AsyncLossClient(
            block_server.target, stream_threshold_bytes=0, stream_chunk_bytes=128
        ) as aio:
            student = torch.log_softmax(torch.randn(30, 9), 1)
            teacher = torch.softmax(torch.randn(30, 9), 1)
            return (
                student,
                teacher,
                await aio.kl_div(student, teacher, reduction="batchmean", return_grad=True),
            )

    student, teacher, result = asyncio.run(main())
    s = student.clone().requires_grad_()
    F.kl_div(s, teacher, reduction="batchmean").backward()
    torch.testing.assert_close(result.grad, s.grad, rtol=1e-6, atol=1e-9)


# -- malformed streams ------------------------------------------------------------------------------


def _stream_error(channel: grpc.Channel, messages: list[bytes]) -> tuple[grpc.StatusCode, str, str]:
    call = channel.stream_stream(STREAM)
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter(messages), timeout=30))
    error = caught.value
    trailers = dict(error.trailing_metadata())  # type: ignore[attr-defined]
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return error.code(), error.details(), info.reason  # type: ignore[attr-defined]


def _header(rows: int = 4, classes: int = 3, stream_input: bool = True) -> tuple[bytes, bytes]:
    """A StreamLoss header for CE on (rows, classes) float32 logits, and the logits' bytes."""
    call = prepare_call("cross_entropy", np.ones((rows, classes), np.float32), np.zeros(rows, np.int64))
    request = call.request
    request.target.data = np.zeros(rows, np.int64).tobytes()
    data = np.ones((rows, classes), np.float32).tobytes()
    if not stream_input:
        request.input.data = data
    return chunks.encode_header(request), data


MALFORMED: list[tuple[str, Callable[[], list[bytes]], str]] = [
    ("empty", list, "STREAM_HEADER_MISSING"),
    (
        "chunk-first",
        lambda: [chunks.encode_chunk("input", 0, b"\0" * 4)],
        "STREAM_HEADER_MISSING",
    ),
    ("header-twice", lambda: [_header()[0], _header()[0]], "STREAM_HEADER_REPEATED"),
    (
        "unknown-tensor",
        lambda: [_header()[0], chunks.encode_chunk("cross_entropy.weight", 0, b"\0" * 4)],
        "CHUNK_TENSOR_UNKNOWN",
    ),
    (
        "a-name-no-request-has",
        lambda: [_header()[0], chunks.encode_chunk("x" * 5000, 0, b"\0" * 4)],
        "CHUNK_TENSOR_UNKNOWN",
    ),
    (
        "name-not-utf8",
        lambda: [_header()[0], b"\x12\x04\x22\x02\xff\xfe"],
        "STREAM_MESSAGE_MALFORMED",
    ),
    (
        "inline-tensor-chunked",
        lambda: [_header(stream_input=False)[0], chunks.encode_chunk("input", 0, b"\0" * 4)],
        "CHUNK_TENSOR_UNKNOWN",
    ),
    (
        "out-of-order",
        lambda: [_header()[0], chunks.encode_chunk("input", 8, b"\0" * 8)],
        "CHUNK_OUT_OF_ORDER",
    ),
    (
        "chunk-repeated",
        lambda: [
            _header()[0],
            chunks.encode_chunk("input", 0, b"\0" * 16),
            chunks.encode_chunk("input", 0, b"\0" * 16),
        ],
        "CHUNK_OUT_OF_ORDER",
    ),
    (
        "chunks-overlap",
        lambda: [
            _header()[0],
            chunks.encode_chunk("input", 0, b"\0" * 16),
            chunks.encode_chunk("input", 8, b"\0" * 40),
        ],
        "CHUNK_OUT_OF_ORDER",
    ),
    ("overrun", lambda: [_header()[0], chunks.encode_chunk("input", 0, b"\0" * 52)], "CHUNK_OVERRUN"),
    (
        "ends-early",
        lambda: [_header()[0], chunks.encode_chunk("input", 0, _header()[1][:20])],
        "STREAM_INCOMPLETE",
    ),
    ("garbage", lambda: [_header()[0], b"\xff\xff\xff"], "STREAM_MESSAGE_MALFORMED"),
    ("neither-part", lambda: [_header()[0], b"\x18\x01"], "STREAM_PART_MISSING"),
]


@pytest.mark.parametrize(("build", "reason"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_streams_are_invalid_argument(
    channel: grpc.Channel, build: Callable[[], list[bytes]], reason: str
) -> None:
    code, message, got = _stream_error(channel, build())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert got == reason, message


def test_a_header_is_checked_before_any_data(channel: grpc.Channel) -> None:
    call = prepare_call("cross_entropy", np.ones((4, 3), np.float32), np.zeros(4, np.int64))
    call.request.target.data = np.zeros(4, np.int64).tobytes()
    call.request.input.shape[:] = [1 << 40, 1 << 20]  # 2**60 elements claimed
    code, message, reason = _stream_error(channel, [chunks.encode_header(call.request)])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "TENSOR_TOO_LARGE", message
    call.request.input.shape[:] = [4, 3]
    call.request.target.shape[:] = [5]
    call.request.target.data = np.zeros(5, np.int64).tobytes()
    code, message, reason = _stream_error(channel, [chunks.encode_header(call.request)])
    assert reason == "TARGET_SHAPE_MISMATCH", message


def test_streamed_targets_are_range_checked(streaming_client: LossClient) -> None:
    with pytest.raises(errors.InvalidArgumentError) as caught:
        streaming_client.nll_loss(torch.randn(40, 3), torch.full((40,), 7))
    assert caught.value.reason == "TARGET_OUT_OF_RANGE"


def test_a_failed_stream_leaves_nothing_allocated(server: RunningServer, channel: grpc.Channel) -> None:
    """The memory a stream's header made the server allocate is gone once the stream has failed."""
    staging = server.server.engine.staging
    allocated: list[weakref.ref[torch.Tensor]] = []
    original = staging.host_buffer

    def recording(nbytes: int) -> torch.Tensor:
        buffer = original(nbytes)
        allocated.append(weakref.ref(buffer))
        return buffer

    rows, classes = 1 << 14, 1 << 12  # 256 MiB of float32 logits announced
    call = prepare_call("cross_entropy", np.ones((2, classes), np.float32), np.zeros(2, np.int64))
    call.request.input.shape[:] = [rows, classes]
    call.request.target.shape[:] = [rows]
    call.request.target.data = np.zeros(rows, np.int64).tobytes()
    messages = [chunks.encode_header(call.request)]
    messages += [
        chunks.encode_chunk("input", i << 20, b"\1" * (1 << 20)) for i in range(8)
    ]  # 8 MiB, then stop
    staging.host_buffer = recording  # type: ignore[method-assign]
    try:
        _, message, reason = _stream_error(channel, messages)
    finally:
        staging.host_buffer = original  # type: ignore[method-assign]
    assert reason == "STREAM_INCOMPLETE", message
    assert len(allocated) == 1
    for _ in range(50):  # the server's handler may still be unwinding
        gc.collect()
        if allocated[0]() is None:
            break
        time.sleep(0.05)
    assert allocated[0]() is None, "the failed stream's buffer is still referenced"


def test_chunk_codec_round_trip() -> None:
    data = memoryview(bytes(range(256)) * 5)
    message = chunks.encode_chunk("target", 1 << 40, data)
    parsed = pb.StreamLossRequest.FromString(message)  # plain protobuf reads what we write
    assert parsed.chunk.tensor == "target" and parsed.chunk.offset == 1 << 40
    assert parsed.chunk.data == data.tobytes()
    named = pb.TensorChunk(tensor="linear_cross_entropy.classifier", offset=5, data=b"xyz")
    part = chunks.decode_part(pb.StreamLossRequest(chunk=named).SerializeToString())
    assert isinstance(part, chunks.Chunk)
    assert (part.tensor, part.offset, bytes(part.data)) == ("linear_cross_entropy.classifier", 5, b"xyz")
    unnamed = chunks.decode_part(chunks.encode_chunk("", 0, b"ab"))  # a PutTensor stream's
    assert isinstance(unnamed, chunks.Chunk) and unnamed.tensor == ""
    assert pb.StreamLossRequest.FromString(chunks.encode_chunk("", 0, b"ab")).chunk.tensor == ""
    header = chunks.encode_header(pb.ComputeLossRequest(kl_div=pb.KlDivLossOptions(log_target=True)))
    assert pb.StreamLossRequest.FromString(header).header.kl_div.log_target


# -- over 2 GiB -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_input_over_two_gib_completes(server: RunningServer) -> None:
    """nll_loss on 2.2 GB of float32 log-probabilities: past protobuf's 2 GiB ceiling for a message."""
    rows, classes = (1 << 15) + (1 << 10), 1 << 14
    labels = torch.randint(0, classes, (rows,))
    logits = torch.zeros(rows, classes)
    logits[torch.arange(rows), labels] = -4 * torch.rand(rows)  # the values nll_loss reads
    assert logits.numel() * 4 > 2**31
    with LossClient(server.target, timeout=600) as client:
        result = client.nll_loss(logits, labels, reduction="sum")
    expected = F.nll_loss(logits, labels, reduction="sum")
    torch.testing.assert_close(result.loss, expected, rtol=1e-6, atol=0)


def test_stream_buffers_are_allocated_off_the_event_loop_and_a_failure_is_resource_exhausted(
    server_factory: Callable[..., RunningServer],
) -> None:
    """Pinned buffers on CUDA take long to page-lock and can fail; here the same path on the CPU."""
    import threading

    from lossd.server.engine import LossEngine

    threads: list[str] = []

    class Failing(LossEngine):
        def __init__(self) -> None:
            super().__init__("cpu")
            real = self.staging.host_buffer
            self.fail = False

            def host_buffer(nbytes: int) -> torch.Tensor:
                threads.append(threading.current_thread().name)
                if self.fail:
                    raise RuntimeError("CUDA error: out of memory")
                return real(nbytes)

            self.staging.host_buffer = host_buffer  # type: ignore[method-assign]

    engine = Failing()
    running = server_factory(engine=engine)
    logits, labels = torch.randn(2048, 1024), torch.randint(0, 1024, (2048,))  # 8 MiB: streamed
    with LossClient(running.target, timeout=60, retry_attempts=1) as client:
        result = client.cross_entropy(logits, labels)
        assert torch.allclose(result.loss, torch.nn.functional.cross_entropy(logits, labels))
        assert threads and all(name.startswith("lossd-wire") for name in threads), threads
        engine.fail = True
        with pytest.raises(errors.ResourceExhaustedError) as refused:
            client.cross_entropy(logits, labels)
    assert refused.value.reason == "ALLOCATION_FAILED" and refused.value.retry_after
    assert running.server.budget.held == 0
