"""NaN and infinity: computed exactly as torch does, counted, and refused with --reject-nonfinite."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lossd.client import LossClient, errors
from lossd.server.engine.finite import nonfinite_fields, nonfinite_many
from lossd.server.losses import LossCall, make_options

from conftest import RunningServer

RNG = np.random.default_rng(11)
NAN, INF = float("nan"), float("inf")


def _logits(value: float, dtype: Any = np.float32, shape: tuple[int, ...] = (4, 5)) -> np.ndarray:
    x = RNG.standard_normal(shape).astype(dtype)
    x.flat[3] = value
    return x


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_cross_entropy_with_nonfinite_logits_matches_torch(
    exact_client: LossClient, value: float, dtype: Any
) -> None:
    logits, labels = _logits(value, dtype), np.array([0, 1, 2, 3])
    result = exact_client.cross_entropy(logits, labels, reduction="none", return_grad=True)
    x = torch.from_numpy(logits).requires_grad_()
    expected = F.cross_entropy(x, torch.from_numpy(labels), reduction="none")
    (grad,) = torch.autograd.grad(expected, x, torch.ones_like(expected))
    np.testing.assert_array_equal(result.loss, expected.detach().numpy())  # NaN where torch has NaN
    np.testing.assert_array_equal(result.grad, grad.numpy())


def test_kl_div_with_log_zero_matches_torch(exact_client: LossClient) -> None:
    """A student that gives a class zero probability (log-prob -inf) where the teacher gives zero too."""
    with np.errstate(divide="ignore"):
        student = np.log(np.array([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]], dtype=np.float32))
    teacher = np.array([[0.0, 0.5, 0.5], [0.1, 0.1, 0.8]], dtype=np.float32)
    for reduction in ("none", "batchmean"):
        result = exact_client.kl_div(student, teacher, reduction=reduction, return_grad=True)
        x = torch.from_numpy(student).requires_grad_()
        expected = F.kl_div(x, torch.from_numpy(teacher), reduction=reduction)
        (grad,) = torch.autograd.grad(expected, x, torch.ones_like(expected))
        np.testing.assert_array_equal(result.loss, expected.detach().numpy())
        np.testing.assert_array_equal(result.grad, grad.numpy())


def test_bfloat16_nonfinite_logits_match_torch(exact_client: LossClient) -> None:
    logits = torch.randn(4, 5, dtype=torch.bfloat16)
    logits[1, 2] = INF
    labels = torch.tensor([0, 1, 2, 3])
    result = exact_client.cross_entropy(logits, labels, reduction="none")
    expected = F.cross_entropy(logits, labels, reduction="none")
    assert torch.equal(result.loss.isnan(), expected.isnan())
    assert torch.equal(result.loss.nan_to_num(), expected.nan_to_num())


def _nonfinite_count(running: RunningServer, loss: str, field: str) -> float:
    value = running.server.metrics.registry.get_sample_value(
        "lossd_nonfinite_requests_total", {"loss": loss, "field": field}
    )
    return value or 0.0


def test_nonfinite_requests_are_counted_by_field(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory()
    with LossClient(running.target, timeout=30) as client:
        client.cross_entropy(_logits(NAN), np.array([0, 1, 2, 3]))
        client.cross_entropy(_logits(0.0), np.array([0, 1, 2, 3]))  # finite: not counted
        weight = np.array([1.0, INF, 1.0, 1.0, 1.0], np.float32)
        client.cross_entropy(_logits(INF), np.array([0, 1, 2, 3]), weight=weight)
        # Streamed (past the client's threshold), in blocks: counted once.
        big = _logits(-INF, shape=(4096, 512))
        streamed = LossClient(running.target, timeout=60, stream_threshold_bytes=1 << 20)
        with streamed:
            streamed.cross_entropy(big, RNG.integers(0, 512, 4096), return_grad=True)
    assert _nonfinite_count(running, "cross_entropy", "input") == 3
    assert _nonfinite_count(running, "cross_entropy", "cross_entropy.weight") == 1


def test_reject_nonfinite_refuses_them_with_the_field(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(reject_nonfinite=True)
    with LossClient(running.target, timeout=30) as client:
        with pytest.raises(errors.InvalidArgumentError) as refused:
            client.kl_div(_logits(0.0), _logits(NAN), reduction="batchmean")
        assert refused.value.reason == "NONFINITE_VALUE"
        assert refused.value.field == "target"
        assert "target holds NaN or infinite values" in refused.value.message
        grad_output = np.ones(4, np.float32)
        grad_output[2] = INF
        with pytest.raises(errors.InvalidArgumentError) as upstream:
            client.cross_entropy(
                _logits(1.0),
                np.array([0, 1, 2, 3]),
                reduction="none",
                grad_output=grad_output,
                return_grad=True,
            )
        assert upstream.value.field == "gradients.grad_output"
        assert client.cross_entropy(_logits(1.0), np.array([0, 1, 2, 3])).loss.shape == ()
        with (
            LossClient(running.target, timeout=60, stream_threshold_bytes=1 << 20) as streamed,
            pytest.raises(errors.InvalidArgumentError) as streamed_refusal,
        ):
            streamed.cross_entropy(
                _logits(NAN, shape=(4096, 512)), RNG.integers(0, 512, 4096), return_grad=True
            )
        assert streamed_refusal.value.reason == "NONFINITE_VALUE"
    assert _nonfinite_count(running, "kl_div", "target") == 1
    assert _nonfinite_count(running, "cross_entropy", "gradients.grad_output") == 1
    assert _nonfinite_count(running, "cross_entropy", "input") == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", [7, 1 << 19], ids=["small", "large"])
def test_the_check_finds_every_kind_of_nonfinite_value(dtype: torch.dtype, size: int) -> None:
    for value in (NAN, INF, -INF):
        x = torch.zeros(size, 3, dtype=dtype)
        target = torch.zeros(size, 3, dtype=dtype)
        call = LossCall(make_options("kl_div"), x, target)
        assert nonfinite_fields(call) == ()
        x[size - 1, 2] = value
        assert nonfinite_fields(call) == ("input",)
        target[0, 0] = value
        assert nonfinite_fields(call) == ("input", "target")
    # the largest finite values are finite
    x = torch.full((size, 3), torch.finfo(dtype).max, dtype=dtype)
    assert nonfinite_fields(LossCall(make_options("kl_div"), x, -x)) == ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", ["cross_entropy", "kl_div", "distillation"])
def test_calls_checked_together_flag_what_each_alone_would(loss: str, dtype: torch.dtype) -> None:
    """Calls computed together are checked in one pass first; each call's fields are then exactly
    those its own check finds (distillation's teacher log-probabilities may hold -inf, a value)."""
    rng = torch.Generator().manual_seed(5)

    def call(value: float | None, where: str) -> LossCall:
        x = torch.randn(3, 4, generator=rng).to(dtype)
        target = torch.randn(3, 4, generator=rng).to(dtype)
        grad_output = torch.ones((), dtype=dtype)
        if value is not None:
            {"input": x, "target": target, "grad_output": grad_output}[where].view(-1)[-1] = value
        return LossCall(make_options(loss), x, target, grad_output=grad_output)

    for value in (None, NAN, INF, -INF):
        for where in ("input", "target", "grad_output"):
            for position in range(3):
                calls = [call(value if i == position else None, where) for i in range(3)]
                assert nonfinite_many(calls) == [nonfinite_fields(c) for c in calls]


def test_a_call_chooses_to_refuse_or_compute_whatever_the_server_default(
    server_factory: Callable[..., RunningServer],
) -> None:
    """The per-call choice: refuse names the tensor and the first bad index; compute overrides a
    refusing server; unset keeps the server's default."""
    logits = np.zeros((3, 4), np.float32)
    logits[1, 2] = np.nan
    labels = np.array([0, 1, 2])
    lenient = server_factory()
    refusing = LossClient(lenient.target, timeout=30, nonfinite="refuse")
    with refusing, pytest.raises(errors.InvalidArgumentError) as refused:
        refusing.cross_entropy(logits, labels)
    assert refused.value.reason == "NONFINITE_VALUE" and refused.value.field == "input"
    assert refused.value.metadata["index"] == "[1, 2]"
    assert "input[1, 2] is nan" in str(refused.value)
    with LossClient(lenient.target, timeout=30) as client:
        assert np.isnan(client.cross_entropy(logits, labels).loss)
    strict = server_factory(reject_nonfinite=True)
    with LossClient(strict.target, timeout=30, nonfinite="compute") as client:
        assert np.isnan(client.cross_entropy(logits, labels).loss)
    with LossClient(strict.target, timeout=30) as client, pytest.raises(errors.InvalidArgumentError):
        client.cross_entropy(logits, labels)
    with pytest.raises(errors.InvalidArgumentError) as bad:
        LossClient(lenient.target, nonfinite="maybe").cross_entropy(logits, labels)
    assert bad.value.field == "nonfinite"


def test_an_unknown_policy_in_a_raw_request_is_refused_naming_the_field(server: RunningServer) -> None:
    import grpc

    from lossd.client._calls import prepare_call
    from lossd.v1 import loss_service_pb2_grpc as pb_grpc
    from lossd.wire.status import from_rpc_error

    request = prepare_call("nll_loss", np.zeros((2, 3), np.float32), np.array([0, 1])).unary()
    request.nonfinite = 7  # type: ignore[assignment]  # what another language's client might send
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.LossServiceStub(channel).ComputeLoss(request, timeout=30)
    error = from_rpc_error(refused.value)
    assert error.reason == "NONFINITE_POLICY_INVALID" and error.field == "nonfinite"
