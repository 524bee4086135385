"""A linear head, `hidden @ classifier.T + bias`, as the fused linear losses take it: its tensors,
the rules for them, its logits for a chunk of tokens and the memory it holds."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lossd.server.losses.base import GRADIENT_FACTOR, LossCall, TensorSpec, compute_dtype, rows_of_tokens
from lossd.server.losses.checks import invalid_argument, require_floating

__all__ = ["HEAD", "check_head", "head_bytes", "head_flops", "head_logits", "resident_head_bytes"]

HEAD = (
    TensorSpec("classifier", shape=(-1, -1), differentiable=True),
    TensorSpec("bias", differentiable=True),
)
"""A trainable head's tensors: its weight (V, H) and optional bias (V)."""


def check_head(
    tensors: Mapping[str, torch.Tensor],
    hidden: torch.Tensor,
    loss: str,
    classifier: str = "classifier",
    bias: str = "bias",
    hidden_field: str = "input",
) -> int:
    """Checks the head that turns `hidden` (..., H) into logits: `classifier` (V, H) required,
    `bias` (V) optional, both floating; returns V."""
    if hidden.dim() == 0:
        raise invalid_argument(
            f"{hidden_field}.shape is []; {loss} needs hidden states (..., H)",
            "SHAPE_INVALID",
            f"{hidden_field}.shape",
            shape=[],
        )
    field = f"{loss}.{classifier}"
    weight = tensors.get(classifier)
    if weight is None:
        raise invalid_argument(f"{field} is missing: the (V, H) weight", "FIELD_MISSING", field)
    require_floating(weight, field, "the classifier")
    size = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != size or weight.shape[0] == 0:
        raise invalid_argument(
            f"{field}.shape is {list(weight.shape)}; it must be [V, {size}] (V >= 1) for hidden states "
            f"of size {size} ({hidden_field}.shape {list(hidden.shape)})",
            "CLASSIFIER_SHAPE_MISMATCH",
            f"{field}.shape",
            classifierShape=list(weight.shape),
            hiddenShape=list(hidden.shape),
        )
    classes = weight.shape[0]
    offset = tensors.get(bias)
    if offset is not None:
        require_floating(offset, f"{loss}.{bias}", "the bias")
        if tuple(offset.shape) != (classes,):
            raise invalid_argument(
                f"{loss}.{bias}.shape is {list(offset.shape)}; it must be [{classes}], one per class",
                "WEIGHT_SHAPE_MISMATCH",
                f"{loss}.{bias}.shape",
                shape=list(offset.shape),
                classes=classes,
            )
    return classes


def head_logits(hidden: torch.Tensor, classifier: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`hidden @ classifier.T + bias` in the classifier's dtype (the compute dtype)."""
    logits = hidden.to(classifier.dtype) @ classifier.T
    return logits if bias is None else logits + bias


def _copied(call: LossCall[Any], name: str, dtype: torch.dtype) -> bool:
    """Whether computing makes a copy of head `name`: a resident one only to change its dtype (it is
    held on the device already), a request's one always (its upload, or its cast)."""
    return name not in call.resident or call.tensors[name].dtype != dtype


def head_bytes(call: LossCall[Any], names: Iterable[str]) -> int:
    """The copies of the heads `names` (those the call has) in the compute dtype, and twice each
    gradient asked for of a tensor every token uses (its sum and the chunk's part)."""
    dtype = compute_dtype(call.input.dtype)
    held = sum(
        call.tensors[name].numel() for name in names if name in call.tensors and _copied(call, name, dtype)
    )
    grads = sum(call.tensors[name].numel() for name in call.grads if name in call.tensors)
    return (held + 2 * grads) * dtype.itemsize


def resident_head_bytes(call: LossCall[Any], names: Iterable[str]) -> int:
    """The part of `head_bytes` that copies resident heads (to cast them)."""
    dtype = compute_dtype(call.input.dtype)
    return dtype.itemsize * sum(
        call.tensors[name].numel()
        for name in names
        if name in call.resident and name in call.tensors and _copied(call, name, dtype)
    )


def head_flops(call: LossCall[Any], hidden: torch.Tensor, classifier: str, backward: bool) -> float:
    """A head's matrix product over every token: tokens x V x H x 2, three times with a backward,
    plus the softmax's few operations on each of the tokens x V logits."""
    head = call.tensors.get(classifier)
    if head is None or head.dim() != 2:
        return 0.0
    logits = rows_of_tokens(hidden.shape) * head.shape[0]
    return logits * head.shape[1] * 2.0 * (GRADIENT_FACTOR if backward else 1.0) + 10.0 * logits
