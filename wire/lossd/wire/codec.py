"""The one tensor codec: numpy arrays and torch tensors to and from `lossd.v1.Tensor`.

Used by the client to send and receive, and by the server to check and decode requests. Decoding
checks a message against `TensorLimits` from its header (dtype, shape) before it touches the data,
so a message claiming a huge shape costs nothing. Torch is imported only when a torch tensor is
involved: the client works with numpy alone.

Wire layout: row-major, little-endian, no padding (see proto/lossd/v1/tensor.proto). numpy has no
bfloat16 of its own: `decode_numpy` returns `ml_dtypes.bfloat16` arrays (the numpy bfloat16 JAX and
TensorFlow use), which widen to float32 exactly with `.astype(np.float32)`.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard, Union

import ml_dtypes
import numpy as np

from lossd.v1 import tensor_pb2
from lossd.wire.errors import InvalidArgumentError, ResourceExhaustedError

if TYPE_CHECKING:
    import torch

__all__ = [
    "TensorLike",
    "TensorLimits",
    "check",
    "data_type_from_name",
    "data_type_name",
    "data_type_of",
    "decode_numpy",
    "decode_torch",
    "encode",
    "is_floating",
    "is_torch_tensor",
    "torch_dtype",
]

TensorLike = Union[np.ndarray, "torch.Tensor", Sequence[Any], float, int]
"""What the client accepts as a tensor: a numpy array, a torch tensor, or nested numbers."""
Buffer = bytes | bytearray | memoryview | np.ndarray
"""Bytes that stand for a tensor's data."""

DataType = tensor_pb2.DataType


@dataclass(frozen=True)
class _Info:
    name: str
    itemsize: int
    numpy: str  # little-endian numpy dtype of the wire bytes; bfloat16 travels as '<u2'
    floating: bool


_INFO: dict[int, _Info] = {
    tensor_pb2.DATA_TYPE_FLOAT32: _Info("float32", 4, "<f4", True),
    tensor_pb2.DATA_TYPE_FLOAT64: _Info("float64", 8, "<f8", True),
    tensor_pb2.DATA_TYPE_FLOAT16: _Info("float16", 2, "<f2", True),
    tensor_pb2.DATA_TYPE_BFLOAT16: _Info("bfloat16", 2, "<u2", True),
    tensor_pb2.DATA_TYPE_INT64: _Info("int64", 8, "<i8", False),
    tensor_pb2.DATA_TYPE_INT32: _Info("int32", 4, "<i4", False),
    tensor_pb2.DATA_TYPE_UINT8: _Info("uint8", 1, "<u1", False),
}
_BY_NUMPY_KIND: dict[tuple[str, int], int] = {
    ("f", 4): tensor_pb2.DATA_TYPE_FLOAT32,
    ("f", 8): tensor_pb2.DATA_TYPE_FLOAT64,
    ("f", 2): tensor_pb2.DATA_TYPE_FLOAT16,
    ("i", 8): tensor_pb2.DATA_TYPE_INT64,
    ("i", 4): tensor_pb2.DATA_TYPE_INT32,
    ("u", 1): tensor_pb2.DATA_TYPE_UINT8,
}
_BY_NAME: dict[str, int] = {info.name: code for code, info in _INFO.items()}
_WIRE_DTYPES: dict[int, np.dtype[Any]] = {code: np.dtype(info.numpy) for code, info in _INFO.items()}


@dataclass(frozen=True)
class TensorLimits:
    """Per-tensor limits checked from the header before any data is read.

    **Parameters:**
    - `max_elements`: the most elements one tensor may hold (RESOURCE_EXHAUSTED beyond).
    - `max_bytes`: the most data bytes one tensor may hold (RESOURCE_EXHAUSTED beyond).
    - `max_dims`: the most dimensions one tensor may have (INVALID_ARGUMENT beyond).
    """

    max_elements: int = 2**40
    max_bytes: int = 2**42
    max_dims: int = 32


_NO_LIMITS = TensorLimits()


def itemsize(dtype: int) -> int:
    """Bytes per element of a DataType (0 for an unknown one)."""
    info = _INFO.get(dtype)
    return info.itemsize if info is not None else 0


