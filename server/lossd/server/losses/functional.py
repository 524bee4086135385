"""Losses that are one `torch.nn.functional` call (`nll_loss`, `cross_entropy`, `kl_div`): computed
alone, a call is that very call and `torch.autograd.grad` of it, bit for bit; merged with others,
the same call over their rows under reduction 'none'."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

from lossd.server.losses.base import Computed, Loss, LossCall, LossOptions, Upload

__all__ = ["FunctionalLoss", "LossFunction"]

LossFunction = Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
"""`f(input, target, tensors)`: one loss with its options bound, its own tensors by name."""

OptionsT = TypeVar("OptionsT", bound=LossOptions)


class FunctionalLoss(Loss[OptionsT]):
    """A loss that is torch's own function with the options bound."""

    @abc.abstractmethod
    def function(self, options: OptionsT, reduction: str) -> LossFunction:
        """torch's own call with the options bound and `reduction`."""

    @abc.abstractmethod
    def temporaries(self, call: LossCall[OptionsT]) -> int:
        """How many input-sized temporaries (at 32 bits at least) torch's computation holds."""

    def scratch_bytes(self, call: LossCall[OptionsT]) -> int:
        elements = max(call.input.numel(), math.prod(self.loss_shape(call, "none")))
        return self.temporaries(call) * elements * max(call.input.element_size(), 4)

    def compute(self, call: LossCall[OptionsT], upload: Upload) -> Computed:
        function = self.function(call.options, call.reduction)
        input, target = upload(call.input), upload(call.target)
        tensors = {name: upload(tensor) for name, tensor in call.tensors.items()}
        if not call.grads:
            with torch.no_grad():
                return Computed(function(input, target, tensors))
        with torch.enable_grad():
            # Fresh leaves: the decoded tensors may be shared, read-only views of the request.
            input = input.detach().requires_grad_(call.input_grad)
            target = target.detach().requires_grad_(call.target_grad)
            loss = function(input, target, tensors)
            upstream = torch.ones_like(loss) if call.grad_output is None else upload(call.grad_output)
            leaves = {
                name: leaf for name, leaf in (("input", input), ("target", target)) if leaf.requires_grad
            }
            grads = torch.autograd.grad(loss, list(leaves.values()), upstream)
        return Computed(loss.detach(), dict(zip(leaves, grads, strict=True)))
