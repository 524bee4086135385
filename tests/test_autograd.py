"""`lossd.client.torch`: loss.backward() through lossd fills .grad exactly as local torch does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lossd.client import LossClient
from lossd.client import torch as lossd_torch

REDUCTIONS = ["none", "mean", "sum"]


def _logits(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _backward(loss: torch.Tensor, upstream: torch.Tensor | None) -> None:
    if upstream is None:
        loss.backward()
    else:
        loss.backward(upstream)


def _compare(
    remote: Callable[..., torch.Tensor],
    local: Callable[..., torch.Tensor],
    tensors: list[torch.Tensor],
    differentiable: list[bool],
    client: LossClient,
    reduction: str,
    upstream_scale: float | None = None,
    **options: Any,
) -> None:
    ours = [t.clone().requires_grad_(d) for t, d in zip(tensors, differentiable, strict=True)]
    theirs = [t.clone().requires_grad_(d) for t, d in zip(tensors, differentiable, strict=True)]
    loss_ours = remote(*ours, reduction=reduction, client=client, **options)
    loss_theirs = local(*theirs, reduction=reduction, **options)
    torch.testing.assert_close(loss_ours.detach(), loss_theirs.detach(), rtol=1e-6, atol=1e-7)
    upstream = None
    if reduction == "none":
        upstream = torch.randn_like(loss_theirs)
    elif upstream_scale is not None:
        upstream = torch.tensor(upstream_scale, dtype=loss_theirs.dtype)
    _backward(loss_ours, upstream)
    _backward(loss_theirs, upstream)
    for a, b, d in zip(ours, theirs, differentiable, strict=True):
        if d:
            assert a.grad is not None
            scale = float(b.grad.abs().max()) if b.grad.numel() else 1.0  # type: ignore[union-attr]
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5,), (6, 5), (2, 5, 3)], ids=str)
def test_cross_entropy_indices(client: LossClient, reduction: str, shape: tuple[int, ...]) -> None:
    target = torch.randint(0, 5, (() if len(shape) == 1 else (shape[0], *shape[2:])))
    _compare(
        lossd_torch.cross_entropy,
        F.cross_entropy,
        [_logits(*shape), target],
        [True, False],
        client,
        reduction,
        label_smoothing=0.1,
        weight=torch.rand(5) + 0.5,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_probabilities_both_gradients(client: LossClient, reduction: str) -> None:
    target = torch.softmax(torch.randn(4, 6, 2), 1)
    _compare(
        lossd_torch.cross_entropy,
        F.cross_entropy,
        [_logits(4, 6, 2), target],
        [True, True],
        client,
        reduction,
        label_smoothing=0.2,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss(client: LossClient, reduction: str) -> None:
    target = torch.tensor([0, 2, -100, 4, 1])
    _compare(
        lossd_torch.nll_loss,
        F.nll_loss,
        [torch.log_softmax(_logits(5, 5), 1), target],
        [True, False],
        client,
        reduction,
    )


@pytest.mark.parametrize("reduction", [*REDUCTIONS, "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div(client: LossClient, reduction: str, log_target: bool) -> None:
    student = torch.log_softmax(_logits(4, 7), 1)
    teacher = torch.softmax(_logits(4, 7), 1)
    teacher = teacher.log() if log_target else teacher
    _compare(
        lossd_torch.kl_div,
        F.kl_div,
        [student, teacher],
        [True, True],
        client,
        reduction,
        log_target=log_target,
    )


@pytest.mark.parametrize("operand", ["target", "input"])
def test_kl_div_broadcast_under_none(client: LossClient, operand: str) -> None:
    """A broadcast operand's gradient sums upstream-weighted terms: the one case that calls back."""
    big, small = torch.log_softmax(_logits(4, 7), 1), torch.softmax(_logits(7), 0)
    tensors = [big, small] if operand == "target" else [small.log(), torch.softmax(_logits(4, 7), 1)]
    _compare(lossd_torch.kl_div, F.kl_div, tensors, [True, True], client, "none")


def test_upstream_gradient_other_than_one(client: LossClient) -> None:
    target = torch.randint(0, 5, (6,))
    _compare(
        lossd_torch.cross_entropy,
        F.cross_entropy,
        [_logits(6, 5), target],
        [True, False],
        client,
        "mean",
        upstream_scale=2.5,
    )


def test_inside_a_graph(client: LossClient) -> None:
    """Gradients flow on into whatever produced the logits."""
    weight = torch.randn(3, 5, requires_grad=True)
    features = torch.randn(8, 3)
    target = torch.randint(0, 5, (8,))
    loss = 0.5 * lossd_torch.cross_entropy(features @ weight, target, client=client)
    loss.backward()
    local_weight = weight.detach().clone().requires_grad_()
    (0.5 * F.cross_entropy(features @ local_weight, target)).backward()
    torch.testing.assert_close(weight.grad, local_weight.grad, rtol=1e-6, atol=1e-7)


def test_bfloat16_backward(client: LossClient) -> None:
    x = _logits(6, 5, dtype=torch.bfloat16).requires_grad_()
    target = torch.randint(0, 5, (6,))
    lossd_torch.cross_entropy(x, target, client=client).backward()
    y = x.detach().clone().requires_grad_()
    F.cross_entropy(y, target).backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, y.grad)  # type: ignore[arg-type]


def test_no_gradients_requested_without_grad_mode(client: LossClient) -> None:
    x = _logits(6, 5).requires_grad_()
    with torch.no_grad():
        loss = lossd_torch.cross_entropy(x, torch.randint(0, 5, (6,)), client=client)
    assert loss.grad_fn is None and not loss.requires_grad