def data_type_name(dtype: int) -> str:
    """'float32' for DATA_TYPE_FLOAT32 and so on; the raw number for unknown values."""
    info = _INFO.get(dtype)
    return info.name if info else f"DataType({dtype})"


def is_floating(dtype: int) -> bool:
    """Whether a wire dtype is a floating-point type."""
    info = _INFO.get(dtype)
    return bool(info and info.floating)


def check(
    msg: tensor_pb2.Tensor, field: str, limits: TensorLimits = _NO_LIMITS, data_bytes: int | None = None
) -> tuple[int, ...]:
    """Validates a wire tensor's header and data length; returns its shape.

    Raises `InvalidArgumentError` or `ResourceExhaustedError` naming `field`. `data_bytes` is
    `len(msg.data)` when the caller already holds the data: each read of a bytes field copies it.
    """
    dtype = msg.dtype
    info = _INFO.get(dtype)
    if dtype == tensor_pb2.DATA_TYPE_UNSPECIFIED:
        raise InvalidArgumentError(
            f"{field}.dtype is unset: set a DataType such as DATA_TYPE_FLOAT32",
            reason="DTYPE_UNSPECIFIED",
            field=f"{field}.dtype",
        )
    if info is None:
        raise InvalidArgumentError(
            f"{field}.dtype {dtype} is not a known DataType",
            reason="DTYPE_UNKNOWN",
            field=f"{field}.dtype",
            metadata={"dtype": str(dtype)},
        )
    shape = tuple(msg.shape)
    if len(shape) > limits.max_dims:
        raise InvalidArgumentError(
            f"{field}.shape has {len(shape)} dimensions; at most {limits.max_dims} are allowed",
            reason="TOO_MANY_DIMENSIONS",
            field=f"{field}.shape",
            metadata={"dims": str(len(shape)), "maxDims": str(limits.max_dims)},
        )
    if shape and min(shape) < 0:
        raise InvalidArgumentError(
            f"{field}.shape {list(shape)} has a negative dimension",
            reason="SHAPE_INVALID",
            field=f"{field}.shape",
            metadata={"shape": str(list(shape))},
        )
    elements = math.prod(shape)  # exact: Python ints do not overflow
    if elements > limits.max_elements or elements * info.itemsize > limits.max_bytes:
        raise ResourceExhaustedError(
            f"{field}.shape {list(shape)} holds {elements} elements ({elements * info.itemsize} bytes); "
            f"this server accepts at most {limits.max_elements} elements and {limits.max_bytes} bytes "
            "per tensor",
            reason="TENSOR_TOO_LARGE",
            field=f"{field}.shape",
            metadata={
                "shape": str(list(shape)),
                "elements": str(elements),
                "maxElements": str(limits.max_elements),
                "maxBytes": str(limits.max_bytes),
            },
        )
    # A dimension may be huge while another is 0: no elements, but no array library can hold the
    # shape (numpy's "array is too big"). Every dimension is held to the element limit.
    if not elements and (
        any(d > limits.max_elements for d in shape) or math.prod(d for d in shape if d) >= 2**62
    ):
        raise InvalidArgumentError(
            f"{field}.shape {list(shape)} has no elements but a dimension over {limits.max_elements}, "
            "or dimensions whose product no array can index",
            reason="SHAPE_INVALID",
            field=f"{field}.shape",
            metadata={"shape": str(list(shape)), "maxElements": str(limits.max_elements)},
        )
    expected = elements * info.itemsize
    size = len(msg.data) if data_bytes is None else data_bytes
    if size != expected:
        raise InvalidArgumentError(
            f"{field}.data has {size} bytes; {data_type_name(msg.dtype)} of shape {list(shape)} "
            f"needs {expected} ({elements} x {info.itemsize})",
            reason="DATA_SIZE_MISMATCH",
            field=f"{field}.data",
            metadata={"bytes": str(size), "expectedBytes": str(expected)},
        )
    return shape


