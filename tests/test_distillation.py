"""The distillation loss in the engine: bit for bit the reference composition
(tests/distillation_reference.py) when computed in one piece, within a stated tolerance in chunks;
finite wherever the math is; every invalid option or tensor refused naming its field."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossd.server.engine import LossEngine
from lossd.server.engine.finite import nonfinite_fields
from lossd.server.losses import LossCall, make_options
from lossd.server.losses import chunked as chunked_module
from lossd.server.losses import distillation as distillation_module
from lossd.wire.errors import InvalidArgumentError

from distillation_reference import CHUNKED_RTOL, reference, reference_grad

ENGINE = LossEngine("cpu")
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def call_of(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    teacher_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    grad: bool = True,
    grad_output: torch.Tensor | None = None,
    grad_dtype: torch.dtype | None = None,
    **options: Any,
) -> LossCall:
    tensors = {}
    if teacher_ids is not None:
        tensors["teacher_ids"] = teacher_ids
    if labels is not None:
        tensors["labels"] = labels
    return LossCall(
        make_options("distillation", reduction, **options),
        student,
        teacher,
        tensors=tensors,
        grads=frozenset({"input"}) if grad else frozenset(),
        outputs=PARTS,
        grad_output=grad_output,
        grad_dtype=grad_dtype,
    )


PARTS = frozenset({"hard_loss", "soft_loss"})


def top_k(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = torch.log_softmax(teacher_logits.double(), -1).topk(k, -1)
    return values.float(), ids


def assert_bits(actual: Any, expected: torch.Tensor, what: str) -> None:
    assert isinstance(actual, torch.Tensor), what
    assert actual.dtype == expected.dtype, f"{what}: {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    assert torch.equal(actual, expected) or (
        torch.isnan(expected).any() and torch.equal(actual.isnan(), expected.isnan())
    ), f"{what} differs: {actual} vs {expected}"


def check_exact(call: LossCall, **reference_kwargs: Any) -> Any:
    """The engine's result equals the reference's loss, parts and gradient bit for bit."""
    out = ENGINE.compute(call)
    options = {
        name: getattr(call.options, name)
        for name in distillation_module.DistillationOptions.__dataclass_fields__
    }
    del options["loss"], options["reduction"]
    kwargs = {**options, "reduction": call.reduction, **call.tensors, **reference_kwargs}
    if call.input_grad:
        loss, hard, soft, grad = reference_grad(
            call.input, call.target, grad_output=call.grad_output, **kwargs
        )
        if call.grad_dtype is not None:
            grad = grad.to(call.grad_dtype)
        assert_bits(out.input_grad, grad, "input gradient")
    else:
        loss, hard, soft = reference(call.input, call.target, **kwargs)
    assert_bits(out.loss, loss, "loss")
    assert_bits(out.outputs["hard_loss"], hard, "hard loss")
    assert_bits(out.outputs["soft_loss"], soft, "soft loss")
    return out


# -- exactness -------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.1, 1e-9, 1 - 1e-9])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher", ["dense", "tail", "renormalized"])
def test_one_piece_equals_the_reference_bit_for_bit(beta: float, reduction: str, teacher: str) -> None:
    torch.manual_seed(0)
    student = torch.randn(3, 4, 11) * 3
    teacher_logits = torch.randn(3, 4, 11) * 3
    labels = torch.randint(0, 11, (3, 4))
    labels[0, 1] = labels[2, 3] = -100
    kwargs: dict[str, Any] = {"labels": labels, "weight_hard": 0.3, "weight_soft": 0.7, "temperature": 2.0}
    if teacher == "dense":
        target = teacher_logits
    else:
        target, ids = top_k(teacher_logits, 5)
        target[1, 2, 3:] = -math.inf  # padding
        ids[1, 2, 3:] = 10_000  # any id where padded
        kwargs |= {"teacher_ids": ids.int(), "top_k_renormalize": teacher == "renormalized"}
    check_exact(call_of(student, target, beta=beta, reduction=reduction, **kwargs))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(9,), (5, 9), (2, 3, 9), (2, 1, 2, 9), (0, 9)])
def test_dtypes_and_shapes(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    student = (torch.randn(shape) * 4).to(dtype)
    teacher = torch.randn(shape).to(dtype)
    labels = torch.randint(0, 9, shape[:-1])
    out = check_exact(
        call_of(student, teacher, labels=labels, beta=0.3, weight_hard=1.0, label_smoothing=0.1)
    )
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.loss.dtype == expected
    assert out.input_grad.dtype == dtype


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"temperature_squared": True, "temperature": 4.0},
        {"normalizer": 37.0},
        {"weight_hard": 2.0, "weight_soft": 0.0},
        {"ignore_index": 3, "weight_hard": 0.5},
        {"label_smoothing": 0.2, "weight_hard": 1.0},
    ],
)
def test_options_are_exact(options: dict[str, Any]) -> None:
    torch.manual_seed(2)
    student, teacher = torch.randn(6, 8), torch.randn(6, 8)
    labels = torch.tensor([0, 3, options.get("ignore_index", -100), 7, 3, 1])
    check_exact(call_of(student, teacher, labels=labels, **options))


def test_truncated_teacher_vocabulary() -> None:
    torch.manual_seed(3)
    student, teacher = torch.randn(4, 6), torch.randn(4, 8)
    out = check_exact(call_of(student, teacher, truncate_teacher=True))
    # the first V entries of the teacher, renormalized: as if the teacher had the student's vocabulary
    local = F.kl_div(
        F.log_softmax(student, -1), F.log_softmax(teacher[:, :6], -1), log_target=True, reduction="sum"
    )
    torch.testing.assert_close(out.loss, local / 4)


def test_upstream_gradient_and_gradient_dtype() -> None:
    torch.manual_seed(4)
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    check_exact(call_of(student, teacher, reduction="none", grad_output=torch.randn(2, 3)))
    check_exact(call_of(student, teacher, grad_output=torch.tensor(2.5, dtype=torch.float64)))
    check_exact(call_of(student, teacher, grad_dtype=torch.float16))


def test_matches_the_three_torch_losses_it_is_made_of() -> None:
    """Forward KL at T = 1 is torch's kl_div per token; the hard term is torch's cross_entropy."""
    torch.manual_seed(5)
    student, teacher = torch.randn(5, 10), torch.randn(5, 10)
    labels = torch.tensor([1, 2, -100, 4, 9])
    out = ENGINE.compute(
        call_of(student, teacher, labels=labels, weight_hard=1.0, reduction="none", grad=False)
    )
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none")
    kl = torch.where(labels != -100, kl.sum(-1), 0.0)
    hard = F.cross_entropy(student, labels, reduction="none")
    torch.testing.assert_close(out.outputs["soft_loss"], kl)
    torch.testing.assert_close(out.outputs["hard_loss"], hard)
    torch.testing.assert_close(out.loss, kl + hard)


def test_the_mean_never_divides_by_the_vocabulary() -> None:
    student, teacher = torch.randn(4, 1000), torch.randn(4, 1000)
    total = ENGINE.compute(call_of(student, teacher, reduction="sum", grad=False)).loss
    mean = ENGINE.compute(call_of(student, teacher, grad=False)).loss
    torch.testing.assert_close(mean, total / 4)


# -- chunks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("sparse", [False, True])
def test_chunks_agree_with_one_piece(monkeypatch: pytest.MonkeyPatch, reduction: str, sparse: bool) -> None:
    torch.manual_seed(6)
    student, teacher_logits = torch.randn(37, 50) * 2, torch.randn(37, 50) * 2
    labels = torch.randint(0, 50, (37,))
    labels[::5] = -100
    kwargs: dict[str, Any] = {"labels": labels, "beta": 0.4, "weight_hard": 0.5, "reduction": reduction}
    target = teacher_logits
    if sparse:
        target, ids = top_k(teacher_logits, 8)
        kwargs["teacher_ids"] = ids
    upstream = torch.randn(37) if reduction == "none" else torch.tensor(1.5)
    call = call_of(student, target, grad_output=upstream, **kwargs)
    whole = ENGINE.compute(call)
    calls = []
    original = distillation_module.token_losses

    def counting(student: torch.Tensor, *args: Any) -> Any:
        calls.append(student.shape[0])
        return original(student, *args)

    monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 50 * 6)
    monkeypatch.setattr(distillation_module, "token_losses", counting)
    chunked = ENGINE.compute(call)
    assert calls == [6, 6, 6, 6, 6, 6, 1], "one chunk's tokens at a time"
    # Each token's values and gradient are computed alike: equal. The reductions sum in float64.
    assert torch.equal(chunked.input_grad, whole.input_grad)
    for name in ("hard_loss", "soft_loss"):
        torch.testing.assert_close(chunked.outputs[name], whole.outputs[name], rtol=CHUNKED_RTOL, atol=1e-7)
    torch.testing.assert_close(chunked.loss, whole.loss, rtol=CHUNKED_RTOL, atol=1e-7)


def test_a_large_call_holds_one_chunk_of_temporaries() -> None:
    """The memory a call is admitted with is one chunk's temporaries, not a multiple of its input."""
    big = call_of(torch.empty(4096, 32000), torch.empty(4096, 32000))
    assert ENGINE.footprint(big) < 0.5 * big.input.nbytes
    small = call_of(torch.empty(3, 5), torch.empty(3, 5))
    assert ENGINE.footprint(small) < 1 << 20


