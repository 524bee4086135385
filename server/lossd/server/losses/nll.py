"""`torch.nn.functional.nll_loss`: the negative log-likelihood of class indices, given log-probabilities."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F

from lossd.server.losses.base import LossCall
from lossd.server.losses.classes import ClassificationLoss, ClassOptions
from lossd.server.losses.functional import LossFunction

if TYPE_CHECKING:
    from lossd.wire.codec import TensorLimits

__all__ = ["NLL_LOSS", "NllLoss"]


class NllLoss(ClassificationLoss[ClassOptions]):
    """Input: log-probabilities (C), (N, C) or (N, C, d1..dk); target: class indices; `weight`:
    one per class; `ignore_index`. No gradient with respect to the target."""

    name = "nll_loss"
    options_type = ClassOptions

    def check(self, call: LossCall[ClassOptions], limits: TensorLimits | None) -> LossCall[ClassOptions]:
        call = self.check_input(call)
        return self.check_classes(call)

    def torch_function(self, options: ClassOptions, reduction: str) -> LossFunction:
        ignore_index = options.ignore_index
        return lambda x, t, tensors: F.nll_loss(
            x, t, weight=tensors.get("weight"), ignore_index=ignore_index, reduction=reduction
        )

    def temporaries(self, call: LossCall[ClassOptions]) -> int:
        return 1 if call.grads else 0

    def flops(self, call: LossCall[ClassOptions]) -> float:
        """A gather and a weight per row; the backward writes the input's gradient."""
        rows = call.input.numel() // max(self.classes(call), 1)
        return 2.0 * rows + (call.input.numel() if call.grads else 0)


NLL_LOSS = NllLoss()
