"""StreamLoss messages on the wire, written and read without protobuf's copies; shared by client and server.

A chunk message carries up to a few MiB of tensor bytes. Through protobuf those bytes would be copied
three times on the way in (into the parsed message, out of it as `bytes`, into the tensor) and twice
on the way out. Here a received chunk's bytes go once, from gRPC's buffer straight into the tensor's
memory, and a sent chunk is one join of a small prefix and a view of the tensor. The layout is plain
protobuf (`StreamLossRequest` / `StreamLossResponse` with field 1 the header and field 2 a
`TensorChunk`), so any protobuf implementation reads and writes the same messages.

A chunk names its tensor by the tensor's field path in the stream's header (`input`,
`cross_entropy.weight`, `gradients.input`), the names errors use: the framing knows no loss.

`Assembly` collects one stream's chunks into tensors allocated once, up front, and checks that they
arrive in order and add up exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
from google.protobuf.message import Message

from lossd.wire.errors import InvalidArgumentError
from lossd.wire.messages import LEN, VARINT, read_varint, skip, varint

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Assembly",
    "Chunk",
    "Part",
    "decode_part",
    "encode_chunk",
    "encode_header",
    "iter_chunks",
]

DEFAULT_CHUNK_BYTES = 1 << 20
"""1 MiB: the chunk size that moved fastest through Python gRPC in the project's measurements."""

_HEADER_FIELD, _CHUNK_FIELD = 1, 2
# TensorChunk's fields.
_OFFSET, _DATA, _TENSOR = 2, 3, 4
_OFFSET_TAG = varint(_OFFSET << 3 | VARINT)
_DATA_TAG = varint(_DATA << 3 | LEN)
_TENSOR_TAG = varint(_TENSOR << 3 | LEN)

Buffer = bytes | bytearray | memoryview


class Chunk(NamedTuple):
    """A received TensorChunk; `data` views the received message."""

    tensor: str
    offset: int
    data: memoryview


Part = memoryview | Chunk
"""A header's serialized bytes, or a chunk."""


_MALFORMED = "STREAM_MESSAGE_MALFORMED"


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    return read_varint(data, pos, _MALFORMED)


def _skip(data: memoryview, pos: int, wire_type: int) -> int:
    return skip(data, pos, wire_type, _MALFORMED)


def _truncated() -> InvalidArgumentError:
    return InvalidArgumentError("a stream message is truncated", reason=_MALFORMED)


def encode_header(message: Message) -> bytes:
    """A serialized stream message whose part is `message` (field 1, the header): a StreamLoss
    request's or response's, or a PutTensor request's."""
    body = message.SerializeToString()
    return b"\x0a" + varint(len(body)) + body


_NAMES: dict[str, bytes] = {}
"""Each tensor name's encoded field (a stream repeats a few names many times)."""


def _name_field(tensor: str) -> bytes:
    field = _NAMES.get(tensor)
    if field is None:
        encoded = tensor.encode()
        field = _TENSOR_TAG + varint(len(encoded)) + encoded if encoded else b""
        if len(_NAMES) < 1024:
            _NAMES[tensor] = field
    return field


def encode_chunk(tensor: str, offset: int, data: Buffer) -> bytes:
    """A serialized stream message carrying one TensorChunk of `tensor`: one copy of `data`, no more."""
    size = len(data) if not isinstance(data, memoryview) else data.nbytes
    inner = _name_field(tensor) + _OFFSET_TAG + varint(offset) + _DATA_TAG + varint(size)
    return b"".join((b"\x12", varint(len(inner) + size), inner, data))


