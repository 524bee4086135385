"""What nll_loss and cross_entropy share: an input of class scores (C), (N, C) or (N, C, d1..dk),
class-index targets with `ignore_index`, and class weights.

Deliberate departures from torch, documented in the .proto: class indices may be int32, and uint8
with any input rank (torch takes uint8 only for 1-D and 2-D inputs, int32 never); both are widened
to int64, which selects the same classes. Class indices are range-checked here on the host: an
out-of-range index that reached a CUDA kernel would trip a device-side assert and ruin the process's
CUDA context.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from lossd.server.losses.base import LossCall, LossOptions, Rows, TensorSpec, segment_sums
from lossd.server.losses.checks import dtype_name, invalid_argument, out_of_range
from lossd.server.losses.functional import FunctionalLoss, LossFunction

__all__ = [
    "DEFAULT_IGNORE_INDEX",
    "ClassOptions",
    "ClassRows",
    "ClassificationLoss",
    "flat_function",
    "layout_copy_bytes",
    "resolve_class_dim",
]

DEFAULT_IGNORE_INDEX = -100
_INDEX_DTYPES = (torch.int64, torch.uint8, torch.int32)


@dataclass(frozen=True)
class ClassOptions(LossOptions):
    """Options every classification loss has (the .proto field is optional: unset is torch's -100)."""

    ignore_index: int = DEFAULT_IGNORE_INDEX
    class_dim: int | None = None
    """None: torch's layout (classes on dim 1). Otherwise, once checked: -1 (classes last) or the
    non-negative index of a dimension other than 1 (see `resolve_class_dim`)."""


def resolve_class_dim(class_dim: int | None, shape: Sequence[int], field: str) -> int | None:
    """A call's class dimension as the checked options hold it: None for torch's own layout (also
    what `class_dim` 1 means, and the only layout of a 1-D input), -1 when the classes are last,
    else its non-negative index; out of range is INVALID_ARGUMENT naming `field`."""
    if class_dim is None:
        return None
    dims = len(shape)
    if not -max(dims, 1) <= class_dim < max(dims, 1):
        raise invalid_argument(
            f"{field} is {class_dim}; the input has {dims} dimension(s), so it must be in "
            f"[{-max(dims, 1)}, {max(dims, 1) - 1}]",
            "CLASS_DIM_OUT_OF_RANGE",
            field,
            classDim=class_dim,
            inputDims=dims,
        )
    resolved = class_dim % max(dims, 1)
    if dims and shape[resolved] == 0:
        raise invalid_argument(
            f"{field} is {class_dim}, a dimension of size 0: there are no classes to view rows of",
            "SHAPE_INVALID",
            "input.shape",
            inputShape=list(shape),
            classDim=class_dim,
        )
    if dims < 2 or resolved == 1:
        return None
    return -1 if resolved == dims - 1 else resolved


def layout_copy_bytes(call: LossCall[Any]) -> int:
    """The copies a class dimension that is neither 1 nor last costs: its input and a target of the
    input's shape, moved to have the classes last (`flat_function`); a view costs nothing."""
    if call.options.class_dim in (None, -1):
        return 0
    copies = call.input.nbytes
    if call.target.shape == call.input.shape:
        copies += call.target.nbytes
    return int(copies)


def flat_function(
    function: LossFunction, class_dim: int | None, reduction: str, elementwise: bool
) -> LossFunction:
    """`function` computed on its tensors viewed as (rows, C) with the classes last: a view when
    they are last already. A 'none' loss comes back shaped like the input without its class
    dimension (or, `elementwise`, like the input)."""
    if class_dim is None:
        return function

    def flat(x: torch.Tensor, t: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        classes = x.shape[class_dim]
        moved = x.movedim(class_dim, -1) if class_dim != -1 else x
        rows = moved.reshape(-1, classes)
        if t.shape == x.shape:
            t = (t.movedim(class_dim, -1) if class_dim != -1 else t).reshape(-1, classes)
        else:
            t = t.reshape(-1)
        loss = function(rows, t, tensors)
        if reduction != "none":
            return loss
        if elementwise:
            back = loss.reshape(moved.shape)
            return back.movedim(-1, class_dim) if class_dim != -1 else back
        return loss.reshape(moved.shape[:-1])

    return flat


OptionsT = TypeVar("OptionsT", bound=ClassOptions)

WEIGHT = TensorSpec("weight")
"""Class weights, one per class: shared by every row."""


class ClassificationLoss(FunctionalLoss[OptionsT]):
    """A loss over class scores with class-index targets (and, where a subclass allows it, class
    probabilities: `probabilities`)."""

    tensors: ClassVar[tuple[TensorSpec, ...]] = (WEIGHT,)
    target: ClassVar[TensorSpec] = TensorSpec("target", "indices")

    def probabilities(self, call: LossCall[OptionsT]) -> bool:
        """Whether the call's target holds class probabilities rather than indices."""
        return False

    @property
    def rows(self) -> Rows[OptionsT]:
        return _ROWS

    def example(self) -> LossCall[OptionsT]:
        logits = torch.randn(4, 3)
        return LossCall(
            self.make_options("mean"), logits, torch.tensor([0, 1, 2, 0]), grads=frozenset({"input"})
        )

    @staticmethod
    def class_dim(call: LossCall[OptionsT]) -> int:
        """The input's dimension that holds the classes (of a checked call)."""
        if call.input.dim() < 2:
            return 0
        class_dim = call.options.class_dim
        return 1 if class_dim is None else class_dim % call.input.dim()

    @staticmethod
    def classes(call: LossCall[OptionsT]) -> int:
        return call.input.shape[ClassificationLoss.class_dim(call)]

    @staticmethod
    def per_row_shape(call: LossCall[OptionsT]) -> tuple[int, ...]:
        """The input's shape without its class dimension: a class-index target's, and the loss's
        under reduction 'none'."""
        shape = tuple(call.input.shape)
        if len(shape) < 2:
            return ()
        dim = ClassificationLoss.class_dim(call)
        return shape[:dim] + shape[dim + 1 :]

    @abc.abstractmethod
    def torch_function(self, options: OptionsT, reduction: str) -> LossFunction:
        """torch's own function with the options bound, for torch's layout."""

    def scratch_bytes(self, call: LossCall[OptionsT]) -> int:
        return super().scratch_bytes(call) + layout_copy_bytes(call)

    def function(self, options: OptionsT, reduction: str) -> LossFunction:
        return flat_function(self.torch_function(options, reduction), options.class_dim, reduction, False)

    # -- torch's rules ----------------------------------------------------------------------------

    def loss_shape(self, call: LossCall[OptionsT], reduction: str) -> tuple[int, ...]:
        if reduction != "none":
            return ()
        return self.per_row_shape(call)

    def check_input(self, call: LossCall[OptionsT]) -> LossCall[OptionsT]:
        """The call with its class dimension resolved (see `resolve_class_dim`)."""
        if call.input.dim() == 0:
            raise invalid_argument(
                f"input.shape is [] (0-d); {self.name} needs (C), (N, C) or (N, C, d1, ..., dk)",
                "SHAPE_INVALID",
                "input.shape",
                inputShape=[],
            )
        given = call.options.class_dim
        resolved = resolve_class_dim(given, tuple(call.input.shape), f"{self.name}.class_dim")
        if resolved == given:
            return call
        return dataclasses.replace(call, options=dataclasses.replace(call.options, class_dim=resolved))

    def loss_dtype(self, call: LossCall[OptionsT]) -> torch.dtype:
        """The input's, or with probability targets its promotion with theirs (torch's)."""
        if self.probabilities(call):
            return torch.promote_types(call.input.dtype, call.target.dtype)
        return call.input.dtype

    def check_classes(self, call: LossCall[OptionsT]) -> LossCall[OptionsT]:
        """Class-index targets (range-checked, as int64) and class weights; probability targets
        are the subclass's to check before."""
        options = call.options
        probabilities = self.probabilities(call)
        target = call.target
        if not probabilities:
            target = self._class_targets(call, options.ignore_index)
            if call.target_grad:
                raise invalid_argument(
                    f"gradients.with_respect_to names 'target', but {self.name} with class-index "
                    "targets has no gradient w.r.t. the target; class-probability targets have one",
                    "GRADIENT_NOT_SUPPORTED",
                    "gradients.with_respect_to",
                    tensor="target",
                    loss=self.name,
                )
        given = call.tensors.get("weight")
        weight = self._weight(call, given, probabilities)
        if target is call.target and weight is given:  # int64 targets, weights as sent: the call
            return call
        tensors = dict(call.tensors)
        if weight is not None:
            tensors["weight"] = weight
        return dataclasses.replace(call, target=target, tensors=tensors)

    def _class_targets(self, call: LossCall[OptionsT], ignore_index: int) -> torch.Tensor:
        input, target = call.input, call.target
        classes = self.classes(call)
        if target.dtype not in _INDEX_DTYPES:
            raise invalid_argument(
                f"target.dtype is {dtype_name(target.dtype)}; class-index targets must be int64, uint8 or "
                f"int32 (class probabilities need target.shape == input.shape {list(input.shape)})",
                "DTYPE_NOT_SUPPORTED",
                "target.dtype",
                dtype=dtype_name(target.dtype),
            )
        expected = self.per_row_shape(call)
        if input.dim() == 1 and tuple(target.shape) == (1,):
            if (call.input_grad or call.target_grad) and classes != 1:
                # torch computes the loss but its backward refuses the shapes (unless C = 1, where
                # they agree): so does lossd.
                raise invalid_argument(
                    f"target.shape is [1] for input.shape {list(input.shape)}: torch computes this loss "
                    'but not its gradient ("size mismatch"); give the target shape [] to get a gradient',
                    "TARGET_SHAPE_MISMATCH",
                    "target.shape",
                    targetShape=[1],
                    inputShape=list(input.shape),
                    expectedShape=[],
                )
            target = target.reshape(())  # torch takes a one-element target for a (C) input too
        if tuple(target.shape) != expected:
            hint = ""
            if (
                call.options.class_dim is None
                and input.dim() >= 3
                and tuple(target.shape) == tuple(input.shape[:-1])
            ):
                hint = (
                    f"; for logits with the classes last, (batch, seq, vocab) as language models hold "
                    f"them, pass class_dim=-1 ({self.name}.class_dim)"
                )
            raise invalid_argument(
                f"target.shape is {list(target.shape)}; for input.shape {list(input.shape)} class-index "
                f"targets must have shape {list(expected)} (or {list(input.shape)} for class probabilities): "
                f"the input without its class dimension {self.class_dim(call)}{hint}",
                "TARGET_SHAPE_MISMATCH",
                "target.shape",
                targetShape=list(target.shape),
                inputShape=list(input.shape),
                expectedShape=list(expected),
            )
        native = call.options.class_dim is None
        if native and classes == 0 and (input.dim() == 3 or input.dim() >= 5) and math.prod(expected) > 0:
            # torch views such inputs as (N, C, 1, -1), which cannot be inferred with no classes.
            raise invalid_argument(
                f"input.shape {list(input.shape)} has no classes (C = 0): torch computes a loss over 3 or "
                '5+ input dimensions only with at least one class ("size mismatch")',
                "SHAPE_INVALID",
                "input.shape",
                inputShape=list(input.shape),
            )
        wide = target if target.dtype == torch.int64 else target.to(torch.int64)
        if wide.device.type == "meta":  # a StreamLoss header: the values are checked once they arrive
            return wide
        values = wide.numpy()
        found = out_of_range(values, classes, values == ignore_index)
        if found is not None:
            position, value, count = found
            raise invalid_argument(
                f"target{position} is {value}, outside [0, {classes}) for {classes} classes and not "
                f"ignore_index ({ignore_index}); {count} target(s) are out of range",
                "TARGET_OUT_OF_RANGE",
                "target",
                value=value,
                index=position,
                classes=classes,
                ignoreIndex=ignore_index,
                count=count,
            )
        return wide

    def _weight(
        self, call: LossCall[OptionsT], weight: torch.Tensor | None, probabilities: bool
    ) -> torch.Tensor | None:
        """Class weights, returned 1-D. Any shape of C elements is taken (torch's K-dim kernels take
        them too) and flattened. With class-index targets the dtype must be the input's, as torch
        requires; with probability targets torch promotes any dtype, and so does lossd."""
        field = f"{self.name}.weight"
        if weight is None:
            return None
        classes = self.classes(call)
        if weight.numel() != classes:
            raise invalid_argument(
                f"{field}.shape is {list(weight.shape)}; it must be [{classes}], one weight per class",
                "WEIGHT_SHAPE_MISMATCH",
                f"{field}.shape",
                weightShape=list(weight.shape),
                classes=classes,
            )
        if not probabilities and weight.dtype != call.input.dtype:
            raise invalid_argument(
                f"{field}.dtype is {dtype_name(weight.dtype)} but input.dtype is "
                f"{dtype_name(call.input.dtype)}; with class-index targets torch needs class weights in "
                "the input's dtype",
                "WEIGHT_DTYPE_MISMATCH",
                f"{field}.dtype",
                weightDtype=dtype_name(weight.dtype),
                inputDtype=dtype_name(call.input.dtype),
            )
        return weight if weight.dim() == 1 else weight.reshape(classes)

    def float16_partial_sum(self, call: LossCall[OptionsT]) -> bool:
        """Whether torch reduces this float16 call through a float16 sum scaled afterwards, which
        can overflow where the merged float64 reduction would not (such calls compute alone)."""
        return False


class ClassRows(Rows[OptionsT]):
    """Rows of class scores: one per sample and spatial position, C classes each."""

    def params(self, call: LossCall[OptionsT]) -> Hashable | None:
        loss = call.loss
        assert isinstance(loss, ClassificationLoss)
        if call.input.dtype == torch.float16 and call.reduction != "none" and loss.float16_partial_sum(call):
            return None
        if call.options.class_dim not in (None, -1):  # classes neither on dim 1 nor last: alone
            return None
        weight = call.tensors.get("weight")
        weights = None if weight is None else (str(weight.dtype), _host_bytes(weight))
        return (loss.classes(call), loss.probabilities(call), weights, call.options.without_reduction())

    def count(self, call: LossCall[OptionsT]) -> int:
        return math.prod(ClassificationLoss.per_row_shape(call))

    def input_rows(self, array: np.ndarray, call: LossCall[OptionsT]) -> np.ndarray:
        """(C) -> (1, C); (N, C) as is; (N, C, d...) -> (N*d..., C); classes last: (..., C) -> (-1, C)."""
        classes = ClassificationLoss.classes(call)
        if array.ndim == 1:
            return array.reshape(1, classes)
        if array.ndim == 2 or call.options.class_dim == -1:
            return array.reshape(-1, classes)
        return np.moveaxis(array, 1, -1).reshape(-1, classes)

    def target_rows(self, array: np.ndarray, call: LossCall[OptionsT]) -> np.ndarray:
        loss = call.loss
        assert isinstance(loss, ClassificationLoss)
        return self.input_rows(array, call) if loss.probabilities(call) else array.reshape(-1)

    def from_rows(self, rows: np.ndarray, shape: Sequence[int], call: LossCall[OptionsT]) -> np.ndarray:
        if len(shape) <= 2 or call.options.class_dim == -1:
            return rows.reshape(shape)
        return np.moveaxis(rows.reshape(shape[0], *shape[2:], shape[1]), -1, 1)

    def mean_divisors(
        self, calls: Sequence[LossCall[OptionsT]], counts: Sequence[int], targets: np.ndarray
    ) -> np.ndarray:
        """Class-index targets: the summed weights of the non-ignored targets; probabilities: the
        rows. Computed over all the calls' targets at once (they share weights and options)."""
        first = calls[0]
        loss = first.loss
        assert isinstance(loss, ClassificationLoss)
        if loss.probabilities(first):
            return np.asarray(counts, dtype=np.float64)
        kept = targets != first.options.ignore_index
        weight = first.tensors.get("weight")
        if weight is None:
            per_row: np.ndarray = kept.astype(np.float64)
        else:
            host = (weight.double() if weight.dtype == torch.bfloat16 else weight).numpy()
            weights = host.astype(np.float64)
            per_row = np.where(kept, weights[np.where(kept, targets, 0)], 0.0)
        return segment_sums(per_row, counts)

    def splittable(self, call: LossCall[OptionsT]) -> bool:
        """Blocks of dim 0's samples: not when dim 0 holds the classes."""
        return call.input.dim() >= 2 and ClassificationLoss.class_dim(call) != 0


def _host_bytes(tensor: torch.Tensor) -> bytes:
    array = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return array.numpy().tobytes()


_ROWS: ClassRows[Any] = ClassRows()
