"""Checks a `LossCall` against torch's rules before any compute, on the CPU: the rules every loss
shares here (input dtype, reduction, gradient options), the loss's own in its module.

Everything torch would reject becomes an `InvalidArgumentError` naming the request field and the
value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lossd.server.losses.base import LossCall
from lossd.server.losses.checks import FLOATING, dtype_name, invalid_argument, require_floating
from lossd.server.losses.registry import LOSSES

if TYPE_CHECKING:
    from lossd.wire.codec import TensorLimits

__all__ = ["loss_shape", "validate"]


def loss_shape(call: LossCall, reduction: str | None = None) -> tuple[int, ...]:
    """The shape of the loss torch returns for a valid call (under `reduction`, if given)."""
    return call.loss.loss_shape(call, call.reduction if reduction is None else reduction)


def _check_reduction(call: LossCall) -> None:
    loss, reduction = call.loss, call.reduction
    if reduction not in loss.reductions:
        owners = [name for name, other in LOSSES.items() if reduction in other.reductions]
        raise invalid_argument(
            f"reduction {reduction!r} is only defined for {', '.join(owners)}, not {loss.name}; use "
            f"{', '.join(loss.reductions[:-1])} or {loss.reductions[-1]}",
            "REDUCTION_NOT_SUPPORTED",
            "reduction",
            reduction=reduction,
            loss=loss.name,
        )


def _check_gradients(call: LossCall) -> None:
    if call.grad_dtype is not None and call.grad_dtype not in FLOATING:
        raise invalid_argument(
            f"gradients.dtype is {dtype_name(call.grad_dtype)}; gradients must be float32, float64, "
            "float16 or bfloat16",
            "DTYPE_NOT_SUPPORTED",
            "gradients.dtype",
            dtype=dtype_name(call.grad_dtype),
        )
    if call.target_grad and not call.loss.target_gradient:
        raise invalid_argument(
            f"gradients.target was requested, but {call.loss.name} has no gradient w.r.t. the target",
            "TARGET_GRADIENT_NOT_SUPPORTED",
            "gradients.target",
            loss=call.loss.name,
        )
    for name in sorted(call.tensor_grads):
        if name not in call.loss.gradient_tensors:
            raise invalid_argument(
                f"gradients.{name} was requested, but {call.loss.name} has no {name} to differentiate",
                "TENSOR_GRADIENT_NOT_SUPPORTED",
                f"gradients.{name}",
                loss=call.loss.name,
            )
        if name not in call.tensors:
            raise invalid_argument(
                f"gradients.{name} was requested, but {call.loss.name}.{name} is unset",
                "TENSOR_GRADIENT_NOT_SUPPORTED",
                f"gradients.{name}",
                loss=call.loss.name,
            )
    upstream = call.grad_output
    if upstream is None:
        return
    require_floating(upstream, "gradients.grad_output", "the upstream gradient")
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
    require_floating(call.input, "input", "the input")
    _check_reduction(call)
    call = call.loss.validate(call, limits)
    _check_gradients(call)
    return call
