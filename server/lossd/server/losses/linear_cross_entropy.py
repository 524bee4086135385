"""Fused linear cross-entropy: hidden states in, `cross_entropy(softcap(h @ W.T + b), y)` out, the
logits never materialized whole.

At language-model scale the logits are the whole cost (8 x 4096 tokens x 128256 words is 8.4 GB in
bfloat16, the hidden states that make them 31x less); the classifier weight is the same on every call
and can be a resident tensor. Computed in chunks of tokens, each chunk's logits, loss and gradient
alone, so a call holds its hidden states, its gradient and one chunk's (chunk x V) temporaries, as
Liger Kernel's fused linear cross-entropy and cut-cross-entropy do inside one process. Options are
cross_entropy's plus `softcap` (Gemma 2), a z-loss (`lse_square_scale`) and the per-token log-sum-exp.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from lossd.server.losses.base import Computed, Loss, LossCall, LossOptions, OipTensor, Upload
from lossd.server.losses.checks import dtype_name, invalid_argument, out_of_range, require_floating
from lossd.server.losses.distillation import CHUNK_ELEMENTS, compute_dtype

if TYPE_CHECKING:
    from lossd.wire.codec import TensorLimits

__all__ = ["LINEAR_CROSS_ENTROPY", "LinearCrossEntropyLoss", "LinearCrossEntropyOptions"]

_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)


@dataclass(frozen=True)
class LinearCrossEntropyOptions(LossOptions):
    ignore_index: int = -100
    label_smoothing: float = 0.0
    softcap: float = 0.0
    lse_square_scale: float = 0.0
    return_lse: bool = False


def _token_losses(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    classifier: torch.Tensor,
    bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    options: LinearCrossEntropyOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (loss, log-sum-exp) of a chunk of hidden states (n, H)."""
    logits = hidden.to(classifier.dtype) @ classifier.T
    if bias is not None:
        logits = logits + bias
    if options.softcap > 0.0:
        logits = options.softcap * torch.tanh(logits / options.softcap)
    loss = F.cross_entropy(
        logits,
        targets,
        weight=weight,
        ignore_index=options.ignore_index,
        label_smoothing=options.label_smoothing,
        reduction="none",
    )
    lse = torch.logsumexp(logits, -1)
    if options.lse_square_scale != 0.0:
        z_loss = options.lse_square_scale * lse.square()
        loss = loss + z_loss.masked_fill(targets == options.ignore_index, 0.0)
    return loss, lse


