"""Fused linear cross-entropy: hidden states in, `cross_entropy(softcap(h @ W.T + b), y)` out, the
logits never materialized whole.

At language-model scale the logits are the whole cost (8 x 4096 tokens x 128256 words is 8.4 GB in
bfloat16, the hidden states that make them 31x less); the classifier weight is the same on every call
and can be a resident tensor. Computed in chunks of tokens, each chunk's logits, loss and gradient
alone, so a call holds its hidden states, its gradient and one chunk's (chunk x V) temporaries, as
Liger Kernel's fused linear cross-entropy and cut-cross-entropy do inside one process. Options are
cross_entropy's plus `softcap` (Gemma 2), a z-loss (`lse_square_scale`) and the per-token log-sum-exp.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from lossd.server.losses.base import (
    Computed,
    Implementation,
    LossCall,
    LossOptions,
    OutputSpec,
    TensorSpec,
    Upload,
    compute_dtype,
)
from lossd.server.losses.checks import dtype_name, invalid_argument, out_of_range, require_floating
from lossd.server.losses.chunked import ChunkedLoss, PerChunk, Prepared
from lossd.server.losses.heads import (
    HEAD,
    check_head,
    head_bytes,
    head_flops,
    head_logits,
    resident_head_bytes,
)

if TYPE_CHECKING:
    from lossd.wire.codec import TensorLimits

__all__ = [
    "CANDIDATES",
    "LINEAR_CROSS_ENTROPY",
    "LinearCrossEntropyLoss",
    "LinearCrossEntropyOptions",
    "kernel_call",
    "kernel_supports",
    "token_losses",
]

_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)


@dataclass(frozen=True)
class LinearCrossEntropyOptions(LossOptions):
    ignore_index: int = -100
    label_smoothing: float = 0.0
    softcap: float = 0.0
    lse_square_scale: float = 0.0


Call = LossCall[LinearCrossEntropyOptions]


def token_losses(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    classifier: torch.Tensor,
    bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    options: LinearCrossEntropyOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (loss, log-sum-exp) of a chunk of hidden states (n, H)."""
    logits = head_logits(hidden, classifier, bias)
    if options.softcap > 0.0:
        logits = options.softcap * torch.tanh(logits / options.softcap)
    loss = F.cross_entropy(
        logits,
        targets,
        weight=weight,
        ignore_index=options.ignore_index,
        label_smoothing=options.label_smoothing,
        reduction="none",
    )
    lse = torch.logsumexp(logits, -1)
    if options.lse_square_scale != 0.0:
        z_loss = options.lse_square_scale * lse.square()
        loss = loss + z_loss.masked_fill(targets == options.ignore_index, 0.0)
    return loss, lse


_INPUT = frozenset({"input"})


