"""Choosing among a loss's implementations: the fastest that agrees with the loss's own computation
within the stated tolerances, never one that disagrees or fails, the loss's own for the calls the
chosen one does not support, and the choice said at start-up and in the metrics. CUDA-only
candidates (Liger Kernel, cut-cross-entropy, torch.compile) are stood in for by CPU ones here; the
adapters' own logic runs on the CPU through a torch kernel of the same form."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lossd.client import LossClient
from lossd.server.engine import LossEngine
from lossd.server.losses import LossCall, make_options
from lossd.server.losses.base import Computed, Upload
from lossd.server.losses.implementations import Choice, Implementation, choose, disagreement
from lossd.server.losses.linear_cross_entropy import (
    CANDIDATES,
    LINEAR_CROSS_ENTROPY,
    LinearCrossEntropyOptions,
    kernel_call,
    kernel_supports,
)

from conftest import RunningServer
from processes import ServeProcess

CPU = torch.device("cpu")


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _probe(**options: Any) -> LossCall:
    generator = torch.Generator().manual_seed(0)
    hidden, classifier = torch.randn(64, 16, generator=generator), torch.randn(40, 16, generator=generator)
    targets = torch.randint(0, 40, (64,), generator=generator)
    return LossCall(
        make_options("linear_cross_entropy", "mean", **options),
        hidden,
        targets,
        tensors={"classifier": classifier},
        grads=frozenset({"input"}),
    )


def _slowed(
    compute: Callable[[LossCall, Upload], Computed], seconds: float
) -> Callable[[LossCall, Upload], Computed]:
    def slow(call: LossCall, upload: Upload) -> Computed:
        time.sleep(seconds)
        return compute(call, upload)

    return slow


def _wrong(call: LossCall, upload: Upload) -> Computed:
    right = LINEAR_CROSS_ENTROPY.compute(call, upload)
    return dataclasses.replace(right, loss=right.loss * 1.001)


def _fails(call: LossCall, upload: Upload) -> Computed:
    raise RuntimeError("no kernel image for this device")


def test_the_fastest_that_agrees_is_chosen() -> None:
    own = LINEAR_CROSS_ENTROPY.compute
    candidates = [
        Implementation("own", _slowed(own, 0.03)),
        Implementation("wrong-but-fast", _wrong),
        Implementation("fails", _fails),
        Implementation("elsewhere", own, unavailable=lambda device: "CUDA only"),
        Implementation("narrow", own, supports=lambda call: call.options.softcap > 0),  # type: ignore[attr-defined]
        Implementation("slower", _slowed(own, 0.06)),
        Implementation("fast", own),
    ]
    choice = choose(candidates, [_probe(), _probe(softcap=5.0)], CPU, _identity, lambda: None)
    assert choice.chosen.name == "fast" and choice.reference.name == "own"
    report = choice.report
    assert report["fast"].startswith("chosen") and report["own"].startswith("agrees")
    assert report["slower"].startswith("agrees")
    assert report["wrong-but-fast"].startswith("disagrees with own: loss")
    assert report["fails"] == "failed: RuntimeError: no kernel image for this device"
    assert report["elsewhere"] == "CUDA only"
    assert report["narrow"] == "does not support the timing probe"
    assert "fast: chosen" in choice.describe()


def test_a_candidate_that_disagrees_on_any_probe_it_supports_is_refused() -> None:
    def wrong_with_softcap(call: LossCall, upload: Upload) -> Computed:
        options = call.options
        assert isinstance(options, LinearCrossEntropyOptions)
        return (_wrong if options.softcap else LINEAR_CROSS_ENTROPY.compute)(call, upload)

    candidates = [
        Implementation("own", _slowed(LINEAR_CROSS_ENTROPY.compute, 0.03)),
        Implementation("softcap-bug", wrong_with_softcap),
    ]
    choice = choose(candidates, [_probe(), _probe(softcap=5.0)], CPU, _identity, lambda: None)
    assert choice.chosen.name == "own"
    assert choice.report["softcap-bug"].startswith("disagrees")


def test_calls_the_chosen_one_lacks_go_to_the_reference() -> None:
    own = Implementation("own", LINEAR_CROSS_ENTROPY.compute)
    plain_only = Implementation(
        "plain-only",
        LINEAR_CROSS_ENTROPY.compute,
        supports=lambda call: call.options.label_smoothing == 0.0,  # type: ignore[attr-defined]
    )
    choice = Choice(plain_only, own)
    assert choice.for_call(_probe()).name == "plain-only"
    assert choice.for_call(_probe(label_smoothing=0.1)).name == "own"


def test_disagreement_uses_the_stated_tolerances() -> None:
    loss = torch.tensor(2.0)
    grad = torch.randn(8, 4)
    exact = Computed(loss, {"input": grad})
    assert disagreement(Computed(loss * (1 + 5e-6), {"input": grad}), exact, torch.float32) is None
    assert disagreement(Computed(loss * (1 + 5e-5), {"input": grad}), exact, torch.float32) is not None
    assert disagreement(Computed(loss, {"input": grad * (1 + 5e-5)}), exact, torch.float32) is None
    assert "gradient" in str(disagreement(Computed(loss, {"input": grad * 1.01}), exact, torch.float32))
    assert disagreement(Computed(loss, {}), exact, torch.float32) == "gradients of [], not ['input']"
    with_head = Computed(loss, {"input": grad, "classifier": grad})
    found = disagreement(Computed(loss, {"input": grad}), with_head, torch.float32)
    assert found == "gradients of ['input'], not ['classifier', 'input']"
    with_lse = Computed(loss, {"input": grad}, {"lse": loss})
    assert disagreement(Computed(loss, {"input": grad}), with_lse, torch.float32) == "no lse"


def test_the_cuda_candidates_say_why_not_here() -> None:
    assert [candidate.name for candidate in CANDIDATES] == ["torch-compile", "liger", "cut-cross-entropy"]
    assert all(candidate.unavailable(CPU) == "CUDA only" for candidate in CANDIDATES)
    cuda = torch.device("cuda")
    reasons = {candidate.name: candidate.unavailable(cuda) for candidate in CANDIDATES}
    assert reasons["torch-compile"] is None
    for name, extra in (("liger", "liger"), ("cut-cross-entropy", "cce")):  # not installed here
        hint = f"from a checkout: pip install -c constraints.txt '.[{extra}]'"
        assert reasons[name] == f"not installed ({hint})"


def test_what_a_fused_kernel_supports() -> None:
    def supports(call: LossCall, **kinds: bool) -> bool:
        given = {"smoothing": True, "z_loss": True, "bias": True, "half_only": False} | kinds
        return kernel_supports(call, **given)

    plain = _probe()
    assert supports(plain)
    assert not supports(plain, half_only=True)
    assert supports(
        dataclasses.replace(
            plain,
            input=plain.input.bfloat16(),
            tensors={"classifier": plain.tensors["classifier"].bfloat16()},
        ),
        half_only=True,
    )
    assert not supports(dataclasses.replace(plain, options=make_options("linear_cross_entropy", "none")))
    assert not supports(dataclasses.replace(plain, tensors={**plain.tensors, "weight": torch.ones(40)}))
    assert not supports(dataclasses.replace(plain, outputs=frozenset({"lse"})))
    assert not supports(_probe(label_smoothing=0.1), smoothing=False)
    assert not supports(_probe(lse_square_scale=1e-4), z_loss=False)
    assert not supports(
        dataclasses.replace(plain, input=plain.input.double())
    )  # the classifier's dtype differs
    assert not supports(dataclasses.replace(plain, grad_output=torch.ones(64)))


def _torch_kernel(
    hidden: torch.Tensor,
    classifier: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    options: LinearCrossEntropyOptions,
    reduction: str,
) -> tuple[torch.Tensor, None]:
    """A fused kernel's form (a differentiable function returning (loss, z_loss)), by torch."""
    logits = F.linear(hidden, classifier, bias)
    if options.softcap:
        logits = options.softcap * torch.tanh(logits / options.softcap)
    loss = F.cross_entropy(
        logits,
        targets,
        ignore_index=options.ignore_index,
        label_smoothing=options.label_smoothing,
        reduction=reduction,
    )
    return loss, None


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_kernel_adapter_agrees_with_the_chunks(reduction: str) -> None:
    """The adapter's path (leaves, autograd, the upstream gradient, the head's gradients) with a torch
    kernel in place of Liger's: it must agree with lossd's own computation."""
    call = dataclasses.replace(
        _probe(softcap=5.0, label_smoothing=0.1),
        options=make_options("linear_cross_entropy", reduction, softcap=5.0, label_smoothing=0.1),
        grad_output=torch.tensor(1.5),
        grads=frozenset({"input", "classifier", "bias"}),
    )
    call = dataclasses.replace(call, tensors={**call.tensors, "bias": torch.randn(40)})
    adapted = kernel_call(call, _identity, _torch_kernel)
    own = LINEAR_CROSS_ENTROPY.compute(call, _identity)
    assert disagreement(adapted, own, torch.float32) is None


