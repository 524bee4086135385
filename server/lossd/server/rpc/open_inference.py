"""The Open Inference Protocol (KServe v2) in front of the same loss service.

Triton's and KServe's clients (C++, Python, Java, Go) speak `inference.GRPCInferenceService`; this
servicer answers them with lossd's losses, one model per loss (`nll_loss`, `cross_entropy`,
`kl_div`, ...: every loss in `lossd.server.losses.LOSSES`), version "1". Everything comes from the
loss's declarations: inputs carry its tensors' names (`input`, `target`, its own such as `weight`,
and `grad_output`), options come as request parameters (the loss's `parameters`), and the outputs
are `loss`, the loss's outputs by their names, and `<tensor>_grad` for each tensor it can
differentiate; requesting an output is what asks for it. A ModelInferRequest is translated into a
`lossd.v1.ComputeLossRequest` (the tensors' bytes are not decoded, only moved) and answered through
the same call lifecycle and whole-message path as `ComputeLoss`, so validation, limits, batching,
metrics and failure handling are exactly its; the answer's tensors go back as raw output contents.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import grpc
import numpy as np

from lossd.server.losses import LOSSES, Loss, LossOutput, TensorSpec
from lossd.server.losses.checks import invalid_argument
from lossd.server.memory import MemoryBudget
from lossd.server.rpc.guard import HandlerCollector, guarded
from lossd.server.rpc.lifecycle import UNKNOWN_LOSS, Call, Context, Lifecycle
from lossd.server.rpc.requests import read_split
from lossd.server.rpc.status import abort
from lossd.server.rpc.unary import answer_whole
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import tensor_pb2
from lossd.v1.oip import open_inference_pb2 as oip
from lossd.v1.oip import open_inference_pb2_grpc as oip_grpc
from lossd.wire import codec, messages
from lossd.wire.errors import LossdError, NotFoundError
from lossd.wire.version import __version__

__all__ = ["INFERENCE_SERVICE", "MODELS", "InferenceServicer"]

INFERENCE_SERVICE: str = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MODELS = tuple(LOSSES)
VERSION = "1"

_DATATYPES = {
    "FP32": tensor_pb2.DATA_TYPE_FLOAT32,
    "FP64": tensor_pb2.DATA_TYPE_FLOAT64,
    "FP16": tensor_pb2.DATA_TYPE_FLOAT16,
    "BF16": tensor_pb2.DATA_TYPE_BFLOAT16,
    "INT64": tensor_pb2.DATA_TYPE_INT64,
    "INT32": tensor_pb2.DATA_TYPE_INT32,
    "UINT8": tensor_pb2.DATA_TYPE_UINT8,
}
_NAMES: dict[int, str] = {dtype: name for name, dtype in _DATATYPES.items()}
# Typed contents: the field holding each datatype's values, and the little-endian dtype they pack to.
_CONTENTS = {
    "FP32": ("fp32_contents", "<f4"),
    "FP64": ("fp64_contents", "<f8"),
    "INT64": ("int64_contents", "<i8"),
    "INT32": ("int_contents", "<i4"),
    "UINT8": ("uint_contents", "u1"),
}
# The protobuf type of each typed-contents field, as numpy reads it.
_CONTENT_DTYPES = {
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
    "int64_contents": np.int64,
    "int_contents": np.int32,
    "uint_contents": np.uint32,
}
_REDUCTIONS = {
    "none": pb.REDUCTION_NONE,
    "mean": pb.REDUCTION_MEAN,
    "sum": pb.REDUCTION_SUM,
    "batchmean": pb.REDUCTION_BATCHMEAN,
}
# Scheduling parameters Triton's clients may send; they mean nothing to a loss and are ignored.
_IGNORED = frozenset({"priority", "timeout", "sequence_id", "sequence_start", "sequence_end"})


_GRAD = "_grad"
"""An output named `<tensor>_grad` is the gradient of the tensor: `input_grad`, `classifier_grad`."""


def _differentiable(loss: Loss[Any]) -> list[TensorSpec]:
    return [spec for spec in loss.all_tensors.values() if spec.differentiable]


def _outputs(loss: Loss[Any]) -> tuple[str, ...]:
    """A model's outputs: the loss, its outputs, the gradients it has."""
    return (
        "loss",
        *(spec.name for spec in loss.outputs),
        *(spec.name + _GRAD for spec in _differentiable(loss)),
    )


ECHO_CHARS = 64
"""Client-supplied strings are echoed in errors only up to this many characters."""


def shown(text: str) -> str:
    """A bounded prefix of a client's string, for an error message or its metadata."""
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + f"... ({len(text)} characters)"


