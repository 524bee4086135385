"""Many validated calls, one computation: rows are concatenated, each call keeps its own reduction.

Every loss is a per-row computation followed by a reduction (see `lossd.server.losses.base.Loss`).
Calls that agree on everything a row's loss depends on (the loss and its params, dtypes, weights,
which gradients) are flattened to rows by their loss, concatenated, and computed with one
`reduction="none"` call and one backward pass. Each call's own reduction is then applied to its own
rows: its sum, its denominator (the loss's per-row weights of a 'mean', rows, or the batch size)
and its upstream gradient. Sums and denominators are taken in float64 and rounded once, so a call's
loss does not depend on what it was merged with.

Host-side work is numpy, and torch is called a fixed number of times per batch, not per call: in a
server whose event loop holds the GIL between requests, every torch call from the compute thread
gives the GIL up and must wait to get it back.

Pure torch and numpy; nothing of gRPC, protobuf or metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from lossd.server.engine.staging import Staging, as_float64, as_result, host_array
from lossd.server.losses import Loss, LossCall, LossOutput, loss_shape

__all__ = ["MergeKey", "compute_merged", "denominators", "merge_key", "segment_sums"]


class MergeKey(NamedTuple):
    """What calls must share to be computed together (a tuple: the batcher hashes and compares one
    per queued call)."""

    loss: Loss
    params: Hashable
    input_dtype: torch.dtype
    target_dtype: torch.dtype
    weight: tuple[str, bytes] | None
    input_grad: bool
    target_grad: bool


def merge_key(call: LossCall) -> MergeKey | None:
    """The key of a validated call, or None if it must be computed alone (its loss says so: see
    `Loss.merge_params`)."""
    params = call.loss.merge_params(call)
    if params is None or call.tensor_grads:  # a gradient summed over the call's rows: alone
        return None
    weight = None
    if call.weight is not None:
        weight = (str(call.weight.dtype), host_array(call.weight).tobytes())
    return MergeKey(
        loss=call.loss,
        params=params,
        input_dtype=call.input.dtype,
        target_dtype=call.target.dtype,
        weight=weight,
        input_grad=call.input_grad,
        target_grad=call.target_grad,
    )


def segment_sums(values: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Per-segment float64 sums of consecutive segments; each depends on its own values only."""
    sums = np.zeros(len(counts), dtype=np.float64)
    sizes = np.asarray(counts, dtype=np.int64)
    nonempty = sizes > 0
    if nonempty.any():
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        sums[nonempty] = np.add.reduceat(values.astype(np.float64, copy=False), starts[nonempty])
    return sums


def denominators(calls: Sequence[LossCall], counts: Sequence[int], targets: np.ndarray | None) -> np.ndarray:
    """What each call's 'mean' divides by (or 'batchmean'; 1 for 'sum' and 'none'). `targets`: the
    calls' class-index targets concatenated, for losses that weigh a mean by them."""
    result = np.ones(len(calls))
    means = []
    for i, call in enumerate(calls):
        if call.reduction == "batchmean":
            result[i] = call.loss.samples_divisor(call)
        elif call.reduction == "mean" and (divisor := call.loss.mean_divisor(call)) is not None:
            result[i] = divisor
        elif call.reduction == "mean":
            result[i] = counts[i]
            means.append(i)
    if targets is None or not means:
        return result
    per_row = calls[0].loss.mean_weights(calls[0], targets)  # merged calls share weights and options
    if per_row is not None:
        result[means] = segment_sums(per_row, counts)[means]
    return result