class LinearCrossEntropyLoss(Loss):
    """Input: hidden states (..., H). Target: class indices (...). Tokens are the rows."""

    name: ClassVar[str] = "linear_cross_entropy"
    tensors: ClassVar[tuple[str, ...]] = ("classifier", "bias", "weight")
    parts: ClassVar[tuple[str, ...]] = ("lse",)
    parameters: ClassVar[Mapping[str, type]] = {
        "ignore_index": int,
        "label_smoothing": float,
        "softcap": float,
        "lse_square_scale": float,
        "return_lse": bool,
    }
    options_type: ClassVar[type[LossOptions]] = LinearCrossEntropyOptions
    target_gradient: ClassVar[bool] = False
    oip_target: ClassVar[OipTensor] = OipTensor("target", "INT64", (-1,))

    def options(self, message: Any, reduction: str) -> LossOptions:
        values = {name: getattr(message, name) for name in self.parameters if name != "ignore_index"}
        if message.HasField("ignore_index"):
            values["ignore_index"] = message.ignore_index
        return self.make_options(reduction, **values)

    # -- rules ----------------------------------------------------------------------------------

    def validate(self, call: LossCall, limits: TensorLimits | None) -> LossCall:
        options = call.options
        assert isinstance(options, LinearCrossEntropyOptions)
        for name, rule in (("softcap", "finite and >= 0"), ("lse_square_scale", "finite and >= 0")):
            value = getattr(options, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise invalid_argument(
                    f"linear_cross_entropy.{name} is {value}; it must be {rule}",
                    "OPTION_INVALID",
                    f"linear_cross_entropy.{name}",
                    value=value,
                )
        if not 0.0 <= options.label_smoothing <= 1.0:
            raise invalid_argument(
                f"linear_cross_entropy.label_smoothing is {options.label_smoothing}; it must be in [0, 1]",
                "LABEL_SMOOTHING_OUT_OF_RANGE",
                "linear_cross_entropy.label_smoothing",
                value=options.label_smoothing,
            )
        hidden, targets = call.input, call.target
        if hidden.dim() == 0:
            raise invalid_argument(
                "input.shape is []; linear_cross_entropy needs hidden states (..., H)",
                "SHAPE_INVALID",
                "input.shape",
                inputShape=[],
            )
        classifier = call.tensors.get("classifier")
        field = "linear_cross_entropy.classifier"
        if classifier is None:
            raise invalid_argument(f"{field} is missing: the (V, H) weight", "FIELD_MISSING", field)
        require_floating(classifier, field, "the classifier")
        size = hidden.shape[-1]
        if classifier.dim() != 2 or classifier.shape[1] != size or classifier.shape[0] == 0:
            raise invalid_argument(
                f"{field}.shape is {list(classifier.shape)}; it must be [V, {size}] (V >= 1) for hidden "
                f"states of size {size} (input.shape {list(hidden.shape)})",
                "CLASSIFIER_SHAPE_MISMATCH",
                f"{field}.shape",
                classifierShape=list(classifier.shape),
                inputShape=list(hidden.shape),
            )
        classes = classifier.shape[0]
        for name in ("bias", "weight"):
            tensor = call.tensors.get(name)
            if tensor is None:
                continue
            require_floating(tensor, f"linear_cross_entropy.{name}", f"the {name}")
            if tuple(tensor.shape) != (classes,):
                raise invalid_argument(
                    f"linear_cross_entropy.{name}.shape is {list(tensor.shape)}; it must be [{classes}], one "
                    "per class",
                    "WEIGHT_SHAPE_MISMATCH",
                    f"linear_cross_entropy.{name}.shape",
                    shape=list(tensor.shape),
                    classes=classes,
                )
        if targets.dtype not in _INDEX_DTYPES:
            raise invalid_argument(
                f"target.dtype is {dtype_name(targets.dtype)}; class indices must be int64, int32 or uint8",
                "DTYPE_NOT_SUPPORTED",
                "target.dtype",
                dtype=dtype_name(targets.dtype),
            )
        lead = tuple(hidden.shape[:-1])
        if tuple(targets.shape) != lead:
            raise invalid_argument(
                f"target.shape is {list(targets.shape)}; it must be {list(lead)}, one class per token "
                f"(input.shape {list(hidden.shape)})",
                "TARGET_SHAPE_MISMATCH",
                "target.shape",
                targetShape=list(targets.shape),
                inputShape=list(hidden.shape),
            )
        wide = targets if targets.dtype == torch.int64 else targets.to(torch.int64)
        if wide.device.type != "meta":
            values = wide.numpy()
            found = out_of_range(values, classes, values == options.ignore_index)
            if found is not None:
                position, value, count = found
                raise invalid_argument(
                    f"target{position} is {value}, outside [0, {classes}) for {classes} classes and not "
                    f"ignore_index ({options.ignore_index}); {count} target(s) are out of range",
                    "TARGET_OUT_OF_RANGE",
                    "target",
                    value=value,
                    index=position,
                    classes=classes,
                    ignoreIndex=options.ignore_index,
                    count=count,
                )
        return dataclasses.replace(call, target=wide)

    def loss_shape(self, call: LossCall, reduction: str) -> tuple[int, ...]:
        return tuple(call.input.shape[:-1]) if reduction == "none" else ()

    def loss_dtype(self, call: LossCall) -> torch.dtype:
        return compute_dtype(call.input.dtype)

    # -- computation ----------------------------------------------------------------------------

    def temporaries(self, call: LossCall) -> int:
        return 0

    def scratch_bytes(self, call: LossCall) -> int:
        """About six float32 (float64) temporaries of one chunk's logits, and the per-token vectors."""
        classifier = call.tensors.get("classifier")
        classes = classifier.shape[0] if classifier is not None and classifier.dim() else 1
        itemsize = compute_dtype(call.input.dtype).itemsize
        tokens = self.rows_of(call)
        chunk = min(tokens, max(1, CHUNK_ELEMENTS // classes)) * classes
        weights = classifier.numel() * itemsize if classifier is not None else 0
        return 6 * chunk * itemsize + 4 * itemsize * tokens + weights

    def example(self) -> LossCall:
        tensors = {"classifier": torch.randn(5, 3), "bias": torch.randn(5)}
        options = self.make_options("mean", softcap=30.0, lse_square_scale=1e-4, return_lse=True)
        targets = torch.tensor([0, 1, 4, 2])
        return LossCall(options, torch.randn(4, 3), targets, input_grad=True, tensors=tensors)

    def compute(self, call: LossCall, upload: Upload) -> Computed:
        options = call.options
        assert isinstance(options, LinearCrossEntropyOptions)
        dtype = compute_dtype(call.input.dtype)
        size = call.input.shape[-1]
        tokens = self.rows_of(call)
        hidden = upload(call.input).reshape(tokens, size)
        targets = upload(call.target).reshape(tokens)
        classifier = upload(call.tensors["classifier"]).to(dtype)
        bias = call.tensors.get("bias")
        bias = None if bias is None else upload(bias).to(dtype)
        weight = call.tensors.get("weight")
        weight = None if weight is None else upload(weight).to(dtype)
        device = hidden.device
        counted = targets != options.ignore_index
        divisor: torch.Tensor | None = None
        if call.reduction == "mean":  # torch's: the summed class weights of the counted tokens
            if weight is None:
                divisor = counted.sum().to(dtype)
            else:
                divisor = weight[torch.where(counted, targets, 0)].masked_fill(~counted, 0.0).sum()
        grad = torch.empty_like(hidden) if call.input_grad else None
        upstream = None
        if grad is not None:
            upstream = (
                torch.ones((), dtype=dtype, device=device)
                if call.grad_output is None
                else upload(call.grad_output).to(dtype)
            )
            if call.reduction == "none":
                upstream = upstream.expand(call.input.shape[:-1]).reshape(tokens)
            elif divisor is not None:
                upstream = upstream / divisor
        none = call.reduction == "none"
        losses = torch.empty(tokens, dtype=dtype, device=device) if none else None
        lse = torch.empty(tokens, dtype=dtype, device=device) if options.return_lse else None
        total = torch.zeros((), dtype=torch.float64, device=device)
        step = max(1, CHUNK_ELEMENTS // classifier.shape[0])
        for start in range(0, tokens, step):
            chunk = slice(start, min(tokens, start + step))
            leaf = hidden[chunk].detach().requires_grad_(grad is not None)
            with torch.enable_grad() if grad is not None else torch.no_grad():
                loss, chunk_lse = _token_losses(leaf, targets[chunk], classifier, bias, weight, options)
                if grad is not None:
                    assert upstream is not None
                    weights = upstream[chunk] if none else upstream.expand(loss.shape)
                    (grad[chunk],) = torch.autograd.grad(loss, leaf, weights)
            if losses is not None:
                losses[chunk] = loss.detach()
            else:
                total += loss.detach().sum(dtype=torch.float64)
            if lse is not None:
                lse[chunk] = chunk_lse.detach()
        lead = call.input.shape[:-1]
        if losses is not None:
            result = losses.reshape(lead)
        else:
            result = (total if divisor is None else total / divisor).to(dtype)
        parts = {} if lse is None else {"lse": lse.reshape(lead)}
        return Computed(result, [] if grad is None else [grad.reshape(call.input.shape)], parts)

    # -- rows: computed alone -------------------------------------------------------------------

    def merge_params(self, call: LossCall) -> Hashable | None:
        return None  # large calls with a weight of their own: alone

    def rows_of(self, call: LossCall) -> int:
        return math.prod(call.input.shape[:-1]) if call.input.dim() else 1

    def input_rows(self, array: np.ndarray, call: LossCall) -> np.ndarray:
        return array.reshape(-1, call.input.shape[-1])

    def target_rows(self, array: np.ndarray, call: LossCall) -> np.ndarray:
        return array.reshape(-1)

    def from_rows(self, rows: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        return rows.reshape(shape)

    def splittable(self, call: LossCall) -> bool:
        return False


LINEAR_CROSS_ENTROPY = LinearCrossEntropyLoss()
