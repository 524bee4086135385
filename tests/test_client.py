"""The Python client: kinds in and out, async, timeouts, errors, channel options, life without torch."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lossd.client import AsyncLossClient, LossClient, errors
from lossd.client._calls import build_request, decode_response
from lossd.v1 import loss_service_pb2 as pb
from lossd.wire.status import from_rpc_error

from conftest import RunningServer, SlowEngine

RNG = np.random.default_rng(3)
LOGITS = RNG.standard_normal((6, 4)).astype(np.float32)
LABELS = np.array([0, 3, 1, 2, 2, 0])


def test_numpy_in_numpy_out(exact_client: LossClient) -> None:
    result = exact_client.cross_entropy(LOGITS, LABELS, label_smoothing=0.1, return_grad=True)
    assert isinstance(result.loss, np.ndarray) and result.loss.dtype == np.float32 and result.loss.shape == ()
    assert isinstance(result.grad, np.ndarray) and result.grad.shape == LOGITS.shape
    assert result.target_grad is None
    x = torch.from_numpy(LOGITS).requires_grad_()
    expected = F.cross_entropy(x, torch.from_numpy(LABELS), label_smoothing=0.1)
    expected.backward()
    assert result.loss == expected.item()
    np.testing.assert_array_equal(result.grad, x.grad.numpy())  # type: ignore[union-attr]


def test_torch_in_torch_out_bfloat16(client: LossClient) -> None:
    x = torch.from_numpy(LOGITS).to(torch.bfloat16)
    result = client.cross_entropy(x, torch.from_numpy(LABELS), reduction="none", return_grad=True)
    assert isinstance(result.loss, torch.Tensor) and result.loss.dtype == torch.bfloat16
    assert result.loss.shape == (6,)
    assert result.grad is not None and result.grad.dtype == torch.bfloat16
    assert torch.equal(result.loss, F.cross_entropy(x, torch.from_numpy(LABELS), reduction="none"))


def test_gradient_dtype_by_name_numpy_or_torch(client: LossClient) -> None:
    for dtype in ("bfloat16", np.float64, torch.float16):
        result = client.nll_loss(torch.from_numpy(LOGITS), LABELS, return_grad=True, grad_dtype=dtype)
        assert result.grad is not None
        assert str(result.grad.dtype).endswith(
            str(np.dtype(dtype).name if dtype is np.float64 else dtype).removeprefix("torch.")
        )


def test_weights_as_a_list_take_the_input_dtype(exact_client: LossClient) -> None:
    x = torch.from_numpy(LOGITS).half()
    result = exact_client.cross_entropy(x, LABELS, weight=[1.0, 2.0, 0.5, 1.0])
    expected = F.cross_entropy(x, torch.from_numpy(LABELS), weight=torch.tensor([1.0, 2.0, 0.5, 1.0]).half())
    assert torch.equal(result.loss, expected)


def test_kl_div_with_target_gradient(client: LossClient) -> None:
    student = torch.log_softmax(torch.randn(3, 5), 1)
    teacher = torch.softmax(torch.randn(3, 5), 1)
    result = client.kl_div(student, teacher, reduction="batchmean", return_grad=True, return_target_grad=True)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    F.kl_div(s, t, reduction="batchmean").backward()
    assert torch.equal(result.grad, s.grad)  # type: ignore[arg-type]
    assert torch.equal(result.target_grad, t.grad)  # type: ignore[arg-type]


def test_raw_request(client: LossClient) -> None:
    request = build_request("nll_loss", LOGITS, LABELS, reduction="sum", ignore_index=3)
    response = client.compute(request)
    assert isinstance(response, pb.ComputeLossResponse)
    assert not response.gradients and not response.outputs  # nothing sent that was not asked for
    loss = decode_response(response, LOGITS).loss
    expected = F.nll_loss(torch.from_numpy(LOGITS), torch.from_numpy(LABELS), reduction="sum", ignore_index=3)
    assert loss == expected.item()


def test_results_follow_the_input_device() -> None:
    """The CPU-testable half of 'CUDA tensors come back on the caller's device'."""
    response = pb.ComputeLossResponse()
    from lossd.wire import codec

    codec.encode(np.ones((2, 2), np.float32), out=response.gradients["input"])
    codec.encode(np.float32(1.0), out=response.loss)
    result = decode_response(response, torch.empty(2, device="meta"))
    assert result.loss.device.type == "meta" and result.grad.device.type == "meta"


