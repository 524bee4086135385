"""`torch.nn.functional.nll_loss`: the negative log-likelihood of class indices, given log-probabilities."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F

from lossd.server.losses.base import LossCall, LossFunction, LossOptions
from lossd.server.losses.classes import ClassificationLoss, ClassOptions

if TYPE_CHECKING:
    from lossd.wire.codec import TensorLimits

__all__ = ["NLL_LOSS", "NllLoss"]


class NllLoss(ClassificationLoss):
    """Input: log-probabilities (C), (N, C) or (N, C, d1..dk); target: class indices; `weight`:
    one per class; `ignore_index`. No gradient with respect to the target."""

    name: ClassVar[str] = "nll_loss"
    parameters: ClassVar[Mapping[str, type]] = {"ignore_index": int}
    target_gradient: ClassVar[bool] = False

    def validate(self, call: LossCall, limits: TensorLimits | None) -> LossCall:
        self.check_input(call)
        return self.validate_classes(call)

    def function(self, options: LossOptions, reduction: str) -> LossFunction:
        assert isinstance(options, ClassOptions)
        ignore_index = options.ignore_index
        return lambda x, t, w: F.nll_loss(x, t, weight=w, ignore_index=ignore_index, reduction=reduction)

    def temporaries(self, call: LossCall) -> int:
        return 1 if call.input_grad or call.target_grad else 0


NLL_LOSS = NllLoss()
