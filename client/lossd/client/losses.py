"""The losses the client offers, each declared once: its method's signature, docstring and rows.

`Losses` is that declaration. Everything else derives from it, by rules that name no loss: the
arguments common to every loss are `COMMON`; the others are the loss's own options, tensors when
annotated `TensorLike` (or `IndexLike`, integers), scalars otherwise (set on the loss's .proto
options message when they differ from their default); `return_grad` asks for d(loss)/d(input),
`return_<tensor>_grad` for the gradient of another tensor (`return_target_grad`,
`return_classifier_grad`), and `return_<output>` for an output besides the loss (`return_lse`);
`@rows(...)` says how the loss's values lie against its input (the answer's size, the class
dimension autograd scales along). From these come the request
(`lossd.client._calls.prepare_call`), the blocking and asyncio methods (`lossd.client._client`),
and the autograd functions (`lossd.client.torch`).

Adding a loss to the client is one method here, with its docstring and its rows (the server's side
is one module in `lossd.server.losses`, the wire's one options message in the .proto).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

    from lossd.wire.codec import TensorLike

    IndexLike: TypeAlias = TensorLike
    """A tensor option of integers (token ids, labels): plain Python numbers stay int64."""

__all__ = ["COMMON", "DECLARATIONS", "LossDeclaration", "Losses", "ReductionName", "RowsKind", "rows"]

ReductionName = Literal["none", "mean", "sum", "batchmean"]
RowsKind = Literal["classes", "tokens", "elements"]
"""How a loss's unreduced values lie against its input: one per sample and position with the
classes on dimension 1 (dimension 0 of a 1-D input), one per token with a token's values last
(computed in float32 at least), or one per element of the input and target broadcast."""

R_co = TypeVar("R_co", covariant=True)
ArrayT = TypeVar("ArrayT", "np.ndarray", "torch.Tensor")

COMMON = frozenset(
    {"self", "input", "target", "reduction", "return_grad", "grad_dtype", "grad_output", "timeout"}
)
"""Arguments every loss has; the others are the loss's own: options, and `return_*` requests."""

F = TypeVar("F", bound=Callable[..., Any])


