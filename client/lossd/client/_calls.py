"""Builds `ComputeLossRequest`s from Python arguments and decodes responses; shared by both clients."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from lossd.client.losses import DECLARATIONS, LossDeclaration
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import tensor_pb2
from lossd.wire import chunks, codec
from lossd.wire.errors import DataLossError, InvalidArgumentError
from lossd.wire.resident import content_id

if TYPE_CHECKING:
    import torch

__all__ = [
    "ArrayT",
    "LossResult",
    "PreparedCall",
    "Resident",
    "StreamReceiver",
    "build_request",
    "decode_response",
    "prepare_call",
]

ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")

_REDUCTIONS: dict[str, pb.Reduction.ValueType] = {
    "none": pb.REDUCTION_NONE,
    "mean": pb.REDUCTION_MEAN,
    "sum": pb.REDUCTION_SUM,
    "batchmean": pb.REDUCTION_BATCHMEAN,
}


_TENSOR_GRADIENTS = ("classifier", "bias")
"""The loss tensors a gradient can be asked for: ComputeLossResponse.<name>_gradient."""


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
    hard_loss: ArrayT | None = None
    """A distillation's hard (cross-entropy) part, reduced like `loss`."""
    soft_loss: ArrayT | None = None
    """A distillation's soft (divergence) part, reduced like `loss`."""
    lse: ArrayT | None = None
    """A linear cross-entropy's per-token log-sum-exp, if `return_lse` was set."""
    classifier_grad: ArrayT | None = None
    """d(loss)/d(classifier) of a linear loss, if `return_classifier_grad` was set."""
    bias_grad: ArrayT | None = None
    """d(loss)/d(bias) of a linear loss, if `return_bias_grad` was set."""


@dataclass(frozen=True, eq=False)
class Resident:
    """A tensor the server holds (`LossClient.resident`): pass it wherever a loss takes a tensor, and
    only its id travels. It keeps the tensor's bytes, to upload them again to a server that does not
    hold it (another replica, a restarted server, one that let it go). It views the tensor's memory
    where it can: change the tensor afterwards and make a new handle, for a changed tensor is another
    resident tensor."""

    id: str
    dtype: int
    shape: tuple[int, ...]
    data: memoryview

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def __repr__(self) -> str:
        return f"Resident({self.id[:19]}..., {codec.data_type_name(self.dtype)}, {list(self.shape)})"

    def header(self) -> tensor_pb2.Tensor:
        return codec.header(self.shape, self.dtype)

    @classmethod
    def of(cls, value: codec.TensorLike) -> Resident:
        """A handle for a tensor (its id computed here, as the server computes it)."""
        array, dtype = codec.to_wire(value, "tensor")
        data = codec.wire_view(array)
        return cls(content_id(dtype, array.shape, data), dtype, tuple(array.shape), data)


_INLINE_BYTES = 1 << 16
"""In a StreamLoss header, tensors up to this size (or the chunk size, if smaller) travel inline
rather than in chunks of their own."""


def _put_option_tensor(
    call: PreparedCall,
    name: str,
    value: codec.TensorLike | Resident,
    message: tensor_pb2.Tensor,
    field: str,
    integers: bool = False,
) -> None:
    """A loss's own tensor (class weights, token ids, say); plain floats take the input's dtype, as
    torch requires of weights, plain integers stay int64."""
    slot = chunks.REQUEST_SLOTS[name]
    if isinstance(value, (np.ndarray, Resident)) or codec.is_torch_tensor(value):
        call.put(slot, message, value, field)
        return
    if integers:
        call.put(slot, message, np.asarray(value, dtype=np.int64), field)
        return
    input_dtype = call.request.input.dtype
    dtype = input_dtype if codec.is_floating(input_dtype) else None
    call.put(slot, message, np.asarray(value, dtype=np.float64), field, dtype)


