"""`lossd.v1` messages to the engine's `LossCall`, and `LossOutput` back: the transport's only logic."""

from __future__ import annotations

import torch

from lossd.client import codec
from lossd.client.errors import InvalidArgumentError
from lossd.server.calls import LossCall, LossKind, LossOptions, LossOutput
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import tensor_pb2

__all__ = ["call_from_request", "response_from_output"]

_REDUCTIONS = {
    pb.REDUCTION_UNSPECIFIED: "mean",
    pb.REDUCTION_NONE: "none",
    pb.REDUCTION_MEAN: "mean",
    pb.REDUCTION_SUM: "sum",
    pb.REDUCTION_BATCHMEAN: "batchmean",
}
_DEFAULT_IGNORE_INDEX = -100


def _tensor(
    message: tensor_pb2.Tensor, present: bool, field: str, limits: codec.TensorLimits
) -> torch.Tensor:
    if not present:
        raise InvalidArgumentError(f"{field} is missing", reason="FIELD_MISSING", field=field)
    return codec.decode_torch(message, field, limits=limits, copy=False)


def _options(request: pb.ComputeLossRequest) -> LossOptions:
    kind_name = request.WhichOneof("loss")
    if kind_name is None:
        raise InvalidArgumentError(
            "loss is unset: set one of nll_loss, cross_entropy or kl_div",
            reason="LOSS_UNSPECIFIED",
            field="loss",
        )
    reduction = _REDUCTIONS.get(request.reduction)
    if reduction is None:
        raise InvalidArgumentError(
            f"reduction {request.reduction} is not a known Reduction",
            reason="REDUCTION_INVALID",
            field="reduction",
            metadata={"reduction": str(request.reduction)},
        )
    kind = LossKind(kind_name)
    if kind is LossKind.KL_DIV:
        return LossOptions(kind, reduction, log_target=request.kl_div.log_target)
    options = request.nll_loss if kind is LossKind.NLL else request.cross_entropy
    ignore_index = options.ignore_index if options.HasField("ignore_index") else _DEFAULT_IGNORE_INDEX
    smoothing = request.cross_entropy.label_smoothing if kind is LossKind.CROSS_ENTROPY else 0.0
    return LossOptions(kind, reduction, ignore_index, smoothing)


def _grad_dtype(gradients: pb.GradientOptions) -> torch.dtype | None:
    if gradients.dtype == tensor_pb2.DATA_TYPE_UNSPECIFIED:
        return None
    if gradients.dtype not in tensor_pb2.DataType.values():
        raise InvalidArgumentError(
            f"gradients.dtype {gradients.dtype} is not a known DataType",
            reason="DTYPE_UNKNOWN",
            field="gradients.dtype",
            metadata={"dtype": str(gradients.dtype)},
        )
    return codec.torch_dtype(gradients.dtype)


def call_from_request(request: pb.ComputeLossRequest, limits: codec.TensorLimits) -> LossCall:
    """Decodes a request into a `LossCall`; tensors are zero-copy views of the request's bytes."""
    options = _options(request)
    weight = None
    if options.kind is not LossKind.KL_DIV:
        holder = request.nll_loss if options.kind is LossKind.NLL else request.cross_entropy
        if holder.HasField("weight"):
            weight = _tensor(holder.weight, True, f"{options.kind.value}.weight", limits)
    gradients = request.gradients
    grad_output = None
    if gradients.HasField("grad_output"):
        grad_output = _tensor(gradients.grad_output, True, "gradients.grad_output", limits)
    return LossCall(
        options=options,
        input=_tensor(request.input, request.HasField("input"), "input", limits),
        target=_tensor(request.target, request.HasField("target"), "target", limits),
        weight=weight,
        input_grad=gradients.input,
        target_grad=gradients.target,
        grad_dtype=_grad_dtype(gradients),
        grad_output=grad_output,
    )


def response_from_output(output: LossOutput) -> pb.ComputeLossResponse:
    """Encodes the engine's result; gradients that were not asked for are not sent."""
    response = pb.ComputeLossResponse()
    codec.encode(output.loss, "loss", out=response.loss)
    if output.input_grad is not None:
        codec.encode(output.input_grad, "input_gradient", out=response.input_gradient)
    if output.target_grad is not None:
        codec.encode(output.target_grad, "target_gradient", out=response.target_gradient)
    return response
