"""Fused linear cross-entropy against the unfused torch composition, within the tolerances the .proto
states: shapes, chunk boundaries, every option, ignored tokens, dtypes; and through a server with a
resident classifier."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossd.client import LossClient
from lossd.client import torch as lossd_torch
from lossd.server.engine import LossEngine
from lossd.server.losses import LossCall, make_options
from lossd.server.losses import chunked as chunked_module
from lossd.wire.errors import InvalidArgumentError

from conftest import RunningServer
from tolerances import close

ENGINE = LossEngine("cpu")


def unfused(
    hidden: torch.Tensor,
    target: torch.Tensor,
    classifier: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float = 0.0,
    lse_square_scale: float = 0.0,
    grad_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, d loss / d hidden) by torch, with the logits whole."""
    loss, lse, grads = unfused_head(
        hidden,
        target,
        classifier,
        bias,
        weight,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        softcap=softcap,
        lse_square_scale=lse_square_scale,
        grad_output=grad_output,
    )
    return loss, lse, grads[0]


def unfused_head(
    hidden: torch.Tensor,
    target: torch.Tensor,
    classifier: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float = 0.0,
    lse_square_scale: float = 0.0,
    grad_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(loss, lse, [d loss / d hidden, d classifier, d bias (if any)]) by torch, the logits whole,
    in the compute dtype (float32 for float16 and bfloat16)."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    leaf = hidden.detach().clone().requires_grad_()
    head = classifier.detach().to(dtype).requires_grad_()
    offset = None if bias is None else bias.detach().to(dtype).requires_grad_()
    logits = leaf.reshape(-1, hidden.shape[-1]).to(dtype) @ head.T
    if offset is not None:
        logits = logits + offset
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    flat = target.reshape(-1).long()
    w = None if weight is None else weight.to(dtype)
    loss = F.cross_entropy(
        logits,
        flat,
        weight=w,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    lse = torch.logsumexp(logits, -1)
    if lse_square_scale:
        z = torch.where(flat != ignore_index, lse_square_scale * lse.square(), 0.0)
        if reduction == "none":
            loss = loss + z
        elif reduction == "sum":
            loss = loss + z.sum()
        else:
            counted = flat != ignore_index
            divisor = counted.sum() if w is None else w[torch.where(counted, flat, 0)][counted].sum()
            loss = loss + z.sum() / divisor
    if reduction == "none":
        loss = loss.reshape(hidden.shape[:-1])
    upstream = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    leaves = [leaf, head] + ([] if offset is None else [offset])
    grads = list(torch.autograd.grad(loss, leaves, upstream))
    return loss.detach(), lse.detach().reshape(hidden.shape[:-1]), grads


def fused(
    hidden: torch.Tensor,
    target: torch.Tensor,
    classifier: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    grad_output: torch.Tensor | None = None,
    tensor_grads: frozenset[str] = frozenset(),
    **options: Any,
) -> Any:
    tensors = {"classifier": classifier}
    if bias is not None:
        tensors["bias"] = bias
    if weight is not None:
        tensors["weight"] = weight
    call = LossCall(
        make_options("linear_cross_entropy", reduction, **options),
        hidden,
        target,
        tensors=tensors,
        grads=frozenset({"input"}) | tensor_grads,
        outputs=frozenset({"lse"}),
        grad_output=grad_output,
    )
    return ENGINE.compute(call)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunked", [False, True])
def test_every_option_against_the_unfused_composition(
    monkeypatch: pytest.MonkeyPatch, reduction: str, chunked: bool
) -> None:
    if chunked:  # chunk boundaries: 37 tokens in chunks of 5 (V = 23 does not divide the chunk)
        monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 23 * 5)
    torch.manual_seed(0)
    hidden, classifier, bias = torch.randn(37, 16), torch.randn(23, 16), torch.randn(23)
    weight = torch.rand(23) + 0.5
    target = torch.randint(0, 23, (37,))
    target[::4] = -1
    options = {"ignore_index": -1, "label_smoothing": 0.1, "softcap": 5.0, "lse_square_scale": 1e-3}
    upstream = torch.randn(37) if reduction == "none" else torch.tensor(1.7)
    both = frozenset({"classifier", "bias"})
    out = fused(
        hidden,
        target,
        classifier,
        bias,
        weight,
        reduction=reduction,
        grad_output=upstream,
        tensor_grads=both,
        **options,
    )
    loss, lse, grads = unfused_head(
        hidden, target, classifier, bias, weight, reduction=reduction, grad_output=upstream, **options
    )
    close(out.loss, loss, torch.float32, "loss")
    close(out.outputs["lse"], lse, torch.float32, "lse")
    close(out.input_grad, grads[0], torch.float32, "grad", gradient=True)
    close(out.grads["classifier"], grads[1], torch.float32, "classifier grad", gradient=True)
    close(out.grads["bias"], grads[2], torch.float32, "bias grad", gradient=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    size=st.integers(1, 9),
    classes=st.integers(1, 13),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    softcap=st.sampled_from([0.0, 2.0]),
    chunk=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
    with_bias=st.booleans(),
)
def test_property_shapes_dtypes_chunks(
    lead: list[int],
    size: int,
    classes: int,
    dtype: torch.dtype,
    reduction: str,
    softcap: float,
    chunk: int,
    seed: int,
    with_bias: bool,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn((*lead, size), generator=generator).to(dtype)
    classifier = torch.randn(classes, size, generator=generator).to(dtype)
    bias = torch.randn(classes, generator=generator).to(dtype) if with_bias else None
    target = torch.randint(-1, classes, tuple(lead), generator=generator)
    wanted = frozenset({"classifier", "bias"} if with_bias else {"classifier"})
    original = chunked_module.CHUNK_ELEMENTS
    chunked_module.CHUNK_ELEMENTS = classes * chunk
    try:
        out = fused(
            hidden,
            target,
            classifier,
            bias,
            reduction=reduction,
            ignore_index=-1,
            softcap=softcap,
            tensor_grads=wanted,
        )
    finally:
        chunked_module.CHUNK_ELEMENTS = original
    loss, _, grads = unfused_head(
        hidden, target, classifier, bias, reduction=reduction, ignore_index=-1, softcap=softcap
    )
    close(out.loss, loss, dtype, "loss")
    close(out.input_grad, grads[0].to(dtype), dtype, "grad", gradient=True)
    close(out.grads["classifier"], grads[1].to(dtype), dtype, "classifier grad", gradient=True)
    if with_bias:
        close(out.grads["bias"], grads[2].to(dtype), dtype, "bias grad", gradient=True)


def test_one_token_and_every_token_ignored() -> None:
    hidden, classifier = torch.randn(6), torch.randn(4, 6)
    out = fused(hidden, torch.tensor(2), classifier)
    loss, _, grad = unfused(hidden, torch.tensor(2), classifier)
    close(out.loss, loss, torch.float32, "loss")
    close(out.input_grad, grad, torch.float32, "grad", gradient=True)
    ignored = fused(torch.randn(3, 6), torch.full((3,), -100), classifier, reduction="sum")
    assert float(ignored.loss) == 0.0 and torch.equal(ignored.input_grad, torch.zeros(3, 6))


def test_refusals_name_the_field() -> None:
    hidden, classifier = torch.randn(3, 4), torch.randn(5, 4)
    cases = [
        (dict(tensors={}), "FIELD_MISSING", "linear_cross_entropy.classifier"),
        (
            dict(tensors={"classifier": torch.randn(5, 3)}),
            "CLASSIFIER_SHAPE_MISMATCH",
            "linear_cross_entropy.classifier.shape",
        ),
        (
            dict(tensors={"classifier": classifier, "bias": torch.randn(4)}),
            "WEIGHT_SHAPE_MISMATCH",
            "linear_cross_entropy.bias.shape",
        ),
        (
            dict(tensors={"classifier": classifier}, target=torch.tensor([0, 5, 1])),
            "TARGET_OUT_OF_RANGE",
            "target",
        ),
        (
            dict(tensors={"classifier": classifier}, target=torch.tensor([0, 1])),
            "TARGET_SHAPE_MISMATCH",
            "target.shape",
        ),
        (
            dict(tensors={"classifier": classifier}, softcap=-1.0),
            "OPTION_INVALID",
            "linear_cross_entropy.softcap",
        ),
        (
            dict(tensors={"classifier": classifier}, label_smoothing=2.0),
            "LABEL_SMOOTHING_OUT_OF_RANGE",
            "linear_cross_entropy.label_smoothing",
        ),
    ]
    for case, reason, field in cases:
        spec = dict(case)
        tensors, target = spec.pop("tensors"), spec.pop("target", torch.tensor([0, 1, 2]))
        call = LossCall(make_options("linear_cross_entropy", "mean", **spec), hidden, target, tensors=tensors)
        with pytest.raises(InvalidArgumentError) as caught:
            ENGINE.prepare(call)
        assert (caught.value.reason, caught.value.field) == (reason, field)


def test_through_a_server_with_a_resident_classifier(server: RunningServer) -> None:
    torch.manual_seed(3)
    classifier = torch.randn(300, 32)
    hidden, target = torch.randn(4, 10, 32), torch.randint(0, 300, (4, 10))
    with LossClient(server.target, timeout=30) as client:
        head = client.resident(classifier)
        result = client.linear_cross_entropy(
            hidden, target, head, softcap=30.0, return_lse=True, return_grad=True
        )
        loss, lse, grad = unfused(hidden, target, classifier, softcap=30.0)
        close(result.loss, loss, torch.float32, "loss")
        close(result.lse, lse, torch.float32, "lse")
        close(result.grad, grad, torch.float32, "grad", gradient=True)
        leaf = hidden.clone().requires_grad_()
        per_token = lossd_torch.linear_cross_entropy(leaf, target, head, reduction="none", client=client)
        upstream = torch.randn(4, 10)
        (per_token * upstream).sum().backward()
        _, _, expected = unfused(hidden, target, classifier, reduction="none", grad_output=upstream)
        close(leaf.grad, expected, torch.float32, "autograd", gradient=True)


@pytest.mark.parametrize("stream", [False, True])
def test_a_trainable_head_through_a_server(server: RunningServer, stream: bool) -> None:
    """The classifier's and the bias's gradients come back with the hidden states', unary and in
    StreamLoss chunks; class weights travel as the loss's weight."""
    torch.manual_seed(4)
    classifier, bias, weight = torch.randn(300, 32), torch.randn(300), torch.rand(300) + 0.5
    hidden, target = torch.randn(4, 10, 32), torch.randint(0, 300, (4, 10))
    threshold = 0 if stream else 1 << 30
    with LossClient(server.target, timeout=30, stream_threshold_bytes=threshold) as client:
        result = client.linear_cross_entropy(
            hidden,
            target,
            classifier,
            bias,
            weight,
            label_smoothing=0.1,
            return_grad=True,
            return_classifier_grad=True,
            return_bias_grad=True,
        )
    loss, _, grads = unfused_head(hidden, target, classifier, bias, weight, label_smoothing=0.1)
    close(result.loss, loss, torch.float32, "loss")
    for actual, expected, what in zip(
        (result.grad, result.classifier_grad, result.bias_grad),
        grads,
        ("input", "classifier", "bias"),
        strict=True,
    ):
        assert actual is not None, what
        close(actual, expected, torch.float32, what, gradient=True)


def test_torch_autograd_fills_the_heads_grad(server: RunningServer) -> None:
    """`backward()` fills the hidden states', the classifier's and the bias's `.grad`; under
    'none' with a non-uniform upstream gradient the head's gradients take a second call."""
    torch.manual_seed(5)
    classifier, bias = torch.randn(50, 16), torch.randn(50)
    hidden, target = torch.randn(3, 7, 16), torch.randint(0, 50, (3, 7))
    with LossClient(server.target, timeout=30) as client:
        for reduction in ("mean", "none"):
            leaves = [t.clone().requires_grad_() for t in (hidden, classifier, bias)]
            loss = lossd_torch.linear_cross_entropy(
                leaves[0], target, leaves[1], leaves[2], reduction=reduction, client=client
            )
            upstream = torch.randn(loss.shape)
            (loss * upstream).sum().backward()
            _, _, grads = unfused_head(
                hidden, target, classifier, bias, reduction=reduction, grad_output=upstream
            )
            for leaf, expected in zip(leaves, grads, strict=True):
                assert leaf.grad is not None
                close(leaf.grad, expected, torch.float32, reduction, gradient=True)


def test_gradients_of_tensors_a_loss_lacks_are_refused(client: LossClient) -> None:
    hidden, classifier = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(InvalidArgumentError) as caught:
        client.linear_cross_entropy(hidden, torch.tensor([0, 1, 2]), classifier, return_bias_grad=True)
    assert (caught.value.reason, caught.value.field) == (
        "GRADIENT_NOT_SUPPORTED",
        "gradients.with_respect_to",
    )
    assert "bias" in caught.value.message and caught.value.metadata["tensor"] == "bias"
    call = LossCall(
        make_options("cross_entropy", "mean"),
        torch.randn(3, 5),
        torch.tensor([0, 1, 2]),
        grads=frozenset({"classifier"}),
    )
    with pytest.raises(InvalidArgumentError) as caught:
        ENGINE.prepare(call)
    assert (caught.value.reason, caught.value.field) == (
        "GRADIENT_NOT_SUPPORTED",
        "gradients.with_respect_to",
    )
    assert caught.value.metadata == {"tensor": "classifier", "loss": "cross_entropy"}
