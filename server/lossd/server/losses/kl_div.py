"""`torch.nn.functional.kl_div`: the pointwise KL divergence of a target distribution from
log-probabilities, with `log_target` and the 'batchmean' reduction; the operands broadcast."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from lossd.server.losses.base import LossCall, LossOptions, Rows, TensorSpec, elementwise_flops
from lossd.server.losses.checks import broadcast_shape, invalid_argument, require_floating
from lossd.server.losses.classes import flat_function, layout_copy_bytes, resolve_class_dim
from lossd.server.losses.functional import FunctionalLoss, LossFunction
from lossd.wire.errors import ResourceExhaustedError

if TYPE_CHECKING:
    from lossd.wire.codec import TensorLimits

__all__ = ["KL_DIV", "KlDivLoss", "KlDivOptions"]


@dataclass(frozen=True)
class KlDivOptions(LossOptions):
    log_target: bool = False
    class_dim: int | None = None
    """None: torch's kl_div as it is. Otherwise, once checked, -1 or a non-negative index (see
    `lossd.server.losses.classes.resolve_class_dim`): the dimension each distribution lies along."""


Call = LossCall[KlDivOptions]


class KlDivLoss(FunctionalLoss[KlDivOptions]):
    """Input: log-probabilities of any shape; target: probabilities (log-probabilities with
    `log_target`) that broadcast with it. Differentiable with respect to both; every element is a
    row of its own."""

    name = "kl_div"
    options_type = KlDivOptions
    reductions: ClassVar[tuple[str, ...]] = ("none", "mean", "sum", "batchmean")
    target: ClassVar[TensorSpec] = TensorSpec("target", shape=(-1, -1), differentiable=True)

    def check(self, call: Call, limits: TensorLimits | None) -> Call:
        require_floating(call.target, "target", "kl_div targets")
        given = call.options.class_dim
        if given is not None:
            field = f"{self.name}.class_dim"
            if call.target.shape != call.input.shape:
                raise invalid_argument(
                    f"{field} is {given}, which views input and target as rows of distributions: they "
                    f"must have one shape (input.shape {list(call.input.shape)}, target.shape "
                    f"{list(call.target.shape)}); leave it unset to broadcast as torch does",
                    "TARGET_SHAPE_MISMATCH",
                    "target.shape",
                    targetShape=list(call.target.shape),
                    inputShape=list(call.input.shape),
                )
            resolved = resolve_class_dim(given, tuple(call.input.shape), field)
            if resolved is None:  # classes on dim 1 (or a 1-D input): flattened all the same
                resolved = 1 if call.input.dim() >= 2 else -1
            if call.input.dim() == 2 and resolved == 1:
                resolved = -1
            call = dataclasses.replace(call, options=dataclasses.replace(call.options, class_dim=resolved))
        broadcast = broadcast_shape(call.input.shape, call.target.shape)
        if broadcast is None:
            raise invalid_argument(
                f"target.shape {list(call.target.shape)} does not broadcast with input.shape "
                f"{list(call.input.shape)}",
                "TARGET_SHAPE_MISMATCH",
                "target.shape",
                targetShape=list(call.target.shape),
                inputShape=list(call.input.shape),
            )
        # A few bytes can broadcast to terabytes: the loss computed over the broadcast shape is a
        # tensor too, held to the same limits before anything is allocated.
        elements = math.prod(broadcast)
        nbytes = elements * max(call.input.element_size(), call.target.element_size())
        if limits is not None and (elements > limits.max_elements or nbytes > limits.max_bytes):
            raise ResourceExhaustedError(
                f"input.shape {list(call.input.shape)} and target.shape {list(call.target.shape)} "
                f"broadcast to {list(broadcast)}: {elements} elements ({nbytes} bytes) to compute; this "
                f"server accepts at most {limits.max_elements} elements and {limits.max_bytes} bytes per "
                "tensor",
                reason="TENSOR_TOO_LARGE",
                field="target.shape",
                metadata={
                    "shape": str(list(broadcast)),
                    "elements": str(elements),
                    "bytes": str(nbytes),
                    "maxElements": str(limits.max_elements),
                    "maxBytes": str(limits.max_bytes),
                },
            )
        return call

    def loss_shape(self, call: Call, reduction: str) -> tuple[int, ...]:
        if reduction != "none":
            return ()
        broadcast = broadcast_shape(call.input.shape, call.target.shape)
        assert broadcast is not None, "validate() admits only broadcastable shapes"
        return broadcast

    def loss_dtype(self, call: Call) -> torch.dtype:
        return torch.promote_types(call.input.dtype, call.target.dtype)

    def function(self, options: KlDivOptions, reduction: str) -> LossFunction:
        log_target = options.log_target

        def kl_div(x: torch.Tensor, t: torch.Tensor, _: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return F.kl_div(x, t, reduction=reduction, log_target=log_target)

        return flat_function(kl_div, options.class_dim, reduction, True)

    def scratch_bytes(self, call: Call) -> int:
        return super().scratch_bytes(call) + layout_copy_bytes(call)

    def flops(self, call: Call) -> float:
        """target x (log target - input) on each element."""
        return elementwise_flops(call, 3.0)

    def temporaries(self, call: Call) -> int:
        """The per-element losses; and their gradients, or a 'none' loss's copy."""
        return 2 if call.grads or call.reduction == "none" else 1

    def example(self) -> Call:
        logits = torch.randn(4, 3)
        return LossCall(
            self.make_options("batchmean"),
            torch.log_softmax(logits, 1),
            torch.softmax(logits, 1),
            grads=frozenset({"input", "target"}),
        )

    @property
    def rows(self) -> Rows[KlDivOptions]:
        return _ROWS


class ElementRows(Rows[KlDivOptions]):
    """Every element is a row of its own (input and target of one shape; a broadcast computes alone)."""

    def params(self, call: Call) -> Hashable | None:
        if call.target.shape != call.input.shape:
            return None  # a broadcast: only alone
        if call.options.class_dim not in (None, -1):
            return None  # a distribution along another dimension than the last: alone
        if call.input.dtype == torch.float16 and call.reduction == "batchmean":
            return None  # torch sums in float16 before it divides: alone, the call gets torch's inf
        return (call.options.log_target,)

    def count(self, call: Call) -> int:
        return call.input.numel()

    def input_rows(self, array: np.ndarray, call: Call) -> np.ndarray:
        return array.reshape(-1)

    def target_rows(self, array: np.ndarray, call: Call) -> np.ndarray:
        return array.reshape(-1)

    def from_rows(self, rows: np.ndarray, shape: Sequence[int], call: Call) -> np.ndarray:
        return rows.reshape(shape)

    def mean_divisors(self, calls: Sequence[Call], counts: Sequence[int], targets: np.ndarray) -> np.ndarray:
        """torch's 'mean' divides by every element."""
        return np.asarray(counts, dtype=np.float64)

    def splittable(self, call: Call) -> bool:
        return call.input.dim() >= 1 and call.target.shape == call.input.shape and call.options.class_dim != 0

    def batch_divisor(self, call: Call) -> float:
        """With a class dimension: the number of distributions (rows), as torch on the flattened
        tensors; without, torch's input.shape[0]."""
        class_dim = call.options.class_dim
        if class_dim is None:
            return super().batch_divisor(call)
        classes = call.input.shape[class_dim] if call.input.dim() else 1
        return float(call.input.numel() // classes) if classes else 0.0


_ROWS: ElementRows = ElementRows()

KL_DIV = KlDivLoss()