def _model(name: str, version: str) -> Loss[Any]:
    if name not in MODELS:
        raise NotFoundError(
            f"model {shown(name)!r} does not exist; lossd serves {', '.join(MODELS)}",
            reason="MODEL_NOT_FOUND",
            metadata={"model": shown(name)},
        )
    if version not in ("", VERSION):
        raise NotFoundError(
            f"model {name!r} has no version {shown(version)!r}; it has version {VERSION}",
            reason="MODEL_VERSION_NOT_FOUND",
            metadata={"model": name, "version": shown(version)},
        )
    return LOSSES[name]


def _parameter(parameters: Mapping[str, oip.InferParameter], name: str) -> Any:
    value = parameters[name]
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def _tensor(
    given: oip.ModelInferRequest.InferInputTensor, raw: memoryview | None, out: tensor_pb2.Tensor
) -> memoryview:
    """Sets a lossd.v1 Tensor's dtype and shape from one OIP input; its bytes: `raw` (a view of the
    received message), or its typed contents packed (a copy: they are no tensor's bytes)."""
    dtype = _DATATYPES.get(given.datatype)
    if dtype is None:
        raise invalid_argument(
            f"{shown(given.name)}.datatype {shown(given.datatype)!r} is not one of {', '.join(_DATATYPES)}",
            "DTYPE_UNKNOWN",
            shown(given.name),
            datatype=shown(given.datatype),
        )
    out.dtype = dtype
    out.shape.extend(given.shape)
    if raw is not None:
        return raw
    if given.datatype not in _CONTENTS:
        raise invalid_argument(
            f"{given.name} is {given.datatype}: 16-bit floats travel only in raw_input_contents",
            "RAW_CONTENTS_REQUIRED",
            given.name,
            datatype=given.datatype,
        )
    field, wire = _CONTENTS[given.datatype]
    values = getattr(given.contents, field)
    array = np.array(values, dtype=_CONTENT_DTYPES[field])  # in C: ~2 ns per value
    if given.datatype == "UINT8" and array.size and int(array.max()) > 255:
        raise invalid_argument(f"{given.name} holds a UINT8 value over 255", "VALUE_OUT_OF_RANGE", given.name)
    return memoryview(array.astype(wire, copy=False).tobytes())


def loss_request(
    request: oip.ModelInferRequest, raw: list[memoryview] | None = None
) -> tuple[pb.ComputeLossRequest, dict[str, memoryview], list[str]]:
    """The lossd.v1 request a ModelInferRequest means (without its tensors' bytes), those bytes by
    lossd.v1 field, and the outputs to return in order. `raw`: the raw input contents, taken out of
    the received message (else the request's own are read)."""
    loss = _model(request.model_name, request.model_version)
    model = loss.name
    message = pb.ComputeLossRequest()
    options = getattr(message, model)
    options.SetInParent()
    if raw is None:
        raw = [memoryview(contents) for contents in request.raw_input_contents]
    if raw and len(raw) != len(request.inputs):
        raise invalid_argument(
            f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} inputs",
            "RAW_CONTENTS_MISMATCH",
            "raw_input_contents",
        )
    if raw and any(given.HasField("contents") for given in request.inputs):
        raise invalid_argument(
            "an input sets contents while raw_input_contents is used; use one form",
            "RAW_CONTENTS_MISMATCH",
            "raw_input_contents",
        )
    targets: dict[str, tuple[str, tensor_pb2.Tensor]] = {
        "input": ("input", message.input),
        "target": ("target", message.target),
        "grad_output": ("gradients.grad_output", message.gradients.grad_output),
    }
    for spec in loss.tensors:
        targets[spec.name] = (f"{model}.{spec.name}", getattr(options, spec.name))
    data: dict[str, memoryview] = {}
    seen = set()
    for i, given in enumerate(request.inputs):
        if given.name not in targets or given.name in seen:
            raise invalid_argument(
                f"input {shown(given.name)!r} is unknown or repeated; {model} takes {', '.join(targets)}",
                "INPUT_UNKNOWN",
                shown(given.name),
                input=shown(given.name),
            )
        seen.add(given.name)
        field, tensor = targets[given.name]
        data[field] = _tensor(given, raw[i] if raw else None, tensor)
    for required in ("input", "target"):
        if required not in seen:
            raise invalid_argument(f"input {required!r} is missing", "FIELD_MISSING", required)
    allowed = {"reduction", "grad_dtype", *loss.parameters}
    for name in request.parameters:
        if name in _IGNORED:
            continue
        if name not in allowed:
            raise invalid_argument(
                f"parameter {shown(name)!r} is unknown to {model}; it takes {', '.join(sorted(allowed))}",
                "PARAMETER_UNKNOWN",
                f"parameters.{shown(name)}",
                parameter=shown(name),
            )
        _apply(message, loss, options, name, _parameter(request.parameters, name))
    outputs = [wanted.name for wanted in request.outputs] or ["loss"]
    known = _outputs(loss)
    for name in outputs:
        if name not in known or outputs.count(name) > 1:
            raise invalid_argument(
                f"output {shown(name)!r} is unknown or repeated; the outputs are {', '.join(known)}",
                "OUTPUT_UNKNOWN",
                f"outputs.{shown(name)}",
                output=shown(name),
            )
    for name in outputs:
        if name.endswith(_GRAD) and name.removesuffix(_GRAD) in loss.differentiable:
            message.gradients.with_respect_to.append(name.removesuffix(_GRAD))
        elif name != "loss":
            message.outputs.append(name)
    return message, data, outputs


