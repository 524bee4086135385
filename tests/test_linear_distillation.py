"""Fused linear distillation against the distillation reference on the logits torch computes whole,
within the tolerances the .proto states: every option, dense and top-k teachers, shapes, chunk
boundaries, dtypes, ignored tokens; the student head's gradients; and through a server with a
resident teacher head, unary, streamed, asyncio and torch autograd."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossd.client import AsyncLossClient, LossClient
from lossd.client import torch as lossd_torch
from lossd.server.engine import LossEngine
from lossd.server.losses import LossCall, make_options
from lossd.server.losses import chunked as chunked_module
from lossd.v1.oip import open_inference_pb2 as oip
from lossd.v1.oip import open_inference_pb2_grpc as oip_grpc
from lossd.wire.errors import InvalidArgumentError

from conftest import RunningServer
from distillation_reference import reference
from tolerances import close

ENGINE = LossEngine("cpu")


def unfused(
    hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    classifier: torch.Tensor,
    teacher_classifier: torch.Tensor,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    grad_output: torch.Tensor | None = None,
    top_k: int = 0,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(loss, hard, soft, [d hidden, d classifier, d bias (if any)]): the logits whole, then the
    distillation reference, in the compute dtype (float32 for float16 and bfloat16)."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    lead = hidden.shape[:-1]
    leaf = hidden.detach().clone().requires_grad_()
    head = classifier.detach().to(dtype).requires_grad_()
    offset = None if bias is None else bias.detach().to(dtype).requires_grad_()
    student = leaf.reshape(-1, hidden.shape[-1]).to(dtype) @ head.T
    if offset is not None:
        student = student + offset
    teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(dtype) @ teacher_classifier.to(dtype).T
    if teacher_bias is not None:
        teacher = teacher + teacher_bias.to(dtype)
    ids = None
    if top_k:
        temperature = options.get("temperature", 1.0)
        teacher, ids = F.log_softmax(teacher / temperature, dim=-1).topk(top_k, dim=-1)
        ids = ids.reshape(*lead, top_k)
    total, hard, soft = reference(
        student.reshape(*lead, -1),
        teacher.reshape(*lead, -1),
        teacher_ids=ids,
        labels=labels,
        reduction=reduction,
        **options,
    )
    upstream = torch.ones_like(total) if grad_output is None else grad_output.to(total.dtype)
    leaves = [leaf, head] + ([] if offset is None else [offset])
    grads = list(torch.autograd.grad(total, leaves, upstream))
    return total.detach(), hard.detach(), soft.detach(), grads


def fused(
    hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    classifier: torch.Tensor,
    teacher_classifier: torch.Tensor,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    grad_output: torch.Tensor | None = None,
    tensor_grads: frozenset[str] = frozenset(),
    **options: Any,
) -> Any:
    tensors = {"classifier": classifier, "teacher_classifier": teacher_classifier}
    for name, tensor in (("bias", bias), ("teacher_bias", teacher_bias), ("labels", labels)):
        if tensor is not None:
            tensors[name] = tensor
    call = LossCall(
        make_options("linear_distillation", reduction, **options),
        hidden,
        teacher_hidden,
        tensors=tensors,
        grads=frozenset({"input"}) | tensor_grads,
        outputs=frozenset({"hard_loss", "soft_loss"}),
        grad_output=grad_output,
    )
    return ENGINE.compute(call)


def check(out: Any, expected: tuple[Any, ...], dtype: torch.dtype, with_bias: bool = True) -> None:
    loss, hard, soft, grads = expected
    close(out.loss, loss, dtype, "loss")
    close(out.outputs["hard_loss"], hard, dtype, "hard_loss")
    close(out.outputs["soft_loss"], soft, dtype, "soft_loss")
    close(out.input_grad, grads[0].to(dtype), dtype, "input grad", gradient=True)
    close(out.grads["classifier"], grads[1].to(dtype), dtype, "classifier grad", gradient=True)
    if with_bias:
        close(out.grads["bias"], grads[2].to(dtype), dtype, "bias grad", gradient=True)


TEACHERS = {
    "dense": {},
    "top_k_tail": {"top_k": 5},
    "top_k_renormalized": {"top_k": 5, "top_k_renormalize": True},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("teacher", sorted(TEACHERS))
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_every_option_against_the_unfused_reference(
    monkeypatch: pytest.MonkeyPatch, reduction: str, chunked: bool, teacher: str, beta: float
) -> None:
    if chunked:  # 37 tokens in chunks of 5: V = 23 does not divide the chunk
        monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 24 * 5)
    torch.manual_seed(0)
    hidden, teacher_hidden = torch.randn(37, 16), torch.randn(37, 12)
    classifier, bias = torch.randn(23, 16), torch.randn(23)
    teacher_classifier, teacher_bias = torch.randn(23, 12), torch.randn(23)
    labels = torch.randint(0, 23, (37,))
    labels[::4] = -1
    options = {
        "beta": beta,
        "temperature": 2.0,
        "temperature_squared": True,
        "weight_hard": 0.5,
        "weight_soft": 0.8,
        "ignore_index": -1,
        "label_smoothing": 0.1,
        **TEACHERS[teacher],
    }
    upstream = torch.randn(37) if reduction == "none" else torch.tensor(1.7)
    tensors = (hidden, teacher_hidden, classifier, teacher_classifier, bias, teacher_bias)
    out = fused(
        *tensors,
        labels=labels,
        reduction=reduction,
        grad_output=upstream,
        tensor_grads=frozenset({"classifier", "bias"}),
        **options,
    )
    expected = unfused(*tensors, labels=labels, reduction=reduction, grad_output=upstream, **options)
    check(out, expected, torch.float32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    size=st.integers(1, 9),
    teacher_size=st.integers(1, 9),
    classes=st.integers(2, 13),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    beta=st.sampled_from([0.0, 0.3, 1.0]),
    top_k=st.integers(0, 2),
    with_labels=st.booleans(),
    chunk=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_shapes_dtypes_chunks(
    lead: list[int],
    size: int,
    teacher_size: int,
    classes: int,
    dtype: torch.dtype,
    reduction: str,
    beta: float,
    top_k: int,
    with_labels: bool,
    chunk: int,
    seed: int,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn((*lead, size), generator=generator).to(dtype)
    teacher_hidden = torch.randn((*lead, teacher_size), generator=generator).to(dtype)
    classifier = torch.randn(classes, size, generator=generator).to(dtype)
    teacher_classifier = torch.randn(classes, teacher_size, generator=generator).to(dtype)
    labels = torch.randint(-1, classes, tuple(lead), generator=generator) if with_labels else None
    options = {"beta": beta, "top_k": top_k, "ignore_index": -1, "weight_hard": 0.5 if with_labels else 0.0}
    original = chunked_module.CHUNK_ELEMENTS
    chunked_module.CHUNK_ELEMENTS = (classes + 1) * chunk
    try:
        out = fused(
            hidden,
            teacher_hidden,
            classifier,
            teacher_classifier,
            labels=labels,
            reduction=reduction,
            tensor_grads=frozenset({"classifier"}),
            **options,
        )
    finally:
        chunked_module.CHUNK_ELEMENTS = original
    expected = unfused(
        hidden, teacher_hidden, classifier, teacher_classifier, labels=labels, reduction=reduction, **options
    )
    check(out, expected, dtype, with_bias=False)


def test_one_token_every_token_ignored_truncation_and_normalizer() -> None:
    torch.manual_seed(1)
    classifier, teacher_classifier = torch.randn(7, 6), torch.randn(9, 4)
    one = (torch.randn(6), torch.randn(4), classifier, teacher_classifier)
    options = {"truncate_teacher": True, "beta": 0.5}
    check(
        fused(*one, tensor_grads=frozenset({"classifier"}), **options),
        unfused(*one, **options),
        torch.float32,
        with_bias=False,
    )
    ignored = fused(
        torch.randn(3, 6),
        torch.randn(3, 4),
        classifier,
        teacher_classifier,
        labels=torch.full((3,), -100),
        reduction="sum",
        tensor_grads=frozenset({"classifier"}),
        **options,
    )
    assert float(ignored.loss) == 0.0 and torch.equal(torch.as_tensor(ignored.input_grad), torch.zeros(3, 6))
    assert torch.equal(torch.as_tensor(ignored.grads["classifier"]), torch.zeros(7, 6))
    tensors = (torch.randn(5, 6), torch.randn(5, 4), classifier, teacher_classifier)
    labels = torch.tensor([0, -100, 3, 4, -100])
    options = {"truncate_teacher": True, "normalizer": 64.0, "weight_hard": 1.0}
    check(
        fused(*tensors, labels=labels, tensor_grads=frozenset({"classifier"}), **options),
        unfused(*tensors, labels=labels, **options),
        torch.float32,
        with_bias=False,
    )


def test_refusals_name_the_field() -> None:
    hidden, teacher_hidden = torch.randn(3, 4), torch.randn(3, 2)
    heads = {"classifier": torch.randn(5, 4), "teacher_classifier": torch.randn(5, 2)}
    name = "linear_distillation"
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"tensors": {"classifier": heads["classifier"]}}, "FIELD_MISSING", f"{name}.teacher_classifier"),
        (
            {"tensors": {**heads, "teacher_classifier": torch.randn(5, 3)}},
            "CLASSIFIER_SHAPE_MISMATCH",
            f"{name}.teacher_classifier.shape",
        ),
        (
            {"tensors": {**heads, "teacher_bias": torch.randn(4)}},
            "WEIGHT_SHAPE_MISMATCH",
            f"{name}.teacher_bias.shape",
        ),
        ({"tensors": heads, "top_k": 6}, "TOP_K_INVALID", f"{name}.top_k"),
        ({"tensors": heads, "top_k_renormalize": True}, "OPTION_NOT_APPLICABLE", f"{name}.top_k_renormalize"),
        (
            {"tensors": {**heads, "teacher_classifier": torch.randn(6, 2)}},
            "VOCABULARY_MISMATCH",
            f"{name}.teacher_classifier.shape",
        ),
        (
            {"tensors": {**heads, "teacher_classifier": torch.randn(6, 2)}, "top_k": 2},
            "VOCABULARY_MISMATCH",
            f"{name}.teacher_classifier.shape",
        ),
        ({"tensors": heads, "weight_hard": 1.0}, "LABELS_MISSING", f"{name}.labels"),
        (
            {"tensors": {**heads, "labels": torch.tensor([0, 5, 1])}},
            "LABEL_OUT_OF_RANGE",
            f"{name}.labels",
        ),
        ({"tensors": heads, "teacher": torch.randn(2, 2)}, "TEACHER_SHAPE_MISMATCH", "target.shape"),
        ({"tensors": heads, "beta": 2.0}, "BETA_OUT_OF_RANGE", f"{name}.beta"),
    ]
    for case, reason, field in cases:
        spec = dict(case)
        tensors, teacher = spec.pop("tensors"), spec.pop("teacher", teacher_hidden)
        call = LossCall(make_options(name, "mean", **spec), hidden, teacher, tensors=tensors)
        with pytest.raises(InvalidArgumentError) as caught:
            ENGINE.prepare(call)
        assert (caught.value.reason, caught.value.field) == (reason, field), case


def _problem(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(4, 9, 32, generator=generator),
        "teacher_hidden": torch.randn(4, 9, 48, generator=generator),
        "classifier": torch.randn(300, 32, generator=generator),
        "bias": torch.randn(300, generator=generator),
        "teacher_classifier": torch.randn(300, 48, generator=generator),
        "labels": torch.randint(0, 300, (4, 9), generator=generator),
    }


@pytest.mark.parametrize("stream", [False, True])
def test_through_a_server_with_a_resident_teacher_head(server: RunningServer, stream: bool) -> None:
    p = _problem(2)
    options = {"beta": 0.5, "temperature": 2.0, "weight_hard": 0.3, "top_k": 20}
    threshold = 0 if stream else 1 << 30
    with LossClient(server.target, timeout=30, stream_threshold_bytes=threshold) as client:
        teacher_head = client.resident(p["teacher_classifier"])
        result = client.linear_distillation(
            p["hidden"],
            p["teacher_hidden"],
            p["classifier"],
            teacher_head,
            bias=p["bias"],
            labels=p["labels"],
            return_grad=True,
            return_classifier_grad=True,
            return_bias_grad=True,
            return_hard_loss=True,
            return_soft_loss=True,
            **options,
        )
    loss, hard, soft, grads = unfused(
        p["hidden"],
        p["teacher_hidden"],
        p["classifier"],
        p["teacher_classifier"],
        p["bias"],
        labels=p["labels"],
        **options,
    )
    close(result.loss, loss, torch.float32, "loss")
    close(result.hard_loss, hard, torch.float32, "hard")
    close(result.soft_loss, soft, torch.float32, "soft")
    for actual, expected, what in zip(
        (result.grad, result.classifier_grad, result.bias_grad),
        grads,
        ("input", "classifier", "bias"),
        strict=True,
    ):
        assert actual is not None, what
        close(actual, expected, torch.float32, what, gradient=True)


def test_torch_autograd_and_asyncio(server: RunningServer) -> None:
    p = _problem(3)

    async def remote() -> Any:
        async with AsyncLossClient(server.target, timeout=30) as client:
            return await client.linear_distillation(
                p["hidden"], p["teacher_hidden"], p["classifier"], p["teacher_classifier"], beta=1.0
            )

    result = asyncio.run(remote())
    loss, *_ = unfused(p["hidden"], p["teacher_hidden"], p["classifier"], p["teacher_classifier"], beta=1.0)
    close(result.loss, loss, torch.float32, "asyncio loss")
    with LossClient(server.target, timeout=30) as client:
        for reduction in ("mean", "none"):
            leaves = [p[name].clone().requires_grad_() for name in ("hidden", "classifier", "bias")]
            out = lossd_torch.linear_distillation(
                leaves[0],
                p["teacher_hidden"],
                leaves[1],
                client.resident(p["teacher_classifier"]),
                bias=leaves[2],
                labels=p["labels"],
                weight_hard=0.5,
                reduction=reduction,
                client=client,
            )
            upstream = torch.randn(out.shape)
            (out * upstream).sum().backward()
            *_, grads = unfused(
                p["hidden"],
                p["teacher_hidden"],
                p["classifier"],
                p["teacher_classifier"],
                p["bias"],
                labels=p["labels"],
                weight_hard=0.5,
                reduction=reduction,
                grad_output=upstream,
            )
            for leaf, expected in zip(leaves, grads, strict=True):
                assert leaf.grad is not None
                close(leaf.grad, expected, torch.float32, reduction, gradient=True)


def test_open_inference_returns_the_heads_gradients(server: RunningServer) -> None:
    p = _problem(4)
    with grpc.insecure_channel(server.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name="linear_distillation"), timeout=10)
        outputs = ["loss", "hard_loss", "soft_loss", "input_grad", "classifier_grad", "bias_grad"]
        assert [t.name for t in metadata.outputs] == outputs
        request = oip.ModelInferRequest(model_name="linear_distillation")
        for name, value in (
            ("input", p["hidden"]),
            ("target", p["teacher_hidden"]),
            ("classifier", p["classifier"]),
            ("teacher_classifier", p["teacher_classifier"]),
        ):
            request.inputs.add(name=name, datatype="FP32", shape=value.shape)
            request.raw_input_contents.append(value.numpy().tobytes())
        request.outputs.add(name="loss")
        request.outputs.add(name="classifier_grad")
        response = stub.ModelInfer(request, timeout=30)
    loss, _, _, grads = unfused(p["hidden"], p["teacher_hidden"], p["classifier"], p["teacher_classifier"])
    values = {
        output.name: np.frombuffer(raw, dtype=np.float32).reshape(output.shape)
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    close(torch.from_numpy(values["loss"].copy()), loss, torch.float32, "loss")
    close(
        torch.from_numpy(values["classifier_grad"].copy()),
        grads[1],
        torch.float32,
        "classifier",
        gradient=True,
    )
