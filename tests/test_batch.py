"""Many losses per call: `ComputeLossBatch` on the server (each entry answered on its own, limits
per entry and per call), and the clients' coalescing of concurrent calls into batches (each caller
its own result or typed error, timeouts, cancellation, a server without the method)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.rpc import error_details_pb2, status_pb2

from lossd.client import AsyncLossClient, LossClient, errors
from lossd.client import torch as lossd_torch
from lossd.client._calls import build_request, decode_response
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd.wire import codec

from conftest import RunningServer, SlowEngine

RNG = np.random.default_rng(7)


def _logits(rows: int = 8, classes: int = 5) -> np.ndarray:
    return RNG.standard_normal((rows, classes)).astype(np.float32)


def _labels(rows: int = 8, classes: int = 5) -> np.ndarray:
    return RNG.integers(0, classes, rows)


def _batch(
    stub: pb_grpc.LossServiceStub, requests: list[pb.ComputeLossRequest]
) -> pb.ComputeLossBatchResponse:
    response: pb.ComputeLossBatchResponse = stub.ComputeLossBatch(
        pb.ComputeLossBatchRequest(requests=requests), timeout=30
    )
    return response


@pytest.fixture
def stub(server: RunningServer) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.LossServiceStub(channel)


def test_each_entry_is_answered_on_its_own(stub: pb_grpc.LossServiceStub, server: RunningServer) -> None:
    """Valid entries of several losses are torch's numbers; a bad entry fails alone, with the status
    a ComputeLoss call would end with (ErrorInfo and BadRequest in google.rpc.Status's fields)."""
    logits, labels = _logits(), _labels()
    log_probs = np.log(np.full((8, 5), 0.2, np.float32))
    probs = np.full((8, 5), 0.2, np.float32)
    bad = labels.copy()
    bad[3] = 9
    requests = [
        build_request("cross_entropy", logits, labels, return_grad=True, label_smoothing=0.1),
        build_request("cross_entropy", logits, bad),
        build_request("nll_loss", log_probs, labels, reduction="sum"),
        build_request("kl_div", log_probs, probs, reduction="batchmean", return_grad=True),
    ]
    registry = server.server.metrics.registry

    def count(name: str, labels: dict[str, str]) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    ok, refused = (
        {"loss": "cross_entropy", "code": "OK"},
        {"loss": "cross_entropy", "code": "INVALID_ARGUMENT"},
    )
    before = [count("lossd_batch_entries_total", ok), count("lossd_batch_entries_total", refused)]
    calls_before = count("lossd_requests_total", {"loss": "batch", "code": "OK"})
    results = _batch(stub, requests).results
    assert [result.WhichOneof("result") for result in results] == [
        "response",
        "error",
        "response",
        "response",
    ]
    x = torch.from_numpy(logits).requires_grad_()
    expected = F.cross_entropy(x, torch.from_numpy(labels), label_smoothing=0.1)
    expected.backward()
    first = decode_response(results[0].response, logits)
    np.testing.assert_allclose(first.loss, expected.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(first.grad, x.grad.numpy(), rtol=1e-6, atol=1e-8)  # type: ignore[union-attr]
    status = status_pb2.Status.FromString(results[1].error.SerializeToString())
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "target[3]" in status.message
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == "TARGET_OUT_OF_RANGE" and info.domain == "lossd"
    bad_request = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad_request) and bad_request.field_violations[0].field == "target"
    nll = decode_response(results[2].response, log_probs)
    expected_nll = F.nll_loss(torch.from_numpy(log_probs), torch.from_numpy(labels), reduction="sum")
    np.testing.assert_allclose(nll.loss, expected_nll.numpy(), rtol=1e-6)
    kl = decode_response(results[3].response, log_probs)
    assert kl.grad is not None and kl.grad.shape == (8, 5)
    # The session's server serves other tests too, but not at once: what this call added, exactly.
    assert count("lossd_batch_entries_total", ok) == before[0] + 1
    assert count("lossd_batch_entries_total", refused) == before[1] + 1
    assert count("lossd_requests_total", {"loss": "batch", "code": "OK"}) == calls_before + 1


def test_an_empty_batch_and_a_malformed_one(stub: pb_grpc.LossServiceStub, server: RunningServer) -> None:
    assert list(_batch(stub, []).results) == []
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_unary("/lossd.v1.LossService/ComputeLossBatch")
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\x0a\xff\xff\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_resident_tensor_the_server_lacks_fails_its_entry_only(stub: pb_grpc.LossServiceStub) -> None:
    missing = build_request("cross_entropy", _logits(), _labels())
    missing.input.Clear()
    missing.input.resident_id = "sha256:" + "0" * 64
    results = _batch(stub, [missing, build_request("cross_entropy", _logits(), _labels())]).results
    assert results[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert results[1].WhichOneof("result") == "response"


def test_limits_per_call(server_factory: Callable[..., RunningServer]) -> None:
    """Too many entries, or answers that together outgrow a message, refuse the whole call."""
    running = server_factory(max_batch_entries=4, max_message_bytes=1 << 20)
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        small = build_request("cross_entropy", _logits(), _labels())
        with pytest.raises(grpc.RpcError) as caught:
            _batch(stub, [small] * 5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_batch_entries" in (caught.value.details() or "")
        # 300 KB up, 800 KB back each (float16 in, float64 gradient out): the request fits, the
        # three answers do not.
        large = build_request(
            "cross_entropy",
            _logits(100_000, 1).astype(np.float16),
            np.zeros(100_000, np.uint8),
            return_grad=True,
            grad_dtype="float64",
        )
        with pytest.raises(grpc.RpcError) as caught:
            _batch(stub, [large] * 3)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "RESPONSE_TOO_LARGE" in str(caught.value.trailing_metadata())
        assert len(_batch(stub, [small] * 4).results) == 4


def test_millions_of_empty_entries_are_refused_before_they_are_built(server: RunningServer) -> None:
    """Two bytes make an empty entry: a 4 MB message holds two million, which are counted (up to
    the limit) before protobuf would build each one; the server answers on."""
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/lossd.v1.LossService/ComputeLossBatch")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\x0a\x00" * 2_000_000, timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "BATCH_TOO_LARGE" in str(caught.value.trailing_metadata())
        stub = pb_grpc.LossServiceStub(channel)
        assert len(_batch(stub, [build_request("cross_entropy", _logits(), _labels())]).results) == 1


def test_entries_are_counted_up_to_the_limit_only() -> None:
    from lossd.server.rpc.batch import _more_fields_than

    entry = b"\x0a\x00"
    assert not _more_fields_than(entry * 4, 4) and _more_fields_than(entry * 5, 4)
    assert not _more_fields_than(b"", 0) and _more_fields_than(entry, 0)
    assert _more_fields_than(entry * 2_000_000, 1024)
    assert not _more_fields_than(b"\x0a\x05\x00", 1)  # truncated: the parser's to refuse


def test_concurrent_threads_are_coalesced_each_with_its_own_answer(server: RunningServer) -> None:
    registry = server.server.metrics.registry
    batches_before = registry.get_sample_value("lossd_requests_total", {"loss": "batch", "code": "OK"}) or 0
    wrong: list[Any] = []
    start = threading.Barrier(32)

    def caller(index: int, client: LossClient) -> None:
        rng = np.random.default_rng(index)
        start.wait()
        for step in range(15):
            logits, labels = rng.standard_normal((8, 5)).astype(np.float32), rng.integers(0, 5, 8)
            bad = step == 5 and index % 4 == 0
            if bad:
                labels[2] = 7
            try:
                result = client.cross_entropy(logits, labels, return_grad=True)
            except errors.InvalidArgumentError as error:
                if not bad or error.reason != "TARGET_OUT_OF_RANGE" or error.field != "target":
                    wrong.append((index, step, error))
                continue
            expected = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
            if bad or not np.allclose(result.loss, expected.numpy(), rtol=1e-6):
                wrong.append((index, step, result.loss))

    with LossClient(server.target, timeout=30, coalesce_in_flight=2) as client:
        threads = [threading.Thread(target=caller, args=(index, client)) for index in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a caller never got its answer"
    assert not wrong
    batches = registry.get_sample_value("lossd_requests_total", {"loss": "batch", "code": "OK"}) or 0
    assert batches > batches_before, "concurrent calls went in batches"


def test_without_coalescing_no_batch_is_sent(server: RunningServer) -> None:
    registry = server.server.metrics.registry
    before = registry.get_sample_value("lossd_requests_total", {"loss": "batch", "code": "OK"}) or 0
    with LossClient(server.target, timeout=30, coalesce=False) as client:
        pool = futures.ThreadPoolExecutor(16)
        list(pool.map(lambda _: client.cross_entropy(_logits(), _labels()), range(64)))
        pool.shutdown()
    assert (registry.get_sample_value("lossd_requests_total", {"loss": "batch", "code": "OK"}) or 0) == before


def test_asyncio_coalescing_timeouts_and_cancellation(server_factory: Callable[..., RunningServer]) -> None:
    """Tasks get their own answers; one whose timeout is short fails DEADLINE_EXCEEDED alone, one
    cancelled ends alone; the others are untouched."""
    running = server_factory(engine=SlowEngine(delay=0.2))

    async def main() -> None:
        async with AsyncLossClient(running.target, timeout=30, coalesce_in_flight=1) as client:
            logits, labels = _logits(), _labels()
            expected = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).numpy()
            first = asyncio.ensure_future(client.cross_entropy(logits, labels))  # holds the one slot
            await asyncio.sleep(0.05)
            waiting = [asyncio.ensure_future(client.cross_entropy(logits, labels)) for _ in range(6)]
            hurried = asyncio.ensure_future(client.cross_entropy(logits, labels, timeout=0.05))
            cancelled = asyncio.ensure_future(client.cross_entropy(logits, labels))
            await asyncio.sleep(0.01)
            cancelled.cancel()
            with pytest.raises(errors.DeadlineExceededError):
                await hurried
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            for done in [first, *waiting]:
                np.testing.assert_allclose((await done).loss, expected, rtol=1e-6)

    asyncio.run(main())
    registry = running.server.metrics.registry
    assert (registry.get_sample_value("lossd_requests_total", {"loss": "batch", "code": "OK"}) or 0) >= 1


def test_autograd_from_many_threads(server: RunningServer) -> None:
    with LossClient(server.target, timeout=30) as client:

        def step(index: int) -> bool:
            logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(index), requires_grad=True)
            labels = torch.arange(6) % 4
            lossd_torch.cross_entropy(logits, labels, client=client).backward()
            local = logits.detach().requires_grad_()
            F.cross_entropy(local, labels).backward()
            return torch.allclose(logits.grad, local.grad, rtol=1e-6, atol=1e-8)  # type: ignore[arg-type]

        with futures.ThreadPoolExecutor(16) as pool:
            assert all(pool.map(step, range(64)))


def _old_server() -> tuple[grpc.Server, str, list[str]]:
    """A server with ComputeLoss only (an older lossd): it answers every call with one response."""
    answer = pb.ComputeLossResponse()
    codec.encode(np.float32(1.5), "loss", out=answer.loss)
    seen: list[str] = []

    def compute(request: bytes, context: Any) -> bytes:
        seen.append("ComputeLoss")
        return answer.SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(8))
    handler = grpc.method_handlers_generic_handler(
        "lossd.v1.LossService", {"ComputeLoss": grpc.unary_unary_rpc_method_handler(compute)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}", seen


def test_a_server_without_the_batch_method_gets_single_calls() -> None:
    server, target, seen = _old_server()
    try:
        with (
            LossClient(target, timeout=30, coalesce_in_flight=1) as client,
            futures.ThreadPoolExecutor(16) as pool,
        ):
            losses = list(
                pool.map(lambda _: float(client.cross_entropy(_logits(), _labels()).loss), range(48))
            )
    finally:
        server.stop(0)
    assert losses == [1.5] * 48
    assert len(seen) == 48, "every call answered by ComputeLoss, none lost"
