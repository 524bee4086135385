"""NaN and infinity in request tensors: found cheaply on the host, before compute.

Torch computes with them as IEEE arithmetic says, and so does lossd (no silent change); the server
counts such requests, and with `--reject-nonfinite` refuses them. The check reads every element
once: numpy's `isfinite` for small tensors (no torch call, which would hand the GIL around), torch's
threaded kernel for large ones. bfloat16, which numpy lacks, is checked on its bit patterns: an
all-ones exponent is infinity or NaN.
"""

from __future__ import annotations

import numpy as np
import torch

from lossd.server.losses import LossCall
from lossd.server.losses.checks import FLOATING
from lossd.wire.errors import InvalidArgumentError

__all__ = ["nonfinite_error", "nonfinite_fields"]

_SMALL = 1 << 18
_BF16_EXPONENT = 0x7F80


def _has_nonfinite(tensor: torch.Tensor, log_probabilities: bool = False) -> bool:
    if tensor.dtype not in FLOATING or tensor.numel() == 0:
        return False
    if log_probabilities:  # -inf is probability 0, a value: NaN and +inf are what is not finite
        return bool((torch.isnan(tensor) | torch.isposinf(tensor)).any())
    if tensor.numel() >= _SMALL or tensor.device.type != "cpu":
        return not bool(torch.isfinite(tensor).all())
    if tensor.dtype == torch.bfloat16:
        bits = tensor.view(torch.int16).numpy()
        return bool(np.any((bits & _BF16_EXPONENT) == _BF16_EXPONENT))
    return not bool(np.isfinite(tensor.numpy()).all())


def nonfinite_fields(call: LossCall) -> tuple[str, ...]:
    """The request fields of `call` that hold a NaN or an infinity, in request order."""
    name = call.loss.name
    tensors = (
        ("input", call.input),
        ("target", call.target),
        (f"{name}.weight", call.weight),
        *((f"{name}.{field}", tensor) for field, tensor in call.tensors.items()),
        ("gradients.grad_output", call.grad_output),
    )
    logs = call.loss.log_probabilities
    return tuple(
        field for field, tensor in tensors if tensor is not None and _has_nonfinite(tensor, field in logs)
    )


def nonfinite_error(fields: tuple[str, ...]) -> InvalidArgumentError:
    """The refusal under `--reject-nonfinite`, naming the first offending field."""
    return InvalidArgumentError(
        f"{fields[0]} holds NaN or infinite values, which this server is set to reject "
        f"(--reject-nonfinite); fields with them: {', '.join(fields)}",
        reason="NONFINITE_VALUE",
        field=fields[0],
        metadata={"fields": ",".join(fields)},
    )
