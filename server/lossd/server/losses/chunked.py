"""The base of the losses over tokens computed a chunk of tokens at a time (`distillation`,
`linear_cross_entropy`, `linear_distillation`): each chunk's values and gradients alone, so that a
call holds its inputs, its gradients and one chunk's temporaries, never several float32 copies of
tokens x V.

The base owns the chunk size, the loop, the upstream gradient, the mean's divisor applied and the
sums; a loss gives its device tensors (`prepare`), its per-chunk math (`per_chunk`), what its mean
divides by (`mean_divisor`) and the width of its temporaries. Each chunk's values are summed as
torch sums them (in the compute dtype), the chunks' sums in float64, divided once and rounded
once: a call that fits one chunk is the plain composition of torch operations, reduction and
autograd included, bit for bit. Each token's values and gradient are those of the whole
computation; the gradient of a tensor every token uses (a classifier) sums the chunks' gradients.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch

from lossd.server.losses.base import (
    Computed,
    Loss,
    LossCall,
    LossOptions,
    Upload,
    compute_dtype,
    rows_of_tokens,
)

__all__ = ["CHUNK_ELEMENTS", "ChunkedLoss", "PerChunk", "Prepared", "as_divisor"]

CHUNK_ELEMENTS = 1 << 21
"""Values per token times tokens per chunk: 8 MiB per float32 temporary of a chunk."""

PER_TOKEN_VECTORS = 8
"""Per-token vectors (losses, outputs, masks) a call holds in the compute dtype besides the chunk."""

OptionsT = TypeVar("OptionsT", bound=LossOptions)


@dataclass
class Prepared:
    """A call's tensors on the device: `rows` one per token (first dimension; the input's as
    "input"), `whole` used by every token (a classifier, class weights)."""

    rows: dict[str, torch.Tensor]
    whole: dict[str, torch.Tensor] = field(default_factory=dict)


PerChunk = Callable[
    [object, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]],
    tuple[torch.Tensor, Mapping[str, torch.Tensor]],
]
"""`per_chunk(options, rows, whole)`: a chunk's per-token loss and its outputs by name, from the
chunk's rows and the whole tensors (those being differentiated are leaves)."""


def as_divisor(value: float, dtype: torch.dtype) -> float:
    """A divisor given as a number, as torch divides a `dtype` tensor by it (rounded to `dtype`)."""
    return float(torch.tensor(value, dtype=dtype)) if dtype != torch.float64 else value