def compute_merged(calls: Sequence[LossCall], key: MergeKey, staging: Staging) -> list[LossOutput]:
    """Computes calls that share `key` together; results on the host, in call order."""
    loss = key.loss
    if loss.merged_by_compute:
        return _merged_by_compute(calls, key, staging)
    counts = [loss.rows_of(call) for call in calls]
    indices = loss.class_targets(calls[0])
    targets = [loss.target_rows(host_array(call.target), call) for call in calls]
    if indices:
        targets = [np.concatenate(targets)]
    divisors = denominators(calls, counts, targets[0] if indices else None)
    x = staging.to_device([loss.input_rows(host_array(call.input), call) for call in calls], key.input_dtype)
    t = staging.to_device(targets, key.target_dtype)
    weight = calls[0].weight
    if weight is not None:
        weight = staging.to_device([host_array(weight)], weight.dtype)
    wanted = key.input_grad or key.target_grad
    with torch.enable_grad() if wanted else torch.no_grad():
        x.requires_grad_(key.input_grad)
        t.requires_grad_(key.target_grad)
        per_row = loss.function(calls[0].options, "none")(x, t, weight)
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
        value = reduced[i]
        if value is None:
            value = as_result(host[0][rows].reshape(loss_shape(call, "none")), loss_dtype)
        input_grad = target_grad = None
        if key.input_grad:
            grad = loss.from_rows(host[1][rows], call.input.shape)
            input_grad = as_result(grad, call.input.dtype, call.grad_dtype)
        if key.target_grad:
            grad = loss.from_rows(host[-1][rows], call.target.shape)
            target_grad = as_result(grad, call.target.dtype, call.grad_dtype)
        outputs.append(LossOutput(loss=value, input_grad=input_grad, target_grad=target_grad))
    return outputs


def _rows(arrays: Sequence[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    """Host arrays of rows concatenated into one host tensor of `dtype` (bfloat16 from its bits)."""
    joined = torch.from_numpy(np.concatenate(arrays))
    return joined.view(torch.bfloat16) if dtype == torch.bfloat16 else joined


def _merged_by_compute(calls: Sequence[LossCall], key: MergeKey, staging: Staging) -> list[LossOutput]:
    """Calls merged as one call of their concatenated rows, computed by their loss under reduction
    'none' with each row's upstream gradient; each call's loss and parts reduced in float64."""
    loss, first = key.loss, calls[0]
    counts = [loss.rows_of(call) for call in calls]
    divisors = denominators(calls, counts, None)
    tensors = {
        name: _rows(
            [loss.tensor_rows(name, host_array(call.tensors[name]), call) for call in calls], tensor.dtype
        )
        for name, tensor in first.tensors.items()
    }
    wanted = key.input_grad or key.target_grad
    merged = LossCall(
        options=dataclasses.replace(first.options, reduction="none"),
        input=_rows([loss.input_rows(host_array(call.input), call) for call in calls], key.input_dtype),
        target=_rows([loss.target_rows(host_array(call.target), call) for call in calls], key.target_dtype),
        weight=first.weight,
        input_grad=key.input_grad,
        target_grad=key.target_grad,
        grad_output=torch.from_numpy(_upstream(calls, counts, divisors)) if wanted else None,
        tensors=tensors,
    )
    computed = loss.compute(merged, staging.upload)
    names = list(computed.parts)
    loss_dtype = computed.loss.dtype
    host = staging.to_host([computed.loss, *computed.parts.values(), *computed.grads])
    values = dict(zip(["loss", *names], host, strict=False))
    grads = host[1 + len(names) :]
    reduced = {
        name: _reductions(calls, array, loss_dtype, counts, divisors) for name, array in values.items()
    }
    bounds = np.cumsum([0, *counts])
    outputs = []
    for i, call in enumerate(calls):
        rows = slice(bounds[i], bounds[i + 1])
        results = {}
        for name, array in values.items():
            value = reduced[name][i]
            if value is None:
                value = as_result(array[rows].reshape(loss_shape(call, "none")), loss_dtype)
            results[name] = value
        input_grad = target_grad = None
        if key.input_grad:
            input_grad = as_result(
                loss.from_rows(grads[0][rows], call.input.shape), call.input.dtype, call.grad_dtype
            )
        if key.target_grad:
            grad = loss.from_rows(grads[-1][rows], call.target.shape)
            target_grad = as_result(grad, call.target.dtype, call.grad_dtype)
        main = results.pop("loss")
        outputs.append(LossOutput(loss=main, input_grad=input_grad, target_grad=target_grad, parts=results))
    return outputs


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
        reduced = segment_sums(values, counts) / denominators
    return [
        as_result(np.asarray(reduced[i]), torch.float64, dtype) if wanted[i] else None
        for i in range(len(calls))
    ]
