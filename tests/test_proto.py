"""The contract: fresh generated code, clean buf lint, and a documented layout that is all a client needs."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lossd.client import codec
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd.v1 import tensor_pb2

from conftest import RunningServer

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_buf_lint_standard_and_comments() -> None:
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    done = subprocess.run([buf, "lint"], cwd=ROOT / "proto", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "COMMENTS" in (ROOT / "proto" / "buf.yaml").read_text()


def test_gencode_runs_on_the_gpu_image_versions() -> None:
    """grpcio 1.84 and protobuf 7.35+ are what the gencode demands; the GPU image has exactly those."""
    assert pb_grpc.GRPC_GENERATED_VERSION == "1.84.0"
    source = (ROOT / "proto" / "lossd" / "v1" / "loss_service_pb2.py").read_text()
    assert "# Protobuf Python Version: 7.35.1" in source


@pytest.mark.parametrize("loss", ["nll_loss", "cross_entropy", "kl_div"])
def test_unset_fields_are_served_as_torchs_defaults(exact_server: RunningServer, loss: str) -> None:
    """A request that sets nothing but the loss and its tensors (reduction UNSPECIFIED, options
    message empty) computes torch's call with torch's defaults, as another language's client would
    send it; and the server's options for an empty message are its defaults, which are torch's."""
    import inspect

    from lossd.server.losses import LOSSES
    from lossd.server.rpc.requests import call_from_request
    from lossd.wire.codec import TensorLimits

    generator = torch.Generator().manual_seed(2)
    x = torch.log_softmax(torch.randn(4, 5, generator=generator), 1)
    target = (
        torch.softmax(torch.randn(4, 5, generator=generator), 1)
        if loss == "kl_div"
        else torch.tensor([0, 4, 1, 3])
    )
    request = pb.ComputeLossRequest(input=codec.encode(x), target=codec.encode(target))
    getattr(request, loss).SetInParent()
    assert request.reduction == pb.REDUCTION_UNSPECIFIED
    with grpc.insecure_channel(exact_server.target) as channel:
        response = pb_grpc.LossServiceStub(channel).ComputeLoss(request, timeout=30)
    expected = getattr(F, loss)(x, target)
    assert torch.equal(codec.decode_torch(response.loss), expected)
    served = call_from_request(request, TensorLimits()).options  # as the server reads the message
    torchs = inspect.signature(getattr(F, loss)).parameters
    for name in LOSSES[loss].parameters:
        # lossd's own options (class_dim) are unset: torch's behaviour
        expected_default = torchs[name].default if name in torchs else None
        assert getattr(served, name) == expected_default, name
    assert served.reduction == torchs["reduction"].default


def test_a_hand_built_request_as_another_language_would_send_it(exact_server: RunningServer) -> None:
    """Only the .proto's documentation: little-endian C-order bytes, bfloat16 = high half of float32."""
    logits = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    flat = [v for row in logits for v in row]
    bf16 = b"".join(struct.pack("<f", v)[2:] for v in flat)  # exact: these values fit in bfloat16
    request = pb.ComputeLossRequest(
        input=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_BFLOAT16, shape=[2, 3], data=bf16),
        target=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_INT32, shape=[2], data=struct.pack("<2i", 2, 0)),
        cross_entropy=pb.CrossEntropyLossOptions(label_smoothing=0.1),
        reduction=pb.REDUCTION_SUM,
        gradients=pb.GradientOptions(with_respect_to=["input"], dtype=tensor_pb2.DATA_TYPE_FLOAT32),
    )
    with grpc.insecure_channel(exact_server.target) as channel:
        response = pb_grpc.LossServiceStub(channel).ComputeLoss(request, timeout=30)
    x = torch.tensor(logits, dtype=torch.bfloat16, requires_grad=True)
    expected = F.cross_entropy(x, torch.tensor([2, 0]), label_smoothing=0.1, reduction="sum")
    expected.backward()
    assert response.loss.dtype == tensor_pb2.DATA_TYPE_BFLOAT16 and list(response.loss.shape) == []
    loss = struct.unpack("<f", b"\0\0" + response.loss.data)[0]
    assert loss == expected.item()
    gradient = response.gradients["input"]
    assert gradient.dtype == tensor_pb2.DATA_TYPE_FLOAT32
    grad = np.frombuffer(gradient.data, "<f4").reshape(list(gradient.shape))
    np.testing.assert_array_equal(grad, x.grad.float().numpy())  # type: ignore[union-attr]
    assert list(response.gradients) == ["input"] and not response.outputs