@dataclass
class PreparedCall:
    """A request with every tensor's dtype and shape set and its bytes still aside (`pending`), so
    that it can go as one `ComputeLoss` message or as a `StreamLoss` stream without a copy too many.
    """

    request: pb.ComputeLossRequest
    pending: list[tuple[int, tensor_pb2.Tensor, memoryview]] = field(default_factory=list)
    residents: list[Resident] = field(default_factory=list)
    """The resident tensors the call names."""
    classes_last: bool = False
    """The loss is over tokens with the vocabulary last (a distillation): one loss per token, and
    its two parts besides."""

    @property
    def nbytes(self) -> int:
        """The tensor bytes still to place."""
        return sum(data.nbytes for _, _, data in self.pending)

    @property
    def answer_nbytes(self) -> int:
        """The answer's tensor bytes as the shapes tell them (a `none` kl_div loss broadcasts):
        a call whose answer would not fit one message streams too."""
        request = self.request
        input_shape, target_shape = tuple(request.input.shape), tuple(request.target.shape)
        itemsize = codec.itemsize(request.input.dtype)
        nbytes = itemsize
        if request.reduction == pb.REDUCTION_NONE and self.classes_last:
            nbytes = math.prod(input_shape[:-1]) * max(itemsize, 4)
        elif request.reduction == pb.REDUCTION_NONE:
            shape = input_shape
            with contextlib.suppress(ValueError):  # a loss whose operands broadcast (kl_div)
                shape = tuple(np.broadcast_shapes(input_shape, target_shape))
            nbytes = math.prod(shape) * itemsize
        if self.classes_last:
            nbytes *= 3  # the loss, its hard and its soft part
        gradients = request.gradients
        wanted = [(gradients.input, request.input), (gradients.target, request.target)]
        loss = request.WhichOneof("loss")
        if loss is not None:
            options = getattr(request, loss)
            wanted += [
                (getattr(gradients, name), getattr(options, name))
                for name in _TENSOR_GRADIENTS
                if name in options.DESCRIPTOR.fields_by_name
            ]
        for asked, tensor in wanted:
            if asked:
                nbytes += math.prod(tensor.shape) * codec.itemsize(gradients.dtype or tensor.dtype)
        return nbytes

    def put(
        self,
        slot: int,
        message: tensor_pb2.Tensor,
        value: codec.TensorLike | Resident,
        name: str,
        dtype: int | None = None,
    ) -> None:
        if isinstance(value, Resident):
            message.CopyFrom(value.header())
            message.resident_id = value.id
            self.residents.append(value)
            return
        array, code = codec.to_wire(value, name, dtype)
        message.dtype = code  # type: ignore[assignment]
        message.shape[:] = array.shape
        self.pending.append((slot, message, codec.wire_view(array)))

    def unary(self) -> pb.ComputeLossRequest:
        """The complete ComputeLossRequest."""
        for _, message, data in self.pending:
            message.data = data.tobytes()
        self.pending = []
        return self.request

    def stream(self, chunk_bytes: int) -> Iterator[bytes]:
        """The StreamLoss messages: the header (small tensors inline), then the other tensors' chunks,
        the input last, so that everything the server needs beside it is there when it arrives."""
        rest = []
        inline = min(_INLINE_BYTES, chunk_bytes)
        for slot, message, data in self.pending:
            if data.nbytes <= inline:
                message.data = data.tobytes()
            else:
                rest.append((slot, data))
        self.pending = []
        yield chunks.encode_header(self.request)
        for slot, data in sorted(rest, key=lambda item: item[0] == pb.TENSOR_SLOT_INPUT):
            yield from chunks.iter_chunks(slot, data, chunk_bytes)


def prepare_call(
    loss: str | LossDeclaration,
    input: codec.TensorLike,
    target: codec.TensorLike,
    *,
    reduction: str = "mean",
    return_grad: bool = False,
    return_target_grad: bool = False,
    return_classifier_grad: bool = False,
    return_bias_grad: bool = False,
    grad_dtype: object = None,
    grad_output: codec.TensorLike | None = None,
    **options: Any,
) -> PreparedCall:
    """The call `F.<loss>(input, target, ...)`, with torch's argument names and defaults: the
    common ones here, the loss's own in `options` (see `lossd.client.losses`)."""
    declaration = DECLARATIONS[loss] if isinstance(loss, str) else loss
    unknown = [
        name for name in options if name not in declaration.options and name not in declaration.tensors
    ]
    if unknown:
        raise TypeError(f"{declaration.name}() got unexpected keyword arguments {sorted(unknown)}")
    if reduction not in _REDUCTIONS:
        raise InvalidArgumentError(
            f"reduction {reduction!r} is not one of {sorted(_REDUCTIONS)}",
            reason="REDUCTION_INVALID",
            field="reduction",
            metadata={"reduction": str(reduction)},
        )
    call = PreparedCall(
        pb.ComputeLossRequest(reduction=_REDUCTIONS[reduction]), classes_last=declaration.classes_last
    )
    request = call.request
    call.put(pb.TENSOR_SLOT_INPUT, request.input, input, "input")
    call.put(pb.TENSOR_SLOT_TARGET, request.target, target, "target")
    message = getattr(request, declaration.name)
    message.SetInParent()
    for name in declaration.tensors:
        value = options.get(name)
        if value is not None:
            field = f"{declaration.name}.{name}"
            _put_option_tensor(call, name, value, getattr(message, name), field, name in declaration.indices)
    for name, default in declaration.options.items():
        value = options.get(name, default)
        if value is not None and value != default:  # unset fields mean the default on the server too
            setattr(message, name, value if default is None else type(default)(value))
    tensor_grads = {"classifier": return_classifier_grad, "bias": return_bias_grad}
    for name, asked in tensor_grads.items():
        if asked and name not in declaration.gradient_tensors:
            raise TypeError(f"{declaration.name}() has no {name} gradient (return_{name}_grad)")
    if return_grad or return_target_grad or any(tensor_grads.values()) or grad_output is not None:
        gradients = request.gradients
        gradients.input = return_grad
        gradients.target = return_target_grad
        gradients.classifier = return_classifier_grad
        gradients.bias = return_bias_grad
        if grad_dtype is not None:
            gradients.dtype = codec.data_type_of(grad_dtype, "gradients.dtype")  # type: ignore[assignment]
        if grad_output is not None:
            call.put(pb.TENSOR_SLOT_GRAD_OUTPUT, gradients.grad_output, grad_output, "gradients.grad_output")
    return call


