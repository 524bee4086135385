"""Builds `ComputeLossRequest`s from Python arguments and decodes responses; shared by both clients.

What a loss takes, differentiates and returns comes from its declaration (`lossd.client.losses`):
tensors, gradients and outputs are addressed by name, as the contract addresses them."""

from __future__ import annotations

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


@dataclass(frozen=True)
class LossResult(Generic[ArrayT]):
    """A loss and what was asked for with it, as numpy arrays or torch tensors like the input
    (torch results live on the input's device).

    `grads` holds the gradients by the name of their tensor ("input", "target", "classifier"),
    `outputs` the outputs besides the loss by name ("hard_loss", "lse"); each is also an attribute:
    `result.grad` (the input's), `result.target_grad`, `result.<tensor>_grad`, `result.<output>`.
    """

    loss: ArrayT
    """The loss: 0-d, or one value per element for `reduction="none"`."""
    grads: Mapping[str, ArrayT] = field(default_factory=dict)
    outputs: Mapping[str, ArrayT] = field(default_factory=dict)

    @property
    def grad(self) -> ArrayT | None:
        """d(loss)/d(input), if `return_grad` was set."""
        return self.grads.get("input")

    @property
    def target_grad(self) -> ArrayT | None:
        """d(loss)/d(target), if `return_target_grad` was set."""
        return self.grads.get("target")

    def __getattr__(self, name: str) -> ArrayT:
        if not name.startswith("_"):
            if name in self.outputs:
                return self.outputs[name]
            if name.endswith("_grad") and name.removesuffix("_grad") in self.grads:
                return self.grads[name.removesuffix("_grad")]
        asked = [
            *self.outputs,
            *(f"{tensor}_grad" for tensor in self.grads if tensor not in ("input", "target")),
        ]
        raise AttributeError(
            f"this LossResult has no {name!r}: it holds loss, grad, target_grad"
            + "".join(f", {item}" for item in asked)
            + " (outputs and gradients come back when their return_* argument asks for them)"
        )


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
    value: codec.TensorLike | Resident,
    message: tensor_pb2.Tensor,
    field: str,
    integers: bool = False,
) -> None:
    """A loss's own tensor (class weights, token ids, say); plain floats take the input's dtype, as
    torch requires of weights, plain integers stay int64."""
    if isinstance(value, (np.ndarray, Resident)) or codec.is_torch_tensor(value):
        call.put(field, message, value)
        return
    if integers:
        call.put(field, message, np.asarray(value, dtype=np.int64))
        return
    input_dtype = call.request.input.dtype
    dtype = input_dtype if codec.is_floating(input_dtype) else None
    call.put(field, message, np.asarray(value, dtype=np.float64), dtype)


@dataclass
class PreparedCall:
    """A request with every tensor's dtype and shape set and its bytes still aside (`pending`, by
    the tensor's field path: the name its StreamLoss chunks carry), so that it can go as one
    `ComputeLoss` message or as a `StreamLoss` stream without a copy too many.
    """

    request: pb.ComputeLossRequest
    declaration: LossDeclaration
    pending: list[tuple[str, tensor_pb2.Tensor, memoryview]] = field(default_factory=list)
    residents: list[Resident] = field(default_factory=list)
    """The resident tensors the call names."""

    @property
    def nbytes(self) -> int:
        """The tensor bytes still to place."""
        return sum(data.nbytes for _, _, data in self.pending)

    def _tensor(self, name: str) -> tensor_pb2.Tensor | None:
        request = self.request
        if name in ("input", "target"):
            return request.input if name == "input" else request.target
        options = getattr(request, self.declaration.name)
        return getattr(options, name) if options.HasField(name) else None

    @property
    def answer_nbytes(self) -> int:
        """The answer's tensor bytes as the shapes and the declaration tell them (a `none` kl_div
        loss broadcasts): a call whose answer would not fit one message streams too."""
        request = self.request
        declaration = self.declaration
        input_shape, target_shape = tuple(request.input.shape), tuple(request.target.shape)
        itemsize = codec.itemsize(request.input.dtype)
        if declaration.rows == "tokens":
            itemsize = max(itemsize, 4)  # computed, and answered, in float32 at least
        options = getattr(request, declaration.name)
        per_row = math.prod(declaration.unreduced_shape(input_shape, target_shape, options))
        reduced = per_row if request.reduction == pb.REDUCTION_NONE else 1
        nbytes = reduced * itemsize
        for name in request.outputs:
            nbytes += (per_row if name in declaration.unreduced else reduced) * itemsize
        gradients = request.gradients
        for name in gradients.with_respect_to:
            tensor = self._tensor(name)
            if tensor is not None:
                nbytes += math.prod(tensor.shape) * codec.itemsize(gradients.dtype or tensor.dtype)
        return nbytes

    def put(
        self,
        name: str,
        message: tensor_pb2.Tensor,
        value: codec.TensorLike | Resident,
        dtype: int | None = None,
    ) -> None:
        """Sets tensor `name` (its field path) in `message`: a resident's id, or its dtype and
        shape with its bytes aside."""
        if isinstance(value, Resident):
            message.CopyFrom(value.header())
            message.resident_id = value.id
            self.residents.append(value)
            return
        array, code = codec.to_wire(value, name, dtype)
        message.dtype = code  # type: ignore[assignment]
        message.shape[:] = array.shape
        self.pending.append((name, message, codec.wire_view(array)))

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
        for name, message, data in self.pending:
            if data.nbytes <= inline:
                message.data = data.tobytes()
            else:
                rest.append((name, data))
        self.pending = []
        yield chunks.encode_header(self.request)
        for name, data in sorted(rest, key=lambda item: item[0] == "input"):
            yield from chunks.iter_chunks(name, data, chunk_bytes)


