"""Validation helpers the loss modules share: field-naming errors, dtype and shape rules."""

from __future__ import annotations

import numpy as np
import torch

from lossd.wire.errors import InvalidArgumentError

__all__ = [
    "FLOATING",
    "OutOfRange",
    "broadcast_shape",
    "dtype_name",
    "invalid_argument",
    "out_of_range",
    "require_floating",
]

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def invalid_argument(message: str, reason: str, field: str, **metadata: object) -> InvalidArgumentError:
    """The error for a bad request field; metadata values become strings (ErrorInfo carries strings)."""
    return InvalidArgumentError(
        message, reason=reason, field=field, metadata={k: str(v) for k, v in metadata.items()}
    )


def require_floating(tensor: torch.Tensor, field: str, role: str) -> None:
    if tensor.dtype not in FLOATING:
        raise invalid_argument(
            f"{field}.dtype is {dtype_name(tensor.dtype)}; {role} must be float32, float64, float16 or "
            "bfloat16",
            "DTYPE_NOT_SUPPORTED",
            f"{field}.dtype",
            dtype=dtype_name(tensor.dtype),
        )


def broadcast_shape(a: torch.Size, b: torch.Size) -> tuple[int, ...] | None:
    """The broadcast of two shapes (numpy / torch rules), or None when they do not broadcast."""
    result = []
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y and 1 not in (x, y):
            return None
        result.append(y if x == 1 else x)
    longer = a if len(a) > len(b) else b
    return (*longer[: len(longer) - len(result)], *reversed(result))


OutOfRange = tuple[list[int], int, int]
"""The first bad index's position and value, and how many there are."""


def out_of_range(values: np.ndarray, limit: int, exempt: np.ndarray | None = None) -> OutOfRange | None:
    """Indices outside [0, limit) that are not `exempt` (ignored labels, padding), checked on the
    host: a bad index must never reach a (CUDA) kernel. Fast when all are in range (min and max)."""
    if not values.size or (values.min() >= 0 and values.max() < limit):
        return None
    bad = (values < 0) | (values >= limit)
    if exempt is not None:
        bad &= ~exempt
    if not bad.any():
        return None
    position = [int(i) for i in np.argwhere(bad)[0]] if bad.ndim else []
    return position, int(values[tuple(position)]), int(bad.sum())