def test_the_engine_chooses_at_warm_up_and_names_every_call(server: RunningServer) -> None:
    engine = LossEngine("cpu")
    engine.warm_up()
    choice = engine.choices["linear_cross_entropy"]
    assert choice.chosen.name == "torch-chunked"
    assert choice.report == {
        "torch-chunked": "chosen (no other candidate runs here)",
        "torch-compile": "CUDA only",
        "liger": "CUDA only",
        "cut-cross-entropy": "CUDA only",
    }
    registry = server.server.metrics.registry
    labels = {"loss": "linear_cross_entropy", "implementation": "torch-chunked"}
    assert registry.get_sample_value("lossd_loss_implementation", labels) == 1
    before = registry.get_sample_value("lossd_loss_implementation_calls_total", labels) or 0.0
    with LossClient(server.target, timeout=30) as client:
        client.linear_cross_entropy(torch.randn(3, 8), [0, 1, 2], torch.randn(5, 8))
    assert registry.get_sample_value("lossd_loss_implementation_calls_total", labels) == before + 1


def test_the_start_up_line_names_the_implementation(serve_process: Callable[..., ServeProcess]) -> None:
    served = serve_process("--host=127.0.0.1", "--port=0", "--metrics-port=0")
    served.serving()
    found = served.wait_for(r"linear_cross_entropy computed by (\S+) \((.*)\)")
    assert found.group(1) == "torch-chunked"
    assert "liger: CUDA only" in found.group(2)
