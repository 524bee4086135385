"""`class_dim`: cross_entropy, nll_loss and kl_div on tensors whose classes are not on dimension 1
(language-model logits (batch, seq, vocab)), equal to torch's function on the tensors viewed as
(rows, C), alone, merged with other calls, streamed in blocks and through a server; the shape error
for (B, T, V) logits without it names it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lossd.client import LossClient, errors
from lossd.server.engine import LossEngine
from lossd.server.losses import LossCall, make_options

from conftest import RunningServer

ENGINE = LossEngine("cpu")

SHAPES = [  # (input shape, class_dim)
    ((4, 7, 11), -1),
    ((4, 7, 11), 2),
    ((3, 11), -1),
    ((3, 11), 0),
    ((11,), -1),
    ((2, 3, 11, 5), 2),
    ((11, 6), 0),
    ((2, 11, 5), 1),
]


def _flat(tensor: torch.Tensor, class_dim: int) -> torch.Tensor:
    """What torch is given: the classes last, viewed as rows."""
    if tensor.dim() < 2:
        return tensor
    return tensor.movedim(class_dim, -1).reshape(-1, tensor.shape[class_dim])


def _rows_shape(shape: tuple[int, ...], class_dim: int) -> tuple[int, ...]:
    if len(shape) < 2:
        return ()
    dim = class_dim % len(shape)
    return shape[:dim] + shape[dim + 1 :]


def _case(loss: str, shape: tuple[int, ...], class_dim: int, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    classes = shape[class_dim] if len(shape) > 1 else shape[0]
    if loss == "kl_div":
        dim = class_dim if len(shape) > 1 else 0
        return {
            "input": torch.log_softmax(x.double(), dim).to(dtype),
            "target": torch.softmax(torch.randn(shape, generator=g).double(), dim).to(dtype),
        }
    target = torch.randint(0, classes, _rows_shape(shape, class_dim), generator=g)
    if target.numel() > 1:
        target.view(-1)[0] = -100  # one ignored target
    if loss == "nll_loss":
        x = torch.log_softmax(x.double(), class_dim if len(shape) > 1 else 0).to(dtype)
    return {"input": x, "target": target}


def _reference(
    loss: str, tensors: dict[str, Any], class_dim: int, reduction: str, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch on the flattened tensors: the loss (a 'none' one shaped back) and the input gradient.
    Classes on dimension 1 are torch's own layout: torch on the tensors as they are."""
    x, t = tensors["input"], tensors["target"]
    if loss != "kl_div" and x.dim() >= 2 and class_dim % x.dim() == 1:
        leaf = x.detach().requires_grad_()
        function = F.cross_entropy if loss == "cross_entropy" else F.nll_loss
        out = function(leaf, t, weight=weight, reduction=reduction)
        (grad,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
        return out.detach(), grad
    flat_x = _flat(x, class_dim).detach().requires_grad_()
    if loss == "kl_div":
        if x.dim() == 1:  # one distribution: one row
            flat_x = x.detach().reshape(1, -1).requires_grad_()
            out = F.kl_div(flat_x, t.reshape(1, -1), reduction=reduction)
            (grad,) = torch.autograd.grad(out, flat_x, torch.ones_like(out))
            return out.detach().reshape(x.shape if reduction == "none" else ()), grad.reshape(x.shape)
        flat_t = _flat(t, class_dim)
        out = F.kl_div(flat_x, flat_t, reduction=reduction)
    else:
        flat_t = t.reshape(-1) if x.dim() > 1 else t
        function = F.cross_entropy if loss == "cross_entropy" else F.nll_loss
        out = function(flat_x, flat_t, weight=weight, reduction=reduction)
    (grad,) = torch.autograd.grad(out, flat_x, torch.ones_like(out))
    if x.dim() > 1:
        moved = x.movedim(class_dim, -1).shape
        grad = grad.reshape(moved).movedim(-1, class_dim)
        if reduction == "none":
            out = out.reshape(moved) if loss == "kl_div" else out.reshape(moved[:-1])
            if loss == "kl_div":
                out = out.movedim(-1, class_dim)
    return out.detach(), grad


def _call(loss: str, tensors: dict[str, Any], class_dim: int, reduction: str, weight: Any) -> LossCall[Any]:
    options = make_options(loss, reduction, class_dim=class_dim)
    own = {} if weight is None else {"weight": weight}
    call = LossCall(options, tensors["input"], tensors["target"], tensors=own, grads=frozenset({"input"}))
    return ENGINE.prepare(call)


def _same(actual: Any, expected: torch.Tensor) -> None:
    actual = torch.as_tensor(actual)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert torch.equal(actual, expected), (actual, expected)


LOSS_REDUCTIONS = [
    (loss, reduction)
    for loss in ("cross_entropy", "nll_loss", "kl_div")
    for reduction in ("none", "mean", "sum", "batchmean")
    if reduction != "batchmean" or loss == "kl_div"
]


@pytest.mark.parametrize(("loss", "reduction"), LOSS_REDUCTIONS)
@pytest.mark.parametrize(("shape", "class_dim"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_torch_on_the_flattened_tensors(
    loss: str, shape: tuple[int, ...], class_dim: int, reduction: str, dtype: torch.dtype
) -> None:
    tensors = _case(loss, shape, class_dim, dtype, seed=len(shape) + class_dim)
    weight = None
    if loss != "kl_div" and len(shape) > 1:
        weight = torch.rand(shape[class_dim], generator=torch.Generator().manual_seed(1)).to(dtype)
    expected, grad = _reference(loss, tensors, class_dim, reduction, weight)
    output = ENGINE.compute(_call(loss, tensors, class_dim, reduction, weight))
    _same(output.loss, expected)
    _same(output.grads["input"], grad)


@pytest.mark.parametrize(("loss", "reduction"), LOSS_REDUCTIONS)
def test_merged_calls_keep_their_numbers(loss: str, reduction: str) -> None:
    """Calls with their classes last merge with each other as rows; each answer is torch's on its
    own flattened tensors (to the float64 reduction merged calls use: see test_merged_compute)."""
    cases = [_case(loss, (b, 5, 9), -1, torch.float64, seed=b) for b in (2, 3, 4)]
    calls = [_call(loss, tensors, -1, reduction, None) for tensors in cases]
    assert len({ENGINE.merge_key(call) for call in calls}) == 1 and ENGINE.merge_key(calls[0]) is not None
    outputs = ENGINE.compute_batch(calls)
    for tensors, output in zip(cases, outputs, strict=True):
        assert not isinstance(output, Exception)
        expected, grad = _reference(loss, tensors, -1, reduction, None)
        torch.testing.assert_close(torch.as_tensor(output.loss), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.as_tensor(output.grads["input"]), grad, rtol=1e-12, atol=1e-12)


def test_a_class_dim_elsewhere_than_last_or_one_computes_alone() -> None:
    tensors = _case("cross_entropy", (4, 6, 3), 0, torch.float32, seed=3)
    assert ENGINE.merge_key(_call("cross_entropy", tensors, 0, "mean", None)) is None


def test_the_flattened_input_is_a_view() -> None:
    """Classes last: torch is handed a view of the very input (no copy of the logits)."""
    seen: list[torch.Tensor] = []
    loss = make_options("cross_entropy", "mean", class_dim=-1).loss
    inner = loss.torch_function(make_options("cross_entropy", "mean", class_dim=-1), "mean")

    def spy(x: torch.Tensor, t: torch.Tensor, tensors: Any) -> torch.Tensor:
        seen.append(x)
        return inner(x, t, tensors)

    from lossd.server.losses.classes import flat_function

    x = torch.randn(2, 3, 8)
    flat_function(spy, -1, "mean", False)(x, torch.zeros(2, 3, dtype=torch.int64), {})
    assert seen[0].shape == (6, 8) and seen[0].data_ptr() == x.data_ptr() and seen[0]._base is x


def test_through_a_server_unary_and_streamed_in_blocks(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(stream_block_bytes=4096, stream_chunk_bytes=2048)
    tensors = _case("cross_entropy", (8, 16, 40), -1, torch.float32, seed=9)
    expected, grad = _reference("cross_entropy", tensors, -1, "mean", None)
    expected_none, _ = _reference("cross_entropy", tensors, -1, "none", None)
    for threshold in (1 << 30, 0):  # unary, then StreamLoss in blocks of samples
        with LossClient(running.target, timeout=60, stream_threshold_bytes=threshold) as client:
            result = client.cross_entropy(tensors["input"], tensors["target"], class_dim=-1, return_grad=True)
            torch.testing.assert_close(result.loss, expected, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(result.grad, grad, rtol=1e-6, atol=1e-8)
            none = client.cross_entropy(tensors["input"], tensors["target"], class_dim=-1, reduction="none")
            assert none.loss.shape == (8, 16)
            torch.testing.assert_close(none.loss, expected_none, rtol=0, atol=0)


def test_lm_shaped_logits_without_it_name_the_fix(client: LossClient) -> None:
    logits = np.zeros((4, 8, 100), np.float32)
    labels = np.zeros((4, 8), np.int64)
    with pytest.raises(errors.InvalidArgumentError) as refused:
        client.cross_entropy(logits, labels)
    assert refused.value.reason == "TARGET_SHAPE_MISMATCH"
    assert "class_dim=-1" in str(refused.value)
    assert client.cross_entropy(logits, labels, class_dim=-1).loss == pytest.approx(np.log(100), rel=1e-6)


@pytest.mark.parametrize("class_dim", [3, -4])
def test_out_of_range_is_refused_naming_the_field(client: LossClient, class_dim: int) -> None:
    with pytest.raises(errors.InvalidArgumentError) as refused:
        client.nll_loss(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3), np.int64), class_dim=class_dim)
    assert refused.value.reason == "CLASS_DIM_OUT_OF_RANGE"
    assert refused.value.field == "nll_loss.class_dim"


def test_kl_div_with_class_dim_needs_one_shape(client: LossClient) -> None:
    with pytest.raises(errors.InvalidArgumentError) as refused:
        client.kl_div(np.zeros((2, 3, 4), np.float32), np.zeros((1, 3, 4), np.float32), class_dim=-1)
    assert refused.value.reason == "TARGET_SHAPE_MISMATCH"
    assert "class_dim" in str(refused.value)