class ChunkedLoss(Loss[OptionsT]):
    """A loss over tokens: the input's last dimension is a token's (logits, hidden states), every
    other is a token; one loss per token for 'none', computed in float32 at least."""

    temporaries: ClassVar[int]
    """How many compute-dtype temporaries of a chunk's width one chunk holds at once."""

    @abc.abstractmethod
    def width(self, call: LossCall[OptionsT]) -> int:
        """A token's values in the chunk's largest temporaries (its vocabulary)."""

    @abc.abstractmethod
    def prepare(self, call: LossCall[OptionsT], upload: Upload, dtype: torch.dtype) -> Prepared:
        """The call's tensors on the device, as the loop takes them."""

    @abc.abstractmethod
    def per_chunk(
        self, options: OptionsT, rows: Mapping[str, torch.Tensor], whole: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        """One chunk's per-token loss and outputs (see `PerChunk`)."""

    @abc.abstractmethod
    def mean_divisor(self, call: LossCall[OptionsT], prepared: Prepared) -> torch.Tensor | float:
        """What a 'mean' divides the summed loss by (a device tensor needs no synchronisation)."""

    def held_bytes(self, call: LossCall[OptionsT]) -> int:
        """Memory besides the chunk's temporaries (heads in the compute dtype, their gradients)."""
        return 0

    # -- the declarations of a token loss --------------------------------------------------------

    def loss_shape(self, call: LossCall[OptionsT], reduction: str) -> tuple[int, ...]:
        return tuple(call.input.shape[:-1]) if reduction == "none" else ()

    def loss_dtype(self, call: LossCall[OptionsT]) -> torch.dtype:
        return compute_dtype(call.input.dtype)

    def tokens(self, call: LossCall[OptionsT]) -> int:
        return rows_of_tokens(call.input.shape)

    def step(self, call: LossCall[OptionsT]) -> int:
        """Tokens per chunk."""
        return max(1, CHUNK_ELEMENTS // max(self.width(call), 1))

    def scratch_bytes(self, call: LossCall[OptionsT]) -> int:
        itemsize = compute_dtype(call.input.dtype).itemsize
        tokens = self.tokens(call)
        chunk = min(tokens, self.step(call)) * self.width(call)
        return (
            self.temporaries * chunk * itemsize
            + PER_TOKEN_VECTORS * itemsize * tokens
            + self.held_bytes(call)
        )

    # -- the loop --------------------------------------------------------------------------------

    def compute(self, call: LossCall[OptionsT], upload: Upload) -> Computed:
        return self.run(call, upload, self.per_chunk)  # type: ignore[arg-type]

    def run(self, call: LossCall[OptionsT], upload: Upload, per_chunk: PerChunk) -> Computed:
        """The computation in chunks of tokens, each chunk's by `per_chunk`."""
        dtype = compute_dtype(call.input.dtype)
        tokens = self.tokens(call)
        prepared = self.prepare(call, upload, dtype)
        rows_in = prepared.rows["input"]
        device = rows_in.device
        none = call.reduction == "none"
        reduced = [spec.name for spec in self.outputs if spec.reduced and spec.name in call.outputs]
        kept = [spec.name for spec in self.outputs if not spec.reduced and spec.name in call.outputs]
        input_grad = call.input_grad
        leaves = {
            name: prepared.whole[name].detach().requires_grad_(True) for name in call.grads if name != "input"
        }
        wanted = bool(call.grads)
        divisor = self.mean_divisor(call, prepared) if call.reduction == "mean" else None
        weights_all = None
        if wanted:
            upstream = self._upstream(call, upload, dtype, device, tokens)
            weights_all = upstream if none or divisor is None else upstream / divisor
        grad = torch.empty_like(rows_in) if input_grad else None
        sums_of = {name: torch.zeros_like(leaf) for name, leaf in leaves.items()}
        per = (
            [torch.empty(tokens, dtype=dtype, device=device) for _ in range(1 + len(reduced))] if none else []
        )
        keep = {name: torch.empty(tokens, dtype=dtype, device=device) for name in kept}
        sums = torch.zeros(1 + len(reduced), dtype=torch.float64, device=device)
        whole = {**prepared.whole, **leaves}
        for start in range(0, tokens, self.step(call)):
            chunk = slice(start, min(tokens, start + self.step(call)))
            rows = {name: tensor[chunk] for name, tensor in prepared.rows.items()}
            leaf = rows_in[chunk].detach().requires_grad_(input_grad)
            rows["input"] = leaf
            with torch.enable_grad() if wanted else torch.no_grad():
                loss, outputs = per_chunk(call.options, rows, whole)
                if weights_all is not None:
                    weights = weights_all[chunk] if none else weights_all.expand(loss.shape)
                    inputs = [leaf] if input_grad else []
                    found = torch.autograd.grad(loss, [*inputs, *leaves.values()], weights, allow_unused=True)
                    if grad is not None:
                        grad[chunk] = found[0] if found[0] is not None else 0.0
                    for name, part in zip(leaves, found[len(inputs) :], strict=True):
                        if part is not None:
                            sums_of[name] += part
            values = [loss.detach(), *(outputs[name].detach() for name in reduced)]
            if none:
                for out, value in zip(per, values, strict=True):
                    out[chunk] = value
            else:
                sums += torch.stack([value.sum() for value in values]).double()
            for name, out in keep.items():
                out[chunk] = outputs[name].detach()
        lead = call.input.shape[:-1]
        if none:
            results = [value.reshape(lead) for value in per]
        else:
            totals = sums if divisor is None else sums / divisor
            results = list(totals.to(dtype).unbind())
        grads = {} if grad is None else {"input": grad.reshape(call.input.shape)}
        grads.update(sums_of)
        named = dict(zip(reduced, results[1:], strict=True))
        named.update((name, value.reshape(lead)) for name, value in keep.items())
        return Computed(results[0], grads, named)

    @staticmethod
    def _upstream(
        call: LossCall[OptionsT], upload: Upload, dtype: torch.dtype, device: torch.device, tokens: int
    ) -> torch.Tensor:
        """The upstream gradient: one per token for 'none', else 0-d (ones where the call gives none)."""
        if call.grad_output is None:
            upstream = torch.ones((), dtype=dtype, device=device)
        else:
            upstream = upload(call.grad_output).to(dtype)
        if call.reduction == "none":
            upstream = upstream.expand(call.input.shape[:-1]).reshape(tokens)
        return upstream
