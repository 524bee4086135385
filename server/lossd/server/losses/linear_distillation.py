"""Fused linear distillation: the student's and the teacher's hidden states in, the distillation loss
of the logits their heads make out, neither side's logits ever whole.

Per chunk of tokens the student's logits `input @ classifier.T + bias` and the teacher's
`target @ teacher_classifier.T + teacher_bias` are made, then exactly the distillation loss's
per-token computation (`distillation.token_losses`: forward or reverse KL, generalized JSD,
temperature, hard labels), as Liger Kernel's fused linear JSD does inside one process. With `top_k`
the teacher is reduced to its top-k log-probabilities first, and the distillation loss's sparse path
follows. The teacher (often its classifier resident, uploaded once) is never differentiated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from lossd.server.losses.base import Computed, LossCall, LossOptions, OipTensor, Upload
from lossd.server.losses.checks import invalid_argument, require_floating
from lossd.server.losses.chunked import TokenLoss, compute_dtype, run_chunks, upstream_gradient
from lossd.server.losses.distillation import (
    CHUNK_ELEMENTS,
    DISTILLATION,
    DistillationOptions,
    check_dense,
    check_labels,
    check_options,
    options_from,
    token_losses,
)
from lossd.server.losses.heads import check_head, head_logits

if TYPE_CHECKING:
    from lossd.wire.codec import TensorLimits

__all__ = ["LINEAR_DISTILLATION", "LinearDistillationLoss", "LinearDistillationOptions"]


@dataclass(frozen=True)
class LinearDistillationOptions(DistillationOptions):
    """The distillation options, and `top_k`: 0 for the dense teacher, else its top-k only."""

    top_k: int = 0


def teacher_top_k(
    teacher: torch.Tensor, options: LinearDistillationOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probabilities at the temperature and their ids, from its logits."""
    temperature = options.temperature
    lt = F.log_softmax(teacher if temperature == 1.0 else teacher / temperature, dim=-1)
    values, ids = lt.topk(options.top_k, dim=-1)
    return values, ids


