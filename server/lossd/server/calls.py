"""The loss engine's plain-Python vocabulary: what to compute, and what comes back.

Free of gRPC and protobuf: the servicer translates `lossd.v1` messages into these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["REDUCTIONS", "LossCall", "LossKind", "LossOptions", "LossOutput"]

REDUCTIONS = ("none", "mean", "sum", "batchmean")
"""torch's reduction names; 'batchmean' is kl_div's alone."""


class LossKind(enum.Enum):
    """The losses lossd computes; each value is the torch.nn.functional name and the proto field."""

    NLL = "nll_loss"
    CROSS_ENTROPY = "cross_entropy"
    KL_DIV = "kl_div"


@dataclass(frozen=True)
class LossOptions:
    """The non-tensor arguments of one loss, with torch's defaults."""

    kind: LossKind
    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    log_target: bool = False


@dataclass(frozen=True)
class LossCall:
    """One loss computation: `F.<kind>(input, target, weight=..., **options)` and what to return.

    Tensors are on the CPU as decoded from the request; the engine moves them to its device.
    `grad_output` is the upstream gradient (None: ones); `grad_dtype` the dtype of the returned
    gradients (None: each tensor's own).
    """

    options: LossOptions
    input: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None
    input_grad: bool = False
    target_grad: bool = False
    grad_dtype: torch.dtype | None = None
    grad_output: torch.Tensor | None = None


@dataclass(frozen=True)
class LossOutput:
    """The loss and the gradients asked for, on the host: torch tensors, or numpy arrays where the
    merged path produced them (any dtype but bfloat16). `nonfinite` names the request fields that
    held NaN or infinity (computed with, as torch does, and counted)."""

    loss: torch.Tensor | np.ndarray
    input_grad: torch.Tensor | np.ndarray | None = None
    target_grad: torch.Tensor | np.ndarray | None = None
    nonfinite: tuple[str, ...] = ()
