"""StreamLoss messages on the wire, written and read without protobuf's copies; shared by client and server.

A chunk message carries up to a few MiB of tensor bytes. Through protobuf those bytes would be copied
three times on the way in (into the parsed message, out of it as `bytes`, into the tensor) and twice
on the way out. Here a received chunk's bytes go once, from gRPC's buffer straight into the tensor's
memory, and a sent chunk is one join of a small prefix and a view of the tensor. The layout is plain
protobuf (`StreamLossRequest` / `StreamLossResponse` with field 1 the header and field 2 a
`TensorChunk`), so any protobuf implementation reads and writes the same messages.

`Assembly` collects one stream's chunks into tensors allocated once, up front, and checks that they
arrive in order and add up exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
from google.protobuf.message import Message

from lossd.v1 import loss_service_pb2 as pb
from lossd.wire.errors import InvalidArgumentError
from lossd.wire.messages import LEN, VARINT, read_varint, skip, varint

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "REQUEST_SLOTS",
    "RESPONSE_SLOTS",
    "Assembly",
    "Chunk",
    "Part",
    "decode_part",
    "encode_chunk",
    "encode_header",
    "iter_chunks",
    "slot_name",
]

REQUEST_SLOTS = {
    "input": pb.TENSOR_SLOT_INPUT,
    "target": pb.TENSOR_SLOT_TARGET,
    "weight": pb.TENSOR_SLOT_WEIGHT,
    "grad_output": pb.TENSOR_SLOT_GRAD_OUTPUT,
    "teacher_ids": pb.TENSOR_SLOT_TEACHER_IDS,
    "labels": pb.TENSOR_SLOT_LABELS,
    "classifier": pb.TENSOR_SLOT_CLASSIFIER,
    "bias": pb.TENSOR_SLOT_BIAS,
    "teacher_classifier": pb.TENSOR_SLOT_TEACHER_CLASSIFIER,
    "teacher_bias": pb.TENSOR_SLOT_TEACHER_BIAS,
}
"""The slot of a request tensor that travels in chunks, by its field's last name
(`cross_entropy.weight` -> weight)."""

RESPONSE_SLOTS = {
    "loss": pb.TENSOR_SLOT_LOSS,
    "hard_loss": pb.TENSOR_SLOT_HARD_LOSS,
    "soft_loss": pb.TENSOR_SLOT_SOFT_LOSS,
    "lse": pb.TENSOR_SLOT_LSE,
    "input_gradient": pb.TENSOR_SLOT_INPUT_GRADIENT,
    "target_gradient": pb.TENSOR_SLOT_TARGET_GRADIENT,
    "classifier_gradient": pb.TENSOR_SLOT_CLASSIFIER_GRADIENT,
    "bias_gradient": pb.TENSOR_SLOT_BIAS_GRADIENT,
}
"""The slot of each response tensor."""

DEFAULT_CHUNK_BYTES = 1 << 20
"""1 MiB: the chunk size that moved fastest through Python gRPC in the project's measurements."""

_HEADER_FIELD, _CHUNK_FIELD = 1, 2
_LEN, _VARINT = LEN, VARINT

Buffer = bytes | bytearray | memoryview


class Chunk(NamedTuple):
    """A received TensorChunk; `data` views the received message."""

    slot: int
    offset: int
    data: memoryview


Part = memoryview | Chunk
"""A header's serialized bytes, or a chunk."""


_MALFORMED = "STREAM_MESSAGE_MALFORMED"


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    return read_varint(data, pos, _MALFORMED)


def _skip(data: memoryview, pos: int, wire_type: int) -> int:
    return skip(data, pos, wire_type, _MALFORMED)


def encode_header(message: Message) -> bytes:
    """A serialized stream message whose part is `message` (field 1, the header): a StreamLoss
    request's or response's, or a PutTensor request's."""
    body = message.SerializeToString()
    return b"\x0a" + varint(len(body)) + body


def encode_chunk(slot: int, offset: int, data: Buffer) -> bytes:
    """A serialized stream message carrying one TensorChunk: one copy of `data`, no more."""
    size = len(data) if not isinstance(data, memoryview) else data.nbytes
    inner = b"\x08" + varint(slot) + b"\x10" + varint(offset) + b"\x1a" + varint(size)
    return b"".join((b"\x12", varint(len(inner) + size), inner, data))


def decode_part(raw: bytes) -> Part:
    """The part a serialized stream message holds: the header's bytes or a chunk (the last part, as
    protobuf's oneof rules say)."""
    data = memoryview(raw)
    pos, part = 0, None
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        field, wire_type = tag >> 3, tag & 7
        if field in (_HEADER_FIELD, _CHUNK_FIELD) and wire_type == _LEN:
            length, pos = _read_varint(data, pos)
            body = data[pos : pos + length]
            if len(body) != length:
                raise InvalidArgumentError("a stream message is truncated", reason="STREAM_MESSAGE_MALFORMED")
            pos += length
            part = body if field == _HEADER_FIELD else _decode_chunk(body)
        else:
            pos = _skip(data, pos, wire_type)
    if part is None:
        raise InvalidArgumentError(
            "a stream message holds neither a header nor a chunk", reason="STREAM_PART_MISSING"
        )
    return part


