"""Every validation rule on the wire: status code, a message naming field and value, ErrorInfo, BadRequest."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2

from lossd.client import LossClient, codec
from lossd.client.errors import InvalidArgumentError, ResourceExhaustedError
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd.v1 import tensor_pb2

from conftest import RunningServer

RNG = np.random.default_rng(7)
LOGITS = RNG.standard_normal((4, 5)).astype(np.float32)
LABELS = np.array([0, 1, 4, 2])
PROBS = np.full((4, 5), 0.2, dtype=np.float32)


def request(
    kind: str = "cross_entropy", input: object = LOGITS, target: object = LABELS
) -> pb.ComputeLossRequest:
    message = pb.ComputeLossRequest()
    codec.encode(input, "input", out=message.input)  # type: ignore[arg-type]
    codec.encode(target, "target", out=message.target)  # type: ignore[arg-type]
    getattr(message, kind).SetInParent()
    return message


@dataclass(frozen=True)
class Rule:
    id: str
    build: Callable[[], pb.ComputeLossRequest]
    reason: str
    field: str
    says: tuple[str, ...]  # substrings the message must contain: the field and the value
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


def _with(
    message: pb.ComputeLossRequest, change: Callable[[pb.ComputeLossRequest], object]
) -> pb.ComputeLossRequest:
    change(message)
    return message


def _set_weight(kind: str, weight: np.ndarray) -> Callable[[], pb.ComputeLossRequest]:
    def build() -> pb.ComputeLossRequest:
        message = request(kind)
        codec.encode(weight, "weight", out=getattr(message, kind).weight)
        return message

    return build


def _upstream(shape: tuple[int, ...], reduction: int) -> Callable[[], pb.ComputeLossRequest]:
    def build() -> pb.ComputeLossRequest:
        message = request()
        message.reduction = reduction  # type: ignore[assignment]
        message.gradients.with_respect_to.append("input")
        codec.encode(np.ones(shape, np.float32), out=message.gradients.grad_output)
        return message

    return build


def _distill(
    teacher: np.ndarray = LOGITS, reduction: int = pb.REDUCTION_UNSPECIFIED, **options: object
) -> Callable[[], pb.ComputeLossRequest]:
    """A distillation request of LOGITS against `teacher`, its options (and tensors) set."""

    def build() -> pb.ComputeLossRequest:
        message = request("distillation", LOGITS, teacher)
        message.reduction = reduction  # type: ignore[assignment]
        for name, value in options.items():
            if isinstance(value, np.ndarray):
                codec.encode(value, name, out=getattr(message.distillation, name))
            else:
                setattr(message.distillation, name, value)
        return message

    return build


def _linear(classifier: np.ndarray, **options: object) -> Callable[[], pb.ComputeLossRequest]:
    """A linear cross-entropy of LOGITS as hidden states (4, 5) against LABELS."""

    def build() -> pb.ComputeLossRequest:
        message = request("linear_cross_entropy")
        codec.encode(classifier, "classifier", out=message.linear_cross_entropy.classifier)
        for name, value in options.items():
            setattr(message.linear_cross_entropy, name, value)
        return message

    return build


def _linear_distill(**options: object) -> Callable[[], pb.ComputeLossRequest]:
    """A linear distillation of LOGITS as the student's hidden states (4, 5) against a teacher's."""

    def build() -> pb.ComputeLossRequest:
        message = request("linear_distillation", LOGITS, LOGITS)
        options_message = message.linear_distillation
        for name in ("classifier", "teacher_classifier"):
            codec.encode(
                RNG.standard_normal((5, 5)).astype(np.float32), name, out=getattr(options_message, name)
            )
        for name, value in options.items():
            setattr(options_message, name, value)
        return message

    return build


RULES = [
    Rule(
        "dtype-unset",
        lambda: _with(request(), lambda m: setattr(m.input, "dtype", 0)),
        "DTYPE_UNSPECIFIED",
        "input.dtype",
        ("input.dtype",),
    ),
    Rule(
        "dtype-unknown",
        lambda: _with(request(), lambda m: setattr(m.target, "dtype", 99)),
        "DTYPE_UNKNOWN",
        "target.dtype",
        ("target.dtype", "99"),
    ),
    Rule(
        "negative-dim",
        lambda: _with(request(), lambda m: m.input.shape.__setitem__(0, -4)),
        "SHAPE_INVALID",
        "input.shape",
        ("input.shape", "-4"),
    ),
    Rule(
        "too-many-dims",
        lambda: request(input=np.zeros((1,) * 33, np.float32)),
        "TOO_MANY_DIMENSIONS",
        "input.shape",
        ("input.shape", "33"),
    ),
    Rule(
        "data-short",
        lambda: _with(request(), lambda m: setattr(m.input, "data", m.input.data[:-4])),
        "DATA_SIZE_MISMATCH",
        "input.data",
        ("input.data", "76", "80"),
    ),
    Rule(
        "data-long",
        lambda: _with(request(), lambda m: setattr(m.target, "data", m.target.data + b"\0")),
        "DATA_SIZE_MISMATCH",
        "target.data",
        ("target.data", "33", "32"),
    ),
    Rule(
        "input-missing",
        lambda: _with(request(), lambda m: m.ClearField("input")),
        "FIELD_MISSING",
        "input",
        ("input",),
    ),
    Rule(
        "target-missing",
        lambda: _with(request(), lambda m: m.ClearField("target")),
        "FIELD_MISSING",
        "target",
        ("target",),
    ),
    Rule(
        "loss-unset",
        lambda: _with(request(), lambda m: m.ClearField("cross_entropy")),
        "LOSS_UNSPECIFIED",
        "loss",
        ("nll_loss", "cross_entropy", "kl_div"),
    ),
    Rule(
        "reduction-unknown",
        lambda: _with(request(), lambda m: setattr(m, "reduction", 42)),
        "REDUCTION_INVALID",
        "reduction",
        ("reduction", "42"),
    ),
    Rule(
        "batchmean-ce",
        lambda: _with(request(), lambda m: setattr(m, "reduction", pb.REDUCTION_BATCHMEAN)),
        "REDUCTION_NOT_SUPPORTED",
        "reduction",
        ("batchmean", "cross_entropy"),
    ),
    Rule(
        "batchmean-nll",
        lambda: _with(request("nll_loss"), lambda m: setattr(m, "reduction", 4)),
        "REDUCTION_NOT_SUPPORTED",
        "reduction",
        ("batchmean", "nll_loss"),
    ),
    Rule(
        "int-input",
        lambda: request(input=np.zeros((4, 5), np.int64)),
        "DTYPE_NOT_SUPPORTED",
        "input.dtype",
        ("input.dtype", "int64"),
    ),
    Rule(
        "0d-input",
        lambda: request(input=np.float32(1.0), target=np.int64(0)),
        "SHAPE_INVALID",
        "input.shape",
        ("input.shape", "[]"),
    ),
    Rule(
        "float-index-target",
        lambda: request(target=LABELS.astype(np.float32)),
        "DTYPE_NOT_SUPPORTED",
        "target.dtype",
        ("target.dtype", "float32"),
    ),
    Rule(
        "int-prob-target",
        lambda: request(target=np.zeros((4, 5), np.int64)),
        "DTYPE_NOT_SUPPORTED",
        "target.dtype",
        ("target.dtype", "int64", "class-probability"),
    ),
    Rule(
        "batch-mismatch",
        lambda: request(target=LABELS[:3]),
        "TARGET_SHAPE_MISMATCH",
        "target.shape",
        ("target.shape", "[3]", "[4]"),
    ),
    Rule(
        "multi-target",
        lambda: request(target=LABELS[:, None]),
        "TARGET_SHAPE_MISMATCH",
        "target.shape",
        ("target.shape", "[4, 1]"),
    ),
    Rule(
        "spatial-mismatch",
        lambda: request(input=np.zeros((2, 5, 3), np.float32), target=np.zeros((2, 4), np.int64)),
        "TARGET_SHAPE_MISMATCH",
        "target.shape",
        ("target.shape", "[2, 4]", "[2, 3]"),
    ),
    Rule(
        "kl-no-broadcast",
        lambda: request("kl_div", input=PROBS, target=PROBS[:, :3]),
        "TARGET_SHAPE_MISMATCH",
        "target.shape",
        ("target.shape", "[4, 3]", "[4, 5]"),
    ),
    Rule(
        "kl-int-target",
        lambda: request("kl_div", input=PROBS, target=np.ones((4, 5), np.int64)),
        "DTYPE_NOT_SUPPORTED",
        "target.dtype",
        ("target.dtype", "int64"),
    ),
    Rule(
        "target-too-big",
        lambda: request(target=np.array([0, 1, 5, 2])),
        "TARGET_OUT_OF_RANGE",
        "target",
        ("target[2]", "5", "[0, 5)"),
    ),
    Rule(
        "target-negative",
        lambda: request("nll_loss", target=np.array([0, -1, 3, 2])),
        "TARGET_OUT_OF_RANGE",
        "target",
        ("target[1]", "-1"),
    ),
    Rule(
        "uint8-255",
        lambda: request(target=np.array([0, 255, 3, 2], np.uint8)),
        "TARGET_OUT_OF_RANGE",
        "target",
        ("target[1]", "255", "-100"),
    ),
    Rule(
        "kdim-position",
        lambda: request(input=np.zeros((2, 5, 3), np.float32), target=np.array([[0, 1, 2], [3, 9, 4]])),
        "TARGET_OUT_OF_RANGE",
        "target",
        ("target[1, 1]", "9"),
    ),
    Rule(
        "weight-length",
        _set_weight("cross_entropy", np.ones(4, np.float32)),
        "WEIGHT_SHAPE_MISMATCH",
        "cross_entropy.weight.shape",
        ("cross_entropy.weight.shape", "[4]", "[5]"),
    ),
    Rule(
        "weight-dtype",
        _set_weight("nll_loss", np.ones(5, np.float64)),
        "WEIGHT_DTYPE_MISMATCH",
        "nll_loss.weight.dtype",
        ("nll_loss.weight.dtype", "float64", "float32"),
    ),
    Rule(
        "smoothing-high",
        lambda: _with(request(), lambda m: setattr(m.cross_entropy, "label_smoothing", 1.1)),
        "LABEL_SMOOTHING_OUT_OF_RANGE",
        "cross_entropy.label_smoothing",
        ("label_smoothing", "1.1"),
    ),
    Rule(
        "smoothing-negative",
        lambda: _with(request(), lambda m: setattr(m.cross_entropy, "label_smoothing", -0.1)),
        "LABEL_SMOOTHING_OUT_OF_RANGE",
        "cross_entropy.label_smoothing",
        ("label_smoothing", "-0.1"),
    ),
    Rule(
        "smoothing-nan",
        lambda: _with(request(), lambda m: setattr(m.cross_entropy, "label_smoothing", float("nan"))),
        "LABEL_SMOOTHING_OUT_OF_RANGE",
        "cross_entropy.label_smoothing",
        ("label_smoothing", "nan"),
    ),
    Rule(
        "prob-ignore-index",
        lambda: _with(request(target=PROBS), lambda m: setattr(m.cross_entropy, "ignore_index", 1)),
        "IGNORE_INDEX_NOT_SUPPORTED",
        "cross_entropy.ignore_index",
        ("ignore_index", "1"),
    ),
    Rule(
        "nll-target-grad",
        lambda: _with(request("nll_loss"), lambda m: m.gradients.with_respect_to.append("target")),
        "GRADIENT_NOT_SUPPORTED",
        "gradients.with_respect_to",
        ("'target'", "nll_loss can be differentiated with respect to input"),
    ),
    Rule(
        "ce-index-target-grad",
        lambda: _with(request(), lambda m: m.gradients.with_respect_to.append("target")),
        "GRADIENT_NOT_SUPPORTED",
        "gradients.with_respect_to",
        ("'target'", "class-index"),
    ),
    Rule(
        "gradient-of-no-tensor",
        lambda: _with(request(), lambda m: m.gradients.with_respect_to.append("logits")),
        "GRADIENT_NOT_SUPPORTED",
        "gradients.with_respect_to",
        ("'logits'", "input, target"),
    ),
    Rule(
        "output-unknown",
        lambda: _with(request(), lambda m: m.outputs.append("lse")),
        "OUTPUT_UNKNOWN",
        "outputs",
        ("'lse'", "cross_entropy", "none besides the loss"),
    ),
    Rule(
        "output-of-another-loss",
        lambda: _with(_distill()(), lambda m: m.outputs.append("lse")),
        "OUTPUT_UNKNOWN",
        "outputs",
        ("'lse'", "hard_loss, soft_loss"),
    ),
    Rule(
        "grad-dtype-int",
        lambda: _with(request(), lambda m: setattr(m.gradients, "dtype", 5)),
        "DTYPE_NOT_SUPPORTED",
        "gradients.dtype",
        ("gradients.dtype", "int64"),
    ),
    Rule(
        "grad-dtype-unknown",
        lambda: _with(request(), lambda m: setattr(m.gradients, "dtype", 77)),
        "DTYPE_UNKNOWN",
        "gradients.dtype",
        ("gradients.dtype", "77"),
    ),
    Rule(
        "upstream-shape-scalar",
        _upstream((4,), pb.REDUCTION_MEAN),
        "GRAD_OUTPUT_SHAPE_MISMATCH",
        "gradients.grad_output.shape",
        ("grad_output.shape", "[4]", "[]"),
    ),
    Rule(
        "upstream-shape-none",
        _upstream((4, 5), pb.REDUCTION_NONE),
        "GRAD_OUTPUT_SHAPE_MISMATCH",
        "gradients.grad_output.shape",
        ("grad_output.shape", "[4, 5]", "[4]"),
    ),
    *[
        Rule(f"distillation-{reason.lower()}-{field.rsplit('.', 1)[-1]}", build, reason, field, says)
        for build, reason, field, says in (
            (_distill(beta=1.5), "BETA_OUT_OF_RANGE", "distillation.beta", ("distillation.beta", "1.5")),
            (
                _distill(temperature=0.0),
                "TEMPERATURE_INVALID",
                "distillation.temperature",
                ("temperature", "0.0"),
            ),
            (
                _distill(weight_soft=-1.0),
                "WEIGHT_INVALID",
                "distillation.weight_soft",
                ("weight_soft", "-1.0"),
            ),
            (
                _distill(normalizer=-2.0),
                "NORMALIZER_INVALID",
                "distillation.normalizer",
                ("normalizer", "-2.0"),
            ),
            (
                _distill(normalizer=2.0, reduction=pb.REDUCTION_SUM),
                "NORMALIZER_NOT_SUPPORTED",
                "distillation.normalizer",
                ("normalizer", "'sum'"),
            ),
            (
                _distill(weight_hard=0.5),
                "LABELS_MISSING",
                "distillation.labels",
                ("distillation.labels", "0.5"),
            ),
            (
                _distill(top_k_renormalize=True),
                "OPTION_NOT_APPLICABLE",
                "distillation.top_k_renormalize",
                ("top_k_renormalize", "sparse"),
            ),
            (
                _distill(labels=np.array([0, 1, 9, 2])),
                "LABEL_OUT_OF_RANGE",
                "distillation.labels",
                ("distillation.labels[2]", "9"),
            ),
            (
                _distill(labels=np.array([0, 1])),
                "LABELS_SHAPE_MISMATCH",
                "distillation.labels.shape",
                ("labels.shape", "[2]", "[4]"),
            ),
            (
                _distill(teacher=RNG.standard_normal((4, 7)).astype(np.float32)),
                "VOCABULARY_MISMATCH",
                "target.shape",
                ("7", "5"),
            ),
            (
                _distill(teacher=np.zeros((4, 2), np.float32), teacher_ids=np.array([[0, 1]] * 3)),
                "TEACHER_SHAPE_MISMATCH",
                "distillation.teacher_ids.shape",
                ("teacher_ids.shape", "[3, 2]", "[4, 2]"),
            ),
            (
                _distill(teacher=np.zeros((4, 2), np.float32), teacher_ids=np.array([[0, 1]] * 3 + [[0, 5]])),
                "TEACHER_ID_OUT_OF_RANGE",
                "distillation.teacher_ids",
                ("teacher_ids[3, 1]", "5"),
            ),
        )
    ],
    Rule(
        "resident-with-data",
        lambda: _with(request(), lambda m: setattr(m.input, "resident_id", "sha256:00")),
        "RESIDENT_NOT_FOUND",
        "input.resident_id",
        ("input.resident_id", "sha256:00"),
        grpc.StatusCode.NOT_FOUND,
    ),
    Rule(
        "linear-classifier-shape",
        _linear(RNG.standard_normal((5, 3)).astype(np.float32)),
        "CLASSIFIER_SHAPE_MISMATCH",
        "linear_cross_entropy.classifier.shape",
        ("classifier.shape", "[5, 3]", "[V, 5]"),
    ),
    Rule(
        "tensor-gradient-of-a-loss-without-it",
        lambda: _with(request(), lambda m: m.gradients.with_respect_to.append("classifier")),
        "GRADIENT_NOT_SUPPORTED",
        "gradients.with_respect_to",
        ("'classifier'", "cross_entropy"),
    ),
    Rule(
        "tensor-gradient-of-an-unset-tensor",
        lambda: _with(
            _linear(RNG.standard_normal((5, 5)).astype(np.float32))(),
            lambda m: m.gradients.with_respect_to.append("bias"),
        ),
        "GRADIENT_NOT_SUPPORTED",
        "gradients.with_respect_to",
        ("'bias'", "linear_cross_entropy.bias is unset"),
    ),
    Rule(
        "linear-distillation-top-k",
        _linear_distill(top_k=9),
        "TOP_K_INVALID",
        "linear_distillation.top_k",
        ("top_k", "9", "[0, 5]"),
    ),
    Rule(
        "linear-softcap",
        _linear(RNG.standard_normal((5, 5)).astype(np.float32), softcap=-2.0),
        "OPTION_INVALID",
        "linear_cross_entropy.softcap",
        ("softcap", "-2.0"),
    ),
]


def rpc_error(channel: grpc.Channel, message: pb.ComputeLossRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        pb_grpc.LossServiceStub(channel).ComputeLoss(message, timeout=30)
    return caught.value


def details(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest | None]:
    trailers = dict(error.trailing_metadata())  # type: ignore[attr-defined]
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.code == error.code().value[0]  # type: ignore[attr-defined]
    info, bad = None, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
    assert info is not None, "every lossd error carries a google.rpc.ErrorInfo"
    return info, bad


@pytest.mark.parametrize("rule", RULES, ids=[rule.id for rule in RULES])
def test_rule_on_the_wire(channel: grpc.Channel, rule: Rule) -> None:
    error = rpc_error(channel, rule.build())
    assert error.code() == rule.code  # type: ignore[attr-defined]
    message = error.details()  # type: ignore[attr-defined]
    for text in rule.says:
        assert text in message, f"{text!r} not in {message!r}"
    info, bad = details(error)
    assert info.domain == "lossd"
    assert info.reason == rule.reason
    assert info.reason.isupper() and len(info.reason) <= 63
    assert all(key[0].islower() and "_" not in key for key in info.metadata), (
        "metadata keys are lowerCamelCase"
    )
    assert bad is not None and bad.field_violations[0].field == rule.field


def test_every_reason_the_server_emits_is_tested() -> None:
    """Each UPPER_SNAKE reason in the decoding code and every loss module has a rule above (or a
    test below)."""
    import importlib
    import pkgutil

    import lossd.server.losses
    import lossd.server.rpc.requests

    modules = [codec, lossd.server.rpc.requests] + [
        importlib.import_module(f"lossd.server.losses.{info.name}")
        for info in pkgutil.iter_modules(lossd.server.losses.__path__)
    ]
    assert len(modules) >= 8
    sources = [inspect.getsource(module) for module in modules]
    emitted = set(re.findall(r'"([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)"', "\n".join(sources)))
    emitted -= {name for module in modules for name in getattr(module, "__all__", ())}  # names, not reasons
    tested = {rule.reason for rule in RULES} | {"TENSOR_TOO_LARGE", "REQUEST_MALFORMED"}
    tested |= {"RESIDENT_MISMATCH"}  # tests/test_resident.py::test_errors
    tested |= {"CLASS_DIM_OUT_OF_RANGE"}  # tests/test_class_dim.py
    tested |= {"NONFINITE_POLICY_INVALID"}  # tests/test_nonfinite.py
    assert emitted <= tested, f"untested reasons: {sorted(emitted - tested)}"
    assert len({rule.id for rule in RULES}) == len(RULES)


@pytest.mark.parametrize(
    "raw", [b"\xff\xff\xff", b"\x0a\x05abc", b"\x08"], ids=["varint", "truncated", "eof"]
)
def test_bytes_that_are_no_request_are_invalid_argument(channel: grpc.Channel, raw: bytes) -> None:
    call = channel.unary_unary("/lossd.v1.LossService/ComputeLoss")
    with pytest.raises(grpc.RpcError) as caught:
        call(raw, timeout=10)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "not a valid serialized lossd.v1.ComputeLossRequest" in error.details()  # type: ignore[attr-defined]
    assert details(error)[0].reason == "REQUEST_MALFORMED"


def test_client_raises_the_typed_error(client: LossClient) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.cross_entropy(LOGITS, np.array([0, 1, 7, 2]))
    error = caught.value
    assert error.reason == "TARGET_OUT_OF_RANGE"
    assert error.field == "target"
    assert error.metadata["value"] == "7"
    assert error.metadata["classes"] == "5"
    assert "target[2] is 7" in str(error)
    assert isinstance(error, ValueError)


def test_limits_are_resource_exhausted(server_factory: Callable[..., RunningServer]) -> None:
    small = server_factory(max_tensor_elements=10)
    with LossClient(small.target, timeout=30) as c, pytest.raises(ResourceExhaustedError) as caught:
        c.cross_entropy(LOGITS, LABELS)
    assert caught.value.reason == "TENSOR_TOO_LARGE"
    assert caught.value.field == "input.shape"
    assert caught.value.metadata["elements"] == "20"
    assert caught.value.metadata["maxElements"] == "10"


def test_byte_limit_is_resource_exhausted(server_factory: Callable[..., RunningServer]) -> None:
    small = server_factory(max_tensor_bytes=64)
    with (
        LossClient(small.target, timeout=30) as c,
        pytest.raises(ResourceExhaustedError, match=r"input\.shape"),
    ):
        c.cross_entropy(LOGITS, LABELS)  # 80 bytes of logits


def test_huge_claimed_shape_allocates_nothing(channel: grpc.Channel) -> None:
    message = request()
    message.input.shape[:] = [2**40, 2**40]  # claims 2**80 elements, sends 80 bytes
    error = rpc_error(channel, message)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert details(error)[0].reason == "TENSOR_TOO_LARGE"


def test_message_limit_is_resource_exhausted(server_factory: Callable[..., RunningServer]) -> None:
    small = server_factory(max_message_bytes=1024)
    with LossClient(small.target, timeout=30) as c, pytest.raises(ResourceExhaustedError):
        c.cross_entropy(np.zeros((64, 5), np.float32), np.zeros(64, np.int64))


def test_bad_request_leaves_the_server_serving(client: LossClient) -> None:
    for _ in range(3):
        with pytest.raises(InvalidArgumentError):
            client.nll_loss(LOGITS, np.array([0, 1, 99, 2]))
    assert client.cross_entropy(LOGITS, LABELS).loss.shape == ()


def test_unknown_dtype_enum_in_codec() -> None:
    with pytest.raises(InvalidArgumentError, match="not a known DataType"):
        codec.check(tensor_pb2.Tensor(dtype=12), "x")  # type: ignore[arg-type]