class LinearCrossEntropyLoss(ChunkedLoss[LinearCrossEntropyOptions]):
    """Input: hidden states (..., H). Target: class indices (...). Tokens are the rows."""

    name = "linear_cross_entropy"
    options_type = LinearCrossEntropyOptions
    target: ClassVar[TensorSpec] = TensorSpec("target", "indices")
    tensors: ClassVar[tuple[TensorSpec, ...]] = (*HEAD, TensorSpec("weight"))
    outputs: ClassVar[tuple[OutputSpec, ...]] = (OutputSpec("lse", reduced=False),)
    temporaries: ClassVar[int] = 6

    # -- rules ----------------------------------------------------------------------------------

    def check(self, call: Call, limits: TensorLimits | None) -> Call:
        options = call.options
        for name, rule in (("softcap", "finite and >= 0"), ("lse_square_scale", "finite and >= 0")):
            value = getattr(options, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise invalid_argument(
                    f"linear_cross_entropy.{name} is {value}; it must be {rule}",
                    "OPTION_INVALID",
                    f"linear_cross_entropy.{name}",
                    value=value,
                )
        if not 0.0 <= options.label_smoothing <= 1.0:
            raise invalid_argument(
                f"linear_cross_entropy.label_smoothing is {options.label_smoothing}; it must be in [0, 1]",
                "LABEL_SMOOTHING_OUT_OF_RANGE",
                "linear_cross_entropy.label_smoothing",
                value=options.label_smoothing,
            )
        hidden, targets = call.input, call.target
        classes = check_head(call.tensors, hidden, self.name)
        weight = call.tensors.get("weight")
        if weight is not None:
            require_floating(weight, "linear_cross_entropy.weight", "the weight")
            if tuple(weight.shape) != (classes,):
                raise invalid_argument(
                    f"linear_cross_entropy.weight.shape is {list(weight.shape)}; it must be [{classes}], "
                    "one per class",
                    "WEIGHT_SHAPE_MISMATCH",
                    "linear_cross_entropy.weight.shape",
                    shape=list(weight.shape),
                    classes=classes,
                )
        if targets.dtype not in _INDEX_DTYPES:
            raise invalid_argument(
                f"target.dtype is {dtype_name(targets.dtype)}; class indices must be int64, int32 or uint8",
                "DTYPE_NOT_SUPPORTED",
                "target.dtype",
                dtype=dtype_name(targets.dtype),
            )
        lead = tuple(hidden.shape[:-1])
        if tuple(targets.shape) != lead:
            raise invalid_argument(
                f"target.shape is {list(targets.shape)}; it must be {list(lead)}, one class per token "
                f"(input.shape {list(hidden.shape)})",
                "TARGET_SHAPE_MISMATCH",
                "target.shape",
                targetShape=list(targets.shape),
                inputShape=list(hidden.shape),
            )
        wide = targets if targets.dtype == torch.int64 else targets.to(torch.int64)
        if wide.device.type != "meta":
            values = wide.numpy()
            found = out_of_range(values, classes, values == options.ignore_index)
            if found is not None:
                position, value, count = found
                raise invalid_argument(
                    f"target{position} is {value}, outside [0, {classes}) for {classes} classes and not "
                    f"ignore_index ({options.ignore_index}); {count} target(s) are out of range",
                    "TARGET_OUT_OF_RANGE",
                    "target",
                    value=value,
                    index=position,
                    classes=classes,
                    ignoreIndex=options.ignore_index,
                    count=count,
                )
        return dataclasses.replace(call, target=wide)

    # -- computation ----------------------------------------------------------------------------

    def width(self, call: Call) -> int:
        classifier = call.tensors.get("classifier")
        return classifier.shape[0] if classifier is not None and classifier.dim() else 1

    def held_bytes(self, call: Call) -> int:
        return head_bytes(call, ("classifier",))

    def shared_scratch_bytes(self, call: Call) -> int:
        return resident_head_bytes(call, ("classifier",))

    def flops(self, call: Call) -> float:
        """The head over every token (tokens x V x H x 2, x3 with gradients) and its log-softmax."""
        return head_flops(call, call.input, "classifier", bool(call.grads))

    def prepare(self, call: Call, upload: Upload, dtype: torch.dtype) -> Prepared:
        tokens = self.tokens(call)
        rows = {
            "input": upload(call.input).reshape(tokens, call.input.shape[-1]),
            "target": upload(call.target).reshape(tokens),
        }
        whole = {name: upload(tensor).to(dtype) for name, tensor in call.tensors.items()}
        return Prepared(rows, whole)

    def per_chunk(
        self,
        options: LinearCrossEntropyOptions,
        rows: Mapping[str, torch.Tensor],
        whole: Mapping[str, torch.Tensor],
        losses: Callable[..., tuple[torch.Tensor, torch.Tensor]] = token_losses,
    ) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        """A chunk's losses by `losses` (`token_losses`, or a compiled form of it)."""
        classifier, bias, weight = whole["classifier"], whole.get("bias"), whole.get("weight")
        loss, lse = losses(rows["input"], rows["target"], classifier, bias, weight, options)
        return loss, {"lse": lse}

    def mean_divisor(self, call: Call, prepared: Prepared) -> torch.Tensor | float:
        """torch's: the summed class weights of the counted tokens."""
        targets, weight = prepared.rows["target"], prepared.whole.get("weight")
        counted = targets != call.options.ignore_index
        if weight is None:
            return counted.sum().to(self.loss_dtype(call))
        return weight[torch.where(counted, targets, 0)].masked_fill(~counted, 0.0).sum()

    def example(self) -> Call:
        tensors = {"classifier": torch.randn(5, 3), "bias": torch.randn(5)}
        options = self.make_options("mean", softcap=30.0, lse_square_scale=1e-4)
        targets = torch.tensor([0, 1, 4, 2])
        return LossCall(
            options, torch.randn(4, 3), targets, tensors=tensors, grads=_INPUT, outputs=frozenset({"lse"})
        )

    def implementations(self) -> Sequence[Implementation]:
        """torch in chunks (this module, the reference) first; torch.compile of the same chunks,
        Liger Kernel's and cut-cross-entropy's fused kernels where they run (CUDA, installed)."""
        return (Implementation("torch-chunked", self.compute), *CANDIDATES)

    def probes(self, device: torch.device) -> Sequence[Call]:
        """A language-model step (4096 tokens, H 1024, V 32768, bfloat16) to time, then float32 with
        the classifier's gradient, label smoothing with a z-loss and ignored tokens, a soft cap with
        a bias: each candidate must agree on those it supports."""
        if device.type != "cuda":
            return ()
        generator = torch.Generator().manual_seed(0)
        tokens, size, classes = 4096, 1024, 32768
        hidden = torch.randn(tokens, size, generator=generator) / 4
        classifier = torch.randn(classes, size, generator=generator) / 16
        targets = torch.randint(0, classes, (tokens,), generator=generator)
        ignored = targets.masked_fill(torch.rand(tokens, generator=generator) < 0.1, -100)
        half = torch.bfloat16
        plain = {"classifier": classifier.to(half)}
        return (
            LossCall(self.make_options("mean"), hidden.to(half), targets, grads=_INPUT, tensors=plain),
            LossCall(
                self.make_options("mean"),
                hidden,
                targets,
                tensors={"classifier": classifier},
                grads=frozenset({"input", "classifier"}),
            ),
            LossCall(
                self.make_options("sum", label_smoothing=0.1, lse_square_scale=1e-4),
                hidden.to(half),
                ignored,
                tensors=plain,
                grads=_INPUT,
            ),
            LossCall(
                self.make_options("mean", softcap=30.0),
                hidden.to(half),
                targets,
                tensors={**plain, "bias": torch.randn(classes, generator=generator).to(half)},
                grads=_INPUT,
            ),
        )


LINEAR_CROSS_ENTROPY = LinearCrossEntropyLoss()


# -- other implementations: candidates where they run ------------------------------------------------
#
# torch.compile of the chunks above, Liger Kernel's fused linear cross-entropy and Apple's
# cut-cross-entropy (`pip install 'lossd[liger]'`, `'lossd[cce]'`). Each says which calls it computes
# exactly as lossd's options mean them; the engine uses one only after it agreed with the chunks at
# start-up (`lossd.server.losses.implementations.choose`), and only for the calls it supports.

_HALF = (torch.float16, torch.bfloat16)


def _needs_cuda(package: str | None, extra: str) -> Callable[[torch.device], str | None]:
    def unavailable(device: torch.device) -> str | None:
        if device.type != "cuda":
            return "CUDA only"
        if package is not None and importlib.util.find_spec(package) is None:
            return f"not installed (from a checkout: pip install -c constraints.txt '.[{extra}]')"
        return None

    return unavailable


@functools.cache
def _compiled() -> PerChunk:
    """The per-chunk computation with `token_losses` compiled (once, on first use)."""
    compiled = torch.compile(token_losses, dynamic=True)
    per_chunk: PerChunk = functools.partial(LINEAR_CROSS_ENTROPY.per_chunk, losses=compiled)
    return per_chunk


def _compiled_compute(call: LossCall[Any], upload: Upload) -> Computed:
    return LINEAR_CROSS_ENTROPY.run(call, upload, _compiled())


def kernel_supports(call: Call, *, smoothing: bool, z_loss: bool, bias: bool, half_only: bool) -> bool:
    """Whether a fused kernel computes `call` as lossd means it: one value per call (its backward
    scales by a number), no class weights nor per-token log-sum-exp, the classifier in the hidden
    states' dtype, and only the options the kernel has."""
    options = call.options
    classifier = call.tensors.get("classifier")
    return (
        classifier is not None
        and call.reduction in ("mean", "sum")
        and (call.grad_output is None or call.grad_output.dim() == 0)
        and "weight" not in call.tensors
        and not call.outputs
        and classifier.dtype == call.input.dtype
        and (call.input.dtype in _HALF or not half_only)
        and call.input.dtype != torch.float64
        and (smoothing or options.label_smoothing == 0.0)
        and (z_loss or options.lse_square_scale == 0.0)
        and (bias or "bias" not in call.tensors)
    )


Kernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, LinearCrossEntropyOptions, str], Any
]
"""`kernel(hidden, classifier, targets, bias, options, reduction)`: a differentiable loss."""


