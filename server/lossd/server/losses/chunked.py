"""Losses over rows of tokens computed a chunk of tokens at a time: each chunk's values and gradients
alone, so that a call holds its inputs, its gradients and one chunk's temporaries, never several
float32 copies of tokens x V.

The distillation loss and the fused linear losses share this loop. Each token's values and
gradient are those of the whole computation; a reduced loss sums the chunks' sums in float64, and
the gradient of a tensor every token uses (a classifier) sums the chunks' gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Sequence as Shape
from dataclasses import dataclass

import numpy as np
import torch

from lossd.server.losses.base import Loss, LossCall, Upload

__all__ = ["Chunked", "PerToken", "TokenLoss", "compute_dtype", "run_chunks", "upstream_gradient"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 and bfloat16 are computed (and the loss returned) in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class TokenLoss(Loss):
    """A loss over tokens: the input's last dimension is a token's (logits, hidden states), every
    other is a token; one loss per token for 'none', computed in float32 at least, in chunks of
    tokens whose temporaries `scratch_bytes` counts."""

    def loss_shape(self, call: LossCall, reduction: str) -> tuple[int, ...]:
        return tuple(call.input.shape[:-1]) if reduction == "none" else ()

    def loss_dtype(self, call: LossCall) -> torch.dtype:
        return compute_dtype(call.input.dtype)

    def temporaries(self, call: LossCall) -> int:
        return 0  # bounded by the chunk, not the input: see `scratch_bytes`

    def rows_of(self, call: LossCall) -> int:
        return math.prod(call.input.shape[:-1]) if call.input.dim() else 1

    def input_rows(self, array: np.ndarray, call: LossCall) -> np.ndarray:
        return array.reshape(-1, call.input.shape[-1])

    def from_rows(self, rows: np.ndarray, shape: Shape[int]) -> np.ndarray:
        return rows.reshape(shape)


PerToken = Callable[[slice, torch.Tensor, Mapping[str, torch.Tensor]], Sequence[torch.Tensor]]
"""`per_token(rows, leaf, tensors)`: the per-token values of a chunk of rows (the total first, then
its parts), from `leaf`, the chunk's differentiated rows, and the whole tensors being
differentiated, by name."""


def upstream_gradient(
    call: LossCall, upload: Upload, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """The upstream gradient of a token loss's call as `run_chunks` takes it: None when no gradient
    is asked for, one per token for 'none', else 0-d (ones where the call gives none)."""
    if not (call.input_grad or call.tensor_grads):
        return None
    if call.grad_output is None:
        upstream = torch.ones((), dtype=dtype, device=device)
    else:
        upstream = upload(call.grad_output).to(dtype)
    if call.reduction == "none":
        upstream = upstream.expand(call.input.shape[:-1]).reshape(-1)
    return upstream


@dataclass(frozen=True)
class Chunked:
    """The results of a chunked computation on the device: each value reduced (0-d) or per token
    (tokens,), the rows' gradient (or None), and each differentiated tensor's gradient."""

    values: list[torch.Tensor]
    grad: torch.Tensor | None
    tensor_grads: dict[str, torch.Tensor]
    kept: list[torch.Tensor]


def run_chunks(
    rows: torch.Tensor,
    per_token: PerToken,
    *,
    outputs: int,
    step: int,
    dtype: torch.dtype,
    reduction: str,
    input_grad: bool,
    tensors: Mapping[str, torch.Tensor] | None = None,
    upstream: torch.Tensor | None = None,
    divisor: torch.Tensor | float | None = None,
    kept: int = 0,
) -> Chunked:
    """Runs `per_token` over chunks of `step` rows of `rows` (tokens, ...).

    `reduction` 'none' keeps one value per token, else sums (divided by `divisor`, if any: 'mean').
    With `input_grad` the gradient w.r.t. `rows` is returned, and that w.r.t. each of `tensors`;
    `upstream` is the upstream gradient, (tokens,) for 'none', 0-d otherwise.
    """
    tokens = rows.shape[0]
    device = rows.device
    leaves = {name: tensor.detach().requires_grad_(True) for name, tensor in (tensors or {}).items()}
    wanted = input_grad or bool(leaves)
    grad = torch.empty_like(rows) if input_grad else None
    sums_of = {name: torch.zeros_like(leaf) for name, leaf in leaves.items()}
    none = reduction == "none"
    per = [torch.empty(tokens, dtype=dtype, device=device) for _ in range(outputs)] if none else None
    sums = torch.zeros(outputs, dtype=torch.float64, device=device)
    keep = [torch.empty(tokens, dtype=dtype, device=device) for _ in range(kept)]
    weights_all = None
    if wanted:
        assert upstream is not None
        weights_all = upstream if none or divisor is None else upstream / divisor
    for start in range(0, tokens, step):
        chunk = slice(start, min(tokens, start + step))
        leaf = rows[chunk].detach().requires_grad_(input_grad)
        with torch.enable_grad() if wanted else torch.no_grad():
            values = per_token(chunk, leaf, leaves)
            if wanted:
                assert weights_all is not None
                weights = weights_all[chunk] if none else weights_all.expand(values[0].shape)
                inputs = [leaf] if input_grad else []
                found = torch.autograd.grad(
                    values[0], [*inputs, *leaves.values()], weights, allow_unused=True
                )
                if grad is not None:
                    grad[chunk] = found[0] if found[0] is not None else 0.0
                for name, part in zip(leaves, found[len(inputs) :], strict=True):
                    if part is not None:
                        sums_of[name] += part
        for out, value in zip(keep, values[outputs:], strict=True):
            out[chunk] = value.detach()
        if per is not None:
            for out, value in zip(per, values[:outputs], strict=True):
                out[chunk] = value.detach()
        else:
            sums += torch.stack([value.detach().sum(dtype=torch.float64) for value in values[:outputs]])
    if per is not None:
        results = per
    else:
        reduced = sums if divisor is None else sums / divisor
        results = list(reduced.to(dtype).unbind())
    return Chunked(results, grad, sums_of, keep)
