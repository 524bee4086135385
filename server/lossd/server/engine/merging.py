"""Many validated calls, one computation: rows are concatenated, each call keeps its own reduction.

A loss whose calls are rows (`lossd.server.losses.Rows`) is a per-row computation followed by a
reduction. Calls that agree on everything a row's loss depends on (the loss and its params, dtypes,
which gradients and outputs) are flattened to rows by their loss, concatenated into one call of the
loss under reduction 'none' with each row's upstream gradient, and computed by the loss's own
`compute`, as any call is. Each call's own reduction is then applied to its own rows: its sum, its
denominator and its upstream gradient. Sums and denominators are taken in float64 and rounded once,
so a call's loss does not depend on what it was merged with.

Host-side work is numpy, and torch is called a fixed number of times per batch, not per call: in a
server whose event loop holds the GIL between requests, every torch call from the compute thread
gives the GIL up and must wait to get it back.

Pure torch and numpy; nothing of gRPC, protobuf or metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from lossd.server.engine.staging import Staging, as_float64, as_result, host_array
from lossd.server.losses import Loss, LossCall, LossOutput, Rows, loss_shape
from lossd.server.losses.base import segment_sums

__all__ = ["MergeKey", "compute_merged", "denominators", "merge_key", "segment_sums"]

_ROW_GRADIENTS = frozenset({"input", "target"})


class MergeKey(NamedTuple):
    """What calls must share to be computed together (a tuple: the batcher hashes and compares one
    per queued call)."""

    loss: Loss[Any]
    params: Hashable
    input_dtype: torch.dtype
    target_dtype: torch.dtype
    grads: frozenset[str]
    outputs: frozenset[str]


def merge_key(call: LossCall[Any]) -> MergeKey | None:
    """The key of a validated call, or None if it must be computed alone: its loss has no rows, or
    says so (`Rows.params`), or a gradient is asked of a tensor every row uses (summed over the
    call's rows: it cannot be told apart from another call's)."""
    rows = call.loss.rows
    if rows is None or not call.grads <= _ROW_GRADIENTS:
        return None
    params = rows.params(call)
    if params is None:
        return None
    return MergeKey(call.loss, params, call.input.dtype, call.target.dtype, call.grads, call.outputs)


def denominators(
    calls: Sequence[LossCall[Any]], counts: Sequence[int], rows: Rows[Any], targets: np.ndarray
) -> np.ndarray:
    """What each call's reduction divides its summed rows by: its 'mean' divisor, its batch size
    for 'batchmean', 1 for 'sum' and 'none'. `targets`: the calls' target rows concatenated."""
    result = np.ones(len(calls))
    means = [i for i, call in enumerate(calls) if call.reduction == "mean"]
    if means:
        result[means] = rows.mean_divisors(calls, counts, targets)[means]
    for i, call in enumerate(calls):
        if call.reduction == "batchmean":
            result[i] = rows.batch_divisor(call)
    return result


def compute_merged(calls: Sequence[LossCall[Any]], key: MergeKey, staging: Staging) -> list[LossOutput]:
    """Computes calls that share `key` together; results on the host, in call order."""
    loss = key.loss
    rows = loss.rows
    assert rows is not None, "only losses with rows have merge keys"
    first = calls[0]
    counts = [rows.count(call) for call in calls]
    target = staging.host_rows([rows.target_rows(host_array(c.target), c) for c in calls], key.target_dtype)
    divisors = denominators(calls, counts, rows, host_array(target))
    tensors = {}
    for name, tensor in first.tensors.items():
        if not loss.all_tensors[name].per_row:
            tensors[name] = tensor  # shared by every row (class weights): equal in every call
            continue
        parts = [rows.tensor_rows(name, host_array(call.tensors[name]), call) for call in calls]
        tensors[name] = staging.host_rows(parts, tensor.dtype)
    merged = LossCall(
        options=dataclasses.replace(first.options, reduction="none"),
        input=staging.host_rows([rows.input_rows(host_array(c.input), c) for c in calls], key.input_dtype),
        target=target,
        tensors=tensors,
        grads=key.grads,
        outputs=key.outputs,
    )
    if key.grads:
        upstream = torch.from_numpy(_upstream(calls, counts, divisors))
        merged = dataclasses.replace(merged, grad_output=upstream.to(loss.loss_dtype(merged)))
    computed = loss.compute(merged, staging.upload)
    loss_dtype = computed.loss.dtype
    names = list(computed.outputs)
    grads = list(computed.grads)
    host = staging.to_host([computed.loss, *computed.outputs.values(), *computed.grads.values()])
    values = dict(zip(["loss", *names], host, strict=False))
    grad_rows = dict(zip(grads, host[1 + len(names) :], strict=True))
    reduced = {
        name: _reductions(calls, values[name], loss_dtype, counts, divisors)
        for name in ["loss", *(spec.name for spec in loss.outputs if spec.reduced and spec.name in values)]
    }
    bounds = np.cumsum([0, *counts]).tolist()  # Python ints: each call slices its rows
    outputs = []
    for i, call in enumerate(calls):
        span = slice(bounds[i], bounds[i + 1])
        results: dict[str, torch.Tensor | np.ndarray] = {}
        for name, array in values.items():
            value = reduced[name][i] if name in reduced else None
            if value is None:  # unreduced, or a reduction left to the call (see `_reductions`)
                value = as_result(array[span].reshape(loss_shape(call, "none")), loss_dtype)
            results[name] = value
        call_grads = {}
        for name, array in grad_rows.items():
            owner = call.tensor(name)
            assert owner is not None, "merged calls differentiate their input or target"
            call_grads[name] = as_result(
                rows.from_rows(array[span], owner.shape, call), owner.dtype, call.grad_dtype
            )
        main = results.pop("loss")
        outputs.append(LossOutput(loss=main, grads=call_grads, outputs=results))
    return outputs


def _upstream(calls: Sequence[LossCall[Any]], counts: Sequence[int], denominators: np.ndarray) -> np.ndarray:
    """d(each call's loss)/d(each row's loss), times the call's own upstream gradient, in float64."""
    scales = np.ones(len(calls))
    explicit = []
    for i, call in enumerate(calls):
        if call.grad_output is None:
            continue
        if call.reduction == "none":
            explicit.append(i)
        else:
            scales[i] = float(as_float64(call.grad_output))
    with np.errstate(divide="ignore", invalid="ignore"):
        per_row = np.repeat(scales / denominators, counts)
    if explicit:
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        for i in explicit:
            upstream = calls[i].grad_output
            assert upstream is not None
            per_row[starts[i] : starts[i] + counts[i]] = as_float64(upstream).reshape(-1)
    return per_row


def _reductions(
    calls: Sequence[LossCall[Any]],
    losses: np.ndarray,
    dtype: torch.dtype,
    counts: Sequence[int],
    denominators: np.ndarray,
) -> list[np.ndarray | torch.Tensor | None]:
    """Each reduced call's value: the float64 sum over its rows / its denominator, rounded once."""
    wanted = [call.reduction != "none" for call in calls]
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