def kernel_call(call: Call, upload: Upload, kernel: Kernel) -> Computed:
    """A call through a fused kernel that is a differentiable torch function: its loss, and the
    gradients asked for by `torch.autograd.grad`."""
    options = call.options
    size = call.input.shape[-1]
    hidden = upload(call.input).reshape(-1, size).detach().requires_grad_(call.input_grad)
    targets = upload(call.target).reshape(-1)
    leaves = {
        name: upload(call.tensors[name]).detach().requires_grad_(name in call.grads)
        for name in ("classifier", "bias")
        if name in call.tensors
    }
    wanted = [hidden] if call.input_grad else []
    wanted += [leaves[name] for name in ("classifier", "bias") if name in call.grads]
    with torch.enable_grad() if wanted else torch.no_grad():
        result = kernel(hidden, leaves["classifier"], targets, leaves.get("bias"), options, call.reduction)
        loss = result.loss if hasattr(result, "loss") else result[0] if isinstance(result, tuple) else result
        grads: list[torch.Tensor] = []
        if wanted:
            upstream = None if call.grad_output is None else upload(call.grad_output).to(loss.dtype)
            grads = list(torch.autograd.grad(loss, wanted, upstream))
    dtype = compute_dtype(call.input.dtype)
    named: dict[str, torch.Tensor] = (
        {"input": grads.pop(0).reshape(call.input.shape)} if call.input_grad else {}
    )
    named.update((name, grads.pop(0)) for name in ("classifier", "bias") if name in call.grads)
    return Computed(loss.detach().to(dtype), named)


