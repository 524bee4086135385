"""`torch.nn.functional.cross_entropy`: log-softmax and NLL in one, with class-index or
class-probability targets and label smoothing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F

from lossd.server.losses.base import LossCall, LossFunction, LossOptions
from lossd.server.losses.checks import invalid_argument, require_floating
from lossd.server.losses.classes import ClassificationLoss, ClassOptions

if TYPE_CHECKING:
    from lossd.wire.codec import TensorLimits

__all__ = ["CROSS_ENTROPY", "CrossEntropyLoss", "CrossEntropyOptions"]


@dataclass(frozen=True)
class CrossEntropyOptions(ClassOptions):
    label_smoothing: float = 0.0


class CrossEntropyLoss(ClassificationLoss):
    """Input: unnormalized logits (C), (N, C) or (N, C, d1..dk); target: class indices, or class
    probabilities when `target.shape == input.shape` (torch's rule), which also have a gradient.

    A negative label_smoothing is refused (torch silently treats it as 0)."""

    name: ClassVar[str] = "cross_entropy"
    parameters: ClassVar[Mapping[str, type]] = {"ignore_index": int, "label_smoothing": float}
    options_type: ClassVar[type[LossOptions]] = CrossEntropyOptions

    def probabilities(self, call: LossCall) -> bool:
        return call.target.shape == call.input.shape

    def validate(self, call: LossCall, limits: TensorLimits | None) -> LossCall:
        self.check_input(call)
        options = call.options
        assert isinstance(options, CrossEntropyOptions)
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
        return self.validate_classes(call)

    def function(self, options: LossOptions, reduction: str) -> LossFunction:
        assert isinstance(options, CrossEntropyOptions)
        ignore_index, smoothing = options.ignore_index, options.label_smoothing
        return lambda x, t, w: F.cross_entropy(
            x, t, weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing
        )

    def temporaries(self, call: LossCall) -> int:
        """Log-probabilities and softmax; one more with label smoothing."""
        options = call.options
        assert isinstance(options, CrossEntropyOptions)
        return 2 + (options.label_smoothing > 0)

    def float16_partial_sum(self, call: LossCall) -> bool:
        """The label-smoothing term and probability-target 'mean' sum in float16 before scaling."""
        options = call.options
        assert isinstance(options, CrossEntropyOptions)
        return options.label_smoothing > 0 or self.probabilities(call)


CROSS_ENTROPY = CrossEntropyLoss()
