"""On a CUDA device (skipped without one): parity with local CUDA torch, device round trips, and
bad class indices kept away from the kernels that would assert and poison the CUDA context."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from lossd.client import LossClient, errors
from lossd.client import torch as lossd_torch

from cases import all_cases, reference
from conftest import RunningServer
from test_parity import check_result, remote

pytestmark = pytest.mark.gpu
CASES = all_cases()[::4]  # every fourth case: each loss, option, shape kind and dtype still appears


@pytest.fixture(scope="module")
def gpu_client() -> Iterator[LossClient]:
    from conftest import make_config

    running = RunningServer(make_config(device="cuda"))
    with LossClient(running.target, timeout=60) as client:
        yield client
    running.close()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_parity_on_cuda(gpu_client: LossClient, case: object) -> None:
    tensors = case.tensors()  # type: ignore[attr-defined]
    expected = reference(case, tensors, device="cuda")  # type: ignore[arg-type]
    check_result(remote(gpu_client, case, tensors), expected, case)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [5, -1, 1000])
@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3)], ids=str)
def test_out_of_range_index_never_reaches_a_kernel(
    gpu_client: LossClient, bad: int, shape: tuple[int, ...]
) -> None:
    logits = torch.randn(shape, device="cuda")
    target = torch.zeros((shape[0], *shape[2:]), dtype=torch.int64, device="cuda")
    target.view(-1)[-1] = bad
    with pytest.raises(errors.InvalidArgumentError) as caught:
        gpu_client.cross_entropy(logits, target, return_grad=True)
    assert caught.value.reason == "TARGET_OUT_OF_RANGE"
    target.view(-1)[-1] = 1  # the process's CUDA context is intact: the next call computes
    result = gpu_client.cross_entropy(logits, target, return_grad=True)
    torch.testing.assert_close(result.loss, F.cross_entropy(logits, target))


def test_cuda_tensors_come_back_on_their_device(gpu_client: LossClient) -> None:
    logits = torch.randn(4, 3, device="cuda", dtype=torch.bfloat16)
    result = gpu_client.cross_entropy(logits, torch.tensor([0, 1, 2, 0], device="cuda"), return_grad=True)
    assert result.loss.device == logits.device and result.grad.device == logits.device  # type: ignore[union-attr]


def test_autograd_with_cuda_tensors(gpu_client: LossClient) -> None:
    x = torch.randn(8, 5, device="cuda", requires_grad=True)
    target = torch.randint(0, 5, (8,), device="cuda")
    lossd_torch.cross_entropy(x, target, client=gpu_client, label_smoothing=0.1).backward()
    y = x.detach().clone().requires_grad_()
    F.cross_entropy(y, target, label_smoothing=0.1).backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_cpu_and_cuda_servers_agree_within_rounding(gpu_client: LossClient, server: RunningServer) -> None:
    logits, target = torch.randn(64, 1000), torch.randint(0, 1000, (64,))
    with LossClient(server.target) as cpu:
        on_cpu = cpu.cross_entropy(logits, target, return_grad=True)
    on_gpu = gpu_client.cross_entropy(logits, target, return_grad=True)
    torch.testing.assert_close(on_gpu.loss, on_cpu.loss)
    torch.testing.assert_close(on_gpu.grad, on_cpu.grad)


def test_a_large_stream_gives_its_pinned_memory_back() -> None:
    """Pinned receive buffers: counted as torch allocates them, returned to the driver after a
    large stream, and the answer is torch's."""
    from conftest import make_config

    running = RunningServer(make_config(device="cuda"))
    try:
        staging = running.server.engine.staging
        assert staging.pinned and staging.buffer_cost((64 << 20) + 1) == 128 << 20
        logits = torch.randn(2048, 16384)  # 128 MiB: streamed, one pinned buffer of 128 MiB
        labels = torch.randint(0, 16384, (2048,))
        with LossClient(running.target, timeout=120) as client:
            result = client.cross_entropy(logits, labels, return_grad=True)
        expected = F.cross_entropy(logits.cuda(), labels.cuda())
        torch.testing.assert_close(result.loss, expected.cpu(), rtol=1e-5, atol=0)
        assert staging.large_pinned == 0, "released after the stream"
    finally:
        running.close()


@pytest.mark.parametrize("teacher", ["dense", "top-k"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distillation_on_cuda_is_the_reference_on_cuda(
    gpu_client: LossClient, teacher: str, reduction: str
) -> None:
    """The reference composition run on CUDA; within rounding (CUDA kernels need not be bitwise
    reproducible across launches of different sizes)."""
    from distillation_reference import reference_grad

    student, teacher_logits = torch.randn(6, 40, 500) * 2, torch.randn(6, 40, 500) * 2
    labels = torch.randint(0, 500, (6, 40))
    labels[:, :3] = -100
    kwargs = {"labels": labels, "beta": 0.5, "weight_hard": 0.2, "temperature": 2.0, "reduction": reduction}
    target = teacher_logits
    if teacher == "top-k":
        values, ids = torch.log_softmax(teacher_logits, -1).topk(16, -1)
        values[0, 0, 8:] = float("-inf")
        target, kwargs["teacher_ids"] = values, ids
    result = gpu_client.distillation(student.cuda(), target.cuda(), return_grad=True, **kwargs)  # type: ignore[arg-type]
    on_device = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    loss, hard, soft, grad = reference_grad(student.cuda(), target.cuda(), **on_device)
    for actual, expected in ((result.loss, loss), (result.hard_loss, hard), (result.soft_loss, soft)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.grad, grad, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(result.grad).all()


def test_linear_losses_on_cuda_with_a_resident_head_kept_on_the_device() -> None:
    """The fused linear losses against their unfused references on CUDA, the classifier resident and
    mirrored in device memory (the call copies it up no more), and the implementation chosen at
    start-up agreeing with the reference on every call it computes."""
    from test_linear_cross_entropy import unfused_head
    from test_linear_distillation import unfused

    from conftest import make_config
    from tolerances import close

    running = RunningServer(make_config(device="cuda"))
    try:
        engine = running.server.engine
        assert "linear_cross_entropy" in engine.choices
        torch.manual_seed(0)
        classifier, teacher_classifier = torch.randn(5000, 256) / 16, torch.randn(5000, 128) / 16
        hidden, teacher_hidden = torch.randn(2, 300, 256), torch.randn(2, 300, 128)
        labels = torch.randint(0, 5000, (2, 300))
        with LossClient(running.target, timeout=120) as client:
            head = client.resident(classifier)
            assert engine.staging._mirrors, "the resident classifier is kept on the device"
            result = client.linear_cross_entropy(
                hidden.cuda(), labels.cuda(), head, return_grad=True, label_smoothing=0.1
            )
            loss, _, grads = unfused_head(hidden, labels, classifier, label_smoothing=0.1)
            close(result.loss.cpu(), loss, torch.float32, "loss")
            close(result.grad.cpu(), grads[0], torch.float32, "grad", gradient=True)
            teacher_head = client.resident(teacher_classifier)
            distilled = client.linear_distillation(
                hidden,
                teacher_hidden,
                classifier,
                teacher_head,
                beta=0.5,
                return_grad=True,
                return_classifier_grad=True,
            )
            loss, _, _, grads = unfused(hidden, teacher_hidden, classifier, teacher_classifier, beta=0.5)
            close(distilled.loss, loss, torch.float32, "distillation loss")
            close(distilled.grad, grads[0], torch.float32, "distillation grad", gradient=True)
            close(distilled.classifier_grad, grads[1], torch.float32, "classifier grad", gradient=True)
    finally:
        running.close()
