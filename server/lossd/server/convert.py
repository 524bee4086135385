"""`lossd.v1` messages to the engine's `LossCall`, and `LossOutput` back: the transport's only logic."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from google.protobuf.message import DecodeError

from lossd.client import codec
from lossd.client.errors import InvalidArgumentError
from lossd.server.calls import LossCall, LossKind, LossOptions, LossOutput
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import tensor_pb2

__all__ = ["call_from_request", "parse_request", "response_from_output", "stream_plan", "stream_response"]

_REDUCTIONS = {
    pb.REDUCTION_UNSPECIFIED: "mean",
    pb.REDUCTION_NONE: "none",
    pb.REDUCTION_MEAN: "mean",
    pb.REDUCTION_SUM: "sum",
    pb.REDUCTION_BATCHMEAN: "batchmean",
}
_DEFAULT_IGNORE_INDEX = -100


INLINE_LOSS_BYTES = 64 * 1024
"""A StreamLoss answer carries its loss in the header up to this size, else in chunks."""

TensorMaker = Callable[[tensor_pb2.Tensor, str], torch.Tensor]


def _required(message: tensor_pb2.Tensor, present: bool, field: str, make: TensorMaker) -> torch.Tensor:
    if not present:
        raise InvalidArgumentError(f"{field} is missing", reason="FIELD_MISSING", field=field)
    return make(message, field)


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


def _call(request: pb.ComputeLossRequest, make: TensorMaker) -> LossCall:
    options = _options(request)
    weight = None
    if options.kind is not LossKind.KL_DIV:
        holder = request.nll_loss if options.kind is LossKind.NLL else request.cross_entropy
        if holder.HasField("weight"):
            weight = make(holder.weight, f"{options.kind.value}.weight")
    gradients = request.gradients
    grad_output = None
    if gradients.HasField("grad_output"):
        grad_output = make(gradients.grad_output, "gradients.grad_output")
    return LossCall(
        options=options,
        input=_required(request.input, request.HasField("input"), "input", make),
        target=_required(request.target, request.HasField("target"), "target", make),
        weight=weight,
        input_grad=gradients.input,
        target_grad=gradients.target,
        grad_dtype=_grad_dtype(gradients),
        grad_output=grad_output,
    )


M = TypeVar("M")


def parse_message(parse: Callable[[bytes], M], raw: bytes, what: str, kind: str = "message") -> M:
    """`parse(raw)`; bytes it cannot parse are the caller's error (`REQUEST_MALFORMED`)."""
    try:
        return parse(raw)
    except (DecodeError, ValueError, TypeError):
        raise InvalidArgumentError(
            f"{what} is not a valid serialized {kind} ({len(raw)} bytes)",
            reason="REQUEST_MALFORMED",
            metadata={"bytes": str(len(raw))},
        ) from None


def parse_request(raw: bytes, what: str = "the request") -> pb.ComputeLossRequest:
    """Parses a serialized ComputeLossRequest; bytes that are not one are the caller's error."""
    return parse_message(pb.ComputeLossRequest.FromString, raw, what, "lossd.v1.ComputeLossRequest")


def call_from_request(
    request: pb.ComputeLossRequest,
    limits: codec.TensorLimits,
    data: Mapping[str, torch.Tensor] | None = None,
) -> LossCall:
    """Decodes a request into a `LossCall`; tensors are zero-copy views of the request's bytes, or of
    `data[field]` (a uint8 host tensor, pinned on CUDA) for tensors whose bytes came apart from it
    (StreamLoss chunks)."""
    extra = data or {}

    def make(message: tensor_pb2.Tensor, field: str) -> torch.Tensor:
        buffer = extra.get(field)
        if buffer is None:
            return codec.decode_torch(message, field, limits=limits, copy=False)
        codec.check(message, field, limits, buffer.numel())
        return buffer.view(codec.torch_dtype(message.dtype)).reshape(tuple(message.shape))

    return _call(request, make)


_SLOTS = {
    "input": pb.TENSOR_SLOT_INPUT,
    "target": pb.TENSOR_SLOT_TARGET,
    "nll_loss.weight": pb.TENSOR_SLOT_WEIGHT,
    "cross_entropy.weight": pb.TENSOR_SLOT_WEIGHT,
    "gradients.grad_output": pb.TENSOR_SLOT_GRAD_OUTPUT,
}


def stream_plan(
    request: pb.ComputeLossRequest, limits: codec.TensorLimits
) -> tuple[LossCall, dict[int, tuple[str, int]]]:
    """For a StreamLoss header: the call with shape-only (meta) tensors, which validation can check
    before any data arrives, and slot -> (field, bytes) of every tensor still to come in chunks."""
    plan: dict[int, tuple[str, int]] = {}

    def make(message: tensor_pb2.Tensor, field: str) -> torch.Tensor:
        nbytes = codec.streamed_bytes(message, field, limits)
        if nbytes is None:
            return codec.decode_torch(message, field, limits=limits, copy=False)
        plan[_SLOTS[field]] = (field, nbytes)
        return torch.empty(tuple(message.shape), dtype=codec.torch_dtype(message.dtype), device="meta")

    return _call(request, make), plan


def stream_response(output: LossOutput) -> tuple[pb.ComputeLossResponse, list[tuple[int, memoryview]]]:
    """The StreamLoss answer: a header with the loss and the gradients' dtypes and shapes, and each
    gradient's bytes (slot, view) to send in chunks."""
    response = pb.ComputeLossResponse()
    chunks: list[tuple[int, memoryview]] = []
    loss, loss_dtype = codec.to_wire(output.loss)
    if loss.nbytes <= INLINE_LOSS_BYTES:  # a reduced loss: inline
        codec.encode(output.loss, "loss", out=response.loss)
    else:  # a `none` loss can outgrow any message: in chunks like the gradients
        response.loss.CopyFrom(codec.header(loss.shape, loss_dtype))
        chunks.append((int(pb.TENSOR_SLOT_LOSS), codec.wire_view(loss)))
    for slot, value, message in (
        (pb.TENSOR_SLOT_INPUT_GRADIENT, output.input_grad, response.input_gradient),
        (pb.TENSOR_SLOT_TARGET_GRADIENT, output.target_grad, response.target_gradient),
    ):
        if value is None:
            continue
        array, dtype = codec.to_wire(value)
        message.CopyFrom(codec.header(array.shape, dtype))
        if array.size:
            chunks.append((int(slot), codec.wire_view(array)))
    return response, chunks


def response_from_output(output: LossOutput) -> pb.ComputeLossResponse:
    """Encodes the engine's result; gradients that were not asked for are not sent."""
    response = pb.ComputeLossResponse()
    codec.encode(output.loss, "loss", out=response.loss)
    if output.input_grad is not None:
        codec.encode(output.input_grad, "input_gradient", out=response.input_gradient)
    if output.target_grad is not None:
        codec.encode(output.target_grad, "target_gradient", out=response.target_gradient)
    return response