def _apply(message: pb.ComputeLossRequest, loss: Loss[Any], options: Any, name: str, value: Any) -> None:
    """Sets one parameter: reduction and grad_dtype, or one of the loss's options (by its type:
    an int is no bool or float, a float no bool, a bool only a bool)."""
    field = f"parameters.{name}"
    try:
        if name == "reduction":
            message.reduction = _REDUCTIONS[str(value)]
        elif name == "grad_dtype":
            message.gradients.dtype = _DATATYPES[str(value)]
        else:
            kind = loss.parameters[name]
            if isinstance(value, bool) != (kind is bool) or (kind is int and not isinstance(value, int)):
                raise TypeError
            setattr(options, name, kind(value))
    except (KeyError, TypeError, ValueError):
        raise invalid_argument(
            f"parameter {name!r} = {shown(repr(value))} is not valid here",
            "PARAMETER_INVALID",
            field,
            value=shown(str(value)),
        ) from None


_RAW_INPUTS = oip.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
_RAW_OUTPUTS = oip.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number


_INPUTS = oip.ModelInferRequest.DESCRIPTOR.fields_by_name["inputs"].number
_INPUT_CONTENTS = oip.ModelInferRequest.InferInputTensor.DESCRIPTOR.fields_by_name["contents"].number
TYPED_EXPANSION = 16
"""The most parsing typed contents may take per byte received: a 1-byte varint becomes an 8-byte
element in protobuf's array, and 8 more in the array lossd builds from it."""
_GROWTH = {
    oip.InferTensorContents.DESCRIPTOR.fields_by_name[name].number: growth
    for name, growth in (
        ("bool_contents", 2),  # a byte each, as protobuf's bools and as numpy's
        ("int_contents", 8),  # varints of a byte or more, 4-byte elements twice
        ("uint_contents", 8),
        ("int64_contents", TYPED_EXPANSION),  # varints of a byte or more, 8-byte elements twice
        ("uint64_contents", TYPED_EXPANSION),
        ("fp32_contents", 2),  # fixed width: the same bytes twice
        ("fp64_contents", 2),
        ("bytes_contents", 1),
    )
}
"""What parsing each typed contents field may take per byte received."""
_MOST_FIELDS = 4096


def _fields(data: memoryview) -> Iterator[tuple[int, memoryview | None]]:
    """A message's fields: (number, contents for a length-delimited one, else None)."""
    pos = 0
    while pos < len(data):
        key, pos = messages.read_varint(data, pos)
        if key & 7 == messages.LEN:
            length, start = messages.read_varint(data, pos)
            pos = start + length
            yield key >> 3, data[start:pos]
        else:
            pos = messages.skip(data, pos, key & 7)
            yield key >> 3, None


def _typed(raw: bytes) -> Iterator[tuple[int, int]]:
    """Each field on the way to the inputs' typed contents, one by one: (the contents field's
    number and bytes) for typed contents, (0, 0) for any other."""
    for number, value in _fields(memoryview(raw)):
        yield 0, 0
        if number != _INPUTS or value is None:
            continue
        for inner, contents in _fields(value):
            yield 0, 0
            if inner != _INPUT_CONTENTS or contents is None:
                continue
            for kind, values in _fields(contents):
                yield kind, len(values) if values is not None else 8


def typed_bytes(raw: bytes) -> int:
    """What parsing a ModelInferRequest's typed contents may allocate, from its bytes before it is
    parsed: each `contents` field's bytes times its growth (`_GROWTH`). A message with more fields
    than any client sends, or one that does not walk, counts as the worst typed contents whole."""
    total = 0
    try:
        for seen, (kind, size) in enumerate(_typed(raw)):
            if seen >= _MOST_FIELDS:
                return TYPED_EXPANSION * len(raw)
            if kind:
                total += _GROWTH.get(kind, TYPED_EXPANSION) * size
    except LossdError:
        return TYPED_EXPANSION * len(raw)
    return total


def read_infer_request(raw: bytes) -> tuple[oip.ModelInferRequest, list[memoryview] | None]:
    """A serialized ModelInferRequest, parsed without its raw input contents, and those as views of
    `raw` (None when it has none, or was parsed whole: then the request holds them)."""
    kind = "inference.ModelInferRequest"
    tree = {_RAW_INPUTS: True}
    request, found = read_split(raw, tree, oip.ModelInferRequest.FromString, "the request", kind)
    return request, found.get((_RAW_INPUTS,))


