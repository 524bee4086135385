"""`torch.nn.functional.cross_entropy`: log-softmax and NLL in one, with class-index or
class-probability targets and label smoothing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F

from lossd.server.losses.base import LossCall, TensorSpec, elementwise_flops
from lossd.server.losses.checks import invalid_argument, require_floating
from lossd.server.losses.classes import ClassificationLoss, ClassOptions
from lossd.server.losses.functional import LossFunction

if TYPE_CHECKING:
    from lossd.wire.codec import TensorLimits

__all__ = ["CROSS_ENTROPY", "CrossEntropyLoss", "CrossEntropyOptions"]


@dataclass(frozen=True)
class CrossEntropyOptions(ClassOptions):
    label_smoothing: float = 0.0


Call = LossCall[CrossEntropyOptions]


class CrossEntropyLoss(ClassificationLoss[CrossEntropyOptions]):
    """Input: unnormalized logits (C), (N, C) or (N, C, d1..dk); target: class indices, or class
    probabilities when `target.shape == input.shape` (torch's rule), which also have a gradient.

    A negative label_smoothing is refused (torch silently treats it as 0)."""

    name = "cross_entropy"
    options_type = CrossEntropyOptions
    target: ClassVar[TensorSpec] = TensorSpec("target", "indices", differentiable=True)

    def probabilities(self, call: Call) -> bool:
        return call.target.shape == call.input.shape

    def check(self, call: Call, limits: TensorLimits | None) -> Call:
        call = self.check_input(call)
        options = call.options
        smoothing, field = options.label_smoothing, f"{self.name}.label_smoothing"
        if not (math.isfinite(smoothing) and 0.0 <= smoothing <= 1.0):
            raise invalid_argument(
                f"{field} is {smoothing}; it must be in [0.0, 1.0]",
                "LABEL_SMOOTHING_OUT_OF_RANGE",
                field,
                labelSmoothing=smoothing,
            )
        if self.probabilities(call):
            require_floating(call.target, "target", "class-probability targets (target.shape == input.shape)")
            if options.ignore_index >= 0:
                raise invalid_argument(
                    f"{self.name}.ignore_index is {options.ignore_index}; with class-probability "
                    "targets torch allows only a negative ignore_index (it is not applied)",
                    "IGNORE_INDEX_NOT_SUPPORTED",
                    f"{self.name}.ignore_index",
                    ignoreIndex=options.ignore_index,
                )
        return self.check_classes(call)

    def torch_function(self, options: CrossEntropyOptions, reduction: str) -> LossFunction:
        ignore_index, smoothing = options.ignore_index, options.label_smoothing
        return lambda x, t, tensors: F.cross_entropy(
            x,
            t,
            weight=tensors.get("weight"),
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=smoothing,
        )

    def temporaries(self, call: Call) -> int:
        """Log-probabilities and softmax; one more with label smoothing."""
        return 2 + (call.options.label_smoothing > 0)

    def flops(self, call: Call) -> float:
        """A log-softmax (a max, an exp, a sum, a log and a subtraction) over each logit."""
        return elementwise_flops(call, 5.0 + 2.0 * (call.options.label_smoothing > 0))

    def float16_partial_sum(self, call: Call) -> bool:
        """The label-smoothing term and probability-target 'mean' sum in float16 before scaling."""
        return call.options.label_smoothing > 0 or self.probabilities(call)


CROSS_ENTROPY = CrossEntropyLoss()
