"""What a loss is to lossd: the `Loss` interface every loss module implements, the optional `Rows`
piece of the losses whose calls merge by rows and stream in blocks, and the plain-Python vocabulary
of one computation (`LossCall`, `Computed`, `LossOutput`).

A loss declares, once, in its module: its name, its options (a frozen dataclass whose fields are its
.proto options message's scalars), its tensors (`TensorSpec`: input, target and its own, what each
holds, which it can differentiate), its outputs besides the loss (`OutputSpec`), and what every loss
must give: its options from the message's values (`options`, derived), torch's rules for a call
(`check`, with the loss's shape under each reduction: `loss_shape`), its computation (`compute`),
its cost (`scratch_bytes` and `flops`: `cost`) and a warm-up call (`example`). The engine, the
transports, the Open Inference Protocol and the clients all work from these declarations and never
ask which loss a call is.

Pure torch and numpy; nothing of gRPC, protobuf or metrics.
"""

from __future__ import annotations

import abc
import functools
import math
import typing
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:  # the codec imports protobuf, which the losses must not need
    from lossd.wire.codec import TensorLimits

__all__ = [
    "GRADIENT_FACTOR",
    "INPUT",
    "REDUCTIONS",
    "Computed",
    "Cost",
    "Implementation",
    "Loss",
    "LossCall",
    "LossOptions",
    "LossOutput",
    "OutputSpec",
    "Rows",
    "TensorSpec",
    "Upload",
    "compute_dtype",
    "elementwise_flops",
    "rows_of_tokens",
    "segment_sums",
]

REDUCTIONS = ("none", "mean", "sum", "batchmean")
"""torch's reduction names, across losses."""

Upload = Callable[[torch.Tensor], torch.Tensor]
"""Moves a host tensor to the engine's device."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 and bfloat16 computed (and their loss returned) in float32, as the token losses do."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a loss takes, declared once: by its name it is addressed everywhere (the .proto
    field of the loss's options message, StreamLoss chunks, gradients, the Open Inference
    Protocol's inputs)."""

    name: str
    holds: Literal["floats", "indices", "log_probabilities"] = "floats"
    """What it holds; -inf is a value in log-probabilities (probability 0), not a fault."""
    shape: tuple[int, ...] = (-1,)
    """Its usual shape, -1 for a dimension of any size (for protocol metadata; every shape the
    loss's rules take is taken)."""
    differentiable: bool = False
    """Whether a call may ask for the loss's gradient with respect to it."""
    per_row: bool = False
    """One entry per row of the input (hard labels): merged calls concatenate it, stream blocks
    slice it; otherwise every row uses all of it (class weights, a classifier)."""


INPUT = TensorSpec("input", shape=(-1, -1), differentiable=True)
"""The input as most losses take it: floats, differentiable."""


@dataclass(frozen=True)
class OutputSpec:
    """One output a loss returns besides the loss, on request, by its name."""

    name: str
    reduced: bool = True
    """True: shaped and reduced like the loss; False: one value per row of the unreduced loss,
    whatever the reduction (a per-token log-sum-exp)."""


@dataclass(frozen=True)
class LossOptions:
    """The non-tensor arguments of one loss call, with torch's defaults; each loss subclasses it
    with its own options, the scalar fields of its .proto options message."""

    loss: Loss[Any]
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

OptionsT = TypeVar("OptionsT", bound=LossOptions)


