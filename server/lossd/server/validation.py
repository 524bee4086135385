"""Checks a `LossCall` against torch's rules before any compute, on the CPU.

Everything torch would reject becomes an `InvalidArgumentError` naming the request field and the
value. Above all, class indices are range-checked here on the host: an out-of-range index that
reached a CUDA kernel would trip a device-side assert and ruin the process's CUDA context.

Deliberate departures from torch, documented in the .proto: class indices may be int32, and uint8
with any input rank (torch takes uint8 only for 1-D and 2-D inputs, int32 never); both are widened
to int64, which selects the same classes. A negative label_smoothing is rejected (torch silently
treats it as 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from lossd.client.errors import InvalidArgumentError, ResourceExhaustedError
from lossd.server.calls import LossCall, LossKind

if TYPE_CHECKING:  # the codec imports protobuf, which the engine must not need
    from lossd.client.codec import TensorLimits

__all__ = ["FLOATING", "invalid_argument", "loss_shape", "validate"]

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int64, torch.uint8, torch.int32)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def invalid_argument(message: str, reason: str, field: str, **metadata: object) -> InvalidArgumentError:
    """The error for a bad request field; metadata values become strings (ErrorInfo carries strings)."""
    return InvalidArgumentError(
        message, reason=reason, field=field, metadata={k: str(v) for k, v in metadata.items()}
    )


def _require_floating(tensor: torch.Tensor, field: str, role: str) -> None:
    if tensor.dtype not in FLOATING:
        raise invalid_argument(
            f"{field}.dtype is {_name(tensor.dtype)}; {role} must be float32, float64, float16 or bfloat16",
            "DTYPE_NOT_SUPPORTED",
            f"{field}.dtype",
            dtype=_name(tensor.dtype),
        )


def broadcast_shape(a: torch.Size, b: torch.Size) -> tuple[int, ...] | None:
    """The broadcast of two shapes (numpy / torch rules), or None when they do not broadcast."""
    result = []
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y and 1 not in (x, y):
            return None
        result.append(y if x == 1 else x)
    longer = a if len(a) > len(b) else b
    return (*longer[: len(longer) - len(result)], *reversed(result))


def is_probability_target(call: LossCall) -> bool:
    """torch's rule: cross_entropy takes class probabilities iff target.shape == input.shape."""
    return call.options.kind is LossKind.CROSS_ENTROPY and call.target.shape == call.input.shape


def loss_shape(call: LossCall, reduction: str | None = None) -> tuple[int, ...]:
    """The shape of the loss torch returns for a valid call (under `reduction`, if given)."""
    if (call.options.reduction if reduction is None else reduction) != "none":
        return ()
    shape = tuple(call.input.shape)
    if call.options.kind is LossKind.KL_DIV:
        broadcast = broadcast_shape(call.input.shape, call.target.shape)
        assert broadcast is not None, "validate() admits only broadcastable shapes"
        return broadcast
    return shape[:1] + shape[2:] if len(shape) >= 2 else ()


def _check_reduction(call: LossCall) -> None:
    kind, reduction = call.options.kind, call.options.reduction
    if reduction == "batchmean" and kind is not LossKind.KL_DIV:
        raise invalid_argument(
            f"reduction 'batchmean' is only defined for kl_div, not {kind.value}; use none, mean or sum",
            "REDUCTION_NOT_SUPPORTED",
            "reduction",
            reduction=reduction,
            loss=kind.value,
        )


