"""Remote losses that take part in torch autograd: `loss.backward()` fills `.grad` as local torch would.

```python
from lossd.client import LossClient
from lossd.client import torch as lossd_torch

client = LossClient("localhost:50051")
loss = lossd_torch.cross_entropy(logits, labels, label_smoothing=0.1, client=client)
loss.backward()          # logits.grad == what F.cross_entropy(...).backward() gives
```

One RPC per forward: the server returns the gradients with the loss, and backward scales them by
the upstream gradient. Only KL with a broadcast input or target under `reduction="none"` needs a
second RPC in backward, which sends the upstream gradient itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lossd.client._calls import DEFAULT_IGNORE_INDEX, LossKind, ReductionName
from lossd.client._client import LossClient

__all__ = ["cross_entropy", "kl_div", "nll_loss"]


@dataclass
class _Call:
    """Everything about one remote loss call except the two differentiable tensors."""

    client: LossClient
    kind: LossKind
    options: dict[str, Any]
    timeout: float | None
    input_grad: bool
    target_grad: bool

    def run(
        self, input: torch.Tensor, target: torch.Tensor, grad_output: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        method = getattr(self.client, self.kind)
        grads: dict[str, Any] = {"return_grad": self.input_grad}
        if self.kind != "nll_loss":
            grads["return_target_grad"] = self.target_grad
        result = method(input, target, **self.options, **grads, grad_output=grad_output, timeout=self.timeout)
        return result.loss, result.grad, result.target_grad


def _scale(
    grad: torch.Tensor | None, upstream: torch.Tensor, loss_shape: torch.Size, class_dim: int | None
) -> torch.Tensor | None:
    """grad * upstream, broadcasting upstream over the class dimension; None when it cannot."""
    if grad is None:
        return None
    if upstream.dim() == 0:
        return grad if bool(upstream == 1) else grad * upstream
    if class_dim is not None and grad.dim() == len(loss_shape) + 1:
        return grad * upstream.unsqueeze(class_dim)
    if grad.shape == loss_shape:
        return grad * upstream
    return None


class _RemoteLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, target: torch.Tensor, call: _Call) -> torch.Tensor:
        loss, grad, target_grad = call.run(input, target)
        ctx.call = call
        ctx.loss_shape = loss.shape
        ctx.save_for_backward(input, target)
        ctx.grads = (grad, target_grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        call: _Call = ctx.call
        input, target = ctx.saved_tensors
        class_dim = None if call.kind == "kl_div" else (1 if input.dim() >= 2 else 0)
        grads = [_scale(saved, upstream, ctx.loss_shape, class_dim) for saved in ctx.grads]
        if (call.input_grad and grads[0] is None) or (call.target_grad and grads[1] is None):
            # A broadcast KL operand: only the server can sum the upstream-weighted terms correctly.
            _, grads[0], grads[1] = call.run(input, target, grad_output=upstream)
        return grads[0], grads[1], None


def _apply(
    kind: LossKind,
    input: torch.Tensor,
    target: torch.Tensor,
    client: LossClient,
    timeout: float | None,
    target_differentiable: bool,
    **options: Any,
) -> torch.Tensor:
    recording = torch.is_grad_enabled()
    call = _Call(
        client=client,
        kind=kind,
        options=options,
        timeout=timeout,
        input_grad=recording and input.requires_grad,
        target_grad=recording and target_differentiable and target.requires_grad,
    )
    loss: torch.Tensor = _RemoteLoss.apply(input, target, call)  # type: ignore[no-untyped-call]
    return loss


def nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    reduction: ReductionName = "mean",
    *,
    client: LossClient,
    timeout: float | None = None,
) -> torch.Tensor:
    """`torch.nn.functional.nll_loss`, computed by `client`'s server, differentiable w.r.t. `input`."""
    return _apply(
        "nll_loss",
        input,
        target,
        client,
        timeout,
        False,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
    )


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    reduction: ReductionName = "mean",
    label_smoothing: float = 0.0,
    *,
    client: LossClient,
    timeout: float | None = None,
) -> torch.Tensor:
    """`torch.nn.functional.cross_entropy`, computed by `client`'s server.

    Differentiable w.r.t. `input`, and w.r.t. `target` when it holds class probabilities.
    """
    return _apply(
        "cross_entropy",
        input,
        target,
        client,
        timeout,
        target.shape == input.shape,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


def kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: ReductionName = "mean",
    log_target: bool = False,
    *,
    client: LossClient,
    timeout: float | None = None,
) -> torch.Tensor:
    """`torch.nn.functional.kl_div`, computed by `client`'s server, differentiable w.r.t. both."""
    return _apply("kl_div", input, target, client, timeout, True, reduction=reduction, log_target=log_target)