@dataclass(frozen=True)
class LossCall(Generic[OptionsT]):
    """One loss computation: `F.<loss>(input, target, **tensors, **options)` and what to return.

    Tensors are on the CPU as decoded from the request; the engine moves them to its device.
    `tensors`: the loss's own (class weights, labels, a classifier), by name; `grads`: the names of
    the tensors to differentiate with respect to (`input`, `target`, or one of `tensors`);
    `outputs`: the outputs wanted besides the loss; `grad_output`: the upstream gradient (None:
    ones); `grad_dtype`: the dtype of the returned gradients (None: each tensor's own).
    """

    options: OptionsT
    input: torch.Tensor
    target: torch.Tensor
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    grads: frozenset[str] = frozenset()
    outputs: frozenset[str] = frozenset()
    grad_dtype: torch.dtype | None = None
    grad_output: torch.Tensor | None = None
    nonfinite: str | None = None
    """What to do with NaN and infinity in its tensors: "compute", "refuse", or None for the
    server's default."""
    resident: Mapping[str, bool] = field(default_factory=dict)
    """The tensors named by a resident id, and whether each holds NaN or infinity: checked once,
    when it was put, and trusted after (it is immutable), so that no call reads it again to check."""

    @property
    def loss(self) -> Loss[OptionsT]:
        loss: Loss[OptionsT] = self.options.loss
        return loss

    @property
    def reduction(self) -> str:
        return self.options.reduction

    @property
    def input_grad(self) -> bool:
        return "input" in self.grads

    @property
    def target_grad(self) -> bool:
        return "target" in self.grads

    def tensor(self, name: str) -> torch.Tensor | None:
        """Any of the call's tensors by name: input, target, or one of the loss's own."""
        if name == "input":
            return self.input
        if name == "target":
            return self.target
        return self.tensors.get(name)


GRADIENT_FACTOR = 3.0
"""A computation with gradients against one without: the forward, and a backward of about twice."""


@dataclass(frozen=True)
class Cost:
    """What a call costs, known from its shapes before it runs: the request bytes it carries
    (resident tensors are held already), the scratch memory its computation takes, and an estimate
    of its floating-point operations (the fair queue's measure, and `--max-call-cost`'s)."""

    bytes: int
    memory: int
    flops: float


def elementwise_flops(call: LossCall[Any], per_element: float) -> float:
    """The FLOPs of a loss that does `per_element` operations on each input (or per-row loss)
    element, three times as many with gradients."""
    elements = max(call.input.numel(), 1)
    return elements * per_element * (GRADIENT_FACTOR if call.grads else 1.0)


@dataclass(frozen=True)
class Computed:
    """A call's results on the device, before they come down: the loss, the outputs asked for and
    the gradients asked for, each by name."""

    loss: torch.Tensor
    grads: Mapping[str, torch.Tensor] = field(default_factory=dict)
    outputs: Mapping[str, torch.Tensor] = field(default_factory=dict)


Result = torch.Tensor | np.ndarray
"""A result on the host: a torch tensor, or a numpy array where the merged path made it (any dtype
but bfloat16)."""


@dataclass(frozen=True)
class LossOutput:
    """The loss, the outputs and the gradients asked for, on the host, by name. `nonfinite` names
    the request fields that held NaN or infinity (computed with, as torch does, and counted);
    `implementation` which of the loss's implementations computed it ("" for a loss with one)."""

    loss: Result
    grads: Mapping[str, Result] = field(default_factory=dict)
    outputs: Mapping[str, Result] = field(default_factory=dict)
    nonfinite: tuple[str, ...] = ()
    implementation: str = ""

    @property
    def input_grad(self) -> Result | None:
        return self.grads.get("input")

    @property
    def target_grad(self) -> Result | None:
        return self.grads.get("target")


@dataclass(frozen=True)
class Implementation:
    """One way to compute a loss: `compute` as `Loss.compute`, for the calls it `supports`, on the
    devices where `unavailable` says nothing (else why not: "not installed", "CUDA only"). The
    choice among them is `lossd.server.losses.implementations`'."""

    name: str
    compute: Callable[[LossCall[Any], Upload], Computed]
    supports: Callable[[LossCall[Any]], bool] = lambda call: True
    unavailable: Callable[[torch.device], str | None] = lambda device: None