def streamed_bytes(msg: tensor_pb2.Tensor, field: str, limits: TensorLimits = _NO_LIMITS) -> int | None:
    """For a StreamLoss header's tensor: the bytes still to come in chunks, or None if it is complete.

    A tensor is complete when its data is all there (or it holds no elements); it is streamed when
    its data is empty. Its header is checked either way.
    """
    info = _INFO.get(msg.dtype)
    size = len(msg.data)
    if info is None or size:
        check(msg, field, limits, size)
        return None
    shape = check(msg, field, limits, math.prod(msg.shape) * info.itemsize)
    expected = math.prod(shape) * info.itemsize
    return expected or None


def _wire_array(
    msg: tensor_pb2.Tensor, field: str, limits: TensorLimits, data: Buffer | None = None
) -> np.ndarray:
    """A native-order numpy view of the message's data, or of `data` standing in for it (bfloat16
    as uint16 bits); read-only when it views the message."""
    if data is None:
        data = msg.data  # read once: protobuf hands out a fresh copy of a bytes field on every read
    shape = check(msg, field, limits, len(data))
    wire = _WIRE_DTYPES[msg.dtype]
    array = np.frombuffer(data, dtype=wire) if len(data) else np.empty(0, dtype=wire)
    if not wire.isnative:  # a big-endian host: one byte-swapping copy
        array = array.astype(wire.newbyteorder("="))
    return array.reshape(shape)


def decode_numpy(
    msg: tensor_pb2.Tensor,
    field: str = "tensor",
    *,
    limits: TensorLimits = _NO_LIMITS,
    copy: bool = True,
    data: Buffer | None = None,
) -> np.ndarray:
    """Decodes a wire tensor into a numpy array (bfloat16 as `ml_dtypes.bfloat16`).

    With `copy=False` the array is a view of the message's bytes (read-only), or of `data`: the
    tensor's bytes when they came apart from the message (in StreamLoss chunks).
    """
    array = _wire_array(msg, field, limits, data)
    if msg.dtype == tensor_pb2.DATA_TYPE_BFLOAT16:
        array = array.view(ml_dtypes.bfloat16)
    return array.copy() if copy else array


def decode_torch(
    msg: tensor_pb2.Tensor,
    field: str = "tensor",
    *,
    limits: TensorLimits = _NO_LIMITS,
    copy: bool = True,
    device: torch.device | str | None = None,
    data: Buffer | None = None,
) -> torch.Tensor:
    """Decodes a wire tensor into a torch tensor, on `device` if given.

    With `copy=False` (and a CPU device) the tensor shares the message's bytes and must not be
    written to, or shares `data`: the tensor's bytes when they came apart from the message.
    """
    import torch

    array = _wire_array(msg, field, limits, data)
    if copy:
        array = array.copy()
    tensor = torch.from_numpy(array)
    if msg.dtype == tensor_pb2.DATA_TYPE_BFLOAT16:
        tensor = tensor.view(torch.bfloat16)
    if device is not None:
        tensor = tensor.to(device)
    return tensor


def is_torch_tensor(value: object) -> TypeGuard[torch.Tensor]:
    """Whether `value` is a torch tensor, without importing torch."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def torch_dtype(dtype: int) -> torch.dtype:
    """The torch dtype of a wire dtype."""
    import torch

    result: torch.dtype = getattr(torch, _INFO[dtype].name)
    return result


def data_type_from_name(name: str, field: str = "dtype") -> int:
    """The wire dtype named 'float32', 'bfloat16', 'torch.int64'... (`InvalidArgumentError` otherwise)."""
    code = _BY_NAME.get(name.removeprefix("torch."))
    if code is None:
        raise InvalidArgumentError(
            f"{field} {name!r} is not a dtype lossd carries; use one of {sorted(_BY_NAME)}",
            reason="DTYPE_NOT_SUPPORTED",
            field=field,
            metadata={"dtype": name},
        )
    return code


def data_type_of(dtype: object, field: str = "dtype") -> int:
    """The wire dtype of a name, a numpy dtype (or type) or a torch dtype."""
    if isinstance(dtype, str):
        return data_type_from_name(dtype, field)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return data_type_from_name(str(dtype), field)
    try:
        numpy_dtype = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError as exc:
        raise InvalidArgumentError(
            f"{field} {dtype!r} is not a dtype", reason="DTYPE_NOT_SUPPORTED", field=field
        ) from exc
    return _data_type_of_numpy(numpy_dtype, field)


_NUMPY_CODES: dict[np.dtype[Any], int] = {}
"""The wire dtype of each numpy dtype met so far (a dtype's name is slow to read)."""


def _data_type_of_numpy(dtype: np.dtype[Any], field: str) -> int:
    code = _NUMPY_CODES.get(dtype)
    if code is not None:
        return code
    if dtype.name == "bfloat16":  # ml_dtypes' numpy bfloat16
        return tensor_pb2.DATA_TYPE_BFLOAT16
    code = _BY_NUMPY_KIND.get((dtype.kind, dtype.itemsize))
    if code is None:
        raise InvalidArgumentError(
            f"{field} {dtype} is not a dtype lossd carries; use one of {sorted(_BY_NAME)}",
            reason="DTYPE_NOT_SUPPORTED",
            field=field,
            metadata={"dtype": str(dtype)},
        )
    if len(_NUMPY_CODES) < 64:
        _NUMPY_CODES[dtype] = code
    return code


def _bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bit patterns, rounding to nearest even as torch does (NaN stays NaN)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(array), np.uint16(0x7FC0), rounded)


