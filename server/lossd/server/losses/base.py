"""What a loss is to lossd: the `Loss` interface every loss module implements, and the plain-Python
vocabulary of one computation (`LossCall`, `LossOutput`).

Everything specific to one loss lives in its module (`nll`, `cross_entropy`, `kl_div`): its options
and how they come from its .proto message, its tensors, torch's rules for them, its computation
alone (torch's own call), by rows for merged calls and blocks of streams, and its Open Inference
Protocol description. The engine and the transport work through this interface and never ask which
loss a call is.

Pure torch and numpy; nothing of gRPC, protobuf or metrics (a loss reads its .proto options message
by its fields, without importing protobuf).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:  # the codec imports protobuf, which the losses must not need
    from lossd.server.losses.implementations import Implementation
    from lossd.wire.codec import TensorLimits

__all__ = [
    "REDUCTIONS",
    "Computed",
    "Loss",
    "LossCall",
    "LossFunction",
    "LossOptions",
    "LossOutput",
    "OipTensor",
    "Upload",
]

REDUCTIONS = ("none", "mean", "sum", "batchmean")
"""torch's reduction names, across losses."""

LossFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""`f(input, target, weight)`: one loss with its options bound."""

Upload = Callable[[torch.Tensor], torch.Tensor]
"""Moves a host tensor to the engine's device."""


@dataclass(frozen=True)
class LossOptions:
    """The non-tensor arguments of one loss call, with torch's defaults; each loss subclasses it
    with its own options."""

    loss: Loss
    reduction: str = "mean"

    def without_reduction(self) -> Hashable:
        """Every option but the reduction, hashable: what calls computed together as rows must
        share (each keeps its own reduction). Cheaper than a copy with reduction 'none'."""
        names = _SHARED_FIELDS.get(type(self))
        if names is None:
            names = tuple(item.name for item in fields(self) if item.name != "reduction")
            _SHARED_FIELDS[type(self)] = names
        return (type(self), *[getattr(self, name) for name in names])


_SHARED_FIELDS: dict[type[LossOptions], tuple[str, ...]] = {}


@dataclass(frozen=True)
class LossCall:
    """One loss computation: `F.<loss>(input, target, weight=..., **options)` and what to return.

    Tensors are on the CPU as decoded from the request; the engine moves them to its device.
    `grad_output` is the upstream gradient (None: ones); `grad_dtype` the dtype of the returned
    gradients (None: each tensor's own); `tensor_grads` the names of the loss's own tensors whose
    gradient is returned too (a trainable head's "classifier").
    """

    options: LossOptions
    input: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None
    input_grad: bool = False
    target_grad: bool = False
    grad_dtype: torch.dtype | None = None
    grad_output: torch.Tensor | None = None
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    tensor_grads: frozenset[str] = frozenset()

    @property
    def loss(self) -> Loss:
        return self.options.loss

    @property
    def reduction(self) -> str:
        return self.options.reduction


@dataclass(frozen=True)
class LossOutput:
    """The loss and the gradients asked for, on the host: torch tensors, or numpy arrays where the
    merged path produced them (any dtype but bfloat16). `nonfinite` names the request fields that
    held NaN or infinity (computed with, as torch does, and counted). `parts`: the loss's named
    parts (`Loss.parts`), each shaped like `loss`; `tensor_grads` the gradients of the loss's own
    tensors asked for, by name; `implementation` which of the loss's implementations computed it
    ("" for a loss with one)."""

    loss: torch.Tensor | np.ndarray
    input_grad: torch.Tensor | np.ndarray | None = None
    target_grad: torch.Tensor | np.ndarray | None = None
    nonfinite: tuple[str, ...] = ()
    parts: Mapping[str, torch.Tensor | np.ndarray] = field(default_factory=dict)
    tensor_grads: Mapping[str, torch.Tensor | np.ndarray] = field(default_factory=dict)
    implementation: str = ""