class Loss(abc.ABC, Generic[OptionsT]):
    """One loss. Instances are singletons held by the registry (`lossd.server.losses.LOSSES`).

    Every loss gives its declarations, `check` and `loss_shape`, `compute`, `scratch_bytes`,
    `flops` and `example` (`options` is derived from `options_type`). A loss whose calls are rows of one
    per-row computation also gives `rows` (merged calls, stream blocks); one with several
    implementations gives `implementations` and `probes`.
    """

    name: ClassVar[str]
    """The `torch.nn.functional` name, the .proto `loss` oneof field and the OIP model name."""
    options_type: type[OptionsT]
    """Its options: `LossOptions` and the scalar fields of its .proto options message."""
    reductions: ClassVar[tuple[str, ...]] = ("none", "mean", "sum")
    input: ClassVar[TensorSpec] = INPUT
    target: ClassVar[TensorSpec]
    tensors: ClassVar[tuple[TensorSpec, ...]] = ()
    """Its own tensors (the Tensor fields of its options message), in request order."""
    outputs: ClassVar[tuple[OutputSpec, ...]] = ()
    """What it can return besides the loss, on request."""

    def __repr__(self) -> str:
        return f"<loss {self.name}>"

    # -- declarations, derived ------------------------------------------------------------------

    @functools.cached_property
    def parameters(self) -> Mapping[str, type]:
        """Each option's Python type (bool, int or float): the options message's scalar fields,
        the Open Inference Protocol's parameters."""
        hints = typing.get_type_hints(self.options_type)
        kinds: dict[str, type] = {}
        for spec in fields(self.options_type):
            if spec.name in ("loss", "reduction"):
                continue
            kind = hints[spec.name]
            kinds[spec.name] = next(t for t in (bool, int, float) if t in typing.get_args(kind) or t is kind)
        return kinds

    @functools.cached_property
    def all_tensors(self) -> Mapping[str, TensorSpec]:
        """input, target and the loss's own tensors, by name."""
        return {spec.name: spec for spec in (self.input, self.target, *self.tensors)}

    @functools.cached_property
    def differentiable(self) -> frozenset[str]:
        """The tensors a call may ask the gradient of (the loss may refuse some calls: a target
        of class indices has none)."""
        return frozenset(name for name, spec in self.all_tensors.items() if spec.differentiable)

    def make_options(self, reduction: str = "mean", **options: Any) -> OptionsT:
        """This loss's options; unset ones take their defaults (torch's)."""
        return self.options_type(self, reduction, **options)

    def options(self, values: Mapping[str, Any], reduction: str) -> OptionsT:
        """The options from the options message's values, by field name (those the message sets:
        an unset optional field takes the default)."""
        return self.make_options(reduction, **values)

    def output_shape(self, call: LossCall[OptionsT], name: str) -> tuple[int, ...]:
        """The shape of output `name` of a valid call."""
        spec = next(spec for spec in self.outputs if spec.name == name)
        return self.loss_shape(call, call.reduction if spec.reduced else "none")

    # -- torch's rules ----------------------------------------------------------------------------

    @abc.abstractmethod
    def check(self, call: LossCall[OptionsT], limits: TensorLimits | None) -> LossCall[OptionsT]:
        """The call ready for torch (targets widened, say), or an `InvalidArgumentError` naming the
        field. What every loss shares is checked before: the input's dtype, the reduction, the
        names of the gradients and outputs asked for (`lossd.server.losses.validation`)."""

    @abc.abstractmethod
    def loss_shape(self, call: LossCall[OptionsT], reduction: str) -> tuple[int, ...]:
        """The shape of the loss a valid call returns under `reduction`."""

    def loss_dtype(self, call: LossCall[OptionsT]) -> torch.dtype:
        """The dtype of the loss (and outputs) a valid call returns."""
        return call.input.dtype

    # -- computation ----------------------------------------------------------------------------

    @abc.abstractmethod
    def compute(self, call: LossCall[OptionsT], upload: Upload) -> Computed:
        """A checked call on the device: the loss, the outputs and gradients it asks for."""

    @abc.abstractmethod
    def scratch_bytes(self, call: LossCall[OptionsT]) -> int:
        """Memory the computation of a checked call takes besides its tensors and answer (its
        temporaries), estimated from the shapes: what the memory budget holds for it."""

    def shared_scratch_bytes(self, call: LossCall[OptionsT]) -> int:
        """The part of `scratch_bytes` made for resident tensors (a cast copy of a head): calls
        compute one after another, so a batch whose entries name the same one counts it once."""
        return 0

    @abc.abstractmethod
    def flops(self, call: LossCall[OptionsT]) -> float:
        """An estimate of a checked call's floating-point operations from its shapes, forward and,
        when it asks for gradients, backward."""

    def cost(self, call: LossCall[OptionsT]) -> Cost:
        """The call's `Cost`, from its shapes."""
        nbytes = call.input.nbytes + call.target.nbytes
        nbytes += sum(tensor.nbytes for name, tensor in call.tensors.items() if name not in call.resident)
        return Cost(nbytes, self.scratch_bytes(call), self.flops(call))

    @abc.abstractmethod
    def example(self) -> LossCall[OptionsT]:
        """A small call with an input gradient, computed once at start-up to warm the device."""

    @property
    def rows(self) -> Rows[OptionsT] | None:
        """How its calls are rows, for losses that merge and stream in blocks; None: computed alone."""
        return None

    def implementations(self) -> Sequence[Implementation]:
        """Ways to compute this loss besides `compute`, which comes first (the reference): the
        engine chooses among them on its device. Empty: `compute` alone."""
        return ()

    def probes(self, device: torch.device) -> Sequence[LossCall[OptionsT]]:
        """Calls the candidate implementations must agree on with the reference at start-up; the
        first (which they must support) is also what they are timed on."""
        return ()


