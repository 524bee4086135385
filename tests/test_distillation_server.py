"""Distillation through a real server, everywhere the other losses are: unary and StreamLoss (whole and
in blocks while the input arrives), merged concurrent calls, the Open Inference Protocol, the
blocking and asyncio clients with numpy and torch, `lossd.client.torch.distillation`, metrics and
errors."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from test_open_inference import _infer, stub  # noqa: F401  (the OIP stub fixture)

from lossd.client import AsyncLossClient, LossClient, errors
from lossd.client import torch as lossd_torch
from lossd.v1.oip import open_inference_pb2 as oip
from lossd.v1.oip import open_inference_pb2_grpc as oip_grpc

from conftest import RunningServer
from distillation_reference import CHUNKED_RTOL, reference, reference_grad

torch.manual_seed(11)
STUDENT = torch.randn(4, 6, 50) * 2
TEACHER = torch.randn(4, 6, 50) * 2
LABELS = torch.randint(0, 50, (4, 6))
LABELS[0, :2] = -100
VALUES, IDS = torch.log_softmax(TEACHER.double(), -1).topk(8, -1)
VALUES = VALUES.float()
VALUES[1, 1, 5:] = -math.inf  # padding
PARTS = {"return_hard_loss": True, "return_soft_loss": True}


def check(result: Any, expected: tuple[torch.Tensor, ...], exact: bool) -> None:
    names = ("loss", "hard_loss", "soft_loss", "grad")
    for name, wanted in zip(names, expected, strict=False):
        actual = torch.as_tensor(getattr(result, name))
        if exact:
            assert torch.equal(actual, wanted), f"{name}: {actual} != {wanted}"
        else:
            torch.testing.assert_close(actual, wanted, rtol=CHUNKED_RTOL, atol=1e-6, msg=name)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_unary_is_the_reference_bit_for_bit(exact_client: LossClient, sparse: bool, reduction: str) -> None:
    kwargs: dict[str, Any] = {"labels": LABELS, "beta": 0.5, "weight_hard": 0.25, "temperature": 1.5}
    target = TEACHER
    if sparse:
        target, kwargs["teacher_ids"] = VALUES, IDS
    result = exact_client.distillation(
        STUDENT, target, reduction=reduction, return_grad=True, **PARTS, **kwargs
    )
    check(result, reference_grad(STUDENT, target, reduction=reduction, **kwargs), exact=True)
    numpy = exact_client.distillation(STUDENT.numpy(), target.numpy(), reduction=reduction, **kwargs)
    assert isinstance(numpy.loss, np.ndarray) and numpy.grad is None
    assert np.array_equal(numpy.loss, result.loss.numpy())


def test_plain_lists_of_labels_and_ids(exact_client: LossClient) -> None:
    student, teacher = STUDENT[0, :2], TEACHER[0, :2]
    values, ids = VALUES[0, :2], IDS[0, :2]
    result = exact_client.distillation(
        student, values, teacher_ids=ids.tolist(), labels=[3, 7], weight_hard=1.0
    )
    expected = reference(student, values, teacher_ids=ids, labels=torch.tensor([3, 7]), weight_hard=1.0)
    assert torch.equal(result.loss, expected[0])
    assert (
        exact_client.distillation(student, teacher, normalizer=10.0).loss
        == reference(student, teacher, normalizer=10.0)[0]
    )


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_streamed(server_factory: Callable[..., RunningServer], blocks: bool, reduction: str) -> None:
    """StreamLoss with every tensor in chunks: computed whole once it has arrived (one token row per
    sample), or in blocks of samples while the student's logits arrive (its reduced loss then summed
    in float64, so within CHUNKED_RTOL)."""
    running = server_factory(batching=False, stream_block_bytes=16 * 700 * 4)
    student = torch.randn(64, 700) if blocks else STUDENT[0, 0]
    teacher = torch.randn(64, 700) if blocks else TEACHER[0, 0]
    values, ids = torch.log_softmax(teacher, -1).topk(16, -1)
    labels = torch.randint(0, student.shape[-1], student.shape[:-1])
    if blocks:
        labels[::3] = -100
    kwargs: dict[str, Any] = {"labels": labels, "teacher_ids": ids, "beta": 0.2, "weight_hard": 0.5}
    with LossClient(running.target, stream_threshold_bytes=0, stream_chunk_bytes=1 << 16) as client:
        result = client.distillation(
            student, values, reduction=reduction, return_grad=True, **PARTS, **kwargs
        )
    expected = reference_grad(student, values, reduction=reduction, **kwargs)
    check(result, expected, exact=not blocks or reduction == "none")
    computations = running.server.metrics.registry.get_sample_value("lossd_batch_requests_count")
    assert (computations > 1) == blocks, computations


def test_merged_concurrent_calls_agree_with_alone(server_factory: Callable[..., RunningServer]) -> None:
    """A batching server merges compatible calls (their tokens concatenated); each keeps its own
    reduction, normalizer, labels and upstream gradient. The server holds a call back up to 0.5 s
    for company, so the 12 calls sent at once are computed in fewer computations than calls."""
    running = server_factory(max_queue_delay_us=500_000)
    calls = []
    for i in range(12):
        generator = torch.Generator().manual_seed(i)
        tokens = 3 + i % 4
        student, teacher = (
            torch.randn(tokens, 30, generator=generator),
            torch.randn(tokens, 30, generator=generator),
        )
        labels = torch.randint(-1, 30, (tokens,), generator=generator)
        kwargs: dict[str, Any] = {"labels": labels, "ignore_index": -1, "beta": 0.3, "weight_hard": 0.5}
        kwargs["reduction"] = ("mean", "sum", "none")[i % 3]
        if i % 4 == 1:
            kwargs["normalizer"], kwargs["reduction"] = 17.0, "mean"
        calls.append((student, teacher, kwargs))
    with LossClient(running.target, timeout=30, coalesce=False) as client, ThreadPoolExecutor(12) as pool:
        results = list(
            pool.map(lambda c: client.distillation(c[0], c[1], return_grad=True, **PARTS, **c[2]), calls)
        )
    for (student, teacher, kwargs), result in zip(calls, results, strict=True):
        check(result, reference_grad(student, teacher, **kwargs), exact=False)
    value = running.server.metrics.registry.get_sample_value
    computations = value("lossd_batch_requests_count")
    assert value("lossd_batch_requests_sum") == 12
    assert computations is not None and computations < 12, f"{computations} computations: nothing merged"


def test_asyncio_client_and_torch_autograd(server: RunningServer) -> None:
    async def run() -> Any:
        async with AsyncLossClient(server.target, timeout=30) as client:
            return await client.distillation(
                STUDENT, TEACHER, labels=LABELS, beta=1.0, return_grad=True, **PARTS
            )

    result = asyncio.run(run())
    check(result, reference_grad(STUDENT, TEACHER, labels=LABELS, beta=1.0), exact=False)

    with LossClient(server.target, timeout=30) as client:
        student = STUDENT.clone().requires_grad_(True)
        loss = lossd_torch.distillation(student, TEACHER, labels=LABELS, reduction="none", client=client)
        upstream = torch.randn(loss.shape)
        (loss * upstream).sum().backward()
    local = STUDENT.clone().requires_grad_(True)
    (reference(local, TEACHER, labels=LABELS, reduction="none")[0] * upstream).sum().backward()
    torch.testing.assert_close(student.grad, local.grad)


def test_a_training_step_through_lossd(server: RunningServer) -> None:
    """A student learns its teacher's distribution through lossd: the loss falls."""
    torch.manual_seed(0)
    teacher = torch.nn.Linear(8, 20)
    student = torch.nn.Linear(8, 20)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.05)
    losses = []
    with LossClient(server.target, timeout=30) as client:
        for _ in range(60):
            x = torch.randn(32, 8)
            with torch.no_grad():
                teacher_logits = 3 * teacher(x)
            loss = lossd_torch.distillation(student(x), teacher_logits, client=client)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < 0.2 * sum(losses[:5]), losses