@dataclass(frozen=True)
class Computed:
    """A call's results on the device, before they come down: the loss, its parts, and the
    gradients asked for (input's, then target's, then those of the loss's tensors by name)."""

    loss: torch.Tensor
    grads: list[torch.Tensor]
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    tensor_grads: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class OipTensor:
    """A tensor in a model's Open Inference Protocol metadata: name, datatype, shape (-1: any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class Loss(abc.ABC):
    """One loss. Instances are singletons held by the registry (`lossd.server.losses.LOSSES`).

    A loss is a per-row computation followed by a reduction: rows are what `reduction="none"`
    returns one value for, and each row's gradient depends on that row alone. That is what lets
    the engine merge calls (rows concatenated, each call reduced on its own) and compute large
    streams in blocks of samples; a loss that is not of that form returns None from `merge_params`.
    """

    name: ClassVar[str]
    """The `torch.nn.functional` name, the .proto `loss` oneof field and the OIP model name."""
    reductions: ClassVar[tuple[str, ...]] = ("none", "mean", "sum")
    tensors: ClassVar[tuple[str, ...]] = ()
    """Optional tensors in the loss's options message ("weight"), in request order."""
    gradient_tensors: ClassVar[tuple[str, ...]] = ()
    """Those of `tensors` whose gradient a call may ask for (`LossCall.tensor_grads`); the loss's
    `compute` returns them."""
    parts: ClassVar[tuple[str, ...]] = ()
    """The named parts of the loss a response carries besides it (response fields)."""
    log_probabilities: ClassVar[tuple[str, ...]] = ()
    """Request fields that hold log-probabilities, where -inf is a value (probability 0), not a
    fault: only NaN and +inf count as non-finite there."""
    oip_tensors: ClassVar[Mapping[str, str]] = {}
    """The OIP datatype of each of `tensors` that is not FP32."""
    merged_by_compute: ClassVar[bool] = False
    """Whether calls merge as one call of their concatenated rows under reduction 'none', through
    `compute` (a loss with tensors of its own or parts), rather than through `function`."""
    parameters: ClassVar[Mapping[str, type]] = {}
    """The scalar fields of the options message and their Python types (also the OIP parameters)."""
    options_type: ClassVar[type[LossOptions]] = LossOptions
    target_gradient: ClassVar[bool] = True
    """Whether the loss can have a gradient with respect to its target (some targets may not)."""
    oip_target: ClassVar[OipTensor]

    def __repr__(self) -> str:
        return f"<loss {self.name}>"

    # -- options --------------------------------------------------------------------------------

    def make_options(self, reduction: str = "mean", **options: Any) -> LossOptions:
        """This loss's options; unset ones take torch's defaults."""
        return self.options_type(self, reduction, **options)

    def options(self, message: Any, reduction: str) -> LossOptions:
        """The options from the loss's .proto options message (read by field name)."""
        return self.make_options(reduction, **{name: getattr(message, name) for name in self.parameters})

    # -- torch's rules ----------------------------------------------------------------------------

    @abc.abstractmethod
    def validate(self, call: LossCall, limits: TensorLimits | None) -> LossCall:
        """The call ready for torch (e.g. targets widened), or an `InvalidArgumentError` naming the
        field; the input's dtype, the reduction's name and the gradient options are checked before."""

    @abc.abstractmethod
    def loss_shape(self, call: LossCall, reduction: str) -> tuple[int, ...]:
        """The shape of the loss torch returns for a valid call under `reduction`."""

    # -- computation ----------------------------------------------------------------------------

    def function(self, options: LossOptions, reduction: str) -> LossFunction:
        """torch's own call with the options bound and `reduction` (the call's, or 'none'): what the
        default `compute`, merging and stream blocks call. A loss that overrides `compute` (and
        merges through it: `merged_by_compute`) has none."""
        raise TypeError(f"{self.name} is computed by its own `compute`, not one torch function")

    @abc.abstractmethod
    def temporaries(self, call: LossCall) -> int:
        """How many input-sized temporaries (at 32 bits at least) torch's computation holds."""

    def scratch_bytes(self, call: LossCall) -> int:
        """Memory the computation of a validated call takes besides its tensors and answer: its
        input-sized temporaries (`temporaries`), at 32 bits at least."""
        elements = max(call.input.numel(), math.prod(self.loss_shape(call, "none")))
        return self.temporaries(call) * elements * max(call.input.element_size(), 4)

    def implementations(self) -> Sequence[Implementation]:
        """Ways to compute this loss besides `compute`, which comes first (the reference): the
        engine chooses among them on its device (`lossd.server.losses.implementations`). Empty:
        `compute` alone."""
        return ()

    def probes(self, device: torch.device) -> Sequence[LossCall]:
        """Calls the candidate implementations must agree on with the reference at start-up; the
        first (which they must support) is also what they are timed on."""
        return ()

    def example(self) -> LossCall:
        """A small call with an input gradient, computed once at start-up to warm the device."""
        logits = torch.randn(4, 3)
        return LossCall(self.make_options("mean"), logits, torch.tensor([0, 1, 2, 0]), input_grad=True)

    def compute(self, call: LossCall, upload: Upload) -> Computed:
        """A validated call on the device: torch's own call and `torch.autograd.grad` of it. A loss
        with its own way of computing (in chunks, say) overrides this."""
        function = self.function(call.options, call.reduction)
        input, target = upload(call.input), upload(call.target)
        weight = None if call.weight is None else upload(call.weight)
        if not (call.input_grad or call.target_grad):
            with torch.no_grad():
                return Computed(function(input, target, weight), [])
        with torch.enable_grad():
            # Fresh leaves: the decoded tensors may be shared, read-only views of the request.
            input = input.detach().requires_grad_(call.input_grad)
            target = target.detach().requires_grad_(call.target_grad)
            loss = function(input, target, weight)
            upstream = torch.ones_like(loss) if call.grad_output is None else upload(call.grad_output)
            leaves = [leaf for leaf in (input, target) if leaf.requires_grad]
            grads = list(torch.autograd.grad(loss, leaves, upstream))
        return Computed(loss.detach(), grads)

    def loss_dtype(self, call: LossCall) -> torch.dtype:
        """The dtype of the loss a valid call returns."""
        return call.input.dtype

    # -- rows: merged calls and stream blocks -----------------------------------------------------

    @abc.abstractmethod
    def merge_params(self, call: LossCall) -> Hashable | None:
        """What a validated call's rows depend on besides dtypes, weights and gradients: calls with
        equal params can be computed as rows of one computation. None: only alone (its reduction
        is not a sum of its rows' losses in torch's arithmetic)."""

    @abc.abstractmethod
    def rows_of(self, call: LossCall) -> int:
        """How many rows a call contributes."""

    @abc.abstractmethod
    def input_rows(self, array: np.ndarray, call: LossCall) -> np.ndarray:
        """A call's input (a host array) as rows, first dimension; a view where it can be."""

    @abc.abstractmethod
    def target_rows(self, array: np.ndarray, call: LossCall) -> np.ndarray:
        """A call's target as rows, matching `input_rows`."""

    @abc.abstractmethod
    def from_rows(self, rows: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Rows back to a tensor of `shape` (a gradient's: the input's or the target's)."""

    def tensor_rows(self, name: str, array: np.ndarray, call: LossCall) -> np.ndarray:
        """One of a call's own `tensors` as rows, matching `input_rows`."""
        return array.reshape(self.rows_of(call), -1)

    def mean_divisor(self, call: LossCall) -> float | None:
        """What a 'mean' divides by, when the loss decides it from the call alone (None: the rows,
        or `mean_weights`)."""
        return None

    def class_targets(self, call: LossCall) -> bool:
        """Whether the target holds one class index per row (concatenated flat when merged)."""
        return False

    def mean_weights(self, call: LossCall, targets: np.ndarray) -> np.ndarray | None:
        """Per-row float64 weights whose sum a 'mean' divides by, given the rows' class-index
        `targets`; None: 'mean' divides by the number of rows."""
        return None

    @abc.abstractmethod
    def splittable(self, call: LossCall) -> bool:
        """Whether a call's samples (first dimension) are rows that can be computed in blocks."""

    def samples_divisor(self, call: LossCall) -> float:
        """What 'batchmean' divides by: the input's first dimension."""
        return float(call.input.shape[0]) if call.input.dim() else 1.0
