"""Protobuf messages whose bulk is tensor bytes, read and written with one copy each way.

protobuf's Python runtime copies a bytes field when it parses a message, again on every read of
the field, and once more when it serializes. For a message that is mostly tensor data that is three
copies of every tensor alive at once. Here the wire format is walked by hand instead (it is simple:
a tag, then a varint, a fixed-size value or a length-prefixed body): `split` hands back the
message's small remainder, which protobuf parses, and views of the tensor bytes inside the received
buffer; `tensor_field` and `bytes_field` frame tensor bytes around a serialized remainder so that
`b"".join(...)` copies each tensor once into the message gRPC sends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

from lossd.wire.errors import InvalidArgumentError

__all__ = [
    "MAX_FIELDS",
    "FieldTree",
    "TooManyFields",
    "bytes_field",
    "message_field",
    "read_varint",
    "skip",
    "split",
    "string_field",
    "tensor_field",
    "varint",
]

VARINT, I64, LEN, I32 = 0, 1, 2, 5

FieldTree = Mapping[int, Union["FieldTree", bool]]
"""Which length-delimited fields `split` takes out: field number -> True (take this field's bytes)
or the tree of a sub-message to walk into."""

Pieces = list[bytes | memoryview]

MAX_FIELDS = 256
"""`split` walks at most this many fields; a real request has a few dozen. Walking a field costs
about a microsecond in Python, where protobuf's C parser skips millions of (hostile, unknown) tiny
fields in milliseconds: past this many, the caller parses the message whole instead."""


class TooManyFields(Exception):
    """The message has more fields than `split` walks (see `MAX_FIELDS`)."""


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def varint(value: int) -> bytes:
    if value < 0x80:  # tags and most lengths: no loop
        return _ONE_BYTE[value]
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _malformed(reason: str) -> InvalidArgumentError:
    return InvalidArgumentError("a message is truncated or malformed", reason=reason)


def read_varint(data: memoryview, pos: int, reason: str = "REQUEST_MALFORMED") -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _malformed(reason)
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def skip(data: memoryview, pos: int, wire_type: int, reason: str = "REQUEST_MALFORMED") -> int:
    """The position after a field's value of `wire_type` that starts at `pos`."""
    if wire_type == VARINT:
        return read_varint(data, pos, reason)[1]
    if wire_type == I64:
        end = pos + 8
    elif wire_type == I32:
        end = pos + 4
    elif wire_type == LEN:
        length, pos = read_varint(data, pos, reason)
        end = pos + length
    else:
        raise _malformed(reason)
    if end > len(data):
        raise _malformed(reason)
    return end


def split(
    raw: bytes | memoryview, tree: FieldTree, max_fields: int = MAX_FIELDS
) -> tuple[bytes, dict[tuple[int, ...], list[memoryview]]]:
    """The message `raw` without the fields `tree` names, and those fields' bytes by their path of
    field numbers, each a view of `raw`, in the order they came (protobuf keeps the last of a
    singular field). Malformed bytes: `InvalidArgumentError` REQUEST_MALFORMED; more than
    `max_fields` fields in the parts walked: `TooManyFields`."""
    found: dict[tuple[int, ...], list[memoryview]] = {}
    budget = [max_fields]
    pieces = _split(memoryview(raw), tree, (), found, budget)
    return b"".join(pieces), found


def _split(
    data: memoryview,
    tree: FieldTree,
    path: tuple[int, ...],
    found: dict[tuple[int, ...], list[memoryview]],
    budget: list[int],
) -> Pieces:
    pieces: Pieces = []
    pos = 0
    while pos < len(data):
        budget[0] -= 1
        if budget[0] < 0:
            raise TooManyFields
        start = pos
        tag, pos = read_varint(data, pos)
        tag_end = pos
        field, wire_type = tag >> 3, tag & 7
        sub = tree.get(field)
        if sub is None or wire_type != LEN:
            pos = skip(data, pos, wire_type)
            pieces.append(data[start:pos])
            continue
        length, body_start = read_varint(data, pos)
        pos = body_start + length
        if pos > len(data):
            raise _malformed("REQUEST_MALFORMED")
        body = data[body_start:pos]
        if sub is True:
            found.setdefault((*path, field), []).append(body)
        elif isinstance(sub, Mapping):
            inner = b"".join(_split(body, sub, (*path, field), found, budget))
            pieces += [data[start:tag_end], varint(len(inner)), inner]
    return pieces


def _size(data: memoryview | bytes) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


def bytes_field(field: int, data: memoryview | bytes) -> Pieces:
    """A length-delimited field holding `data` (not copied: the join that assembles the message
    copies it once)."""
    return [varint(field << 3 | LEN), varint(_size(data)), data]


def message_field(field: int, pieces: Pieces) -> Pieces:
    """A sub-message field holding the serialized `pieces` (not copied until the join)."""
    return [varint(field << 3 | LEN), varint(sum(_size(piece) for piece in pieces)), *pieces]


def string_field(field: int, text: str) -> Pieces:
    """A string field."""
    return bytes_field(field, text.encode())


def tensor_field(field: int, header: bytes, data_field: int, data: memoryview | bytes) -> Pieces:
    """A sub-message field: the sub-message's serialized `header` (its small fields) followed by
    its bytes field `data_field` holding `data`."""
    return message_field(field, [header, *bytes_field(data_field, data)])
