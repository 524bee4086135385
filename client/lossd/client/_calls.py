"""Builds `ComputeLossRequest`s from Python arguments and decodes responses; shared by both clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import numpy as np

from lossd.client import codec
from lossd.client.errors import InvalidArgumentError
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import tensor_pb2

if TYPE_CHECKING:
    import torch

__all__ = ["ArrayT", "LossKind", "LossResult", "ReductionName", "build_request", "decode_response"]

ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")
LossKind = Literal["nll_loss", "cross_entropy", "kl_div"]
ReductionName = Literal["none", "mean", "sum", "batchmean"]

_REDUCTIONS: dict[str, pb.Reduction.ValueType] = {
    "none": pb.REDUCTION_NONE,
    "mean": pb.REDUCTION_MEAN,
    "sum": pb.REDUCTION_SUM,
    "batchmean": pb.REDUCTION_BATCHMEAN,
}
DEFAULT_IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossResult(Generic[ArrayT]):
    """A loss and the gradients that were asked for, as numpy arrays or torch tensors like the input.

    Torch results live on the input's device.
    """

    loss: ArrayT
    """The loss: 0-d, or one value per element for `reduction="none"`."""
    grad: ArrayT | None = None
    """d(loss)/d(input), if `return_grad` was set."""
    target_grad: ArrayT | None = None
    """d(loss)/d(target), if `return_target_grad` was set."""


def _encode_weight(
    weight: codec.TensorLike, like: tensor_pb2.Tensor, field: str, out: tensor_pb2.Tensor
) -> None:
    """Encodes class weights; plain numbers take the input's dtype, as torch requires of weights."""
    if isinstance(weight, np.ndarray) or codec.is_torch_tensor(weight):
        codec.encode(weight, field, out=out)
        return
    floating = codec.is_floating(like.dtype)
    codec.encode(np.asarray(weight, dtype=np.float64), field, dtype=like.dtype if floating else None, out=out)


def build_request(
    kind: LossKind,
    input: codec.TensorLike,
    target: codec.TensorLike,
    *,
    reduction: str = "mean",
    weight: codec.TensorLike | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    label_smoothing: float = 0.0,
    log_target: bool = False,
    return_grad: bool = False,
    return_target_grad: bool = False,
    grad_dtype: object = None,
    grad_output: codec.TensorLike | None = None,
) -> pb.ComputeLossRequest:
    """The request for `F.<kind>(input, target, ...)` with torch's argument names and defaults."""
    if reduction not in _REDUCTIONS:
        raise InvalidArgumentError(
            f"reduction {reduction!r} is not one of {sorted(_REDUCTIONS)}",
            reason="REDUCTION_INVALID",
            field="reduction",
            metadata={"reduction": str(reduction)},
        )
    request = pb.ComputeLossRequest(reduction=_REDUCTIONS[reduction])
    codec.encode(input, "input", out=request.input)
    codec.encode(target, "target", out=request.target)
    if kind == "kl_div":
        request.kl_div.log_target = log_target
    else:
        options = request.nll_loss if kind == "nll_loss" else request.cross_entropy
        options.SetInParent()
        if weight is not None:
            _encode_weight(weight, request.input, f"{kind}.weight", out=options.weight)
        if ignore_index != DEFAULT_IGNORE_INDEX:
            options.ignore_index = int(ignore_index)
        if kind == "cross_entropy":
            request.cross_entropy.label_smoothing = float(label_smoothing)
    if return_grad or return_target_grad or grad_output is not None:
        gradients = request.gradients
        gradients.input = return_grad
        gradients.target = return_target_grad
        if grad_dtype is not None:
            gradients.dtype = codec.data_type_of(grad_dtype, "gradients.dtype")  # type: ignore[assignment]
        if grad_output is not None:
            codec.encode(grad_output, "gradients.grad_output", out=gradients.grad_output)
    return request


def decode_response(response: pb.ComputeLossResponse, like: Any) -> LossResult[Any]:
    """Decodes a response into arrays of the same kind as `like` (torch: on `like`'s device)."""
    if codec.is_torch_tensor(like):
        device = like.device

        def decode(message: tensor_pb2.Tensor, field: str) -> Any:
            return codec.decode_torch(message, field, device=device)

    else:

        def decode(message: tensor_pb2.Tensor, field: str) -> Any:
            return codec.decode_numpy(message, field)

    return LossResult(
        loss=decode(response.loss, "loss"),
        grad=decode(response.input_gradient, "input_gradient")
        if response.HasField("input_gradient")
        else None,
        target_grad=(
            decode(response.target_gradient, "target_gradient")
            if response.HasField("target_gradient")
            else None
        ),
    )