def _check_class_targets(call: LossCall, classes: int) -> torch.Tensor:
    """Checks class-index targets; returns them as int64."""
    input, target = call.input, call.target
    ignore_index = call.options.ignore_index
    if target.dtype not in _INDEX_DTYPES:
        raise invalid_argument(
            f"target.dtype is {_name(target.dtype)}; class-index targets must be int64, uint8 or int32 "
            f"(class probabilities need target.shape == input.shape {list(input.shape)})",
            "DTYPE_NOT_SUPPORTED",
            "target.dtype",
            dtype=_name(target.dtype),
        )
    expected = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    if input.dim() == 1 and tuple(target.shape) == (1,):
        if call.input_grad or call.target_grad:
            # torch computes the loss but its backward refuses the shapes: so does lossd.
            raise invalid_argument(
                f"target.shape is [1] for input.shape {list(input.shape)}: torch computes this loss but "
                'not its gradient ("size mismatch"); give the target shape [] to get a gradient',
                "TARGET_SHAPE_MISMATCH",
                "target.shape",
                targetShape=[1],
                inputShape=list(input.shape),
                expectedShape=[],
            )
        target = target.reshape(())  # torch takes a one-element target for a (C) input too
    if tuple(target.shape) != expected:
        raise invalid_argument(
            f"target.shape is {list(target.shape)}; for input.shape {list(input.shape)} class-index "
            f"targets must have shape {list(expected)} (or {list(input.shape)} for class probabilities)",
            "TARGET_SHAPE_MISMATCH",
            "target.shape",
            targetShape=list(target.shape),
            inputShape=list(input.shape),
            expectedShape=list(expected),
        )
    if classes == 0 and (input.dim() == 3 or input.dim() >= 5) and math.prod(expected) > 0:
        # torch views such inputs as (N, C, 1, -1), which cannot be inferred with no classes.
        raise invalid_argument(
            f"input.shape {list(input.shape)} has no classes (C = 0): torch computes a loss over 3 or 5+ "
            'input dimensions only with at least one class ("size mismatch")',
            "SHAPE_INVALID",
            "input.shape",
            inputShape=list(input.shape),
        )
    wide = target if target.dtype == torch.int64 else target.to(torch.int64)
    if wide.device.type == "meta":  # a StreamLoss header: the values are checked once they arrive
        return wide
    values = wide.numpy()  # host-side: a bad index must never reach a (CUDA) kernel
    if values.size and (values.min() < 0 or values.max() >= classes):  # the rare, slow path
        bad = ((values < 0) | (values >= classes)) & (values != ignore_index)
    else:
        bad = None
    if bad is not None and bad.any():
        position = [int(i) for i in np.argwhere(bad)[0]] if bad.ndim else []
        value = int(values[tuple(position)])
        raise invalid_argument(
            f"target{position} is {value}, outside [0, {classes}) for {classes} classes and not "
            f"ignore_index ({ignore_index}); {int(bad.sum())} target(s) are out of range",
            "TARGET_OUT_OF_RANGE",
            "target",
            value=value,
            index=position,
            classes=classes,
            ignoreIndex=ignore_index,
            count=int(bad.sum()),
        )
    return wide


def _check_weight(call: LossCall, classes: int, probabilities: bool) -> torch.Tensor | None:
    """Checks class weights; returns them 1-D.

    Any shape of C elements is taken (torch's K-dim kernels take them too) and flattened. With
    class-index targets the dtype must be the input's, as torch requires; with probability targets
    torch promotes any dtype, and so does lossd.
    """
    weight, field = call.weight, f"{call.options.kind.value}.weight"
    if weight is None:
        return None
    if weight.numel() != classes:
        raise invalid_argument(
            f"{field}.shape is {list(weight.shape)}; it must be [{classes}], one weight per class",
            "WEIGHT_SHAPE_MISMATCH",
            f"{field}.shape",
            weightShape=list(weight.shape),
            classes=classes,
        )
    if not probabilities and weight.dtype != call.input.dtype:
        raise invalid_argument(
            f"{field}.dtype is {_name(weight.dtype)} but input.dtype is {_name(call.input.dtype)}; "
            "with class-index targets torch needs class weights in the input's dtype",
            "WEIGHT_DTYPE_MISMATCH",
            f"{field}.dtype",
            weightDtype=_name(weight.dtype),
            inputDtype=_name(call.input.dtype),
        )
    return weight.reshape(classes)