def test_bad_reduction_is_refused_locally(client: LossClient) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="'average'") as caught:
        client.cross_entropy(LOGITS, LABELS, reduction="average")  # type: ignore[arg-type]
    assert caught.value.reason == "REDUCTION_INVALID"


def test_async_client(server: RunningServer) -> None:
    async def main() -> list[Any]:
        async with AsyncLossClient(server.target, timeout=30) as aio:
            calls = [aio.cross_entropy(LOGITS, LABELS, return_grad=True) for _ in range(16)]
            calls.append(aio.nll_loss(torch.from_numpy(LOGITS), LABELS, reduction="none"))
            calls.append(aio.kl_div(np.log(np.full((2, 3), 1 / 3)), np.full((2, 3), 1 / 3)))
            results = await asyncio.gather(*calls)
            with pytest.raises(errors.InvalidArgumentError):
                await aio.cross_entropy(LOGITS, LABELS + 10)
            return results

    results = asyncio.run(main())
    assert all(r.loss == results[0].loss for r in results[:16])
    assert isinstance(results[16].loss, torch.Tensor) and results[16].loss.shape == (6,)
    assert results[17].loss == 0.0


def test_timeout_is_deadline_exceeded(server_factory: Callable[..., RunningServer]) -> None:
    slow = server_factory(engine=SlowEngine(delay=2.0))
    with LossClient(slow.target, timeout=60) as c, pytest.raises(errors.DeadlineExceededError):
        c.cross_entropy(LOGITS, LABELS, timeout=0.2)  # the per-call timeout beats the client's 60 s


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_is_unavailable() -> None:
    with LossClient(f"127.0.0.1:{_closed_port()}", timeout=5) as c, pytest.raises(errors.UnavailableError):
        c.cross_entropy(LOGITS, LABELS)


def test_client_message_limit(server: RunningServer) -> None:
    with (
        LossClient(server.target, max_message_bytes=100) as small,
        pytest.raises(errors.ResourceExhaustedError),
    ):
        small.cross_entropy(LOGITS, LABELS)


def test_injected_channel_is_not_closed(server: RunningServer) -> None:
    channel = grpc.insecure_channel(server.target)
    with LossClient(channel=channel) as c:
        c.cross_entropy(LOGITS, LABELS)
    assert LossClient(channel=channel).cross_entropy(LOGITS, LABELS).loss.shape == ()
    channel.close()


def test_every_status_code_has_its_exception() -> None:
    seen = set()
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        cls = errors.error_class(code.name)
        assert cls.code == code.name, f"{code.name} maps to {cls.__name__}"
        assert issubclass(cls, errors.LossdError)
        seen.add(cls)
    assert len(seen) == len(grpc.StatusCode) - 1
    assert errors.error_class("NO_SUCH_CODE") is errors.UnknownError


def test_plain_grpc_errors_map_without_details(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        missing = channel.unary_unary("/lossd.v1.LossService/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as caught:
            missing(b"", timeout=10)
    error = from_rpc_error(caught.value)
    assert isinstance(error, errors.UnimplementedError)
    assert error.reason == "" and error.field is None


def test_client_needs_neither_torch_nor_the_server(server: RunningServer) -> None:
    """With torch unimportable, the numpy client still works; lossd.client.errors loads without gRPC."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import lossd.client.errors, lossd.client.codec
        assert not any(m.split(".")[0] == "grpc" for m in sys.modules), "errors/codec pulled in grpc"
        import numpy as np
        from lossd.client import LossClient
        with LossClient("{server.target}", timeout=30) as c:
            r = c.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 2]), return_grad=True)
        assert abs(float(r.loss) - np.log(3)) < 1e-6, r.loss
        assert "lossd.server" not in sys.modules
        print("ok")
    """)
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
