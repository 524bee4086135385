"""NaN and infinity in request tensors: found cheaply on the host, before compute.

Torch computes with them as IEEE arithmetic says, and so does lossd (no silent change); the server
counts such requests, and with `--reject-nonfinite` refuses them. The check reads every element
once: numpy's `isfinite` for small tensors (no torch call, which would hand the GIL around), torch's
threaded kernel for large ones. bfloat16, which numpy lacks, is checked on its bit patterns: an
all-ones exponent is infinity or NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lossd.server.engine.staging import host_array
from lossd.server.losses import Loss, LossCall
from lossd.server.losses.checks import FLOATING
from lossd.wire.errors import InvalidArgumentError

__all__ = ["holds_nonfinite", "nonfinite_error", "nonfinite_fields", "nonfinite_many"]

_SMALL = 1 << 18
_BF16_EXPONENT = 0x7F80


def holds_nonfinite(tensor: torch.Tensor, log_probabilities: bool = False) -> bool:
    """Whether a tensor holds NaN or infinity (NaN or +inf in log-probabilities, where -inf is
    probability 0)."""
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


@functools.cache
def _fields(loss: Loss[Any]) -> tuple[bool, bool, dict[str, tuple[str, bool]]]:
    """Whether -inf is a value in a loss's input and target (log-probabilities), and each of its own
    tensors' request field and the same flag: a loss's, computed once."""
    specs = loss.all_tensors
    logs = {name: spec.holds == "log_probabilities" for name, spec in specs.items()}
    own = {spec.name: (f"{loss.name}.{spec.name}", logs[spec.name]) for spec in loss.tensors}
    return logs["input"], logs["target"], own


def _tensors(call: LossCall[Any]) -> list[tuple[str, torch.Tensor, bool]]:
    """A call's request tensors in request order: field, tensor, and whether -inf is a value there
    (log-probabilities)."""
    input_log, target_log, own = _fields(call.loss)
    tensors: list[tuple[str, torch.Tensor, bool]] = [
        ("input", call.input, input_log),
        ("target", call.target, target_log),
    ]
    for name, tensor in call.tensors.items():
        field, log = own[name]
        tensors.append((field, tensor, log))
    if call.grad_output is not None:
        tensors.append(("gradients.grad_output", call.grad_output, False))
    return tensors


def _scanned(call: LossCall[Any]) -> list[tuple[str, torch.Tensor, bool]]:
    """`_tensors` but the resident ones: those were checked when they were put."""
    if not call.resident:
        return _tensors(call)
    resident = _resident_fields(call)
    return [entry for entry in _tensors(call) if entry[0] not in resident]


def _resident_fields(call: LossCall[Any]) -> dict[str, bool]:
    """The request field of each resident tensor, and whether it was found to hold NaN or
    infinity when it was put."""
    _, _, own = _fields(call.loss)
    fields = {"input": "input", "target": "target"} | {name: field for name, (field, _) in own.items()}
    return {fields[name]: bad for name, bad in call.resident.items() if name in fields}


def nonfinite_fields(call: LossCall[Any]) -> tuple[str, ...]:
    """The request fields of `call` that hold a NaN or an infinity, in request order (a resident
    tensor's as found when it was put: it is not read again)."""
    known = _resident_fields(call) if call.resident else {}
    return tuple(
        field
        for field, tensor, log in _tensors(call)
        if tensor is not None and (known[field] if field in known else holds_nonfinite(tensor, log))
    )


def _array_nonfinite(array: np.ndarray, dtype: torch.dtype, log_probabilities: bool) -> bool:
    """`holds_nonfinite` of a host array of `dtype`'s elements (bfloat16 as int16 bits)."""
    if dtype == torch.bfloat16:
        return bool(np.any((array & _BF16_EXPONENT) == _BF16_EXPONENT))
    if log_probabilities:
        return bool(np.any(np.isnan(array) | np.isposinf(array)))
    return not bool(np.isfinite(array).all())


def nonfinite_many(calls: Sequence[LossCall[Any]]) -> list[tuple[str, ...]]:
    """`nonfinite_fields` of each call. Small host tensors of several calls are checked together
    first, one numpy pass per dtype: when that finds nothing (nearly always), no call holds a NaN
    or an infinity; otherwise each call is checked on its own to say which fields do."""
    if len(calls) < 2:
        return [nonfinite_fields(call) for call in calls]
    groups: dict[tuple[torch.dtype, bool], list[np.ndarray]] = {}
    for call in calls:
        if call.resident and any(call.resident.values()):
            return [nonfinite_fields(call) for call in calls]
        for _, tensor, log in _scanned(call):
            if tensor is None or tensor.dtype not in FLOATING or tensor.numel() == 0:
                continue
            if (
                tensor.numel() >= _SMALL
                or tensor.device.type != "cpu"
                or (log and tensor.dtype == torch.bfloat16)
            ):
                return [nonfinite_fields(call) for call in calls]
            groups.setdefault((tensor.dtype, log), []).append(host_array(tensor).reshape(-1))
    for (dtype, log), arrays in groups.items():
        if _array_nonfinite(np.concatenate(arrays), dtype, log):
            return [nonfinite_fields(call) for call in calls]
    return [()] * len(calls)


def first_nonfinite(call: LossCall[Any], field: str) -> tuple[list[int], float] | None:
    """The index and value of the first NaN or infinity (+inf and NaN in log-probabilities) of a
    call's request field, in row-major order."""
    for name, tensor, log in _tensors(call):
        if name != field or tensor.dtype not in FLOATING:
            continue
        values = tensor.detach().reshape(-1)
        bad = (torch.isnan(values) | torch.isposinf(values)) if log else ~torch.isfinite(values)
        if bool(bad.any()):  # the first one: argmax of the mask, no list of every index
            flat = int(bad.to(torch.uint8).argmax())
            index = [int(i) for i in np.unravel_index(flat, tuple(tensor.shape))] if tensor.dim() else []
            return index, float(values[flat])
    return None


def nonfinite_error(fields: tuple[str, ...], call: LossCall[Any] | None = None) -> InvalidArgumentError:
    """The refusal of a call with NaN or infinite values (its own choice or the server's
    `--reject-nonfinite`), naming the first offending field and, given the call, its first such
    value's index."""
    where, metadata = "", {"fields": ",".join(fields)}
    first = first_nonfinite(call, fields[0]) if call is not None else None
    if first is not None:
        index, value = first
        where = f" (the first: {fields[0]}{index} is {value})"
        metadata["index"] = str(index)
    why = "this call asks" if call is not None and call.nonfinite == "refuse" else "this server is set"
    return InvalidArgumentError(
        f"{fields[0]} holds NaN or infinite values{where}, which {why} to refuse (nonfinite, "
        f"--reject-nonfinite); fields with them: {', '.join(fields)}",
        reason="NONFINITE_VALUE",
        field=fields[0],
        metadata=metadata,
    )