def to_wire(value: TensorLike, field: str = "tensor", dtype: int | None = None) -> tuple[np.ndarray, int]:
    """A numpy array holding `value`'s wire elements (bfloat16 as int16 bits) and its DataType."""
    if is_torch_tensor(value):
        return _torch_wire_array(value, field, dtype)
    return _numpy_wire_array(value, field, dtype)


def wire_view(array: np.ndarray) -> memoryview:
    """The wire bytes of a `to_wire` array: a view when it is C-ordered and little-endian already."""
    order = array.dtype.byteorder
    little = order in ("<", "|") or (order == "=" and sys.byteorder == "little")
    if not (little and array.flags.c_contiguous):
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def header(shape: Sequence[int], dtype: int) -> tensor_pb2.Tensor:
    """A wire tensor with a dtype and a shape and no data (its bytes travel in chunks)."""
    return tensor_pb2.Tensor(dtype=dtype, shape=tuple(shape))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=4096)
def header_bytes(shape: tuple[int, ...], dtype: int) -> bytes:
    """`header(shape, dtype)` serialized; each dtype and shape once (answers repeat them)."""
    return header(shape, dtype).SerializeToString()


def encode(
    value: TensorLike,
    field: str = "tensor",
    *,
    dtype: int | None = None,
    out: tensor_pb2.Tensor | None = None,
) -> tensor_pb2.Tensor:
    """Encodes a numpy array, a torch tensor (any device) or nested numbers as a wire tensor.

    `dtype` (a wire DataType) converts the values first; without it, nested Python numbers
    become numpy's default dtype for them (int64 or float64). `out` is filled in place of a new
    message (a sub-message of a request, say), which saves copying the bytes once more.
    """
    array, code = to_wire(value, field, dtype)
    message = tensor_pb2.Tensor() if out is None else out
    message.dtype = code  # type: ignore[assignment]
    message.shape[:] = array.shape
    message.data = wire_view(array).tobytes()
    return message


def _numpy_wire_array(value: TensorLike, field: str, dtype: int | None) -> tuple[np.ndarray, int]:
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    code = _data_type_of_numpy(array.dtype, f"{field}.dtype")
    if dtype is not None and dtype != code:
        if dtype == tensor_pb2.DATA_TYPE_BFLOAT16:
            array, code = _bfloat16_bits(array.astype(np.float32)), dtype
        else:
            array, code = array.astype(_INFO[dtype].numpy), dtype
    elif code == tensor_pb2.DATA_TYPE_BFLOAT16:
        array = array.view(np.uint16)
    return array, code


def _torch_wire_array(tensor: torch.Tensor, field: str, dtype: int | None) -> tuple[np.ndarray, int]:
    import torch

    code = data_type_from_name(str(tensor.dtype), f"{field}.dtype")
    tensor = tensor.detach()
    if dtype is not None and dtype != code:
        tensor, code = tensor.to(torch_dtype(dtype)), dtype
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy(), code
