"""Property: lossd accepts exactly what torch accepts, and then computes torch's numbers.

Hypothesis draws calls from the whole space, valid and not: every rank and size (zeros included),
every wire dtype for input, target and weight, indices in and out of range, every option value.
Each draw goes to local torch and to the engine in process (the wire is covered by test_parity).
The only disagreements allowed are lossd's documented departures (see lossd.server.losses).
"""

from __future__ import annotations

import math
from typing import Any

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings

from lossd.client.errors import InvalidArgumentError
from lossd.server.engine import LossEngine
from lossd.server.losses import LOSSES, LossCall, LossOptions, make_options

from cases import same_bits

ENGINE = LossEngine("cpu")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8)
FLOATS = DTYPES[:4]


def _tensor(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype, high: int) -> torch.Tensor:
    if dtype in FLOATS:
        return torch.randn(shape, dtype=torch.float64).to(dtype)
    low = 0 if dtype == torch.uint8 else -2
    return torch.randint(low, max(high, low + 1), shape).to(dtype)


TORCH_LOSSES = [name for name in LOSSES if hasattr(F, name) and name != "linear_cross_entropy"]
"""The losses that are one torch.nn.functional call (distillation, composed of them, has its own
reference and property tests in test_distillation.py)."""


@st.composite
def calls(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(TORCH_LOSSES))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    rank = draw(st.sampled_from([0, 1, 1, 2, 2, 2, 3, 4]))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=rank, max_size=rank)))
    classes = shape[1] if rank >= 2 else (shape[0] if rank == 1 else 1)
    input_dtype = draw(st.sampled_from(FLOATS) if draw(st.integers(0, 9)) else st.sampled_from(DTYPES))
    target_shape_kind = draw(st.sampled_from(["index", "same", "random", "broadcast"]))
    if target_shape_kind == "index":
        target_shape = () if rank <= 1 else (shape[0], *shape[2:])
    elif target_shape_kind == "same":
        target_shape = shape
    elif target_shape_kind == "broadcast":
        target_shape = shape[draw(st.integers(0, rank)) :]
    else:
        target_shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
    if draw(st.integers(0, 4)):  # mostly the dtype the shape calls for, so that most draws are valid
        likely = (torch.int64, torch.uint8, torch.int32) if target_shape_kind == "index" else FLOATS
        if kind == "kl_div":
            likely = FLOATS
        target_dtype = draw(st.sampled_from(likely))
    else:
        target_dtype = draw(st.sampled_from(DTYPES))
    target = _tensor(draw, target_shape, target_dtype, classes + (2 if draw(st.integers(0, 3)) == 0 else 0))
    if target.dtype in FLOATS and kind != "kl_div" and draw(st.booleans()):
        target = target.float().softmax(-1).to(target_dtype) if target.dim() else target
    weight = None
    if kind != "kl_div" and draw(st.booleans()):
        length = draw(st.sampled_from([classes] * 4 + [classes + 1, max(classes - 1, 0)]))
        weight_dtype = draw(st.sampled_from([input_dtype] * 7 + list(DTYPES)))
        weight = (torch.rand(length, dtype=torch.float64) + 0.1).to(weight_dtype)
        if draw(st.integers(0, 5)) == 0 and length == classes:
            weight = weight.reshape(1, length)
    ignore_index = draw(st.sampled_from([None, None, None, -100, -1, 0, 1, classes, 255]))
    smoothing = draw(st.sampled_from([0.0] * 4 + [0.25] * 4 + [1.0, 1.5, -0.1, math.nan]))
    reductions = ["none", "mean", "sum"] * 3 + ["batchmean"]
    return {
        "kind": kind,
        "input": _tensor(draw, shape, input_dtype, classes),
        "target": target,
        "weight": weight,
        "ignore_index": ignore_index,
        "label_smoothing": smoothing if kind == "cross_entropy" else 0.0,
        "log_target": draw(st.booleans()) if kind == "kl_div" else False,
        "reduction": draw(st.sampled_from(reductions)),
        "input_grad": draw(st.booleans()) and input_dtype in FLOATS,
    }


