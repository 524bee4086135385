"""Parity through a real server: every generated case equals local torch (loss, gradients, dtypes)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lossd.client import LossClient

from cases import Case, all_cases, reference, same_bits, tolerance

CASES = all_cases()


def remote(client: LossClient, case: Case, tensors: dict[str, Any]) -> Any:
    """The case through a client; with an `AsyncLossClient`, the awaitable result."""
    kwargs: dict[str, Any] = dict(tensors["options"])
    if tensors["weight"] is not None:
        kwargs["weight"] = tensors["weight"]
    if case.kind != "nll_loss":
        kwargs["return_target_grad"] = case.target_grad
    method = getattr(client, case.kind)
    return method(
        tensors["input"],
        tensors["target"],
        return_grad=case.input_grad,
        grad_dtype=case.grad_dtype,
        grad_output=tensors["grad_output"],
        **kwargs,
    )


def assert_same(
    actual: torch.Tensor | None, expected: torch.Tensor | None, what: str, *dtypes: torch.dtype | None
) -> None:
    """Close to local torch (see `cases.tolerance`); `dtypes` are those the computation involved."""
    if expected is None:
        assert actual is None, f"{what} was not requested but came back"
        return
    assert actual is not None, f"{what} is missing"
    torch.testing.assert_close(
        actual, expected, equal_nan=True, msg=lambda m: f"{what}: {m}", **tolerance(expected, *dtypes)
    )


def check_result(result: Any, expected: dict[str, torch.Tensor | None], case: Case) -> None:
    dtypes = (case.dtype, case.target_dtype, case.grad_dtype)
    assert_same(result.loss, expected["loss"], "loss", *dtypes)
    assert_same(result.grad, expected["grad"], "input gradient", *dtypes)
    assert_same(result.target_grad, expected["target_grad"], "target gradient", *dtypes)


def check_bits(result: Any, expected: dict[str, torch.Tensor | None]) -> None:
    for what, actual, wanted in (
        ("loss", result.loss, expected["loss"]),
        ("input gradient", result.grad, expected["grad"]),
        ("target gradient", result.target_grad, expected["target_grad"]),
    ):
        assert (actual is None) == (wanted is None), what
        if wanted is not None:
            assert same_bits(actual, wanted), f"{what}: {actual} != {wanted}"


def test_case_count() -> None:
    assert len(CASES) >= 800
    assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_parity(client: LossClient, case: Case) -> None:
    """Batching on (the default): the merged per-row path, within rounding of local torch."""
    tensors = case.tensors()
    check_result(remote(client, case, tensors), reference(case, tensors), case)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_parity_unbatched_is_bit_exact(exact_client: LossClient, case: Case) -> None:
    """Batching off: each call is torch's own F.* call and autograd, bit for bit."""
    tensors = case.tensors()
    check_bits(remote(exact_client, case, tensors), reference(case, tensors))
