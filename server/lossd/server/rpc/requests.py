"""`lossd.v1` messages to the engine's `LossCall`, and `LossOutput` back.

Which loss a request names and what it takes is the loss's own (`lossd.server.losses`): this module
looks the loss up by the request's `loss` oneof, reads its options message's scalars into plain
values and its tensors by the names the loss declares, and writes every answer tensor by name
(`loss`, `outputs.<name>`, `gradients.<name>`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from google.protobuf.message import DecodeError

from lossd.server.losses import LOSSES, Loss, LossCall, LossOptions, LossOutput
from lossd.server.resident import NO_RESIDENTS, ResidentInfo, ResidentView
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import tensor_pb2
from lossd.wire import codec, messages
from lossd.wire.errors import InvalidArgumentError

__all__ = [
    "REQUEST_TENSORS",
    "answer_tensors",
    "call_from_request",
    "encode_response",
    "parse_request",
    "read_request",
    "read_split",
    "stream_plan",
    "stream_response",
]

_REDUCTIONS = {
    pb.REDUCTION_UNSPECIFIED: "mean",
    pb.REDUCTION_NONE: "none",
    pb.REDUCTION_MEAN: "mean",
    pb.REDUCTION_SUM: "sum",
    pb.REDUCTION_BATCHMEAN: "batchmean",
}


INLINE_LOSS_BYTES = 64 * 1024
"""A StreamLoss answer carries its loss in the header up to this size, else in chunks."""

TensorMaker = Callable[[tensor_pb2.Tensor, str], torch.Tensor]


def _required(message: tensor_pb2.Tensor, present: bool, field: str, make: TensorMaker) -> torch.Tensor:
    if not present:
        raise InvalidArgumentError(f"{field} is missing", reason="FIELD_MISSING", field=field)
    return make(message, field)


@functools.cache
def _scalars(descriptor: Any) -> tuple[tuple[str, bool], ...]:
    """An options message type's scalar fields: (name, whether it has presence: `optional`)."""
    return tuple((f.name, f.has_presence) for f in descriptor.fields if f.message_type is None)


def _values(message: Any) -> dict[str, Any]:
    """The scalar options an options message sets, by field name: an unset `optional` field is left
    out (the loss's default holds), every other field is its value."""
    return {
        name: getattr(message, name)
        for name, presence in _scalars(message.DESCRIPTOR)
        if not presence or message.HasField(name)
    }


