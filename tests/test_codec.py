"""The tensor codec: every dtype both ways, byte order, layouts, bfloat16 rounding, limits."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from lossd.client.errors import InvalidArgumentError, ResourceExhaustedError
from lossd.v1 import tensor_pb2
from lossd.wire import codec

TORCH_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
]
NUMPY_DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8]
SHAPES = [(), (0,), (3,), (2, 3), (2, 0, 4), (2, 3, 4, 1)]


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    value = (torch.randn(shape) * 50).to(dtype)
    message = codec.encode(value)
    assert list(message.shape) == list(shape)
    assert len(message.data) == value.numel() * value.element_size()
    back = codec.decode_torch(message)
    assert back.dtype == dtype
    assert torch.equal(back, value)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numpy_round_trip(dtype: type, shape: tuple[int, ...]) -> None:
    value = (np.random.default_rng(0).standard_normal(shape) * 50).astype(dtype)
    back = codec.decode_numpy(codec.encode(value))
    assert back.dtype == value.dtype
    np.testing.assert_array_equal(back, value)
    back[...] = 0  # decoded client results are writable copies


def test_wire_layout_is_documented_little_endian_c_order() -> None:
    message = codec.encode(np.array([[1, 2], [3, 4]], np.float32))
    assert message.data == struct.pack("<4f", 1, 2, 3, 4)
    assert message.dtype == tensor_pb2.DATA_TYPE_FLOAT32


def test_big_endian_and_strided_inputs_are_normalised() -> None:
    value = np.arange(12, dtype=">f8").reshape(3, 4).T  # big-endian and not contiguous
    message = codec.encode(value)
    assert message.data == np.ascontiguousarray(value, dtype="<f8").tobytes()
    np.testing.assert_array_equal(codec.decode_numpy(message), value)
    transposed = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(codec.decode_torch(codec.encode(transposed)), transposed)


def test_bfloat16_from_numpy_rounds_like_torch() -> None:
    values = np.array([1.0, 1.00390625, 1.01171875, -3.14159, 65504.0, 1e-40, np.inf, -np.inf], np.float32)
    message = codec.encode(values, dtype=tensor_pb2.DATA_TYPE_BFLOAT16)
    expected = torch.from_numpy(values).to(torch.bfloat16)
    assert torch.equal(codec.decode_torch(message), expected)
    nan = codec.decode_torch(
        codec.encode(np.array([np.nan], np.float32), dtype=tensor_pb2.DATA_TYPE_BFLOAT16)
    )
    assert torch.isnan(nan).all()


def test_bfloat16_comes_back_as_ml_dtypes_bfloat16_for_numpy() -> None:
    import ml_dtypes

    value = torch.randn(5, 7).to(torch.bfloat16)
    decoded = codec.decode_numpy(codec.encode(value))
    assert decoded.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(decoded.astype(np.float32), value.float().numpy())
    again = codec.decode_torch(codec.encode(decoded))  # and it goes back as bfloat16
    assert again.dtype == torch.bfloat16 and torch.equal(again, value)


def test_bfloat16_wire_bits_are_the_high_half_of_float32() -> None:
    message = codec.encode(torch.tensor([1.5], dtype=torch.bfloat16))
    assert message.data == struct.pack("<f", 1.5)[2:]


def test_nested_lists_and_dtype_conversion() -> None:
    assert codec.encode([[1, 2], [3, 4]]).dtype == tensor_pb2.DATA_TYPE_INT64
    assert codec.encode([0.5, 1.5]).dtype == tensor_pb2.DATA_TYPE_FLOAT64
    half = codec.encode([0.5, 1.5], dtype=tensor_pb2.DATA_TYPE_FLOAT16)
    assert half.data == np.array([0.5, 1.5], np.float16).tobytes()
    cast = codec.encode(torch.tensor([1.0, 2.0]), dtype=tensor_pb2.DATA_TYPE_FLOAT64)
    assert codec.decode_torch(cast).dtype == torch.float64


def test_zero_copy_decode_shares_the_message_bytes() -> None:
    message = codec.encode(np.arange(6, dtype=np.float32))
    view = codec.decode_numpy(message, copy=False)
    assert not view.flags.writeable
    tensor = codec.decode_torch(message, copy=False)
    assert tensor.tolist() == [0, 1, 2, 3, 4, 5]


def test_decode_onto_a_device() -> None:
    tensor = codec.decode_torch(codec.encode(np.ones(3, np.float32)), device="meta")
    assert tensor.device.type == "meta" and tensor.shape == (3,)


@pytest.mark.parametrize(
    "value",
    [np.array([True]), np.array([1 + 2j]), np.array(["a"]), torch.tensor([1 + 1j]), torch.tensor([True])],
    ids=["bool", "complex", "str", "torch-complex", "torch-bool"],
)
def test_unsupported_dtypes_are_refused(value: object) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        codec.encode(value, "input")  # type: ignore[arg-type]
    assert caught.value.reason == "DTYPE_NOT_SUPPORTED"
    assert caught.value.field == "input.dtype"


def test_dtype_names() -> None:
    assert codec.data_type_of("bfloat16") == tensor_pb2.DATA_TYPE_BFLOAT16
    assert codec.data_type_of(torch.float16) == tensor_pb2.DATA_TYPE_FLOAT16
    assert codec.data_type_of(np.float64) == tensor_pb2.DATA_TYPE_FLOAT64
    assert codec.data_type_of("torch.int32") == tensor_pb2.DATA_TYPE_INT32
    with pytest.raises(InvalidArgumentError):
        codec.data_type_of("float8")
    with pytest.raises(InvalidArgumentError):
        codec.data_type_of(object())


def test_limits_checked_from_the_header() -> None:
    message = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[10, 10], data=b"")
    with pytest.raises(ResourceExhaustedError, match="100 elements"):
        codec.check(message, "input", codec.TensorLimits(max_elements=99))
    with pytest.raises(ResourceExhaustedError, match="400 bytes"):
        codec.check(message, "input", codec.TensorLimits(max_bytes=399))
    with pytest.raises(InvalidArgumentError, match="needs 400"):
        codec.check(message, "input")
    with pytest.raises(InvalidArgumentError, match="3 dimensions"):
        codec.check(
            tensor_pb2.Tensor(dtype=1, shape=[1, 1, 1], data=b"\0" * 4), "x", codec.TensorLimits(max_dims=2)
        )