def build_request(
    loss: str, input: codec.TensorLike, target: codec.TensorLike, **options: Any
) -> pb.ComputeLossRequest:
    """The complete ComputeLossRequest for `F.<loss>(input, target, **options)` (see `prepare_call`)."""
    return prepare_call(loss, input, target, **options).unary()


def decode_response(
    response: pb.ComputeLossResponse, like: Any, data: Mapping[str, np.ndarray] | None = None
) -> LossResult[Any]:
    """Decodes a response into arrays of the same kind as `like` (torch: on `like`'s device).

    `data[field]` holds a gradient's bytes when they came in StreamLoss chunks; the result then
    shares that memory.
    """
    extra = data or {}
    if codec.is_torch_tensor(like):
        device = like.device

        def decode(message: tensor_pb2.Tensor, field: str) -> Any:
            bytes_ = extra.get(field)
            return codec.decode_torch(message, field, device=device, data=bytes_, copy=bytes_ is None)

    else:

        def decode(message: tensor_pb2.Tensor, field: str) -> Any:
            bytes_ = extra.get(field)
            return codec.decode_numpy(message, field, data=bytes_, copy=bytes_ is None)

    parts = {
        name: decode(getattr(response, name), name)
        for name in ("hard_loss", "soft_loss", "lse")
        if response.HasField(name)
    }
    parts.update(
        (f"{name}_grad", decode(getattr(response, f"{name}_gradient"), f"{name}_gradient"))
        for name in _TENSOR_GRADIENTS
        if response.HasField(f"{name}_gradient")  # type: ignore[arg-type]
    )
    return LossResult(
        loss=decode(response.loss, "loss"),
        **parts,
        grad=decode(response.input_gradient, "input_gradient")
        if response.HasField("input_gradient")
        else None,
        target_grad=(
            decode(response.target_gradient, "target_gradient")
            if response.HasField("target_gradient")
            else None
        ),
    )


class StreamReceiver:
    """Reads a StreamLoss response stream: the header, then the chunks of every tensor it left empty
    (the gradients, sometimes the loss) into memory allocated once from the header. A malformed
    stream is the server's fault: `DataLossError`."""

    def __init__(self, like: Any) -> None:
        self._like = like
        self._header: pb.ComputeLossResponse | None = None
        self._assembly: chunks.Assembly | None = None

    def feed(self, raw: bytes) -> None:
        try:
            part = chunks.decode_part(raw)
            if self._assembly is None:
                if isinstance(part, chunks.Chunk):
                    raise InvalidArgumentError(
                        "the response stream opened with a chunk", reason="STREAM_HEADER_MISSING"
                    )
                self._header = pb.ComputeLossResponse.FromString(bytes(part))
                sizes: dict[int, int] = {}
                fields: dict[int, str] = {}
                for name, slot in chunks.RESPONSE_SLOTS.items():
                    if self._header.HasField(name):  # type: ignore[arg-type]
                        nbytes = codec.streamed_bytes(getattr(self._header, name), name)
                        if nbytes is not None:
                            sizes[int(slot)], fields[int(slot)] = nbytes, name
                self._assembly = chunks.Assembly(sizes, lambda n: np.empty(n, dtype=np.uint8), fields)
            elif isinstance(part, chunks.Chunk):
                self._assembly.add(*part)
            else:
                raise InvalidArgumentError(
                    "the response stream repeated its header", reason="STREAM_HEADER_REPEATED"
                )
        except InvalidArgumentError as error:
            raise DataLossError(f"malformed response stream: {error.message}", reason=error.reason) from None

    def result(self) -> LossResult[Any]:
        if self._header is None or self._assembly is None:
            raise DataLossError("the response stream ended before its header", reason="STREAM_HEADER_MISSING")
        try:
            self._assembly.check_complete()
        except InvalidArgumentError as error:
            raise DataLossError(f"malformed response stream: {error.message}", reason=error.reason) from None
        return decode_response(self._header, self._like, self._assembly.by_field())
