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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from lossd.server.losses.base import LossCall, OutputSpec, TensorSpec, Upload
from lossd.server.losses.checks import invalid_argument, require_floating
from lossd.server.losses.chunked import ChunkedLoss, Prepared
from lossd.server.losses.distillation import (
    DISTILLATION,
    DistillationOptions,
    check_dense,
    check_labels,
    check_options,
    mean_divisor,
    token_losses,
)
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


Call = LossCall[LinearDistillationOptions]

_HEADS = ("classifier", "bias", "teacher_classifier", "teacher_bias")


class LinearDistillationLoss(ChunkedLoss[LinearDistillationOptions]):
    """Input: the student's hidden states (..., H). Target: the teacher's (..., H_t). Both heads'
    weights, optional biases and labels are the options' tensors. Tokens are the rows."""

    name = "linear_distillation"
    options_type = LinearDistillationOptions
    target: ClassVar[TensorSpec] = TensorSpec("target", shape=(-1, -1))
    tensors: ClassVar[tuple[TensorSpec, ...]] = (
        *HEAD,
        TensorSpec("teacher_classifier", shape=(-1, -1)),
        TensorSpec("teacher_bias"),
        TensorSpec("labels", "indices", per_row=True),
    )
    outputs: ClassVar[tuple[OutputSpec, ...]] = DISTILLATION.outputs
    temporaries: ClassVar[int] = 12

    # -- rules ----------------------------------------------------------------------------------

    def check(self, call: Call, limits: TensorLimits | None) -> Call:
        options = call.options
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

    def width(self, call: Call) -> int:
        """Both sides' logits, a top-k teacher's tail bucket included."""
        sizes = [
            call.tensors[name].shape[0]
            for name in ("classifier", "teacher_classifier")
            if name in call.tensors
        ]
        return max(sizes[0], sizes[-1] + (call.options.top_k > 0)) if sizes else 1

    def held_bytes(self, call: Call) -> int:
        return head_bytes(call, _HEADS)

    def shared_scratch_bytes(self, call: Call) -> int:
        return resident_head_bytes(call, _HEADS)

    def flops(self, call: Call) -> float:
        """Both heads over every token (the teacher's forward only) and the divergence."""
        student = head_flops(call, call.input, "classifier", bool(call.grads))
        return student + head_flops(call, call.target, "teacher_classifier", False)

    def prepare(self, call: Call, upload: Upload, dtype: torch.dtype) -> Prepared:
        tokens = self.tokens(call)
        rows = {
            "input": upload(call.input).reshape(tokens, call.input.shape[-1]),
            "target": upload(call.target).reshape(tokens, call.target.shape[-1]),
        }
        labels = call.tensors.get("labels")
        if labels is not None:
            rows["labels"] = upload(labels).reshape(tokens)
        whole = {name: upload(tensor).to(dtype) for name, tensor in call.tensors.items() if name != "labels"}
        return Prepared(rows, whole)

    def per_chunk(
        self,
        options: LinearDistillationOptions,
        rows: Mapping[str, torch.Tensor],
        whole: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        student = head_logits(rows["input"], whole["classifier"], whole.get("bias"))
        with torch.no_grad():
            teacher = head_logits(rows["target"], whole["teacher_classifier"], whole.get("teacher_bias"))
            ids = None
            if options.top_k:
                teacher, ids = teacher_top_k(teacher, options)
        total, hard, soft = token_losses(student, teacher, ids, rows.get("labels"), options)
        return total, {"hard_loss": hard, "soft_loss": soft}

    def mean_divisor(self, call: Call, prepared: Prepared) -> torch.Tensor | float:
        return mean_divisor(
            call.options, prepared.rows.get("labels"), self.tokens(call), self.loss_dtype(call)
        )

    def example(self) -> Call:
        tensors = {
            "classifier": torch.randn(5, 3),
            "bias": torch.randn(5),
            "teacher_classifier": torch.randn(5, 4),
            "labels": torch.tensor([0, 1, 4, 2]),
        }
        options = self.make_options("mean", beta=0.5, weight_hard=0.5, temperature=2.0)
        return LossCall(
            options, torch.randn(4, 3), torch.randn(4, 4), tensors=tensors, grads=frozenset({"input"})
        )


LINEAR_DISTILLATION = LinearDistillationLoss()