def test_errors_name_the_field(client: LossClient) -> None:
    with pytest.raises(errors.InvalidArgumentError) as caught:
        client.distillation(STUDENT, torch.randn(4, 6, 51))
    assert caught.value.reason == "VOCABULARY_MISMATCH" and caught.value.field == "target.shape"
    with pytest.raises(errors.InvalidArgumentError) as caught:
        client.distillation(STUDENT, VALUES, teacher_ids=IDS + 45)
    assert caught.value.reason == "TEACHER_ID_OUT_OF_RANGE"
    assert caught.value.field == "distillation.teacher_ids"
    with pytest.raises(errors.InvalidArgumentError) as caught:
        client.distillation(STUDENT, TEACHER, temperature=0.0)
    assert caught.value.reason == "TEMPERATURE_INVALID" and caught.value.field == "distillation.temperature"


def test_streamed_ids_out_of_range_are_refused_before_compute(exact_server: RunningServer) -> None:
    with (
        LossClient(exact_server.target, stream_threshold_bytes=0) as client,
        pytest.raises(errors.InvalidArgumentError) as caught,
    ):
        client.distillation(STUDENT, VALUES, teacher_ids=IDS + 45)
    assert caught.value.reason == "TEACHER_ID_OUT_OF_RANGE"


def test_metrics_count_distillation(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory()
    with LossClient(running.target, timeout=30) as client:
        client.distillation(STUDENT, TEACHER)
        with pytest.raises(errors.InvalidArgumentError):
            client.distillation(STUDENT, TEACHER, beta=3.0)
    value = running.server.metrics.registry.get_sample_value
    assert value("lossd_requests_total", {"loss": "distillation", "code": "OK"}) == 1
    assert value("lossd_requests_total", {"loss": "distillation", "code": "INVALID_ARGUMENT"}) == 1


def test_open_inference(stub: oip_grpc.GRPCInferenceServiceStub) -> None:  # noqa: F811
    metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name="distillation"), timeout=10)
    assert [t.name for t in metadata.inputs] == ["input", "target", "teacher_ids", "labels", "grad_output"]
    assert [t.datatype for t in metadata.inputs][2:4] == ["INT64", "INT64"]
    assert [t.name for t in metadata.outputs] == ["loss", "hard_loss", "soft_loss", "input_grad"]
    tensors = [
        ("input", STUDENT.numpy(), "FP32"),
        ("target", VALUES.numpy(), "FP32"),
        ("teacher_ids", IDS.numpy(), "INT64"),
        ("labels", LABELS.numpy(), "INT64"),
    ]
    result = _infer(
        stub,
        "distillation",
        tensors,
        ("loss", "hard_loss", "soft_loss", "input_grad"),
        beta=0.5,
        weight_hard=0.5,
        temperature=2.0,
        top_k_renormalize=True,
    )
    options = {"beta": 0.5, "weight_hard": 0.5, "temperature": 2.0, "top_k_renormalize": True}
    expected = reference_grad(STUDENT, VALUES, teacher_ids=IDS, labels=LABELS, **options)
    for name, wanted in zip(("loss", "hard_loss", "soft_loss", "input_grad"), expected, strict=True):
        assert np.array_equal(result[name], wanted.numpy()), name
    with pytest.raises(grpc.RpcError) as caught:
        _infer(stub, "distillation", tensors, ("target_grad",))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_client_sizes_a_distillation_answer_from_its_tokens() -> None:
    """One loss (and the parts asked for) per token, not per logit: a small answer does not stream."""
    from lossd.client._calls import prepare_call

    student, teacher = np.zeros((64, 1000), np.float32), np.zeros((64, 1000), np.float32)
    assert prepare_call("distillation", student, teacher, reduction="none").answer_nbytes == 64 * 4
    with_parts = prepare_call("distillation", student, teacher, reduction="none", **PARTS)
    assert with_parts.answer_nbytes == 64 * 4 * 3
    assert prepare_call("distillation", student, teacher, return_hard_loss=True).answer_nbytes == 4 * 2
    with_grad = prepare_call("distillation", student, teacher, return_grad=True)
    assert with_grad.answer_nbytes == 4 + student.nbytes
