"""Knowledge distillation: a student's logits against a teacher's distribution (dense, or its top-k),
plus an optional cross-entropy on hard labels, in one call.

The semantics are TRL's (`GKDTrainer.generalized_jsd_loss`, top-k with `loss_add_tail`) and Liger
Kernel's (`LigerFusedLinearJSDLoss`): per token, with student log-probabilities `ls` and teacher
log-probabilities `lt` at temperature T,

    beta = 0: D = KL(teacher || student)    beta = 1: D = KL(student || teacher)
    else:     D = beta KL(teacher || m) + (1 - beta) KL(student || m),  m = (1 - beta) p_s + beta p_t
    loss = weight_hard * cross_entropy(s, labels) + weight_soft * D (* T^2 with temperature_squared)

summed over the vocabulary, never divided by it; tokens whose label is `ignore_index` count in
neither term. `0 log 0` is 0, so a teacher probability of exactly 0 and `-inf` padding are values,
not NaN. float16 and bfloat16 logits are computed in float32, as Liger does.

The computation runs in chunks of tokens (`lossd.server.losses.chunked`), so a call holds its
inputs, its gradient and one chunk's temporaries, never several float32 copies of tokens x V. A call
that fits one chunk is exactly the reference composition of torch operations, reduction and
autograd included; in several chunks each token's values and gradient are the same, and the
reduction sums the chunks' sums in float64. The hard and soft terms are outputs on request.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from lossd.server.losses.base import (
    LossCall,
    LossOptions,
    OutputSpec,
    Rows,
    TensorSpec,
    Upload,
    compute_dtype,
    elementwise_flops,
    rows_of_tokens,
)
from lossd.server.losses.checks import dtype_name, invalid_argument, out_of_range, require_floating
from lossd.server.losses.chunked import ChunkedLoss, Prepared, as_divisor

if TYPE_CHECKING:
    from lossd.wire.codec import TensorLimits

__all__ = [
    "DISTILLATION",
    "DistillationLoss",
    "DistillationOptions",
    "check_dense",
    "check_labels",
    "check_options",
    "mean_divisor",
    "token_losses",
]

TAIL_CLAMP = -1e-7
"""The top-k tail bucket is log(1 - exp(min(logsumexp(values), TAIL_CLAMP))): never log(0)."""

_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)


@dataclass(frozen=True)
class DistillationOptions(LossOptions):
    """The options of a distillation call and their defaults (TRL's loss: forward KL, T = 1)."""

    beta: float = 0.0
    temperature: float = 1.0
    temperature_squared: bool = False
    weight_hard: float = 0.0
    weight_soft: float = 1.0
    ignore_index: int = -100
    label_smoothing: float = 0.0
    top_k_renormalize: bool = False
    truncate_teacher: bool = False
    normalizer: float | None = None


def _has_zero(lp: torch.Tensor) -> bool:
    """Whether log-probabilities may hold -inf (probability 0): always on a device (asking would
    wait for it), on the CPU by one reduction (NaN counts too: masking is then the safe side)."""
    if lp.device.type != "cpu" or lp.numel() == 0:
        return lp.numel() > 0
    least = lp.detach().min()
    return bool(least == -math.inf) or bool(least.isnan())


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """sum_v p (log p - log q) over the last dimension, with 0 log 0 = 0: where p is 0 both logs
    are replaced by 0 before they meet, so neither the value nor the gradient sees -inf - -inf.
    Without any 0 the replacement changes nothing (values nor gradients) and is skipped: most
    calls have none, and the fills would cost a quarter of the computation."""
    if _has_zero(lp):
        zero = lp == -math.inf
        return (lp.exp() * (lp.masked_fill(zero, 0.0) - lq.masked_fill(zero, 0.0))).sum(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _divergence(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0.0:
        return _kl(lt, ls)
    if beta == 1.0:
        return _kl(ls, lt)
    # Where both sides are 0 (top-k padding) so is the mixture; its logsumexp is taken over zeros
    # there instead, whose gradient is finite (that of -inf over -inf is not), and the -inf put back.
    if _has_zero(ls) and _has_zero(lt):
        absent = (ls == -math.inf) & (lt == -math.inf)
        safe_s, safe_t = ls.masked_fill(absent, 0.0), lt.masked_fill(absent, 0.0)
        mixture = torch.logsumexp(torch.stack([safe_s + math.log1p(-beta), safe_t + math.log(beta)]), 0)
        mixture = mixture.masked_fill(absent, -math.inf)
    else:
        mixture = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), 0)
    return beta * _kl(lt, mixture) + (1.0 - beta) * _kl(ls, mixture)


def _with_tail(lp: torch.Tensor) -> torch.Tensor:
    mass = torch.logsumexp(lp, -1, keepdim=True).clamp(max=TAIL_CLAMP)
    return torch.cat([lp, torch.log(-torch.expm1(mass))], -1)


def _renormalized(lp: torch.Tensor) -> torch.Tensor:
    total = torch.logsumexp(lp, -1, keepdim=True)
    return lp - total.masked_fill(total == -math.inf, 0.0)  # an all-padding token stays all -inf


def token_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    options: DistillationOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (total, hard, soft) for rows of tokens: `student` (n, V), `teacher` (n, V_t) or
    its top-k log-probabilities (n, k) with `teacher_ids`, `labels` (n) int64 or None."""
    dtype = compute_dtype(student.dtype)
    s = student.to(dtype)
    vocabulary = s.shape[-1]
    temperature = options.temperature
    # x / 1 is x, bit for bit, and so is its gradient: at T = 1 the divisions are left out.
    ls = F.log_softmax(s if temperature == 1.0 else s / temperature, dim=-1)
    if teacher_ids is None:
        t = teacher[:, :vocabulary] if teacher.shape[-1] != vocabulary else teacher
        t = t.to(dtype)
        lt = F.log_softmax(t if temperature == 1.0 else t / temperature, dim=-1)
    else:
        lt = teacher.to(dtype)
        padding = lt == -math.inf
        ls = ls.gather(-1, teacher_ids.masked_fill(padding, 0)).masked_fill(padding, -math.inf)
        if options.top_k_renormalize:
            ls, lt = _renormalized(ls), _renormalized(lt)
        else:
            ls, lt = _with_tail(ls), _with_tail(lt)
    soft = options.weight_soft * _divergence(ls, lt, options.beta)
    if options.temperature_squared:
        soft = soft * (temperature * temperature)
    if labels is None:
        hard = torch.zeros_like(soft)
        return soft, hard, soft
    counted = labels != options.ignore_index
    soft = soft.masked_fill(~counted, 0.0)
    if options.weight_hard == 0.0:
        hard = torch.zeros_like(soft)
        return soft, hard, soft
    hard = options.weight_hard * F.cross_entropy(
        s,
        labels,
        ignore_index=options.ignore_index,
        label_smoothing=options.label_smoothing,
        reduction="none",
    )
    return hard + soft, hard, soft


def check_options(
    options: DistillationOptions, loss: str, reduction: str, labels: bool, sparse: bool, sparse_field: str
) -> None:
    """The distillation options' rules; `loss` names the fields, `labels` and `sparse` say whether
    the call has labels and a sparse teacher (set by `sparse_field`)."""

    def bad(name: str, rule: str, reason: str) -> None:
        value = getattr(options, name)
        raise invalid_argument(
            f"{loss}.{name} is {value}; it must be {rule}",
            reason,
            f"{loss}.{name}",
            value=value,
        )

    if not 0.0 <= options.beta <= 1.0:
        bad(
            "beta",
            "in [0, 1] (0: forward KL, 1: reverse KL, between: generalized JSD)",
            "BETA_OUT_OF_RANGE",
        )
    if not (math.isfinite(options.temperature) and options.temperature > 0.0):
        bad("temperature", "finite and > 0", "TEMPERATURE_INVALID")
    for name in ("weight_hard", "weight_soft"):
        value = getattr(options, name)
        if not (math.isfinite(value) and value >= 0.0):
            bad(name, "finite and >= 0", "WEIGHT_INVALID")
    if not 0.0 <= options.label_smoothing <= 1.0:
        bad("label_smoothing", "in [0, 1]", "LABEL_SMOOTHING_OUT_OF_RANGE")
    if options.normalizer is not None:
        if not (math.isfinite(options.normalizer) and options.normalizer > 0.0):
            bad("normalizer", "finite and > 0", "NORMALIZER_INVALID")
        if reduction != "mean":
            raise invalid_argument(
                f"{loss}.normalizer is set with reduction {reduction!r}; it divides the "
                "summed loss, which is what 'mean' does: leave the reduction unset or 'mean'",
                "NORMALIZER_NOT_SUPPORTED",
                f"{loss}.normalizer",
                reduction=reduction,
            )
    if not labels:
        for name in ("weight_hard", "label_smoothing"):
            if getattr(options, name) != 0.0:
                raise invalid_argument(
                    f"{loss}.{name} is {getattr(options, name)} but {loss}.labels is "
                    "unset: the hard term needs labels",
                    "LABELS_MISSING",
                    f"{loss}.labels",
                    option=name,
                )
    for name, wanted in (("top_k_renormalize", True), ("truncate_teacher", False)):
        if getattr(options, name) and sparse != wanted:
            kind = "a sparse (top-k) teacher" if wanted else "a dense teacher"
            raise invalid_argument(
                f"{loss}.{name} is set, but it applies to {kind} only ({sparse_field} is "
                f"{'unset' if wanted else 'set'})",
                "OPTION_NOT_APPLICABLE",
                f"{loss}.{name}",
            )


def check_labels(
    labels: torch.Tensor, lead: tuple[int, ...], vocabulary: int, ignore_index: int, field: str
) -> torch.Tensor:
    """Hard labels `field`: an index dtype, one per token, in [0, V) or ignore_index; widened."""
    if labels.dtype not in _INDEX_DTYPES:
        raise invalid_argument(
            f"{field}.dtype is {dtype_name(labels.dtype)}; labels must be int64, int32 or uint8",
            "DTYPE_NOT_SUPPORTED",
            f"{field}.dtype",
            dtype=dtype_name(labels.dtype),
        )
    if tuple(labels.shape) != lead:
        raise invalid_argument(
            f"{field}.shape is {list(labels.shape)}; it must be the student's leading dimensions "
            f"{list(lead)}, one label per token",
            "LABELS_SHAPE_MISMATCH",
            f"{field}.shape",
            labelsShape=list(labels.shape),
            expectedShape=list(lead),
        )
    wide = labels if labels.dtype == torch.int64 else labels.to(torch.int64)
    if wide.device.type == "meta":
        return wide
    values = wide.numpy()
    found = out_of_range(values, vocabulary, values == ignore_index)
    if found is not None:
        position, value, count = found
        raise invalid_argument(
            f"{field}{position} is {value}, outside [0, {vocabulary}) and not ignore_index "
            f"({ignore_index}); {count} label(s) are out of range",
            "LABEL_OUT_OF_RANGE",
            field,
            value=value,
            index=position,
            vocabulary=vocabulary,
            ignoreIndex=ignore_index,
            count=count,
        )
    return wide


def check_dense(
    options: DistillationOptions,
    vocabulary: int,
    teacher_vocabulary: int,
    loss: str,
    where: tuple[str, str] = ("target.shape[-1]", "input.shape[-1]"),
) -> None:
    """A dense teacher's vocabulary against the student's; `where` names the teacher's and the
    student's vocabulary sizes in the request."""
    if teacher_vocabulary == vocabulary or (options.truncate_teacher and teacher_vocabulary > vocabulary):
        return
    hint = (
        f"; set {loss}.truncate_teacher to use the teacher's first V entries"
        if teacher_vocabulary > vocabulary
        else ""
    )
    raise invalid_argument(
        f"the teacher's vocabulary ({where[0]} = {teacher_vocabulary}) differs from the "
        f"student's ({where[1]} = {vocabulary}){hint}",
        "VOCABULARY_MISMATCH",
        where[0].split("[")[0],
        teacherVocabulary=teacher_vocabulary,
        studentVocabulary=vocabulary,
    )


Call = LossCall[DistillationOptions]


class DistillationLoss(ChunkedLoss[DistillationOptions]):
    """Input: the student's logits (..., V). Target: the dense teacher (..., V_t), or the top-k
    teacher's log-probabilities (..., k) with `teacher_ids`. Optional `labels` (...). Tokens are the
    rows: one loss per token for 'none'."""

    name = "distillation"
    options_type = DistillationOptions
    target: ClassVar[TensorSpec] = TensorSpec("target", "log_probabilities", (-1, -1))
    tensors: ClassVar[tuple[TensorSpec, ...]] = (
        TensorSpec("teacher_ids", "indices", (-1, -1), per_row=True),
        TensorSpec("labels", "indices", per_row=True),
    )
    outputs: ClassVar[tuple[OutputSpec, ...]] = (OutputSpec("hard_loss"), OutputSpec("soft_loss"))
    temporaries: ClassVar[int] = 12

    # -- rules ----------------------------------------------------------------------------------

    def check(self, call: Call, limits: TensorLimits | None) -> Call:
        options = call.options
        check_options(
            options,
            self.name,
            call.reduction,
            "labels" in call.tensors,
            "teacher_ids" in call.tensors,
            "distillation.teacher_ids",
        )
        student, teacher = call.input, call.target
        if student.dim() == 0 or student.shape[-1] == 0:
            raise invalid_argument(
                f"input.shape is {list(student.shape)}; distillation needs the student's logits "
                "(..., V) with V >= 1",
                "SHAPE_INVALID",
                "input.shape",
                inputShape=list(student.shape),
            )
        require_floating(teacher, "target", "the teacher")
        lead, vocabulary = tuple(student.shape[:-1]), student.shape[-1]
        if teacher.dim() == 0 or tuple(teacher.shape[:-1]) != lead:
            raise invalid_argument(
                f"target.shape is {list(teacher.shape)}; the teacher must have the student's leading "
                f"dimensions {list(lead)} and one last dimension (input.shape {list(student.shape)})",
                "TEACHER_SHAPE_MISMATCH",
                "target.shape",
                targetShape=list(teacher.shape),
                inputShape=list(student.shape),
            )
        tensors = dict(call.tensors)
        ids = tensors.get("teacher_ids")
        if ids is None:
            check_dense(options, vocabulary, teacher.shape[-1], self.name)
        else:
            tensors["teacher_ids"] = self._teacher_ids(ids, teacher, vocabulary, options)
        labels = tensors.get("labels")
        if labels is not None:
            tensors["labels"] = check_labels(
                labels, lead, vocabulary, options.ignore_index, "distillation.labels"
            )
        return dataclasses.replace(call, tensors=tensors)

    @staticmethod
    def _teacher_ids(
        ids: torch.Tensor, values: torch.Tensor, vocabulary: int, options: DistillationOptions
    ) -> torch.Tensor:
        field = "distillation.teacher_ids"
        if ids.dtype not in (torch.int64, torch.int32):
            raise invalid_argument(
                f"{field}.dtype is {dtype_name(ids.dtype)}; teacher ids must be int64 or int32",
                "DTYPE_NOT_SUPPORTED",
                f"{field}.dtype",
                dtype=dtype_name(ids.dtype),
            )
        if ids.shape != values.shape:
            raise invalid_argument(
                f"{field}.shape is {list(ids.shape)}; it must be target.shape {list(values.shape)}, one id "
                "per teacher log-probability",
                "TEACHER_SHAPE_MISMATCH",
                f"{field}.shape",
                idsShape=list(ids.shape),
                targetShape=list(values.shape),
            )
        wide = ids if ids.dtype == torch.int64 else ids.to(torch.int64)
        if "meta" in (wide.device.type, values.device.type):  # a StreamLoss header: checked on arrival
            return wide
        padding = torch.isneginf(values)
        found = out_of_range(wide.numpy(), vocabulary, padding.numpy())
        if found is not None:
            position, value, count = found
            raise invalid_argument(
                f"{field}{position} is {value}, outside [0, {vocabulary}) for the student's "
                f"{vocabulary} logits (only padding, a -inf teacher value, may hold any id); "
                f"{count} id(s) are out of range",
                "TEACHER_ID_OUT_OF_RANGE",
                field,
                value=value,
                index=position,
                vocabulary=vocabulary,
                count=count,
            )
        if padding.any():
            wide = wide.masked_fill(padding, 0)
        return wide

    # -- computation ----------------------------------------------------------------------------

    def flops(self, call: Call) -> float:
        """Two log-softmaxes (student and teacher, at a temperature) and the divergence over each
        logit."""
        return elementwise_flops(call, 16.0)

    def width(self, call: Call) -> int:
        """The student's vocabulary, or the teacher's (a top-k teacher's k + 1 buckets) if wider."""
        if not call.input.dim():
            return 1
        teacher = call.target.shape[-1] + ("teacher_ids" in call.tensors) if call.target.dim() else 1
        return max(call.input.shape[-1], teacher)

    def prepare(self, call: Call, upload: Upload, dtype: torch.dtype) -> Prepared:
        tokens = self.tokens(call)
        rows = {
            "input": upload(call.input).reshape(tokens, call.input.shape[-1]),
            "target": upload(call.target).reshape(tokens, call.target.shape[-1]),
        }
        ids, labels = call.tensors.get("teacher_ids"), call.tensors.get("labels")
        if ids is not None:
            rows["teacher_ids"] = upload(ids).reshape(tokens, ids.shape[-1])
        if labels is not None:
            rows["labels"] = upload(labels).reshape(tokens)
        return Prepared(rows)

    def per_chunk(
        self,
        options: DistillationOptions,
        rows: Mapping[str, torch.Tensor],
        whole: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        total, hard, soft = token_losses(
            rows["input"], rows["target"], rows.get("teacher_ids"), rows.get("labels"), options
        )
        return total, {"hard_loss": hard, "soft_loss": soft}

    def mean_divisor(self, call: Call, prepared: Prepared) -> torch.Tensor | float:
        return mean_divisor(
            call.options, prepared.rows.get("labels"), self.tokens(call), self.loss_dtype(call)
        )

    def example(self) -> Call:
        student, teacher = torch.randn(4, 5), torch.randn(4, 5)
        options = self.make_options("mean", beta=0.5, weight_hard=0.5)
        return LossCall(
            options,
            student,
            teacher,
            tensors={"labels": torch.tensor([0, 1, 4, 2])},
            grads=frozenset({"input"}),
            outputs=frozenset({"hard_loss", "soft_loss"}),
        )

    @property
    def rows(self) -> Rows[DistillationOptions]:
        return _ROWS


def mean_divisor(
    options: DistillationOptions, labels: torch.Tensor | None, tokens: int, dtype: torch.dtype
) -> torch.Tensor | float:
    """What a distillation's 'mean' divides by: the normalizer (rounded to the compute dtype, as
    torch divides by a number), or the tokens that count (at least 1; a device tensor, so nothing
    waits for the device to count), or every token."""
    if options.normalizer is not None:
        return as_divisor(options.normalizer, dtype)
    if labels is None:
        return float(max(tokens, 1))
    return (labels != options.ignore_index).sum().clamp(min=1)


class TokenRows(Rows[DistillationOptions]):
    """Rows of tokens: merged calls are one call of their concatenated tokens."""

    def params(self, call: Call) -> Hashable | None:
        """Calls with the same vocabularies, kind of teacher, labels or not, and options (but their
        reductions and normalizers) are tokens of one computation."""
        return (
            call.input.shape[-1],
            call.target.shape[-1],
            tuple(sorted(call.tensors)),
            dataclasses.replace(call.options, reduction="none", normalizer=None),
        )

    def count(self, call: Call) -> int:
        return rows_of_tokens(call.input.shape)

    def input_rows(self, array: np.ndarray, call: Call) -> np.ndarray:
        return array.reshape(-1, call.input.shape[-1])

    def target_rows(self, array: np.ndarray, call: Call) -> np.ndarray:
        return array.reshape(-1, call.target.shape[-1])

    def from_rows(self, rows: np.ndarray, shape: Sequence[int], call: Call) -> np.ndarray:
        return rows.reshape(shape)

    def mean_divisors(self, calls: Sequence[Call], counts: Sequence[int], targets: np.ndarray) -> np.ndarray:
        result = np.empty(len(calls))
        for i, call in enumerate(calls):
            labels = call.tensors.get("labels")
            divisor = mean_divisor(call.options, labels, counts[i], compute_dtype(call.input.dtype))
            result[i] = float(divisor)
        return result

    def splittable(self, call: Call) -> bool:
        return call.input.dim() >= 2


_ROWS = TokenRows()

DISTILLATION = DistillationLoss()