def rows(kind: RowsKind, *, unreduced: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Declares how a loss's values lie against its input (`RowsKind`); `unreduced`: its outputs
    that are one value per row whatever the reduction (others are reduced like the loss)."""

    def declare(method: F) -> F:
        method.__lossd_rows__ = (kind, unreduced)  # type: ignore[attr-defined]
        return method

    return declare


class Losses(Protocol[R_co]):
    """The loss methods: torch.nn.functional's names, arguments and defaults (`weight` is positional,
    as in torch), plus what to return and the call's timeout. `R_co` is what a call returns (a
    `LossResult`, or an awaitable of one)."""

    @rows("classes")
    def nll_loss(
        self,
        input: ArrayT,
        target: TensorLike,
        weight: TensorLike | None = None,
        *,
        ignore_index: int = -100,
        reduction: ReductionName = "mean",
        class_dim: int | None = None,
        return_grad: bool = False,
        grad_dtype: object = None,
        grad_output: TensorLike | None = None,
        timeout: float | None = None,
    ) -> R_co:
        """`torch.nn.functional.nll_loss(input, target, ...)`, computed by the server.

        `return_grad` also returns d(loss)/d(input); `grad_dtype` sets its dtype (default: the
        input's); `grad_output` is the upstream gradient (default: ones). `class_dim` names the
        input's class dimension when it is not torch's 1: `-1` for (batch, seq, vocab) with
        (batch, seq) targets (torch's function on the tensors viewed as (rows, C)).
        """

    @rows("classes")
    def cross_entropy(
        self,
        input: ArrayT,
        target: TensorLike,
        weight: TensorLike | None = None,
        *,
        ignore_index: int = -100,
        reduction: ReductionName = "mean",
        label_smoothing: float = 0.0,
        class_dim: int | None = None,
        return_grad: bool = False,
        return_target_grad: bool = False,
        grad_dtype: object = None,
        grad_output: TensorLike | None = None,
        timeout: float | None = None,
    ) -> R_co:
        """`torch.nn.functional.cross_entropy(input, target, ...)`, computed by the server.

        `target` holds class indices, or class probabilities when it has the input's shape.
        `return_target_grad` (probability targets only) also returns d(loss)/d(target).
        `class_dim=-1` takes (batch, seq, vocab) logits with (batch, seq) labels (see `nll_loss`).
        """

    @rows("elements")
    def kl_div(
        self,
        input: ArrayT,
        target: TensorLike,
        *,
        reduction: ReductionName = "mean",
        log_target: bool = False,
        class_dim: int | None = None,
        return_grad: bool = False,
        return_target_grad: bool = False,
        grad_dtype: object = None,
        grad_output: TensorLike | None = None,
        timeout: float | None = None,
    ) -> R_co:
        """`torch.nn.functional.kl_div(input, target, ...)`, computed by the server.

        `input` holds log-probabilities; `target` probabilities (log-probabilities with
        `log_target=True`). As in torch, the default reduction 'mean' divides by every element;
        'batchmean' is the KL divergence proper. With `class_dim` (-1: the last), input and
        target are viewed as rows of distributions, so 'batchmean' divides by the rows (every
        (batch, seq) position), not by input.shape[0] as torch's does.
        """

    @rows("tokens")
    def distillation(
        self,
        input: ArrayT,
        target: TensorLike,
        *,
        teacher_ids: IndexLike | None = None,
        labels: IndexLike | None = None,
        beta: float = 0.0,
        temperature: float = 1.0,
        temperature_squared: bool = False,
        weight_hard: float = 0.0,
        weight_soft: float = 1.0,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        top_k_renormalize: bool = False,
        truncate_teacher: bool = False,
        normalizer: float | None = None,
        reduction: ReductionName = "mean",
        return_grad: bool = False,
        return_hard_loss: bool = False,
        return_soft_loss: bool = False,
        grad_dtype: object = None,
        grad_output: TensorLike | None = None,
        timeout: float | None = None,
    ) -> R_co:
        """Knowledge distillation of the student's logits `input` (..., V) from a teacher, per token
        `weight_hard * cross_entropy(input, labels) + weight_soft * D` (times T^2 with
        `temperature_squared`), with TRL's and Liger Kernel's conventions.

        `target` is the dense teacher (logits or log-probabilities, (..., V_t)), or, with
        `teacher_ids` (..., k), the teacher's top-k log-probabilities (-inf pads), closed by a tail
        bucket or renormalized (`top_k_renormalize`). `beta` 0 is forward KL(teacher || student),
        1 reverse KL, between the generalized JSD. `labels` equal to `ignore_index` count in neither
        term; 'mean' divides by the counted tokens, or by `normalizer` (a global count) when given.
        `return_hard_loss` and `return_soft_loss` also return the two terms (`result.hard_loss`,
        `result.soft_loss`), reduced like the loss; `return_grad` returns d(loss)/d(input).
        """

    @rows("tokens", unreduced=("lse",))
    def linear_cross_entropy(
        self,
        input: ArrayT,
        target: TensorLike,
        classifier: TensorLike,
        bias: TensorLike | None = None,
        weight: TensorLike | None = None,
        *,
        ignore_index: int = -100,
        reduction: ReductionName = "mean",
        label_smoothing: float = 0.0,
        softcap: float = 0.0,
        lse_square_scale: float = 0.0,
        return_lse: bool = False,
        return_grad: bool = False,
        return_classifier_grad: bool = False,
        return_bias_grad: bool = False,
        grad_dtype: object = None,
        grad_output: TensorLike | None = None,
        timeout: float | None = None,
    ) -> R_co:
        """`cross_entropy(softcap(input @ classifier.T + bias), target, weight, ...)` from hidden
        states `input` (..., H), fused by the server: the logits never travel nor exist whole.

        `classifier` (V, H) is best a resident tensor (`client.resident(W)`), uploaded once.
        `softcap` > 0 soft-caps the logits (Gemma 2); `lse_square_scale` adds the z-loss;
        `return_lse` also returns each token's log-sum-exp (`result.lse`); `return_grad` returns
        d(loss)/d(input), `return_classifier_grad` and `return_bias_grad` those of a trainable
        head (`result.classifier_grad`, `result.bias_grad`).
        """

    @rows("tokens")
    def linear_distillation(
        self,
        input: ArrayT,
        target: TensorLike,
        classifier: TensorLike,
        teacher_classifier: TensorLike,
        *,
        bias: TensorLike | None = None,
        teacher_bias: TensorLike | None = None,
        labels: IndexLike | None = None,
        beta: float = 0.0,
        temperature: float = 1.0,
        temperature_squared: bool = False,
        weight_hard: float = 0.0,
        weight_soft: float = 1.0,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        top_k: int = 0,
        top_k_renormalize: bool = False,
        truncate_teacher: bool = False,
        normalizer: float | None = None,
        reduction: ReductionName = "mean",
        return_grad: bool = False,
        return_classifier_grad: bool = False,
        return_bias_grad: bool = False,
        return_hard_loss: bool = False,
        return_soft_loss: bool = False,
        grad_dtype: object = None,
        grad_output: TensorLike | None = None,
        timeout: float | None = None,
    ) -> R_co:
        """`distillation(input @ classifier.T + bias, target @ teacher_classifier.T + teacher_bias,
        ...)` from the student's hidden states `input` (..., H) and the teacher's `target`
        (..., H_t), fused by the server: neither side's logits travel nor exist whole.

        Every option is the distillation loss's (see `distillation`); `top_k` > 0 distills against
        the teacher's top-k log-probabilities only. The heads are best resident tensors
        (`client.resident(W)`), uploaded once. `return_hard_loss` and `return_soft_loss` return the
        two terms; `return_grad` returns d(loss)/d(input), `return_classifier_grad` and
        `return_bias_grad` those of the student's head.
        """


@dataclass(frozen=True)
class LossDeclaration:
    """What the client knows of one loss, read from its `Losses` method."""

    name: str
    signature: inspect.Signature
    doc: str
    tensors: tuple[str, ...]
    """Its own tensor options, in order ("weight")."""
    options: Mapping[str, Any]
    """Its own scalar options and their defaults."""
    positional: tuple[str, ...]
    """The arguments that may be given by position, in order (after `self`)."""
    accepts: frozenset[str]
    """Every argument's name."""
    rows: RowsKind
    """How its values lie against its input."""
    indices: tuple[str, ...] = ()
    """Those of `tensors` that hold integers."""
    gradients: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """The tensors it can differentiate by their `return_*` argument (`return_grad`: "input")."""
    outputs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Its outputs besides the loss by their `return_*` argument (`return_lse`: "lse")."""
    unreduced: frozenset[str] = frozenset()
    """Those of its outputs that are one value per row whatever the reduction."""

    @functools.cached_property
    def keywords(self) -> frozenset[str]:
        """The loss's own keyword arguments: its options and tensors and `return_*` requests."""
        return frozenset({*self.options, *self.tensors, *self.gradients, *self.outputs})

    def class_dimension(self, input_dims: int, options: Any) -> int | None:
        """The input's dimension a loss of one value per row leaves out (None: one value per
        element), by a call's options: its keyword arguments, or its options message."""
        if self.rows == "tokens":
            return -1
        if self.rows != "classes":
            return None
        if input_dims < 2:
            return 0
        if isinstance(options, Mapping):
            chosen = options.get("class_dim")
        else:
            chosen = options.class_dim if options.HasField("class_dim") else None
        return 1 if chosen is None else int(chosen) % input_dims

    def unreduced_shape(
        self, input_shape: tuple[int, ...], target_shape: tuple[int, ...], options: Any
    ) -> tuple[int, ...]:
        """The shape of the loss under reduction 'none' (`options` as for `class_dimension`)."""
        dim = self.class_dimension(len(input_shape), options)
        if dim is not None:
            if len(input_shape) < 2 and self.rows == "classes":
                return ()
            dim %= len(input_shape)
            return input_shape[:dim] + input_shape[dim + 1 :]
        try:  # a broadcast the server refuses: the input's shape, then
            return tuple(np.broadcast_shapes(input_shape, target_shape))
        except ValueError:
            return input_shape

    @property
    def target_gradient(self) -> bool:
        """Whether the target can have a gradient."""
        return "target" in self.gradients.values()

    @property
    def own(self) -> tuple[str, ...]:
        """Its own tensors and options in signature order, with `reduction`: what torch's function
        takes besides input and target."""
        return tuple(
            name
            for name in self.signature.parameters
            if name == "reduction"
            or (name not in COMMON and name not in self.gradients and name not in self.outputs)
        )


def _declaration(name: str, method: Any) -> LossDeclaration:
    signature = inspect.signature(method)
    tensors, indices, options = [], [], {}
    gradients, outputs = {"return_grad": "input"}, {}
    for parameter in signature.parameters.values():
        if parameter.name in COMMON:
            continue
        if parameter.name.startswith("return_") and parameter.name.endswith("_grad"):
            gradients[parameter.name] = parameter.name.removeprefix("return_").removesuffix("_grad")
        elif parameter.name.startswith("return_"):
            outputs[parameter.name] = parameter.name.removeprefix("return_")
        elif "IndexLike" in str(parameter.annotation):
            tensors.append(parameter.name)
            indices.append(parameter.name)
        elif "TensorLike" in str(parameter.annotation):
            tensors.append(parameter.name)
        else:
            options[parameter.name] = parameter.default
    kind, unreduced = method.__lossd_rows__
    return LossDeclaration(
        name=name,
        signature=signature,
        doc=inspect.getdoc(method) or "",
        tensors=tuple(tensors),
        options=options,
        positional=tuple(
            p.name
            for p in signature.parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name != "self"
        ),
        accepts=frozenset(signature.parameters) - {"self"},
        rows=kind,
        indices=tuple(indices),
        gradients=gradients,
        outputs=outputs,
        unreduced=frozenset(unreduced),
    )


DECLARATIONS: Mapping[str, LossDeclaration] = {
    name: _declaration(name, method)
    for name, method in vars(Losses).items()
    if not name.startswith("_") and inspect.isfunction(method)
}
"""Every loss the client offers, by name."""