_NONFINITE = {"compute": pb.NON_FINITE_COMPUTE, "refuse": pb.NON_FINITE_REFUSE}


def prepare_call(
    loss: str | LossDeclaration,
    input: codec.TensorLike,
    target: codec.TensorLike,
    *,
    reduction: str = "mean",
    grad_dtype: object = None,
    grad_output: codec.TensorLike | None = None,
    nonfinite: str | None = None,
    **options: Any,
) -> PreparedCall:
    """The call `F.<loss>(input, target, ...)`, with torch's argument names and defaults: the
    common ones here, the loss's own in `options`, with the `return_*` requests (see
    `lossd.client.losses`)."""
    declaration = DECLARATIONS[loss] if isinstance(loss, str) else loss
    unknown = [name for name in options if name not in declaration.keywords]
    if unknown:
        raise TypeError(f"{declaration.name}() got unexpected keyword arguments {sorted(unknown)}")
    if reduction not in _REDUCTIONS:
        raise InvalidArgumentError(
            f"reduction {reduction!r} is not one of {sorted(_REDUCTIONS)}",
            reason="REDUCTION_INVALID",
            field="reduction",
            metadata={"reduction": str(reduction)},
        )
    call = PreparedCall(pb.ComputeLossRequest(reduction=_REDUCTIONS[reduction]), declaration)
    if nonfinite is not None:
        if nonfinite not in _NONFINITE:
            raise InvalidArgumentError(
                f"nonfinite {nonfinite!r} is not one of {sorted(_NONFINITE)} (None: the server's default)",
                reason="NONFINITE_POLICY_INVALID",
                field="nonfinite",
                metadata={"nonfinite": str(nonfinite)},
            )
        call.request.nonfinite = _NONFINITE[nonfinite]
    request = call.request
    call.put("input", request.input, input)
    call.put("target", request.target, target)
    message = getattr(request, declaration.name)
    message.SetInParent()
    for name in declaration.tensors:
        value = options.get(name)
        if value is not None:
            field = f"{declaration.name}.{name}"
            _put_option_tensor(call, value, getattr(message, name), field, name in declaration.indices)
    for name, default in declaration.options.items():
        value = options.get(name, default)
        if value is not None and value != default:  # unset fields mean the default on the server too
            setattr(message, name, value if default is None else type(default)(value))
    outputs = [output for flag, output in declaration.outputs.items() if options.get(flag)]
    if outputs:
        request.outputs.extend(outputs)
    wrt = [tensor for flag, tensor in declaration.gradients.items() if options.get(flag)]
    if wrt or grad_output is not None:
        gradients = request.gradients
        gradients.with_respect_to.extend(wrt)
        if grad_dtype is not None:
            gradients.dtype = codec.data_type_of(grad_dtype, "gradients.dtype")  # type: ignore[assignment]
        if grad_output is not None:
            call.put("gradients.grad_output", gradients.grad_output, grad_output)
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

    `data[name]` holds a tensor's bytes when they came in StreamLoss chunks (by the name they
    carried: "loss", "outputs.lse", "gradients.input"); the result then shares that memory.
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

    return LossResult(
        loss=decode(response.loss, "loss"),
        grads={name: decode(tensor, f"gradients.{name}") for name, tensor in response.gradients.items()},
        outputs={name: decode(tensor, f"outputs.{name}") for name, tensor in response.outputs.items()},
    )


def response_tensors(response: pb.ComputeLossResponse) -> Iterator[tuple[str, tensor_pb2.Tensor]]:
    """A response's tensors by the names their chunks carry."""
    yield "loss", response.loss
    for name, tensor in response.outputs.items():
        yield f"outputs.{name}", tensor
    for name, tensor in response.gradients.items():
        yield f"gradients.{name}", tensor


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
                sizes: dict[str, int] = {}
                for name, tensor in response_tensors(self._header):
                    nbytes = codec.streamed_bytes(tensor, name)
                    if nbytes is not None:
                        sizes[name] = nbytes
                self._assembly = chunks.Assembly(sizes, lambda n: np.empty(n, dtype=np.uint8))
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
        return decode_response(self._header, self._like, self._assembly.by_name())
