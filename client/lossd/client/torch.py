"""Remote losses that take part in torch autograd: `loss.backward()` fills `.grad` as local torch would.

```python
from lossd.client import LossClient
from lossd.client import torch as lossd_torch

client = LossClient("localhost:50051")
loss = lossd_torch.cross_entropy(logits, labels, label_smoothing=0.1, client=client)
loss.backward()          # logits.grad == what F.cross_entropy(...).backward() gives
```

One function per loss the client declares (`lossd.client.losses`), with torch.nn.functional's
arguments in torch's order (the deprecated `size_average` and `reduce` left out), then `client=`
and `timeout=`. A linear loss's classifier and bias that require a gradient get theirs too (a
trainable head); a resident one (`client.resident(W)`) is a constant.
One RPC per forward: the server returns the gradients with the loss, and backward
scales them by the upstream gradient. Only a loss whose gradient does not factor that way (KL with a
broadcast input or target under `reduction="none"`) needs a second RPC in backward, which sends the
upstream gradient itself.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from lossd.client._client import LossClient
from lossd.client.losses import DECLARATIONS, LossDeclaration

__all__ = sorted(DECLARATIONS)  # noqa: PLE0605  (one function per declared loss)


@dataclass
class _Call:
    """Everything about one remote loss call except the two differentiable tensors."""

    client: LossClient
    declaration: LossDeclaration
    options: dict[str, Any]
    timeout: float | None
    input_grad: bool
    target_grad: bool
    tensor_grads: tuple[str, ...] = ()
    """The loss's own tensors (a trainable head's classifier) whose gradient is asked for."""

    def run(
        self, input: torch.Tensor, target: torch.Tensor, grad_output: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The loss, and the gradients of input, target and each of `tensor_grads` (None: not asked)."""
        method = getattr(self.client, self.declaration.name)
        asked = {
            "input": self.input_grad,
            "target": self.target_grad,
            **dict.fromkeys(self.tensor_grads, True),
        }
        flags = {flag: asked.get(tensor, False) for flag, tensor in self.declaration.gradients.items()}
        result = method(input, target, **self.options, **flags, grad_output=grad_output, timeout=self.timeout)
        tensors = [result.grads.get(name) for name in self.tensor_grads]
        return result.loss, [result.grad, result.target_grad, *tensors]


def _scale(
    grad: torch.Tensor | None, upstream: torch.Tensor, loss_shape: torch.Size, left_out: int | None
) -> torch.Tensor | None:
    """grad * upstream, broadcasting upstream over the dimension the loss leaves out; None when
    it cannot."""
    if grad is None:
        return None
    if upstream.dim() == 0:
        return grad if bool(upstream == 1) else grad * upstream
    if left_out is not None and grad.dim() == len(loss_shape) + 1:
        return grad * upstream.unsqueeze(left_out)
    if grad.shape == loss_shape:
        return grad * upstream
    return None


class _RemoteLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, input: torch.Tensor, target: torch.Tensor, call: _Call, *tensors: torch.Tensor
    ) -> torch.Tensor:
        """`tensors` are the loss's own tensors whose gradient is asked for (`call.tensor_grads`):
        arguments here only so that autograd routes their gradients; the call sends them."""
        loss, grads = call.run(input, target)
        ctx.call = call
        ctx.loss_shape = loss.shape
        ctx.save_for_backward(input, target)
        ctx.grads = grads
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        call: _Call = ctx.call
        input, target = ctx.saved_tensors
        # A loss with one value per sample (or position) has one dimension fewer than its input:
        # the one it leaves out (the classes). One with a value per element has none.
        per_element = len(ctx.loss_shape) >= input.dim()
        left_out = None if per_element else call.declaration.class_dimension(input.dim(), call.options)
        grads = [_scale(saved, upstream, ctx.loss_shape, left_out) for saved in ctx.grads[:2]]
        # A tensor every token uses (a classifier) sums the tokens' terms: it scales only by a 0-d
        # upstream gradient.
        grads += [
            _scale(saved, upstream, torch.Size(), None) if upstream.dim() == 0 else None
            for saved in ctx.grads[2:]
        ]
        if (
            (call.input_grad and grads[0] is None)
            or (call.target_grad and grads[1] is None)
            or any(grad is None for grad in grads[2:])
        ):
            # A broadcast operand: only the server can sum the upstream-weighted terms correctly.
            _, grads = call.run(input, target, grad_output=upstream)
        return grads[0], grads[1], None, *grads[2:]


class RemoteLossFunction:
    """`torch.nn.functional.<name>`, computed by `client`'s server, differentiable w.r.t. the
    input, and w.r.t. the target where the loss has a target gradient and the target requires one."""

    def __init__(self, declaration: LossDeclaration) -> None:
        self.declaration = declaration
        self.__name__ = self.__qualname__ = declaration.name
        own = [
            declaration.signature.parameters[name].replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
            for name in declaration.own
        ]
        tensor = inspect.Parameter.POSITIONAL_OR_KEYWORD
        keyword = inspect.Parameter.KEYWORD_ONLY
        self.__signature__ = inspect.Signature(
            [
                inspect.Parameter("input", tensor, annotation="torch.Tensor"),
                inspect.Parameter("target", tensor, annotation="torch.Tensor"),
                *own,
                inspect.Parameter("client", keyword, annotation="LossClient"),
                inspect.Parameter("timeout", keyword, default=None, annotation="float | None"),
            ],
            return_annotation="torch.Tensor",
        )
        self.__doc__ = (
            f"`torch.nn.functional.{declaration.name}`, computed by `client`'s server; `loss.backward()` "
            "fills the gradients torch would.\n\n" + declaration.doc
        )

    def __repr__(self) -> str:
        return f"<lossd remote loss {self.declaration.name}{self.__signature__}>"

    def __call__(self, input: torch.Tensor, target: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        arguments = self.__signature__.bind(input, target, *args, **kwargs)
        arguments.apply_defaults()
        options = dict(arguments.arguments)
        del options["input"], options["target"]
        client, timeout = options.pop("client"), options.pop("timeout")
        recording = torch.is_grad_enabled()
        tensors = {
            name: options[name]
            for name in self.declaration.gradients.values()
            if name not in ("input", "target")
            and recording
            and isinstance(options.get(name), torch.Tensor)
            and options[name].requires_grad
        }
        call = _Call(
            client=client,
            declaration=self.declaration,
            options=options,
            timeout=timeout,
            input_grad=recording and input.requires_grad,
            target_grad=recording and self.declaration.target_gradient and target.requires_grad,
            tensor_grads=tuple(tensors),
        )
        loss: torch.Tensor = _RemoteLoss.apply(input, target, call, *tensors.values())  # type: ignore[no-untyped-call]
        return loss


_FUNCTIONS = {name: RemoteLossFunction(declaration) for name, declaration in DECLARATIONS.items()}


def __getattr__(name: str) -> RemoteLossFunction:
    function = _FUNCTIONS.get(name)
    if function is None:
        raise AttributeError(f"module 'lossd.client.torch' has no attribute {name!r}")
    return function


def __dir__() -> list[str]:
    return sorted([*globals(), *_FUNCTIONS])