def _torch(args: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = args["input"].clone().requires_grad_(args["input_grad"])
    target = args["target"]
    kind = args["kind"]
    options: dict[str, Any] = {"reduction": args["reduction"]}
    if kind == "kl_div":
        loss = F.kl_div(x, target, log_target=args["log_target"], **options)
    else:
        if args["ignore_index"] is not None:
            options["ignore_index"] = args["ignore_index"]
        if kind == "nll_loss":
            loss = F.nll_loss(x, target, weight=args["weight"], **options)
        else:
            loss = F.cross_entropy(
                x, target, weight=args["weight"], label_smoothing=args["label_smoothing"], **options
            )
    grad = None
    if args["input_grad"]:
        (grad,) = torch.autograd.grad(loss, [x], torch.ones_like(loss))
    return loss.detach(), grad


def loss_options(args: dict[str, Any]) -> LossOptions:
    """The engine's options for the drawn call: those its loss has."""
    given = {
        "ignore_index": -100 if args["ignore_index"] is None else args["ignore_index"],
        "label_smoothing": args["label_smoothing"],
        "log_target": args["log_target"],
    }
    own = LOSSES[args["kind"]].parameters
    return make_options(args["kind"], args["reduction"], **{k: v for k, v in given.items() if k in own})


def _departure(args: dict[str, Any]) -> bool:
    """Calls torch accepts and lossd deliberately rejects: label_smoothing outside [0, 1] (torch
    treats negative and NaN values as 0), and integer inputs (torch accepts them only when empty,
    when no kernel runs)."""
    s = args["label_smoothing"]
    bad_smoothing = args["kind"] == "cross_entropy" and not (0.0 <= s <= 1.0)
    return bad_smoothing or args["input"].dtype not in FLOATS


def _normalized(args: dict[str, Any]) -> dict[str, Any]:
    """The call as lossd hands it to torch: integer targets widened, class weights flattened."""
    target = args["target"]
    weight = args["weight"]
    return {
        **args,
        "target": target.long() if target.dtype in (torch.int32, torch.uint8) else target,
        "weight": weight.reshape(-1) if weight is not None else None,
    }


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_lossd_accepts_what_torch_accepts(args: dict[str, Any]) -> None:
    torch_errors = (RuntimeError, ValueError, IndexError, NotImplementedError)
    reason_torch = ""
    try:
        expected = _torch(args)
    except torch_errors as torch_error:
        reason_torch = str(torch_error)
        try:  # where torch refuses only the forms lossd normalizes, the normalized call is the reference
            expected = _torch(_normalized(args))
        except torch_errors:
            expected = None
    options = loss_options(args)
    weight = {} if args["weight"] is None else {"weight": args["weight"]}
    grads = frozenset({"input"}) if args["input_grad"] else frozenset()
    call = LossCall(options, args["input"], args["target"], tensors=weight, grads=grads)
    try:
        output = ENGINE.compute(call)
    except InvalidArgumentError as error:
        assert expected is None or _departure(args), f"lossd rejected what torch accepts: {error}"
        assert error.field and error.reason
        event(f"rejected: {error.reason}")
        return
    assert not _departure(args), "lossd accepted a label_smoothing outside [0, 1]"
    assert expected is not None, f"lossd accepted what torch rejects ({reason_torch})"
    event(f"accepted: {args['kind']}")
    loss, grad = expected
    assert same_bits(output.loss, loss), (output.loss, loss)  # computed alone: torch's own call
    if grad is not None:
        assert output.input_grad is not None
        assert same_bits(output.input_grad, grad)


def test_no_classes_over_three_or_five_dimensions_is_refused_as_torch_refuses_it() -> None:
    """Found by the property above on a busy run: torch cannot view (N, 0, d) inputs as (N, C, 1, -1)."""
    for shape, target_shape, torch_computes in (
        ((1, 0, 1), (1, 1), False),
        ((2, 0, 1, 1, 1), (2, 1, 1, 1), False),
        ((1, 0, 2, 2), (1, 2, 2), True),
        ((1, 0, 0), (1, 0), True),
    ):
        x, t = torch.empty(shape), torch.zeros(target_shape, dtype=torch.long)
        call = LossCall(make_options("nll_loss", "none", ignore_index=0), x, t)
        if torch_computes:
            assert torch.equal(ENGINE.compute(call).loss, F.nll_loss(x, t, ignore_index=0, reduction="none"))
        else:
            with pytest.raises(RuntimeError, match="size mismatch"):
                F.nll_loss(x, t, ignore_index=0, reduction="none")
            with pytest.raises(InvalidArgumentError) as refused:
                ENGINE.compute(call)
            assert refused.value.reason == "SHAPE_INVALID"


def test_a_one_element_target_for_one_class_has_its_gradient_as_in_torch() -> None:
    """Found by the property above: for a (C) input and a [1] target, torch's backward refuses the
    shapes unless C = 1; lossd refuses exactly then."""
    for classes, computes in ((1, True), (3, False)):
        x, t = torch.randn(classes), torch.tensor([0])
        call = LossCall(make_options("nll_loss", "sum"), x, t, grads=frozenset({"input"}))
        if computes:
            leaf = x.clone().requires_grad_()
            expected = F.nll_loss(leaf, t, reduction="sum")
            (grad,) = torch.autograd.grad(expected, leaf)
            output = ENGINE.compute(call)
            assert same_bits(output.loss, expected.detach()) and same_bits(output.input_grad, grad)
        else:
            with pytest.raises(InvalidArgumentError) as refused:
                ENGINE.compute(call)
            assert refused.value.reason == "TARGET_SHAPE_MISMATCH"
