"""Many validated calls, one computation: rows are concatenated, each call keeps its own reduction.

Every loss is a per-row computation followed by a reduction. Calls that agree on everything a row's
loss depends on (loss, dtypes, class count, weights, ignore_index, smoothing, log_target, which
gradients) are flattened to rows (N, C, d1..dk -> N*d1*..*dk rows of C), concatenated, and computed
with one `reduction="none"` call and one backward pass. Each call's own reduction is then applied to
its own rows: its sum, its denominator (summed class weights of non-ignored targets, rows, elements,
or the batch size) and its upstream gradient. Sums and denominators are taken in float64 and
rounded once, so a call's loss does not depend on what it was merged with.

Host-side work is numpy, and torch is called a fixed number of times per batch, not per call: in a
server whose event loop holds the GIL between requests, every torch call from the compute thread
gives the GIL up and must wait to get it back.

Pure torch and numpy; nothing of gRPC, protobuf or metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lossd.server.calls import LossCall, LossKind, LossOutput
from lossd.server.validation import is_probability_target, loss_shape

__all__ = [
    "MergeKey",
    "Staging",
    "as_float64",
    "as_result",
    "compute_merged",
    "denominators",
    "host_array",
    "merge_key",
    "rows_of",
]


@dataclass(frozen=True)
class MergeKey:
    """What calls must share to be computed together."""

    kind: LossKind
    input_dtype: torch.dtype
    target_dtype: torch.dtype
    classes: int
    probabilities: bool
    weight: tuple[str, bytes] | None
    ignore_index: int
    label_smoothing: float
    log_target: bool
    input_grad: bool
    target_grad: bool


def host_array(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a host tensor; bfloat16, which numpy lacks, as its int16 bit patterns."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def as_float64(tensor: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of a host tensor."""
    if tensor.dtype == torch.bfloat16:
        return tensor.double().numpy()
    return tensor.numpy().astype(np.float64)


def merge_key(call: LossCall) -> MergeKey | None:
    """The key of a validated call, or None if it must be computed alone: a broadcast kl_div, or a
    float16 call whose torch reduction sums in float16 before it divides (see `_float16_partial_sum`)."""
    options = call.options
    if options.kind is LossKind.KL_DIV:
        if call.target.shape != call.input.shape:
            return None
        classes, probabilities = 0, False
    else:
        classes = call.input.shape[1] if call.input.dim() >= 2 else call.input.shape[0]
        probabilities = is_probability_target(call)
    if call.input.dtype == torch.float16 and _float16_partial_sum(call, probabilities):
        return None
    weight = None
    if call.weight is not None:
        weight = (str(call.weight.dtype), host_array(call.weight).tobytes())
    return MergeKey(
        kind=options.kind,
        input_dtype=call.input.dtype,
        target_dtype=call.target.dtype,
        classes=classes,
        probabilities=probabilities,
        weight=weight,
        ignore_index=options.ignore_index,
        label_smoothing=options.label_smoothing,
        log_target=options.log_target,
        input_grad=call.input_grad,
        target_grad=call.target_grad,
    )


def _float16_partial_sum(call: LossCall, probabilities: bool) -> bool:
    """Whether torch reduces this call through a float16 sum that is scaled afterwards: the label
    smoothing term, probability-target 'mean', kl_div 'batchmean'. Such a sum can overflow to inf
    where the float64 reduction of the merged path stays finite; alone, the call gets torch's inf."""
    options = call.options
    if options.reduction == "none":
        return False
    if options.kind is LossKind.KL_DIV:
        return options.reduction == "batchmean"
    return options.label_smoothing > 0 or probabilities


def rows_of(call: LossCall) -> int:
    """How many rows a call contributes: samples x spatial positions (elements for kl_div)."""
    if call.options.kind is LossKind.KL_DIV:
        return call.input.numel()
    shape = call.input.shape
    return 1 if len(shape) == 1 else shape[0] * math.prod(shape[2:])


def _as_rows(array: np.ndarray, kind: LossKind, classes: int) -> np.ndarray:
    """(C) -> (1, C); (N, C) as is; (N, C, d...) -> (N*d..., C); kl_div: flat."""
    if kind is LossKind.KL_DIV:
        return array.reshape(-1)
    if array.ndim == 1:
        return array.reshape(1, classes)
    if array.ndim == 2:
        return array
    return np.moveaxis(array, 1, -1).reshape(-1, classes)