# -- finite where the math is ----------------------------------------------------------------------


def finite_everything(out: Any) -> None:
    for name, value in (("loss", out.loss), *out.outputs.items(), ("grad", out.input_grad)):
        assert torch.isfinite(torch.as_tensor(value)).all(), f"{name} is not finite: {value}"


@pytest.mark.parametrize("beta", [0.0, 0.5, 1e-12, 1 - 1e-12])
def test_teacher_probabilities_of_zero(beta: float) -> None:
    torch.manual_seed(7)
    student = torch.randn(4, 6)
    teacher = torch.log_softmax(torch.randn(4, 6), -1)
    teacher[:, :3] = -math.inf  # the teacher is sure these are not the next token
    out = check_exact(call_of(student, teacher, beta=beta))
    finite_everything(out)


def test_reverse_kl_against_a_zero_teacher_probability_is_infinite_as_the_math_says() -> None:
    student = torch.zeros(1, 3)
    teacher = torch.tensor([[0.0, 0.0, -math.inf]])
    out = check_exact(call_of(student, teacher, beta=1.0, grad=False))
    assert out.loss == math.inf


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_padding_and_all_padding_tokens(renormalize: bool, beta: float) -> None:
    torch.manual_seed(8)
    student = torch.randn(3, 20)
    values, ids = top_k(torch.randn(3, 20), 4)
    values[1, 2:] = -math.inf
    values[2, :] = -math.inf  # a token whose teacher sent nothing
    ids[2, :] = -1
    out = check_exact(call_of(student, values, teacher_ids=ids, beta=beta, top_k_renormalize=renormalize))
    finite_everything(out)
    none = ENGINE.compute(
        call_of(student, values, teacher_ids=ids, beta=beta, top_k_renormalize=renormalize, reduction="none")
    )
    assert none.loss[2] == 0.0
    assert torch.equal(none.input_grad[2], torch.zeros(20))


