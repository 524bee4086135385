"""One large call computed in blocks of samples while its input is still arriving.

Every loss lossd serves is a sum over samples (rows of the first dimension) scaled by one
denominator, and each sample's gradient depends on that sample alone. So once the small tensors
(targets, weights, upstream gradient) are in, the denominator is known and each block of complete
samples can be computed, `reduction="none"` with the call's own upstream gradient, while later
samples are still on the wire; its gradient can go back at once. The loss is the float64 sum of
the blocks' per-sample losses over the denominator, rounded once, as for merged calls.

Pure torch and numpy; nothing of gRPC or protobuf.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lossd.server.engine.merging import denominators, merge_key
from lossd.server.engine.staging import as_float64, as_result, host_array
from lossd.server.losses import LossCall, loss_shape

__all__ = ["BlockPlan", "block_plan"]


@dataclass(frozen=True)
class BlockPlan:
    """How to compute `call` (its input still filling) in blocks of samples."""

    call: LossCall[Any]
    samples: int
    sample_bytes: int
    denominator: float
    loss_dtype: torch.dtype
    loss_shape: tuple[int, ...]

    def block(self, start: int, stop: int) -> LossCall[Any]:
        """Samples [start, stop) as a call of their own: per-sample losses, the call's upstream."""
        call = self.call
        reduced = call.options.reduction != "none"
        if reduced:
            upstream = float(as_float64(call.grad_output)) if call.grad_output is not None else 1.0
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = np.float64(upstream) / np.float64(self.denominator)
            shape = (stop - start, *self.block_loss_shape()[1:])
            grad_output: torch.Tensor | None = torch.full(shape, float(scale), dtype=torch.float64)
        else:
            grad_output = None if call.grad_output is None else call.grad_output[start:stop]
        specs = call.loss.all_tensors
        return dataclasses.replace(
            call,
            options=dataclasses.replace(call.options, reduction="none"),
            input=call.input[start:stop],
            target=call.target[start:stop],
            grad_output=grad_output if call.grads else None,
            tensors={
                name: tensor[start:stop] if specs[name].per_row else tensor
                for name, tensor in call.tensors.items()
            },
        )

    def block_loss_shape(self) -> tuple[int, ...]:
        return loss_shape(self.call, "none")

    def reduce(self, total: float) -> np.ndarray | torch.Tensor:
        """The loss of a reduced call from the float64 sum of all its per-sample losses."""
        with np.errstate(divide="ignore", invalid="ignore"):
            value = np.asarray(np.float64(total) / np.float64(self.denominator))
        return as_result(value, torch.float64, self.loss_dtype)


def block_plan(call: LossCall[Any]) -> BlockPlan | None:
    """The plan for a prepared call whose small tensors are complete, or None if it cannot be split
    (a single sample, a 1-D classification input, a call that only computes alone: see
    `lossd.server.engine.merging.merge_key`)."""
    loss, rows = call.loss, call.loss.rows
    if rows is None or not rows.splittable(call):
        return None
    samples = call.input.shape[0]
    if samples < 2 or merge_key(call) is None:
        return None
    targets = rows.target_rows(host_array(call.target), call)
    denominator = float(denominators([call], [rows.count(call)], rows, targets)[0])
    return BlockPlan(
        call=call,
        samples=samples,
        sample_bytes=math.prod(call.input.shape[1:]) * call.input.element_size(),
        denominator=denominator,
        loss_dtype=loss.loss_dtype(call),
        loss_shape=loss_shape(call),
    )
