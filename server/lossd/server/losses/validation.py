"""Checks a `LossCall` against torch's rules before any compute, on the CPU: the rules every loss
shares here (input dtype, reduction, the gradients and outputs asked for, the upstream gradient),
the loss's own in its module (`Loss.check`).

Everything torch would reject becomes an `InvalidArgumentError` naming the request field and the
value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lossd.server.losses.base import LossCall
from lossd.server.losses.checks import FLOATING, dtype_name, invalid_argument, require_floating
from lossd.server.losses.registry import LOSSES

if TYPE_CHECKING:
    from lossd.wire.codec import TensorLimits

__all__ = ["loss_shape", "validate"]


def loss_shape(call: LossCall[Any], reduction: str | None = None) -> tuple[int, ...]:
    """The shape of the loss torch returns for a valid call (under `reduction`, if given)."""
    return call.loss.loss_shape(call, call.reduction if reduction is None else reduction)


def _check_reduction(call: LossCall[Any]) -> None:
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


def _check_names(call: LossCall[Any]) -> None:
    """The gradients and outputs asked for are ones the loss has (shown bounded: they are a
    client's strings)."""
    loss = call.loss
    for name in sorted(call.grads):
        if name not in loss.differentiable:
            can = ", ".join(sorted(loss.differentiable))
            raise invalid_argument(
                f"gradients.with_respect_to names {_shown(name)!r}; {loss.name} can be differentiated "
                f"with respect to {can}",
                "GRADIENT_NOT_SUPPORTED",
                "gradients.with_respect_to",
                tensor=_shown(name),
                loss=loss.name,
            )
        if call.tensor(name) is None:
            raise invalid_argument(
                f"gradients.with_respect_to names {name!r}, but {loss.name}.{name} is unset",
                "GRADIENT_NOT_SUPPORTED",
                "gradients.with_respect_to",
                tensor=name,
                loss=loss.name,
            )
    if not call.outputs:
        return
    known = [spec.name for spec in loss.outputs]
    for name in sorted(call.outputs):
        if name not in known:
            has = f"its outputs are {', '.join(known)}" if known else "it has none besides the loss"
            raise invalid_argument(
                f"outputs names {_shown(name)!r}, which {loss.name} does not return; {has}",
                "OUTPUT_UNKNOWN",
                "outputs",
                output=_shown(name),
                loss=loss.name,
            )


def _shown(name: str) -> str:
    return name if len(name) <= 64 else name[:64] + f"... ({len(name)} characters)"


def _check_gradients(call: LossCall[Any]) -> None:
    if call.grad_dtype is not None and call.grad_dtype not in FLOATING:
        raise invalid_argument(
            f"gradients.dtype is {dtype_name(call.grad_dtype)}; gradients must be float32, float64, "
            "float16 or bfloat16",
            "DTYPE_NOT_SUPPORTED",
            "gradients.dtype",
            dtype=dtype_name(call.grad_dtype),
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


def validate(call: LossCall[Any], limits: TensorLimits | None = None) -> LossCall[Any]:
    """Returns the call ready for torch (int32 targets widened), or raises `InvalidArgumentError`
    (or `ResourceExhaustedError` when a broadcast passes `limits`)."""
    require_floating(call.input, "input", "the input")
    _check_reduction(call)
    _check_names(call)
    call = call.loss.check(call, limits)
    _check_gradients(call)
    return call