def test_every_token_ignored_is_zero_not_nan() -> None:
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    labels = torch.full((3,), -100)
    out = check_exact(call_of(student, teacher, labels=labels, weight_hard=1.0))
    assert out.loss == 0.0 and out.outputs["hard_loss"] == 0.0 and out.outputs["soft_loss"] == 0.0
    assert torch.equal(out.input_grad, torch.zeros(3, 5))


@pytest.mark.parametrize("temperature", [1e-4, 1e-2, 1e2, 1e4])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_very_small_and_very_large_temperatures(temperature: float, beta: float) -> None:
    torch.manual_seed(9)
    student, teacher = torch.randn(4, 7) * 5, torch.randn(4, 7) * 5
    out = check_exact(call_of(student, teacher, temperature=temperature, beta=beta, temperature_squared=True))
    finite_everything(out)


def test_ignored_tokens_get_no_gradient() -> None:
    torch.manual_seed(10)
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    labels = torch.tensor([1, -100, 2, -100])
    out = ENGINE.compute(call_of(student, teacher, labels=labels, beta=0.5, weight_hard=1.0))
    assert torch.equal(out.input_grad[1], torch.zeros(6)) and torch.equal(out.input_grad[3], torch.zeros(6))
    assert out.input_grad[0].abs().sum() > 0


