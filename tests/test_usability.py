"""What a new user meets first: a closed client, torch's positional arguments, bfloat16 with numpy,
switches given alone, a metrics port already taken, the start-up lines, the OIP metadata's ranks."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lossd.client import AsyncLossClient, LossClient, errors
from lossd.server.config import ServerConfig
from lossd.v1.oip import open_inference_pb2 as oip

from conftest import RunningServer
from processes import ServeProcess, free_port

PROTOCOL = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def test_a_closed_client_raises_a_lossd_error(server: RunningServer) -> None:
    with LossClient(server.target, timeout=30) as client:
        client.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]))
    with pytest.raises(errors.FailedPreconditionError) as closed:
        client.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]))
    assert closed.value.reason == "CLIENT_CLOSED" and "closed" in closed.value.message


def test_a_closed_async_client_raises_a_lossd_error(server: RunningServer) -> None:
    import asyncio

    async def scenario() -> None:
        async with AsyncLossClient(server.target, timeout=30) as client:
            await client.nll_loss(np.zeros((2, 3), np.float32), np.array([0, 1]))
        with pytest.raises(errors.FailedPreconditionError):
            await client.nll_loss(np.zeros((2, 3), np.float32), np.array([0, 1]))

    asyncio.run(scenario())


def test_weight_is_positional_as_in_torch(client: LossClient) -> None:
    logits, labels, weight = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]), torch.rand(4)
    assert torch.allclose(
        client.cross_entropy(logits, labels, weight).loss, F.cross_entropy(logits, labels, weight)
    )
    log_probs = torch.log_softmax(logits, 1)
    assert torch.allclose(
        client.nll_loss(log_probs, labels, weight).loss, F.nll_loss(log_probs, labels, weight)
    )
    with pytest.raises(TypeError) as wrong:
        client.cross_entropy(logits, labels, weight, -100)  # type: ignore[misc]
    assert "_Losses" not in str(wrong.value)


def test_numpy_callers_get_bfloat16_back(client: LossClient) -> None:
    logits = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    result = client.cross_entropy(logits, np.array([0, 1, 2, 3]), return_grad=True, grad_dtype="bfloat16")
    assert result.grad.dtype == ml_dtypes.bfloat16
    expected = torch.func.grad(lambda x: F.cross_entropy(x, torch.tensor([0, 1, 2, 3])))(
        torch.from_numpy(logits)
    )
    np.testing.assert_array_equal(result.grad.astype(np.float32), expected.to(torch.bfloat16).float().numpy())
    # bfloat16 numpy input works, and its results come back in kind
    half = client.cross_entropy(logits.astype(ml_dtypes.bfloat16), np.array([0, 1, 2, 3]), return_grad=True)
    assert half.loss.dtype == ml_dtypes.bfloat16 and half.grad.dtype == ml_dtypes.bfloat16


def test_a_switch_given_alone_turns_it_on_and_help_says_unset() -> None:
    assert ServerConfig.parse(["--reject-nonfinite"], environ={}).reject_nonfinite is True
    assert ServerConfig.parse(["--reject-nonfinite", "off"], environ={}).reject_nonfinite is False
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    text = parser.format_help()
    assert "default )" not in text and "default unset)" in text


def test_a_metrics_port_in_use_is_named_with_its_setting(serve_process: Callable[..., ServeProcess]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = serve_process(
            "--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--metrics-port", str(port)
        )
        status, log = server.finish(60)
    assert status == 1
    assert f"cannot serve metrics on port {port} (--metrics-port, LOSSD_METRICS_PORT" in log, log
    assert "Traceback" not in log


def test_the_start_up_lines_name_every_service_and_the_metrics_endpoint(
    serve_process: Callable[..., ServeProcess],
) -> None:
    metrics = free_port()
    server = serve_process(
        "--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--metrics-port", str(metrics)
    )
    server.serving()
    line = server.wait_for(r"lossd also serves (.*)").group(0)
    for service in ("inference.GRPCInferenceService", "grpc.health.v1.Health", "grpc.reflection.v1alpha"):
        assert service in line
    assert f"metrics on http://127.0.0.1:{metrics}/metrics" in line
    server.process.terminate()
    assert server.finish()[0] == 0


def test_the_oip_metadata_and_the_readme_agree_on_ranks(channel: grpc.Channel, client: LossClient) -> None:
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelMetadata",
        request_serializer=oip.ModelMetadataRequest.SerializeToString,
        response_deserializer=oip.ModelMetadataResponse.FromString,
    )
    metadata = call(oip.ModelMetadataRequest(name="cross_entropy"), timeout=30)
    shapes = {tensor.name: list(tensor.shape) for tensor in metadata.inputs}
    assert shapes["input"] == [-1, -1] and shapes["target"] == [-1]
    assert "every rank torch accepts" in PROTOCOL
    # a rank the metadata does not show is accepted, as docs/protocol.md says
    logits = torch.randn(2, 3, 4)
    labels = torch.randint(0, 3, (2, 4))
    assert torch.allclose(client.cross_entropy(logits, labels).loss, F.cross_entropy(logits, labels))


def test_the_health_command_of_the_client_alone_does_not_import_the_server_packages() -> None:
    code = (
        "import sys; from lossd import cli; from lossd.client import health; "
        "assert not any(m in sys.modules for m in ('torch', 'prometheus_client')), sorted(sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0


class _Lost(grpc.RpcError):
    """What a sync call raises when its server's connection broke mid-answer."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "Stream removed (recvmsg:Connection reset by peer (104))"

    def trailing_metadata(self) -> tuple[()]:
        return ()