def head_token_losses(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head: Mapping[str, torch.Tensor],
    labels: torch.Tensor | None,
    options: LinearDistillationOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (total, hard, soft) of a chunk of tokens from both sides' hidden states; `head`
    holds classifier, bias, teacher_classifier, teacher_bias (the biases optional)."""
    student = head_logits(student_hidden, head["classifier"], head.get("bias"))
    with torch.no_grad():
        teacher = head_logits(teacher_hidden, head["teacher_classifier"], head.get("teacher_bias"))
        ids = None
        if options.top_k:
            teacher, ids = teacher_top_k(teacher, options)
    return token_losses(student, teacher, ids, labels, options)


class LinearDistillationLoss(TokenLoss):
    """Input: the student's hidden states (..., H). Target: the teacher's (..., H_t). Both heads'
    weights, optional biases and labels are the options' tensors. Tokens are the rows."""

    name: ClassVar[str] = "linear_distillation"
    tensors: ClassVar[tuple[str, ...]] = (
        "classifier",
        "bias",
        "teacher_classifier",
        "teacher_bias",
        "labels",
    )
    gradient_tensors: ClassVar[tuple[str, ...]] = ("classifier", "bias")
    parts: ClassVar[tuple[str, ...]] = ("hard_loss", "soft_loss")
    parameters: ClassVar[Mapping[str, type]] = {**DISTILLATION.parameters, "top_k": int}
    options_type: ClassVar[type[LossOptions]] = LinearDistillationOptions
    target_gradient: ClassVar[bool] = False
    oip_target: ClassVar[OipTensor] = OipTensor("target", "FP32", (-1, -1))
    oip_tensors: ClassVar[Mapping[str, str]] = {"labels": "INT64"}

    def options(self, message: Any, reduction: str) -> LossOptions:
        return options_from(self, message, reduction)

    # -- rules ----------------------------------------------------------------------------------

    def validate(self, call: LossCall, limits: TensorLimits | None) -> LossCall:
        options = call.options
        assert isinstance(options, LinearDistillationOptions)
        name = self.name
        check_options(
            options,
            name,
            call.reduction,
            "labels" in call.tensors,
            options.top_k > 0,
            f"{name}.top_k",
        )
        student, teacher = call.input, call.target
        vocabulary = check_head(call.tensors, student, name)
        require_floating(teacher, "target", "the teacher's hidden states")
        teacher_vocabulary = check_head(
            call.tensors, teacher, name, "teacher_classifier", "teacher_bias", hidden_field="target"
        )
        lead = tuple(student.shape[:-1])
        if tuple(teacher.shape[:-1]) != lead:
            raise invalid_argument(
                f"target.shape is {list(teacher.shape)}; the teacher's hidden states must have the "
                f"student's leading dimensions {list(lead)} (input.shape {list(student.shape)})",
                "TEACHER_SHAPE_MISMATCH",
                "target.shape",
                targetShape=list(teacher.shape),
                inputShape=list(student.shape),
            )
        where = (f"{name}.teacher_classifier.shape[0]", f"{name}.classifier.shape[0]")
        if options.top_k < 0 or options.top_k > teacher_vocabulary:
            raise invalid_argument(
                f"{name}.top_k is {options.top_k}; it must be in [0, {teacher_vocabulary}], the "
                "teacher's vocabulary (0: the dense teacher)",
                "TOP_K_INVALID",
                f"{name}.top_k",
                value=options.top_k,
                teacherVocabulary=teacher_vocabulary,
            )
        if options.top_k == 0:
            check_dense(options, vocabulary, teacher_vocabulary, name, where)
        elif teacher_vocabulary > vocabulary:  # the teacher's ids index the student's logits
            raise invalid_argument(
                f"the teacher's vocabulary ({where[0]} = {teacher_vocabulary}) is larger than the "
                f"student's ({where[1]} = {vocabulary}): its top-k ids could name no student logit",
                "VOCABULARY_MISMATCH",
                f"{name}.teacher_classifier.shape",
                teacherVocabulary=teacher_vocabulary,
                studentVocabulary=vocabulary,
            )
        tensors = dict(call.tensors)
        labels = tensors.get("labels")
        if labels is not None:
            tensors["labels"] = check_labels(labels, lead, vocabulary, options.ignore_index, f"{name}.labels")
        return dataclasses.replace(call, tensors=tensors)

    # -- computation ----------------------------------------------------------------------------

    def scratch_bytes(self, call: LossCall) -> int:
        """A dozen float32 (float64) temporaries of one chunk's logits (both sides), the per-token
        vectors, the heads in the compute dtype and the gradients of those asked for."""
        itemsize = compute_dtype(call.input.dtype).itemsize
        vocabulary = max(
            (t.shape[0] for n, t in call.tensors.items() if "classifier" in n and t.dim()), default=1
        )
        tokens = self.rows_of(call)
        chunk = min(tokens, max(1, CHUNK_ELEMENTS // vocabulary)) * vocabulary
        heads = sum(t.numel() for n, t in call.tensors.items() if n != "labels") * itemsize
        grads = sum(call.tensors[n].numel() for n in call.tensor_grads if n in call.tensors) * itemsize
        return 12 * chunk * itemsize + 8 * itemsize * tokens + heads + 2 * grads

    def example(self) -> LossCall:
        tensors = {
            "classifier": torch.randn(5, 3),
            "bias": torch.randn(5),
            "teacher_classifier": torch.randn(5, 4),
            "labels": torch.tensor([0, 1, 4, 2]),
        }
        options = self.make_options("mean", beta=0.5, weight_hard=0.5, temperature=2.0)
        return LossCall(options, torch.randn(4, 3), torch.randn(4, 4), input_grad=True, tensors=tensors)

    def compute(self, call: LossCall, upload: Upload) -> Computed:
        options = call.options
        assert isinstance(options, LinearDistillationOptions)
        dtype = compute_dtype(call.input.dtype)
        tokens = self.rows_of(call)
        student = upload(call.input).reshape(tokens, call.input.shape[-1])
        teacher = upload(call.target).reshape(tokens, call.target.shape[-1])
        head = {name: upload(tensor).to(dtype) for name, tensor in call.tensors.items() if name != "labels"}
        labels = call.tensors.get("labels")
        labels = None if labels is None else upload(labels).reshape(tokens)
        device = student.device
        divisor: torch.Tensor | float | None = None
        if call.reduction == "mean":
            if options.normalizer is not None:
                divisor = options.normalizer
            elif labels is None:
                divisor = float(max(tokens, 1))
            else:  # a device tensor: no synchronisation to count
                divisor = (labels != options.ignore_index).sum().clamp(min=1)
        upstream = upstream_gradient(call, upload, dtype, device)

        def per_token(
            rows: slice, leaf: torch.Tensor, leaves: Mapping[str, torch.Tensor]
        ) -> Sequence[torch.Tensor]:
            chunk_labels = None if labels is None else labels[rows]
            return head_token_losses(leaf, teacher[rows], {**head, **leaves}, chunk_labels, options)

        vocabulary = max(head["classifier"].shape[0], head["teacher_classifier"].shape[0] + 1)
        done = run_chunks(
            student,
            per_token,
            outputs=3,
            step=max(1, CHUNK_ELEMENTS // vocabulary),
            dtype=dtype,
            reduction=call.reduction,
            input_grad=call.input_grad,
            tensors={name: head[name] for name in call.tensor_grads},
            upstream=upstream,
            divisor=divisor,
        )
        shape = call.input.shape[:-1] if call.reduction == "none" else ()
        total, hard, soft = (value.reshape(shape) for value in done.values)
        grads = [] if done.grad is None else [done.grad.reshape(call.input.shape)]
        return Computed(total, grads, {"hard_loss": hard, "soft_loss": soft}, done.tensor_grads)

    # -- rows: computed alone -------------------------------------------------------------------

    def merge_params(self, call: LossCall) -> Hashable | None:
        return None  # large calls with heads of their own: alone

    def target_rows(self, array: np.ndarray, call: LossCall) -> np.ndarray:
        return array.reshape(-1, call.target.shape[-1])

    def splittable(self, call: LossCall) -> bool:
        return False


LINEAR_DISTILLATION = LinearDistillationLoss()
