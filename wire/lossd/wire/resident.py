"""The id of a resident tensor: a digest of its dtype, shape and bytes, the same on client and server,
so that a tensor is uploaded once and held once whoever sends it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from lossd.wire.codec import data_type_name

__all__ = ["content_id"]


def content_id(dtype: int, shape: Sequence[int], data: bytes | bytearray | memoryview) -> str:
    """ "sha256:" and the hex SHA-256 of "<dtype>:<d0>,<d1>,...:" followed by the data bytes."""
    digest = hashlib.sha256(f"{data_type_name(dtype)}:{','.join(str(d) for d in shape)}:".encode())
    digest.update(data)
    return "sha256:" + digest.hexdigest()