def test_minus_infinity_in_the_teacher_is_a_value_not_a_fault() -> None:
    teacher = torch.tensor([[0.0, -math.inf, -1.0]])
    call = call_of(torch.zeros(1, 3), teacher)
    assert nonfinite_fields(call) == ()
    assert nonfinite_fields(call_of(torch.zeros(1, 3), torch.tensor([[0.0, math.nan, 1.0]]))) == ("target",)
    assert nonfinite_fields(call_of(torch.zeros(1, 3), torch.tensor([[0.0, math.inf, 1.0]]))) == ("target",)
    assert nonfinite_fields(call_of(torch.tensor([[0.0, -math.inf, 1.0]]), teacher)) == ("input",)


# -- properties ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    vocabulary=st.integers(1, 12),
    dtype=st.sampled_from(FLOATS),
    beta=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    temperature=st.floats(0.05, 20.0),
    squared=st.booleans(),
    weights=st.tuples(st.floats(0.0, 3.0), st.floats(0.0, 3.0)),
    smoothing=st.floats(0.0, 1.0),
    teacher=st.sampled_from(["dense", "tail", "renormalized", "truncated"]),
    labelled=st.booleans(),
    reduction=st.sampled_from(["none", "mean", "sum"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_one_piece_is_the_reference(
    lead: list[int],
    vocabulary: int,
    dtype: torch.dtype,
    beta: float,
    temperature: float,
    squared: bool,
    weights: tuple[float, float],
    smoothing: float,
    teacher: str,
    labelled: bool,
    reduction: str,
    seed: int,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    shape = (*lead, vocabulary)
    student = (torch.randn(shape, generator=generator) * 3).to(dtype)
    kwargs: dict[str, Any] = {"beta": beta, "temperature": temperature, "temperature_squared": squared}
    kwargs["weight_soft"] = weights[1]
    if labelled:
        labels = torch.randint(-1, vocabulary, tuple(lead), generator=generator)
        kwargs |= {
            "labels": labels,
            "ignore_index": -1,
            "weight_hard": weights[0],
            "label_smoothing": smoothing,
        }
    if teacher in ("dense", "truncated"):
        extra = 3 if teacher == "truncated" else 0
        target = torch.randn((*lead, vocabulary + extra), generator=generator).to(dtype)
        kwargs["truncate_teacher"] = teacher == "truncated"
    else:
        k = min(vocabulary, 3)
        target, ids = top_k(torch.randn(shape, generator=generator), k)
        kwargs |= {"teacher_ids": ids, "top_k_renormalize": teacher == "renormalized"}
    out = check_exact(call_of(student, target, reduction=reduction, **kwargs))
    assert out.loss.shape == (tuple(lead) if reduction == "none" else ())


# -- validation ------------------------------------------------------------------------------------


def refused(call: LossCall) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as caught:
        ENGINE.prepare(call)
    return caught.value


@pytest.mark.parametrize(
    ("options", "reason", "field"),
    [
        ({"beta": -0.1}, "BETA_OUT_OF_RANGE", "distillation.beta"),
        ({"beta": 1.5}, "BETA_OUT_OF_RANGE", "distillation.beta"),
        ({"beta": math.nan}, "BETA_OUT_OF_RANGE", "distillation.beta"),
        ({"temperature": 0.0}, "TEMPERATURE_INVALID", "distillation.temperature"),
        ({"temperature": -1.0}, "TEMPERATURE_INVALID", "distillation.temperature"),
        ({"temperature": math.inf}, "TEMPERATURE_INVALID", "distillation.temperature"),
        ({"weight_soft": -1.0}, "WEIGHT_INVALID", "distillation.weight_soft"),
        ({"weight_soft": math.nan}, "WEIGHT_INVALID", "distillation.weight_soft"),
        ({"normalizer": 0.0}, "NORMALIZER_INVALID", "distillation.normalizer"),
        ({"normalizer": math.inf}, "NORMALIZER_INVALID", "distillation.normalizer"),
        ({"normalizer": 4.0, "reduction": "sum"}, "NORMALIZER_NOT_SUPPORTED", "distillation.normalizer"),
        ({"weight_hard": 1.0}, "LABELS_MISSING", "distillation.labels"),
        ({"label_smoothing": 0.1}, "LABELS_MISSING", "distillation.labels"),
        ({"top_k_renormalize": True}, "OPTION_NOT_APPLICABLE", "distillation.top_k_renormalize"),
        ({"reduction": "batchmean"}, "REDUCTION_NOT_SUPPORTED", "reduction"),
    ],
)
def test_invalid_options_name_their_field(options: dict[str, Any], reason: str, field: str) -> None:
    error = refused(call_of(torch.randn(2, 4), torch.randn(2, 4), **options))
    assert (error.reason, error.field) == (reason, field), error


def test_invalid_label_options_name_their_field() -> None:
    labels = torch.tensor([0, 1])
    for options, reason, field in (
        ({"label_smoothing": 1.5}, "LABEL_SMOOTHING_OUT_OF_RANGE", "distillation.label_smoothing"),
        ({"weight_hard": -2.0}, "WEIGHT_INVALID", "distillation.weight_hard"),
    ):
        error = refused(call_of(torch.randn(2, 4), torch.randn(2, 4), labels=labels, **options))
        assert (error.reason, error.field) == (reason, field), error


def test_invalid_tensors_name_their_field() -> None:
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    values, ids = top_k(t, 2)
    cases: list[tuple[LossCall, str, str]] = [
        (call_of(torch.randn(()), torch.randn(())), "SHAPE_INVALID", "input.shape"),
        (call_of(torch.randn(2, 0), torch.randn(2, 0)), "SHAPE_INVALID", "input.shape"),
        (call_of(s, torch.randn(2, 4, 5)), "TEACHER_SHAPE_MISMATCH", "target.shape"),
        (call_of(s, torch.randn(2, 3, 6)), "VOCABULARY_MISMATCH", "target.shape"),
        (call_of(s, torch.randn(2, 3, 4), truncate_teacher=True), "VOCABULARY_MISMATCH", "target.shape"),
        (call_of(s, torch.randint(0, 3, (2, 3, 5))), "DTYPE_NOT_SUPPORTED", "target.dtype"),
        (
            call_of(s, t.long().float(), labels=torch.zeros(2, 3)),
            "DTYPE_NOT_SUPPORTED",
            "distillation.labels.dtype",
        ),
        (
            call_of(s, t, labels=torch.zeros(2, 4, dtype=torch.long)),
            "LABELS_SHAPE_MISMATCH",
            "distillation.labels.shape",
        ),
        (call_of(s, t, labels=torch.full((2, 3), 5)), "LABEL_OUT_OF_RANGE", "distillation.labels"),
        (
            call_of(s, values, teacher_ids=ids.float()),
            "DTYPE_NOT_SUPPORTED",
            "distillation.teacher_ids.dtype",
        ),
        (
            call_of(s, values, teacher_ids=ids[..., :1]),
            "TEACHER_SHAPE_MISMATCH",
            "distillation.teacher_ids.shape",
        ),
        (call_of(s, values, teacher_ids=ids + 5), "TEACHER_ID_OUT_OF_RANGE", "distillation.teacher_ids"),
        (
            call_of(s, values, teacher_ids=ids, truncate_teacher=True),
            "OPTION_NOT_APPLICABLE",
            "distillation.truncate_teacher",
        ),
        (call_of(s, t, teacher_ids=ids), "TEACHER_SHAPE_MISMATCH", "distillation.teacher_ids.shape"),
    ]
    for call, reason, field in cases:
        error = refused(call)
        assert (error.reason, error.field) == (reason, field), error
    error = refused(call_of(s, torch.randn(2, 3, 6)))
    assert "6" in error.message and "5" in error.message, "both vocabulary sizes are named"
    assert error.metadata == {"teacherVocabulary": "6", "studentVocabulary": "5"}


def test_the_teacher_has_no_gradient() -> None:
    call = LossCall(
        make_options("distillation"), torch.randn(2, 3), torch.randn(2, 3), grads=frozenset({"target"})
    )
    error = refused(call)
    assert (error.reason, error.field) == ("GRADIENT_NOT_SUPPORTED", "gradients.with_respect_to")


def test_the_parts_come_back_only_when_asked_for() -> None:
    call = dataclasses.replace(
        call_of(torch.randn(3, 5), torch.randn(3, 5)), outputs=frozenset({"soft_loss"})
    )
    out = ENGINE.compute(call)
    assert set(out.outputs) == {"soft_loss"}
    assert not ENGINE.compute(dataclasses.replace(call, outputs=frozenset())).outputs


def test_the_zero_probability_masks_change_nothing_where_there_is_no_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the CPU the masks are skipped when no probability is 0; on a device (where asking would
    wait for it) they always apply. Both give the same bits."""
    torch.manual_seed(12)
    student, teacher = torch.randn(5, 9), torch.randn(5, 9)
    values, ids = top_k(torch.randn(5, 9), 4)
    calls = [
        call_of(student, teacher, beta=0.5),
        call_of(student, teacher, beta=0.0),
        call_of(student, values, teacher_ids=ids, beta=0.5),
    ]
    skipped = [ENGINE.compute(call) for call in calls]
    monkeypatch.setattr(distillation_module, "_has_zero", lambda lp: True)
    masked = [ENGINE.compute(call) for call in calls]
    for a, b in zip(skipped, masked, strict=True):
        assert torch.equal(a.loss, b.loss) and torch.equal(a.input_grad, b.input_grad)


def test_zero_probabilities_are_looked_for_on_the_cpu_only() -> None:
    has_zero = distillation_module._has_zero
    assert not has_zero(torch.tensor([[-1.0, -2.0]]))
    assert has_zero(torch.tensor([[-1.0, -math.inf]]))
    assert has_zero(torch.tensor([[-1.0, math.nan]]))
    assert has_zero(torch.empty(2, 3, device="meta")), "on a device: assumed, never asked"
    assert not has_zero(torch.empty(0, 3, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparse", [False, True])
def test_merged_calls_keep_their_own_reductions(dtype: torch.dtype, sparse: bool) -> None:
    """Compatible calls merge (one computation over their concatenated tokens); each keeps its own
    reduction, normalizer, labels and upstream gradient, within CHUNKED_RTOL of the reference."""
    calls, expected = [], []
    for i, reduction in enumerate(["mean", "sum", "none", "mean", "none"]):
        generator = torch.Generator().manual_seed(i)
        lead = (2, 3 + i) if i % 2 else (4 + i,)
        student = torch.randn((*lead, 30), generator=generator).to(dtype)
        teacher = torch.randn((*lead, 30), generator=generator)
        labels = torch.randint(-1, 30, lead, generator=generator)
        kwargs: dict[str, Any] = {"labels": labels, "ignore_index": -1, "beta": 0.7, "weight_hard": 0.5}
        if sparse:
            teacher, kwargs["teacher_ids"] = top_k(teacher, 6)
        if i == 3:
            kwargs["normalizer"] = 11.0
        upstream = torch.randn(lead, generator=generator) if reduction == "none" else torch.tensor(0.5 * i)
        call = ENGINE.prepare(call_of(student, teacher, reduction=reduction, grad_output=upstream, **kwargs))
        calls.append(call)
        options = {name: value for name, value in kwargs.items() if name not in ("labels", "teacher_ids")}
        tensors = {name: call.tensors[name] for name in call.tensors}
        expected.append(
            reference_grad(student, teacher, grad_output=upstream, reduction=reduction, **options, **tensors)
        )
    keys = {ENGINE.merge_key(call) for call in calls}
    assert len(keys) == 1 and None not in keys, "they merge"
    merged = ENGINE.compute_batch(calls)
    for i, (result, (loss, hard, soft, grad)) in enumerate(zip(merged, expected, strict=True)):
        assert not isinstance(result, Exception), result
        for name, value, wanted in (
            ("loss", result.loss, loss),
            ("hard", result.outputs["hard_loss"], hard),
            ("soft", result.outputs["soft_loss"], soft),
            ("grad", result.input_grad, grad),
        ):
            actual = torch.as_tensor(value)
            assert actual.dtype == wanted.dtype and actual.shape == wanted.shape, (i, name)
            if dtype == torch.bfloat16 and name == "grad":
                torch.testing.assert_close(actual, wanted, msg=f"call {i} {name}")  # one bf16 rounding
            else:
                torch.testing.assert_close(
                    actual, wanted, rtol=CHUNKED_RTOL, atol=1e-6, msg=f"call {i} {name}"
                )