def _decode_chunk(body: memoryview) -> Chunk:
    slot = offset = 0
    chunk = body[0:0]
    pos = 0
    while pos < len(body):
        tag, pos = _read_varint(body, pos)
        field, wire_type = tag >> 3, tag & 7
        if field == 1 and wire_type == _VARINT:
            slot, pos = _read_varint(body, pos)
        elif field == 2 and wire_type == _VARINT:
            offset, pos = _read_varint(body, pos)
            if offset >= 1 << 63:  # int64 below zero
                offset -= 1 << 64
        elif field == 3 and wire_type == _LEN:
            length, pos = _read_varint(body, pos)
            chunk = body[pos : pos + length]
            pos += length
        else:
            pos = _skip(body, pos, wire_type)
    return Chunk(slot, offset, chunk)


def iter_chunks(slot: int, data: memoryview, chunk_bytes: int) -> Iterator[bytes]:
    """The chunk messages carrying `data` (a byte view of one tensor)."""
    for offset in range(0, data.nbytes, chunk_bytes):
        yield encode_chunk(slot, offset, data[offset : offset + chunk_bytes])


def slot_name(slot: int) -> str:
    """'TENSOR_SLOT_INPUT' and so on, or the number."""
    try:
        return pb.TensorSlot.Name(slot)  # type: ignore[arg-type]
    except ValueError:
        return str(slot)


class Assembly:
    """The tensors of one stream, allocated once and filled chunk by chunk.

    **Parameters:**
    - `sizes`: slot -> the number of bytes that slot's tensor must receive.
    - `allocate`: returns n writable bytes as a 1-D uint8 array, or anything numpy can view as one
      without copying (the server's are torch tensors in pinned memory when it runs on CUDA).
    - `fields`: slot -> the field name used in error messages (`input`, `cross_entropy.weight`).
    """

    def __init__(
        self, sizes: Mapping[int, int], allocate: Callable[[int], Any], fields: Mapping[int, str]
    ) -> None:
        self._fields = dict(fields)
        self._buffers = {slot: allocate(size) for slot, size in sizes.items()}
        self._views: dict[int, np.ndarray] = {slot: np.asarray(b) for slot, b in self._buffers.items()}
        self.received = dict.fromkeys(sizes, 0)

    def expected(self, slot: int) -> int:
        """The bytes `slot`'s tensor must receive in all."""
        return int(self._views[slot].size)

    def add(self, slot: int, offset: int, data: memoryview) -> None:
        """Copies one chunk's bytes into place, after checking where they go."""
        buffer = self._views.get(slot)
        if buffer is None:
            expected = sorted(slot_name(s) for s in self._views)
            raise InvalidArgumentError(
                f"a chunk for {slot_name(slot)} arrived, but this stream sends only {expected}",
                reason="CHUNK_SLOT_INVALID",
                field="chunk.slot",
                metadata={"slot": slot_name(slot)},
            )
        field = self._fields[slot]
        have = self.received[slot]
        if offset != have:
            raise InvalidArgumentError(
                f"a chunk of {field} starts at byte {offset}, but {have} bytes have arrived: chunks must "
                "come in order, without gaps or overlap",
                reason="CHUNK_OUT_OF_ORDER",
                field="chunk.offset",
                metadata={"tensor": field, "offset": str(offset), "received": str(have)},
            )
        end = offset + data.nbytes
        if end > buffer.size:
            raise InvalidArgumentError(
                f"chunks of {field} run past its {buffer.size} bytes (to byte {end})",
                reason="CHUNK_OVERRUN",
                field="chunk.data",
                metadata={"tensor": field, "bytes": str(end), "expectedBytes": str(buffer.size)},
            )
        buffer[offset:end] = np.frombuffer(data, dtype=np.uint8)
        self.received[slot] = end

    def check_complete(self) -> None:
        """Raises unless every tensor has all its bytes."""
        for slot, buffer in self._views.items():
            if self.received[slot] != buffer.size:
                field = self._fields[slot]
                raise InvalidArgumentError(
                    f"the stream ended with {self.received[slot]} of the {buffer.size} bytes of {field}",
                    reason="STREAM_INCOMPLETE",
                    field=field,
                    metadata={
                        "tensor": field,
                        "received": str(self.received[slot]),
                        "expectedBytes": str(buffer.size),
                    },
                )

    def by_field(self) -> dict[str, Any]:
        """field name -> its assembled bytes, as `allocate` returned them."""
        return {self._fields[slot]: buffer for slot, buffer in self._buffers.items()}