def _liger(
    hidden: torch.Tensor,
    classifier: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    options: LinearCrossEntropyOptions,
    reduction: str,
) -> Any:
    functional = importlib.import_module("liger_kernel.transformers.functional")
    return functional.liger_fused_linear_cross_entropy(
        hidden,
        classifier,
        targets,
        bias=bias,
        ignore_index=options.ignore_index,
        lse_square_scale=options.lse_square_scale,
        label_smoothing=options.label_smoothing,
        reduction=reduction,
        softcap=options.softcap or None,
        accum_dtype=torch.float32,  # the head's gradient summed in float32, as lossd's chunks do
    )


def _cut_cross_entropy(
    hidden: torch.Tensor,
    classifier: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    options: LinearCrossEntropyOptions,
    reduction: str,
) -> Any:
    package = importlib.import_module("cut_cross_entropy")
    assert bias is None  # cut-cross-entropy has none: `kernel_supports(bias=False)`
    return package.linear_cross_entropy(
        hidden,
        classifier,
        targets,
        ignore_index=options.ignore_index,
        softcap=options.softcap or None,
        reduction=reduction,
        filter_eps=None,  # no gradient filtering: exact, not approximate
    )


CANDIDATES = (
    Implementation(
        "torch-compile",
        _compiled_compute,
        unavailable=_needs_cuda(None, ""),
    ),
    Implementation(
        "liger",
        functools.partial(kernel_call, kernel=_liger),
        functools.partial(kernel_supports, smoothing=True, z_loss=True, bias=True, half_only=False),
        _needs_cuda("liger_kernel", "liger"),
    ),
    Implementation(
        "cut-cross-entropy",
        functools.partial(kernel_call, kernel=_cut_cross_entropy),
        functools.partial(kernel_supports, smoothing=False, z_loss=False, bias=False, half_only=True),
        _needs_cuda("cut_cross_entropy", "cce"),
    ),
)
"""The candidates besides lossd's own chunks, in the order they are tried."""