def _check_classification(call: LossCall) -> LossCall:
    """nll_loss and cross_entropy: input (C), (N, C) or (N, C, d1, ..., dk)."""
    input, options = call.input, call.options
    if input.dim() == 0:
        raise invalid_argument(
            "input.shape is [] (0-d); nll_loss and cross_entropy need (C), (N, C) or (N, C, d1, ..., dk)",
            "SHAPE_INVALID",
            "input.shape",
            inputShape=[],
        )
    classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    probabilities = is_probability_target(call)
    smoothing, field = options.label_smoothing, f"{options.kind.value}.label_smoothing"
    if not (math.isfinite(smoothing) and 0.0 <= smoothing <= 1.0):
        raise invalid_argument(
            f"{field} is {smoothing}; it must be in [0.0, 1.0]",
            "LABEL_SMOOTHING_OUT_OF_RANGE",
            field,
            labelSmoothing=smoothing,
        )
    if probabilities:
        _require_floating(call.target, "target", "class-probability targets (target.shape == input.shape)")
        if options.ignore_index >= 0:
            raise invalid_argument(
                f"{options.kind.value}.ignore_index is {options.ignore_index}; with class-probability "
                "targets torch allows only a negative ignore_index (it is not applied)",
                "IGNORE_INDEX_NOT_SUPPORTED",
                f"{options.kind.value}.ignore_index",
                ignoreIndex=options.ignore_index,
            )
        target = call.target
    else:
        target = _check_class_targets(call, classes)
        if call.target_grad:
            raise invalid_argument(
                f"gradients.target was requested, but {options.kind.value} with class-index targets "
                "has no gradient w.r.t. the target; only class-probability targets and kl_div do",
                "TARGET_GRADIENT_NOT_SUPPORTED",
                "gradients.target",
                loss=options.kind.value,
            )
    weight = _check_weight(call, classes, probabilities)
    return dataclasses.replace(call, target=target, weight=weight)


def _check_kl(call: LossCall, limits: TensorLimits | None) -> None:
    _require_floating(call.target, "target", "kl_div targets")
    broadcast = broadcast_shape(call.input.shape, call.target.shape)
    if broadcast is None:
        raise invalid_argument(
            f"target.shape {list(call.target.shape)} does not broadcast with input.shape "
            f"{list(call.input.shape)}",
            "TARGET_SHAPE_MISMATCH",
            "target.shape",
            targetShape=list(call.target.shape),
            inputShape=list(call.input.shape),
        )
    # A few bytes can broadcast to terabytes: the loss computed over the broadcast shape is a
    # tensor too, held to the same limits before anything is allocated.
    elements = math.prod(broadcast)
    nbytes = elements * max(call.input.element_size(), call.target.element_size())
    if limits is not None and (elements > limits.max_elements or nbytes > limits.max_bytes):
        raise ResourceExhaustedError(
            f"input.shape {list(call.input.shape)} and target.shape {list(call.target.shape)} broadcast "
            f"to {list(broadcast)}: {elements} elements ({nbytes} bytes) to compute; this server "
            f"accepts at most {limits.max_elements} elements and {limits.max_bytes} bytes per tensor",
            reason="TENSOR_TOO_LARGE",
            field="target.shape",
            metadata={
                "shape": str(list(broadcast)),
                "elements": str(elements),
                "bytes": str(nbytes),
                "maxElements": str(limits.max_elements),
                "maxBytes": str(limits.max_bytes),
            },
        )


def _check_gradients(call: LossCall) -> None:
    if call.grad_dtype is not None and call.grad_dtype not in FLOATING:
        raise invalid_argument(
            f"gradients.dtype is {_name(call.grad_dtype)}; gradients must be float32, float64, float16 "
            "or bfloat16",
            "DTYPE_NOT_SUPPORTED",
            "gradients.dtype",
            dtype=_name(call.grad_dtype),
        )
    upstream = call.grad_output
    if upstream is None:
        return
    _require_floating(upstream, "gradients.grad_output", "the upstream gradient")
    expected = loss_shape(call)
    if tuple(upstream.shape) != expected:
        raise invalid_argument(
            f"gradients.grad_output.shape is {list(upstream.shape)}; it must be the loss's shape "
            f"{list(expected)}",
            "GRAD_OUTPUT_SHAPE_MISMATCH",
            "gradients.grad_output.shape",
            gradOutputShape=list(upstream.shape),
            lossShape=list(expected),
        )


def validate(call: LossCall, limits: TensorLimits | None = None) -> LossCall:
    """Returns the call ready for torch (int32 targets widened), or raises `InvalidArgumentError`
    (or `ResourceExhaustedError` when a broadcast passes `limits`)."""
    _require_floating(call.input, "input", "the input")
    _check_reduction(call)
    if call.options.kind is LossKind.KL_DIV:
        _check_kl(call, limits)
    else:
        call = _check_classification(call)
    _check_gradients(call)
    return call