def decode_part(raw: bytes) -> Part:
    """The part a serialized stream message holds: the header's bytes or a chunk (the last part, as
    protobuf's oneof rules say)."""
    data = memoryview(raw)
    pos, part = 0, None
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        field, wire_type = tag >> 3, tag & 7
        if field in (_HEADER_FIELD, _CHUNK_FIELD) and wire_type == LEN:
            length, pos = _read_varint(data, pos)
            body = data[pos : pos + length]
            if len(body) != length:
                raise _truncated()
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
    tensor = ""
    offset = 0
    chunk = body[0:0]
    pos = 0
    while pos < len(body):
        tag, pos = _read_varint(body, pos)
        field, wire_type = tag >> 3, tag & 7
        if field == _OFFSET and wire_type == VARINT:
            offset, pos = _read_varint(body, pos)
            if offset >= 1 << 63:  # int64 below zero
                offset -= 1 << 64
        elif field in (_DATA, _TENSOR) and wire_type == LEN:
            length, pos = _read_varint(body, pos)
            value = body[pos : pos + length]
            if len(value) != length:
                raise _truncated()
            pos += length
            if field == _DATA:
                chunk = value
            else:
                try:
                    tensor = str(value, "utf-8")
                except UnicodeDecodeError:
                    raise InvalidArgumentError(
                        "a chunk's tensor name is not UTF-8", reason=_MALFORMED, field="chunk.tensor"
                    ) from None
        else:
            pos = _skip(body, pos, wire_type)
    return Chunk(tensor, offset, chunk)


def iter_chunks(tensor: str, data: memoryview, chunk_bytes: int) -> Iterator[bytes]:
    """The chunk messages carrying `data` (a byte view of one tensor) as `tensor`'s."""
    for offset in range(0, data.nbytes, chunk_bytes):
        yield encode_chunk(tensor, offset, data[offset : offset + chunk_bytes])


def _shown(name: str) -> str:
    """A tensor's name in an error: a client's string, bounded (a PutTensor's tensor has none)."""
    if not name:
        return "header"
    return name if len(name) <= 64 else name[:64] + f"... ({len(name)} characters)"


class Assembly:
    """The tensors of one stream, allocated once and filled chunk by chunk.

    **Parameters:**
    - `sizes`: tensor name -> the number of bytes that tensor must receive.
    - `allocate`: returns n writable bytes as a 1-D uint8 array, or anything numpy can view as one
      without copying (the server's are torch tensors in pinned memory when it runs on CUDA).
    """

    def __init__(self, sizes: Mapping[str, int], allocate: Callable[[int], Any]) -> None:
        self._buffers = {name: allocate(size) for name, size in sizes.items()}
        self._views: dict[str, np.ndarray] = {name: np.asarray(b) for name, b in self._buffers.items()}
        self.received = dict.fromkeys(sizes, 0)

    def expected(self, tensor: str) -> int:
        """The bytes `tensor` must receive in all."""
        return int(self._views[tensor].size)

    def complete(self, tensor: str) -> bool:
        """Whether `tensor` has all its bytes (True for one the stream does not send)."""
        view = self._views.get(tensor)
        return view is None or self.received[tensor] == view.size

    def add(self, tensor: str, offset: int, data: memoryview) -> None:
        """Copies one chunk's bytes into place, after checking where they go."""
        buffer = self._views.get(tensor)
        if buffer is None:
            expected = sorted(_shown(name) for name in self._views)
            raise InvalidArgumentError(
                f"a chunk of {_shown(tensor)!r} arrived, but this stream sends only {expected} in chunks",
                reason="CHUNK_TENSOR_UNKNOWN",
                field="chunk.tensor",
                metadata={"tensor": _shown(tensor)},
            )
        field = _shown(tensor)
        have = self.received[tensor]
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
        self.received[tensor] = end

    def all_complete(self) -> bool:
        """Whether every tensor has all its bytes."""
        return all(self.received[name] == buffer.size for name, buffer in self._views.items())

    def check_complete(self) -> None:
        """Raises unless every tensor has all its bytes."""
        for name, buffer in self._views.items():
            if self.received[name] != buffer.size:
                field = _shown(name)
                raise InvalidArgumentError(
                    f"the stream ended with {self.received[name]} of the {buffer.size} bytes of {field}",
                    reason="STREAM_INCOMPLETE",
                    field=field,
                    metadata={
                        "tensor": field,
                        "received": str(self.received[name]),
                        "expectedBytes": str(buffer.size),
                    },
                )

    def by_name(self) -> dict[str, Any]:
        """tensor name -> its assembled bytes, as `allocate` returned them."""
        return dict(self._buffers)