class Rows(abc.ABC, Generic[OptionsT]):
    """The piece of a loss whose calls are rows: a per-row computation (each row's loss and
    gradient depend on that row alone) followed by a reduction.

    That is what lets the engine merge calls (their rows concatenated into one call of the loss
    under reduction 'none', computed by the loss's own `compute`, each call reduced on its own in
    float64) and compute large streams in blocks of samples.
    """

    @abc.abstractmethod
    def params(self, call: LossCall[OptionsT]) -> Hashable | None:
        """What a checked call's rows depend on besides dtypes, gradients and outputs (its options
        but the reduction, shared tensors such as class weights): calls with equal params can be
        computed as rows of one computation. None: only alone (its reduction is not a sum of its
        rows' losses in torch's arithmetic)."""

    @abc.abstractmethod
    def count(self, call: LossCall[OptionsT]) -> int:
        """How many rows a call has."""

    @abc.abstractmethod
    def input_rows(self, array: np.ndarray, call: LossCall[OptionsT]) -> np.ndarray:
        """A call's input (a host array) as rows, first dimension; a view where it can be."""

    @abc.abstractmethod
    def target_rows(self, array: np.ndarray, call: LossCall[OptionsT]) -> np.ndarray:
        """A call's target as rows, matching `input_rows`."""

    def tensor_rows(self, name: str, array: np.ndarray, call: LossCall[OptionsT]) -> np.ndarray:
        """One of a call's per-row tensors (`TensorSpec.per_row`) as rows, matching `input_rows`."""
        rows = self.count(call)
        return array.reshape(rows) if array.size == rows else array.reshape(rows, -1)

    @abc.abstractmethod
    def from_rows(self, rows: np.ndarray, shape: Sequence[int], call: LossCall[OptionsT]) -> np.ndarray:
        """Rows back to a tensor of `shape` (a gradient's: the input's or the target's)."""

    @abc.abstractmethod
    def mean_divisors(
        self, calls: Sequence[LossCall[OptionsT]], counts: Sequence[int], targets: np.ndarray
    ) -> np.ndarray:
        """What each call's 'mean' divides by (float64), for calls that share params; `targets`
        is their target rows concatenated."""

    @abc.abstractmethod
    def splittable(self, call: LossCall[OptionsT]) -> bool:
        """Whether a call's samples (first dimension) are rows that can be computed in blocks."""

    def batch_divisor(self, call: LossCall[OptionsT]) -> float:
        """What 'batchmean' divides the summed loss by: torch's input.shape[0]."""
        return float(call.input.shape[0]) if call.input.dim() else 1.0


def rows_of_tokens(shape: Sequence[int]) -> int:
    """The tokens of an input whose last dimension is a token's (logits, hidden states)."""
    return math.prod(shape[:-1]) if len(shape) else 1


def segment_sums(values: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Per-segment float64 sums of consecutive segments; each depends on its own values only."""
    sums = np.zeros(len(counts), dtype=np.float64)
    sizes = np.asarray(counts, dtype=np.int64)
    nonempty = sizes > 0
    if nonempty.any():
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        sums[nonempty] = np.add.reduceat(values.astype(np.float64, copy=False), starts[nonempty])
    return sums
