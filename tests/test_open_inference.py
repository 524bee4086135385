"""The Open Inference Protocol (KServe v2): lossd's own stub for the details, and Triton's own
Python client (tritonclient, in a virtual environment of its own) for compatibility, both against
real servers and checked against torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_validation import details

from lossd.v1.oip import open_inference_pb2 as oip
from lossd.v1.oip import open_inference_pb2_grpc as oip_grpc

from conftest import RunningServer

ROOT = Path(__file__).resolve().parent.parent
TRITON_DIR = Path(__file__).resolve().parent / "tritonclient"
TRITON_VENV = ROOT / ".venv-tritonclient"
RNG = np.random.default_rng(9)


@pytest.fixture(scope="module")
def stub(exact_server: RunningServer) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(exact_server.target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def _input(name: str, array: np.ndarray, datatype: str) -> oip.ModelInferRequest.InferInputTensor:
    return oip.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(array.shape))


def _infer(
    stub: oip_grpc.GRPCInferenceServiceStub,
    model: str,
    tensors: list[tuple[str, np.ndarray, str]],
    outputs: tuple[str, ...] = (),
    **parameters: Any,
) -> dict[str, np.ndarray]:
    request = oip.ModelInferRequest(model_name=model, id="req-1")
    for name, array, datatype in tensors:
        request.inputs.append(_input(name, array, datatype))
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    for key, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[
            type(value)
        ]
        setattr(request.parameters[key], field, value)
    response = stub.ModelInfer(request, timeout=30)
    assert response.id == "req-1" and response.model_name == model and response.model_version == "1"
    wire = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "BF16": "<u2"}
    result = {}
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        result[output.name] = np.frombuffer(raw, wire[output.datatype]).reshape(list(output.shape))
    return result


def test_probes_and_metadata(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(oip.ServerLiveRequest(), timeout=10).live
    assert stub.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
    for model in ("nll_loss", "cross_entropy", "kl_div"):
        assert stub.ModelReady(oip.ModelReadyRequest(name=model), timeout=10).ready
        metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name=model, version="1"), timeout=10)
        assert metadata.versions == ["1"] and metadata.platform == "pytorch"
        assert [t.name for t in metadata.inputs][:2] == ["input", "target"]
        assert [t.name for t in metadata.outputs][:2] == ["loss", "input_grad"]
    server = stub.ServerMetadata(oip.ServerMetadataRequest(), timeout=10)
    assert server.name == "lossd"
    for call in (
        lambda: stub.ModelReady(oip.ModelReadyRequest(name="resnet50"), timeout=10),
        lambda: stub.ModelMetadata(oip.ModelMetadataRequest(name="kl_div", version="7"), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as missing:
            call()
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_cross_entropy_with_options_and_gradient_matches_torch(
    stub: oip_grpc.GRPCInferenceServiceStub,
) -> None:
    logits = RNG.standard_normal((6, 4)).astype(np.float32)
    labels = np.array([0, 3, 1, 1, 2, -1])
    weight = np.array([1.0, 2.0, 0.5, 1.0], np.float32)
    result = _infer(
        stub,
        "cross_entropy",
        [("input", logits, "FP32"), ("target", labels, "INT64"), ("weight", weight, "FP32")],
        ("input_grad", "loss"),
        label_smoothing=0.2,
        ignore_index=-1,
        reduction="sum",
    )
    assert list(result) == ["input_grad", "loss"]  # in the order asked
    x = torch.from_numpy(logits).requires_grad_()
    loss = F.cross_entropy(
        x,
        torch.from_numpy(labels),
        weight=torch.from_numpy(weight),
        ignore_index=-1,
        label_smoothing=0.2,
        reduction="sum",
    )
    (grad,) = torch.autograd.grad(loss, x)
    assert result["loss"].shape == () and result["loss"] == loss.item()
    np.testing.assert_array_equal(result["input_grad"], grad.numpy())


def test_bfloat16_and_float16_travel_raw(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    student = torch.randn(3, 5).log_softmax(1).to(torch.bfloat16)
    teacher = torch.randn(3, 5).softmax(1).to(torch.bfloat16)
    result = _infer(
        stub,
        "kl_div",
        [
            ("input", student.view(torch.int16).numpy(), "BF16"),
            ("target", teacher.view(torch.int16).numpy(), "BF16"),
        ],
        ("loss", "input_grad"),
        reduction="batchmean",
    )
    x = student.clone().requires_grad_()
    loss = F.kl_div(x, teacher, reduction="batchmean")
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(torch.from_numpy(result["loss"].copy()).view(torch.bfloat16), loss.detach())
    assert torch.equal(torch.from_numpy(result["input_grad"].copy()).view(torch.bfloat16), grad)
    half = torch.randn(4, 3).log_softmax(1).half()
    labels = np.array([0, 2, 1, 1])
    result = _infer(
        stub, "nll_loss", [("input", half.numpy(), "FP16"), ("target", labels, "INT64")], reduction="none"
    )
    expected = F.nll_loss(half, torch.from_numpy(labels), reduction="none")
    np.testing.assert_array_equal(result["loss"], expected.numpy())


def test_typed_contents_work_too(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    logits = RNG.standard_normal((2, 3)).astype(np.float32)
    request = oip.ModelInferRequest(model_name="cross_entropy")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 3]).contents.fp32_contents.extend(
        logits.ravel()
    )
    request.inputs.add(name="target", datatype="INT32", shape=[2]).contents.int_contents.extend([2, 0])
    response = stub.ModelInfer(request, timeout=30)
    expected = F.cross_entropy(torch.from_numpy(logits), torch.tensor([2, 0]))
    assert np.frombuffer(response.raw_output_contents[0], "<f4")[0] == expected.item()


def _error(
    stub: oip_grpc.GRPCInferenceServiceStub, request: oip.ModelInferRequest
) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=30)
    error = caught.value
    return error.code(), details(error)[0].reason, error.details()  # type: ignore[attr-defined]


def _request(model: str = "cross_entropy", **changes: Any) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[2, 3])
    request.inputs.add(name="target", datatype="INT64", shape=[2])
    request.raw_input_contents.extend([np.zeros((2, 3), np.float32).tobytes(), np.array([0, 1]).tobytes()])
    return request


@pytest.mark.parametrize(
    ("change", "code", "reason"),
    [
        (lambda r: setattr(r, "model_name", "bert"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (
            lambda r: setattr(r.inputs[0], "datatype", "FP8"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "DTYPE_UNKNOWN",
        ),
        (lambda r: setattr(r.inputs[1], "name", "labels"), grpc.StatusCode.INVALID_ARGUMENT, "INPUT_UNKNOWN"),
        (lambda r: r.raw_input_contents.pop(), grpc.StatusCode.INVALID_ARGUMENT, "RAW_CONTENTS_MISMATCH"),
        (
            lambda r: r.parameters["label_smothing"].SetInParent(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "PARAMETER_UNKNOWN",
        ),
        (
            lambda r: setattr(r.parameters["reduction"], "string_param", "avg"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "PARAMETER_INVALID",
        ),
        (lambda r: r.outputs.add(name="logits"), grpc.StatusCode.INVALID_ARGUMENT, "OUTPUT_UNKNOWN"),
        (
            lambda r: r.inputs[1].shape.__setitem__(0, 3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "DATA_SIZE_MISMATCH",
        ),
        (
            lambda r: r.raw_input_contents.__setitem__(1, np.array([0, 9]).tobytes()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "TARGET_OUT_OF_RANGE",
        ),
    ],
    ids=[
        "model",
        "datatype",
        "input-name",
        "raw-count",
        "parameter-name",
        "parameter-value",
        "output",
        "size",
        "range",
    ],
)
def test_bad_requests_get_clean_errors(
    stub: oip_grpc.GRPCInferenceServiceStub,
    change: Callable[[oip.ModelInferRequest], Any],
    code: grpc.StatusCode,
    reason: str,
) -> None:
    request = _request()
    change(request)
    got_code, got_reason, message = _error(stub, request)
    assert (got_code, got_reason) == (code, reason), message


def test_the_protocol_can_be_turned_off(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(open_inference=False)
    with grpc.insecure_channel(running.target) as channel, pytest.raises(grpc.RpcError) as caught:
        oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip.ServerLiveRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_probes_stay_open_and_inference_needs_the_token(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(auth_token="t0k")
    with grpc.insecure_channel(running.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(_request(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        stub.ModelInfer(_request(), timeout=10, metadata=(("authorization", "Bearer t0k"),))


# -- Triton's own client ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_python() -> str:
    """The Python of .venv-tritonclient, made on first use from tests/tritonclient/requirements.txt."""
    python = TRITON_VENV / "bin" / "python"
    stamp = TRITON_VENV / ".requirements"
    wanted = (TRITON_DIR / "requirements.txt").read_text()
    if not python.exists() or not stamp.exists() or stamp.read_text() != wanted:
        made = subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(TRITON_VENV)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        installed = (
            made.returncode == 0
            and subprocess.run(
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "-r",
                    str(TRITON_DIR / "requirements.txt"),
                ],
                capture_output=True,
                text=True,
                timeout=600,
            ).returncode
            == 0
        )
        if not installed:
            if os.environ.get("LOSSD_REQUIRE_TRITONCLIENT"):
                pytest.fail("could not install tritonclient into .venv-tritonclient")
            pytest.skip("tritonclient could not be installed (no package index?)")
        stamp.write_text(wanted)
    return str(python)


def test_tritons_python_client_works_unchanged(
    triton_python: str, server_factory: Callable[..., RunningServer]
) -> None:
    running = server_factory(batching=False)
    done = subprocess.run(
        [triton_python, str(TRITON_DIR / "call_lossd.py"), running.target],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["live"] and report["ready"] and all(report["models_ready"].values())
    assert report["server"]["name"] == "lossd"
    assert [i["name"] for i in report["cross_entropy_metadata"]["inputs"]][:2] == ["input", "target"]

    ce = report["cross_entropy"]
    x = torch.tensor(ce["input"], dtype=torch.float32, requires_grad=True)
    loss = F.cross_entropy(x, torch.tensor(ce["target"]), label_smoothing=0.1)
    (grad,) = torch.autograd.grad(loss, x)
    assert ce["loss_datatype"] == "FP32" and ce["loss"] == loss.item()
    assert torch.equal(torch.tensor(ce["input_grad"], dtype=torch.float32), grad)

    kl = report["kl_div"]
    student = torch.tensor(kl["input"]).to(torch.bfloat16).requires_grad_()
    teacher = torch.tensor(kl["target"]).to(torch.bfloat16).requires_grad_()
    loss = F.kl_div(student, teacher, reduction="batchmean")
    grads = torch.autograd.grad(loss, [student, teacher])
    assert kl["datatypes"] == ["BF16", "BF16", "BF16"]
    assert torch.tensor(kl["loss"]).to(torch.bfloat16) == loss
    assert torch.equal(torch.tensor(kl["input_grad"]).to(torch.bfloat16), grads[0])
    assert torch.equal(torch.tensor(kl["target_grad"]).to(torch.bfloat16), grads[1])

    nll = report["nll_loss"]
    expected = F.nll_loss(torch.tensor(nll["input"]).half(), torch.tensor([0, 1, 2, 1, 0]), reduction="none")
    assert torch.equal(torch.tensor(nll["loss"]).half(), expected)

    assert report["bad_target"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "target" in report["bad_target"]["message"]
    assert report["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