def test_a_call_whose_connection_broke_mid_answer_is_sent_once_more(server: RunningServer) -> None:
    """gRPC's retry policy does not retry a call once the answer's headers arrived; a loss call is
    idempotent, so the client sends it once more (and only once). Without coalescing here; with it
    below."""
    with LossClient(server.target, timeout=30, coalesce=False) as client:
        real = client._stub.ComputeLoss
        attempts: list[int] = []

        def flaky(request: object, **kwargs: object) -> object:
            attempts.append(1)
            if len(attempts) == 1:
                raise _Lost()
            return real(request, **kwargs)

        client._stub.ComputeLoss = flaky  # type: ignore[method-assign]
        result = client.cross_entropy(torch.tensor([[1.0, 2.0]]), torch.tensor([1]))
        assert len(attempts) == 2 and result.loss.shape == ()

        attempts.clear()

        def dead(request: object, **kwargs: object) -> object:
            attempts.append(1)
            raise _Lost()

        client._stub.ComputeLoss = dead  # type: ignore[method-assign]
        with pytest.raises(errors.UnavailableError):
            client.cross_entropy(torch.tensor([[1.0, 2.0]]), torch.tensor([1]))
        assert len(attempts) == 2


class _LostFirst:
    """The coalescer's single call whose connection breaks mid-answer."""

    def __init__(self) -> None:
        self.calls = 0

    def future(self, request: object, **kwargs: object) -> futures.Future[object]:
        self.calls += 1
        lost: futures.Future[object] = futures.Future()
        lost.set_exception(_Lost())
        return lost


def test_a_coalesced_call_whose_connection_broke_is_sent_once_more(server: RunningServer) -> None:
    with LossClient(server.target, timeout=30) as client:
        single = _LostFirst()
        client._coalescer._single = single
        real = client._stub.ComputeLoss
        again: list[int] = []

        def count(request: object, **kwargs: object) -> object:
            again.append(1)
            return real(request, **kwargs)

        client._stub.ComputeLoss = count  # type: ignore[method-assign]
        result = client.cross_entropy(torch.tensor([[1.0, 2.0]]), torch.tensor([1]))
        assert single.calls == 1 and len(again) == 1 and result.loss.shape == ()

        def dead(request: object, **kwargs: object) -> object:
            again.append(1)
            raise _Lost()

        again.clear()
        client._stub.ComputeLoss = dead  # type: ignore[method-assign]
        with pytest.raises(errors.UnavailableError):
            client.cross_entropy(torch.tensor([[1.0, 2.0]]), torch.tensor([1]))
        assert single.calls == 2 and len(again) == 1, "sent once more, and only once"