def encode_infer_response(request: oip.ModelInferRequest, output: LossOutput, outputs: list[str]) -> bytes:
    """The engine's result as a serialized ModelInferResponse, each output's bytes copied once."""
    answer = oip.ModelInferResponse(model_name=request.model_name, model_version=VERSION, id=request.id)
    tensors = {
        "loss": output.loss,
        **output.outputs,
        **{name + _GRAD: grad for name, grad in output.grads.items()},
    }
    contents: list[bytes | memoryview] = []
    for name in outputs:
        value = tensors[name]
        assert value is not None, f"{name} was requested, so it was computed"
        array, dtype = codec.to_wire(value, name)
        answer.outputs.add(name=name, datatype=_NAMES[dtype], shape=array.shape)
        contents += messages.bytes_field(_RAW_OUTPUTS, codec.wire_view(array))
    return b"".join([answer.SerializeToString(), *contents])


_METADATA_TYPES = {"floats": "FP32", "log_probabilities": "FP32", "indices": "INT64"}
"""The protocol has one datatype per tensor: FP32 stands for every float type lossd takes (FP64,
FP16 and BF16 work too), INT64 for integers (INT32 and UINT8 work too)."""


def _metadata(loss: Loss[Any]) -> oip.ModelMetadataResponse:
    """What a model takes and gives, from the loss's declarations."""
    tensor = oip.ModelMetadataResponse.TensorMetadata

    def described(spec: TensorSpec, name: str | None = None) -> oip.ModelMetadataResponse.TensorMetadata:
        return tensor(name=name or spec.name, datatype=_METADATA_TYPES[spec.holds], shape=spec.shape)

    inputs = [described(spec) for spec in loss.all_tensors.values()]
    inputs.append(tensor(name="grad_output", datatype="FP32", shape=[-1]))
    outputs = [tensor(name="loss", datatype="FP32", shape=[])]
    outputs += [
        tensor(name=spec.name, datatype="FP32", shape=[] if spec.reduced else [-1]) for spec in loss.outputs
    ]
    outputs += [
        tensor(name=spec.name + _GRAD, datatype="FP32", shape=spec.shape) for spec in _differentiable(loss)
    ]
    return oip.ModelMetadataResponse(
        name=loss.name, versions=[VERSION], platform="pytorch", inputs=inputs, outputs=outputs
    )


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` on a `LossServicer`; `ready()` says whether the server
    takes calls (started, not draining, device working); `budget` holds the metadata calls."""

    def __init__(
        self,
        losses: Lifecycle,
        ready: Callable[[], bool],
        budget: MemoryBudget,
        open_methods: frozenset[str] = frozenset(),
    ) -> None:
        self._losses = losses
        self._ready = ready
        self._budget = budget
        self._open = open_methods

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """ModelInfer reads its raw message like ComputeLoss; the other methods are guarded."""
        infer = grpc.method_handlers_generic_handler(
            INFERENCE_SERVICE, {"ModelInfer": grpc.stream_stream_rpc_method_handler(self.ModelInfer)}
        )
        collector = HandlerCollector()
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(self, collector)  # type: ignore[arg-type]
        server.add_generic_rpc_handlers(
            (infer, guarded(self._losses, collector.handlers, self._budget, self._open))
        )

    async def ServerLive(self, request: oip.ServerLiveRequest, context: Context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=not self._losses.failed)

    async def ServerReady(self, request: oip.ServerReadyRequest, context: Context) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request: oip.ModelReadyRequest, context: Context) -> oip.ModelReadyResponse:
        try:
            _model(request.name, request.version)
        except NotFoundError as error:
            await abort(context, error)
        return oip.ModelReadyResponse(ready=self._ready())

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Context
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="lossd", version=__version__, extensions=[])

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Context
    ) -> oip.ModelMetadataResponse:
        try:
            loss = _model(request.name, request.version)
        except NotFoundError as error:
            await abort(context, error)
        return _metadata(loss)

    async def ModelInfer(self, requests: AsyncIterator[bytes], context: Context) -> None:  # type: ignore[override]
        state: dict[str, Any] = {}

        def build(raw: bytes) -> tuple[pb.ComputeLossRequest, dict[str, memoryview]]:
            request, contents = read_infer_request(raw)
            message, data, wanted = loss_request(request, contents)
            state["request"], state["outputs"] = request, wanted
            return message, data

        def encode(output: LossOutput) -> bytes:
            return encode_infer_response(state.pop("request"), output, state["outputs"])

        async def answer(call: Call) -> None:
            await answer_whole(call, build, encode, typed_bytes)

        await self._losses.serve(requests, context, UNKNOWN_LOSS, answer)