def _from_rows(rows: np.ndarray, shape: torch.Size, kind: LossKind) -> np.ndarray:
    """The inverse of `_as_rows` for an array of `shape`."""
    if kind is LossKind.KL_DIV or len(shape) <= 2:
        return rows.reshape(shape)
    return np.moveaxis(rows.reshape(shape[0], *shape[2:], shape[1]), -1, 1)


def _segment_sums(values: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Per-segment float64 sums of consecutive segments; each depends on its own values only."""
    sums = np.zeros(len(counts), dtype=np.float64)
    sizes = np.asarray(counts, dtype=np.int64)
    nonempty = sizes > 0
    if nonempty.any():
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        sums[nonempty] = np.add.reduceat(values.astype(np.float64, copy=False), starts[nonempty])
    return sums


def denominators(
    calls: Sequence[LossCall], key: MergeKey, counts: Sequence[int], targets: np.ndarray | None
) -> np.ndarray:
    """What each call's 'mean' divides by (or 'batchmean'; 1 for 'sum' and 'none')."""
    result = np.ones(len(calls))
    means = []
    for i, call in enumerate(calls):
        reduction = call.options.reduction
        if reduction == "batchmean" and call.input.dim():
            result[i] = call.input.shape[0]
        elif reduction == "mean":
            result[i] = counts[i]  # rows for probability targets, elements for kl_div
            means.append(i)
    if targets is None or not means:
        return result
    # Class-index targets: 'mean' divides by the summed weights of the non-ignored targets.
    kept = targets != key.ignore_index
    if calls[0].weight is None:
        per_row = kept.astype(np.float64)
    else:
        per_row = np.where(kept, as_float64(calls[0].weight)[np.where(kept, targets, 0)], 0.0)
    result[means] = _segment_sums(per_row, counts)[means]
    return result


def _upstream(calls: Sequence[LossCall], counts: Sequence[int], denominators: np.ndarray) -> np.ndarray:
    """d(each call's loss)/d(each row's loss), times the call's own upstream gradient, in float64."""
    scales = np.ones(len(calls))
    explicit = []
    for i, call in enumerate(calls):
        if call.grad_output is None:
            continue
        if call.options.reduction == "none":
            explicit.append(i)
        else:
            scales[i] = float(as_float64(call.grad_output))
    with np.errstate(divide="ignore", invalid="ignore"):
        per_row = np.repeat(scales / denominators, counts)
    if explicit:
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        for i in explicit:
            per_row[starts[i] : starts[i] + counts[i]] = as_float64(calls[i].grad_output).reshape(-1)  # type: ignore[arg-type]
    return per_row


def _loss_rows(key: MergeKey) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    if key.kind is LossKind.NLL:
        return lambda x, t, w: F.nll_loss(x, t, weight=w, ignore_index=key.ignore_index, reduction="none")
    if key.kind is LossKind.CROSS_ENTROPY:
        return lambda x, t, w: F.cross_entropy(
            x,
            t,
            weight=w,
            ignore_index=key.ignore_index,
            reduction="none",
            label_smoothing=key.label_smoothing,
        )
    return lambda x, t, _: F.kl_div(x, t, reduction="none", log_target=key.log_target)


SPARE_BYTES = 1 << 30
"""The largest receive buffer kept for reuse (one at a time)."""


class Staging:
    """Moves concatenated host arrays to the device and results back.

    For CUDA (`pinned=True`) the host side is page-locked memory from torch's caching host
    allocator: the arrays are concatenated straight into it and copied with non-blocking DMA, and
    one synchronisation ends each batch. On the CPU the concatenation is the tensor.
    """

    def __init__(self, device: torch.device, pinned: bool) -> None:
        self.device = device
        self.pinned = pinned
        self._spare: torch.Tensor | None = None

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 host tensor to receive request bytes into (pinned memory on CUDA).

        On the CPU the last recycled buffer is reused when it fits: fresh memory costs a page fault
        per 4 KiB on first touch (about a third of a large stream's receive time here). CUDA's
        pinned buffers come from torch's caching host allocator, which reuses them anyway.
        """
        spare = self._spare
        if spare is not None and nbytes <= spare.numel() <= 2 * nbytes:
            self._spare = None
            return spare[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def recycle(self, buffer: torch.Tensor) -> None:
        """Offers a buffer from `host_buffer` back once nothing refers to its contents any more."""
        if self.pinned or buffer.numel() > SPARE_BYTES:
            return
        base = buffer if buffer._base is None else buffer._base
        if self._spare is None or base.numel() > self._spare.numel():
            self._spare = base

    def to_device(self, parts: Sequence[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
        """One device tensor of `dtype`: `parts` (host arrays, bfloat16 as int16) concatenated."""
        shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
        host = torch.empty(shape, dtype=dtype, pin_memory=self.pinned)
        np.concatenate(parts, axis=0, out=host_array(host))
        return host if self.device.type == "cpu" else host.to(self.device, non_blocking=self.pinned)

    def to_host(self, tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """Host arrays of device tensors, complete when this returns."""
        if self.device.type == "cpu":
            return [host_array(tensor) for tensor in tensors]
        copies = []
        for tensor in tensors:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.pinned)
            host.copy_(tensor, non_blocking=self.pinned)
            copies.append(host)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return [host_array(copy) for copy in copies]


def as_result(
    array: np.ndarray, dtype: torch.dtype, wanted: torch.dtype | None = None
) -> np.ndarray | torch.Tensor:
    """`array` (of `dtype`) as the codec takes it, converted to `wanted` as torch converts.

    numpy where it can; torch for bfloat16, which numpy lacks.
    """
    target = wanted or dtype
    if torch.bfloat16 in (dtype, target):
        tensor = torch.from_numpy(array if array.flags.c_contiguous else array.copy())  # keeps 0-d
        tensor = tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor
        return tensor.to(target) if target != tensor.dtype else tensor
    if target == dtype:
        return array
    if target == torch.float16:  # torch narrows float64 to half through float32
        array = array.astype(np.float32)
    return array.astype(_NUMPY[target])


_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def compute_merged(calls: Sequence[LossCall], key: MergeKey, staging: Staging) -> list[LossOutput]:
    """Computes calls that share `key` together; results on the host, in call order."""
    kind, classes = key.kind, key.classes
    counts = [rows_of(call) for call in calls]
    indices = not (key.probabilities or kind is LossKind.KL_DIV)
    if indices:
        targets = [np.concatenate([host_array(call.target).reshape(-1) for call in calls])]
    else:
        targets = [_as_rows(host_array(call.target), kind, classes) for call in calls]
    divisors = denominators(calls, key, counts, targets[0] if indices else None)
    x = staging.to_device(
        [_as_rows(host_array(call.input), kind, classes) for call in calls], key.input_dtype
    )
    t = staging.to_device(targets, key.target_dtype)
    weight = calls[0].weight
    if weight is not None:
        weight = staging.to_device([host_array(weight)], weight.dtype)
    wanted = key.input_grad or key.target_grad
    with torch.enable_grad() if wanted else torch.no_grad():
        x.requires_grad_(key.input_grad)
        t.requires_grad_(key.target_grad)
        per_row = _loss_rows(key)(x, t, weight)
        grads: list[torch.Tensor] = []
        if wanted:
            upstream = staging.to_device([_upstream(calls, counts, divisors)], torch.float64).to(
                per_row.dtype
            )
            leaves = [leaf for leaf in (x, t) if leaf.requires_grad]
            grads = list(torch.autograd.grad(per_row, leaves, upstream))
    loss_dtype = per_row.dtype
    host = staging.to_host([per_row.detach(), *grads])
    bounds = np.cumsum([0, *counts])
    reduced = _reductions(calls, host[0], loss_dtype, counts, divisors)
    outputs = []
    for i, call in enumerate(calls):
        rows = slice(bounds[i], bounds[i + 1])
        loss = reduced[i]
        if loss is None:
            loss = as_result(host[0][rows].reshape(loss_shape(call, "none")), loss_dtype)
        input_grad = target_grad = None
        if key.input_grad:
            grad = _from_rows(host[1][rows], call.input.shape, kind)
            input_grad = as_result(grad, call.input.dtype, call.grad_dtype)
        if key.target_grad:
            grad = _from_rows(host[-1][rows], call.target.shape, kind)
            target_grad = as_result(grad, call.target.dtype, call.grad_dtype)
        outputs.append(LossOutput(loss=loss, input_grad=input_grad, target_grad=target_grad))
    return outputs


def _reductions(
    calls: Sequence[LossCall],
    losses: np.ndarray,
    dtype: torch.dtype,
    counts: Sequence[int],
    denominators: np.ndarray,
) -> list[np.ndarray | torch.Tensor | None]:
    """Each reduced call's loss: the float64 sum over its rows / its denominator, rounded once."""
    wanted = [call.options.reduction != "none" for call in calls]
    if not any(wanted):
        return [None] * len(calls)
    values = losses
    if dtype == torch.bfloat16:  # int16 bit patterns: widen exactly to float32
        values = (losses.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        reduced = _segment_sums(values, counts) / denominators
    return [
        as_result(np.asarray(reduced[i]), torch.float64, dtype) if wanted[i] else None
        for i in range(len(calls))
    ]
