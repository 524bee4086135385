"""Parity through a real server: every generated case equals local torch (loss, gradients, dtypes)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lossd.client import LossClient

from cases import Case, all_cases, reference, tolerance

CASES = all_cases()


def remote(client: LossClient, case: Case, tensors: dict[str, Any]) -> Any:
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


def assert_same(actual: torch.Tensor | None, expected: torch.Tensor | None, what: str) -> None:
    if expected is None:
        assert actual is None, f"{what} was not requested but came back"
        return
    assert actual is not None, f"{what} is missing"
    torch.testing.assert_close(
        actual, expected, equal_nan=True, msg=lambda m: f"{what}: {m}", **tolerance(expected.dtype)
    )


def test_case_count() -> None:
    assert len(CASES) >= 800
    assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_parity(client: LossClient, case: Case) -> None:
    tensors = case.tensors()
    expected = reference(case, tensors)
    result = remote(client, case, tensors)
    assert_same(result.loss, expected["loss"], "loss")
    assert_same(result.grad, expected["grad"], "input gradient")
    assert_same(result.target_grad, expected["target_grad"], "target gradient")