def _options(request: pb.ComputeLossRequest) -> tuple[Loss[Any], LossOptions, Any]:
    """The loss, its options, and its options message (which may hold tensors)."""
    name = request.WhichOneof("loss")
    if name is None:
        raise InvalidArgumentError(
            f"loss is unset: set one of {', '.join(LOSSES)}",
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
    loss = LOSSES[name]
    message = getattr(request, name)
    return loss, loss.options(_values(message), reduction), message


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


def _flags(loss: Loss[Any], held: Mapping[str, ResidentInfo]) -> dict[str, bool]:
    """Each resident tensor of a call by its name, and whether it holds what its field counts as
    not finite (found when it was put)."""
    flags = {}
    for field, info in held.items():
        spec = loss.all_tensors.get(field.rsplit(".", 1)[-1])
        if spec is not None:
            flags[spec.name] = info.nonfinite_log if spec.holds == "log_probabilities" else info.nonfinite
    return flags


def _call(
    request: pb.ComputeLossRequest, make: TensorMaker, held: Mapping[str, ResidentInfo] | None = None
) -> LossCall[Any]:
    loss, options, message = _options(request)
    tensors = {
        spec.name: make(getattr(message, spec.name), f"{loss.name}.{spec.name}")
        for spec in loss.tensors
        if message.HasField(spec.name)
    }
    gradients = request.gradients
    grad_output = None
    if gradients.HasField("grad_output"):
        grad_output = make(gradients.grad_output, "gradients.grad_output")
    return LossCall(
        options=options,
        input=_required(request.input, request.HasField("input"), "input", make),
        target=_required(request.target, request.HasField("target"), "target", make),
        tensors=tensors,
        grads=frozenset(gradients.with_respect_to),
        outputs=frozenset(request.outputs),
        grad_dtype=_grad_dtype(gradients),
        grad_output=grad_output,
        nonfinite=_nonfinite(request.nonfinite),
        resident=_flags(loss, held) if held else {},
    )


_NONFINITE: dict[int, str | None] = {
    pb.NON_FINITE_UNSPECIFIED: None,
    pb.NON_FINITE_COMPUTE: "compute",
    pb.NON_FINITE_REFUSE: "refuse",
}


def _nonfinite(value: int) -> str | None:
    if value not in _NONFINITE:
        raise InvalidArgumentError(
            f"nonfinite is {value}, not a known NonFinite",
            reason="NONFINITE_POLICY_INVALID",
            field="nonfinite",
            metadata={"nonfinite": str(value)},
        )
    return _NONFINITE[value]


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


_DATA = tensor_pb2.Tensor.DESCRIPTOR.fields_by_name["data"].number


def _tensor_paths(descriptor: Any, path: tuple[int, ...] = (), name: str = "") -> dict[tuple[int, ...], str]:
    """Every `lossd.v1.Tensor` field inside a message type: the path of field numbers to its data,
    and the field's dotted name (`gradients.grad_output`)."""
    found: dict[tuple[int, ...], str] = {}
    for field in descriptor.fields:
        if field.message_type is None:
            continue
        dotted = f"{name}.{field.name}" if name else field.name
        if field.message_type is tensor_pb2.Tensor.DESCRIPTOR:
            found[(*path, field.number, _DATA)] = dotted
        elif field.message_type.full_name.startswith("lossd."):
            found |= _tensor_paths(field.message_type, (*path, field.number), dotted)
    return found


REQUEST_TENSORS = _tensor_paths(pb.ComputeLossRequest.DESCRIPTOR)
"""Where each tensor's bytes sit in a ComputeLossRequest, and the field it is."""


def _tree(paths: Any) -> messages.FieldTree:
    tree: dict[int, Any] = {}
    for path in paths:
        node = tree
        for number in path[:-1]:
            node = node.setdefault(number, {})
        node[path[-1]] = True
    return tree


_REQUEST_TREE = _tree(REQUEST_TENSORS)


SPLIT_BYTES = 64 * 1024
"""Messages from this size on are parsed without their tensors' bytes (which are then views of the
received message); smaller ones by protobuf whole, where a copy costs less than walking the fields."""


def read_split(
    raw: bytes, tree: messages.FieldTree, parse: Callable[[bytes], M], what: str, kind: str
) -> tuple[M, dict[tuple[int, ...], list[memoryview]]]:
    """A serialized message parsed without the bytes fields `tree` names, and those as views of
    `raw` by path (see `lossd.wire.messages.split`). Small messages, and messages no client makes
    (more fields than `split` walks, or a large remainder: what is not tensor bytes), are parsed by
    protobuf whole, with nothing split off: there a copy costs less than the walk, or the walk would
    save nothing."""
    if len(raw) >= SPLIT_BYTES:
        try:
            remainder, found = parse_message(lambda data: messages.split(data, tree), raw, what, kind)
        except messages.TooManyFields:
            pass
        else:
            if len(remainder) < SPLIT_BYTES:
                return parse_message(parse, remainder, what, kind), found
            del remainder, found
    return parse_message(parse, raw, what, kind), {}


def read_request(
    raw: bytes, what: str = "the request"
) -> tuple[pb.ComputeLossRequest, dict[str, memoryview]]:
    """A serialized ComputeLossRequest, parsed without its tensors' bytes, and those bytes as views
    of `raw` by field: one copy of the request in memory, the one gRPC made."""
    kind = "lossd.v1.ComputeLossRequest"
    request, found = read_split(raw, _REQUEST_TREE, pb.ComputeLossRequest.FromString, what, kind)
    return request, {REQUEST_TENSORS[path]: views[-1] for path, views in found.items()}


def held(
    message: tensor_pb2.Tensor, field: str, resident: ResidentView | None, infos: dict[str, ResidentInfo]
) -> torch.Tensor:
    """The resident tensor a request's tensor names (NOT_FOUND when the caller holds none by that
    id), checked against the dtype and shape the request gives for it, if any; its info goes in
    `infos` by field."""
    if resident is None:
        resident = NO_RESIDENTS
    tensor, info = resident.get(message.resident_id, field)
    infos[field] = info
    given_shape = tuple(message.shape)
    if (
        len(message.data)
        or (message.dtype and message.dtype != info.dtype)
        or (given_shape and given_shape != info.shape)
    ):
        raise InvalidArgumentError(
            f"{field} names resident tensor {info.id} "
            f"({codec.data_type_name(info.dtype)} {list(info.shape)}) but also gives data, or a dtype "
            f"({codec.data_type_name(message.dtype)}) or shape ({list(given_shape)}) of its own that differ",
            reason="RESIDENT_MISMATCH",
            field=field,
            metadata={"residentId": info.id, "shape": str(list(info.shape))},
        )
    return tensor


def call_from_request(
    request: pb.ComputeLossRequest,
    limits: codec.TensorLimits,
    data: Mapping[str, torch.Tensor | memoryview] | None = None,
    resident: ResidentView | None = None,
) -> LossCall[Any]:
    """Decodes a request into a `LossCall`; tensors are zero-copy views of the request's bytes, or of
    `data[field]` for tensors whose bytes came apart from it: a view of the received message
    (`read_request`), or a uint8 host tensor (pinned on CUDA) the StreamLoss chunks filled."""
    extra = data or {}
    infos: dict[str, ResidentInfo] = {}

    def make(message: tensor_pb2.Tensor, field: str) -> torch.Tensor:
        if message.resident_id:
            return held(message, field, resident, infos)
        buffer = extra.get(field)
        if buffer is None or isinstance(buffer, memoryview):
            return codec.decode_torch(message, field, limits=limits, copy=False, data=buffer)
        codec.check(message, field, limits, buffer.numel())
        return buffer.view(codec.torch_dtype(message.dtype)).reshape(tuple(message.shape))

    return _call(request, make, infos)


def stream_plan(
    request: pb.ComputeLossRequest, limits: codec.TensorLimits, resident: ResidentView | None = None
) -> tuple[LossCall[Any], dict[str, int]]:
    """For a StreamLoss header: the call with shape-only (meta) tensors, which validation can check
    before any data arrives, and the bytes of every tensor still to come in chunks, by its field
    path (the name its chunks carry)."""
    plan: dict[str, int] = {}
    infos: dict[str, ResidentInfo] = {}

    def make(message: tensor_pb2.Tensor, field: str) -> torch.Tensor:
        if message.resident_id:
            return held(message, field, resident, infos)
        nbytes = codec.streamed_bytes(message, field, limits)
        if nbytes is None:
            return codec.decode_torch(message, field, limits=limits, copy=False)
        plan[field] = nbytes
        return torch.empty(tuple(message.shape), dtype=codec.torch_dtype(message.dtype), device="meta")

    return _call(request, make, infos), plan


def answer_tensors(output: LossOutput) -> list[tuple[str, str, Any]]:
    """The response's tensors in field order: (field, key, value) with the loss first ("loss", ""),
    then each output ("outputs", name) and each gradient ("gradients", name)."""
    tensors: list[tuple[str, str, Any]] = [("loss", "", output.loss)]
    tensors += [("outputs", name, value) for name, value in output.outputs.items()]
    tensors += [("gradients", name, value) for name, value in output.grads.items()]
    return tensors


def tensor_name(field: str, key: str) -> str:
    """The name a response tensor's chunks carry: its field path in the header."""
    return f"{field}.{key}" if key else field


def stream_response(output: LossOutput) -> tuple[pb.ComputeLossResponse, list[tuple[str, memoryview]]]:
    """The StreamLoss answer: a header with the loss and outputs and the gradients' dtypes and
    shapes, and the bytes (name, view) of each tensor to send in chunks: the gradients always, a
    loss or output that outgrows `INLINE_LOSS_BYTES` (one per element) too."""
    response = pb.ComputeLossResponse()
    pieces: list[tuple[str, memoryview]] = []
    for field, key, value in answer_tensors(output):
        message = getattr(response, field)[key] if key else getattr(response, field)
        name = tensor_name(field, key)
        array, dtype = codec.to_wire(value, name)
        if field != "gradients" and array.nbytes <= INLINE_LOSS_BYTES:  # a reduced loss: inline
            codec.encode(value, name, out=message)
            continue
        message.CopyFrom(codec.header(array.shape, dtype))
        if array.size:
            pieces.append((name, codec.wire_view(array)))
    return response, pieces


_RESPONSE_TAGS = {
    field.name: messages.varint(field.number << 3 | messages.LEN)
    for field in pb.ComputeLossResponse.DESCRIPTOR.fields
}
_DATA_TAG = messages.varint(_DATA << 3 | messages.LEN)
_VALUE_TAG = messages.varint(2 << 3 | messages.LEN)  # a map entry's value; its key is field 1


@functools.lru_cache(maxsize=1024)
def _map_key(key: str) -> bytes:
    """A map entry's key field (answers repeat the same few names)."""
    return b"".join(messages.string_field(1, key))


def encode_response(output: LossOutput) -> bytes:
    """The serialized ComputeLossResponse of the engine's result, each tensor's bytes copied once,
    into the joined message (each dtype and shape's header is serialized once, see
    `codec.header_bytes`, and each map key once, see `_map_key`)."""
    pieces: list[bytes | memoryview] = []
    for field, key, value in answer_tensors(output):
        array, dtype = codec.to_wire(value, tensor_name(field, key) if key else field)
        data = codec.wire_view(array)
        head = codec.header_bytes(array.shape, dtype) + _DATA_TAG + messages.varint(data.nbytes)
        size = len(head) + data.nbytes
        if key:  # a map entry: its key, then the tensor as its value
            name = _map_key(key)
            length = messages.varint(size)
            pieces += (
                _RESPONSE_TAGS[field],
                messages.varint(len(name) + len(_VALUE_TAG) + len(length) + size),
                name,
                _VALUE_TAG,
                length,
                head,
                data,
            )
        else:
            pieces += (_RESPONSE_TAGS[field], messages.varint(size), head, data)
    return b"".join(pieces)
