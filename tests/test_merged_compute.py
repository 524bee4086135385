"""Merged computation (`lossd.server.engine.merging`): calls computed as rows of one computation
each keep their own reduction, gradients and numbers, equal to torch's alone; and the same through
a server that batches. The batch queue itself is `test_batch_queue.py`'s."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lossd.client import AsyncLossClient, LossClient, errors
from lossd.server.engine import LossEngine
from lossd.server.engine.staging import Staging
from lossd.server.losses import LOSSES, LossCall, make_options

from cases import Case, all_cases, reference, same_bits
from conftest import RunningServer, SlowEngine
from test_parity import check_result, remote

ENGINE = LossEngine("cpu")


def as_call(case: Case, tensors: dict[str, Any]) -> LossCall:
    options = tensors["options"]
    own = LOSSES[case.kind].parameters
    loss_options = make_options(
        case.kind, options["reduction"], **{k: v for k, v in options.items() if k in own}
    )
    grads = {name for name, asked in (("input", case.input_grad), ("target", case.target_grad)) if asked}
    call = LossCall(
        loss_options,
        tensors["input"],
        tensors["target"],
        tensors={} if tensors["weight"] is None else {"weight": tensors["weight"]},
        grads=frozenset(grads),
        grad_dtype=case.grad_dtype,
        grad_output=tensors["grad_output"],
    )
    return ENGINE.prepare(call)


class Result:
    def __init__(self, output: Any) -> None:
        def tensor(value: Any) -> torch.Tensor | None:
            return None if value is None else torch.as_tensor(value)

        self.loss = tensor(output.loss)
        self.grad = tensor(output.input_grad)
        self.target_grad = tensor(output.target_grad)


def test_every_case_merged_with_its_kind_matches_torch() -> None:
    """All parity cases, grouped by merge key and computed as merged batches, in process."""
    cases = all_cases()
    prepared = [(case, case.tensors()) for case in cases]
    groups: dict[Any, list[int]] = collections.defaultdict(list)
    for i, (case, tensors) in enumerate(prepared):
        key = ENGINE.merge_key(as_call(case, tensors))
        groups[key if key is not None else ("alone", i)].append(i)
    merged = sum(len(members) for members in groups.values() if len(members) > 1)
    assert merged > 500, "most cases must share a key with others"
    for members in groups.values():
        calls = [as_call(*prepared[i]) for i in members]
        for i, output in zip(members, ENGINE.compute_batch(calls), strict=True):
            case, tensors = prepared[i]
            assert not isinstance(output, Exception), (case.id, output)
            check_result(Result(output), reference(case, tensors), case)


def test_merged_results_do_not_depend_on_the_company() -> None:
    """The same call merged into different batches gives the same bits."""
    base = next(
        c
        for c in all_cases()
        if c.kind == "cross_entropy"
        and c.shape == (3, 5, 4, 2)
        and c.label_smoothing
        and not c.weight
        and c.dtype == torch.float32
        and c.reduction == "mean"
    )
    calls = [as_call(case, case.tensors()) for case in (dataclasses.replace(base, seed=s) for s in range(4))]
    calls.append(
        as_call(
            dataclasses.replace(base, shape=(6, 5), seed=9),
            dataclasses.replace(base, shape=(6, 5), seed=9).tensors(),
        )
    )
    assert len({ENGINE.merge_key(call) for call in calls}) == 1
    first = ENGINE.compute_batch([calls[0], calls[1]])[0]
    second = ENGINE.compute_batch([calls[2], calls[4], calls[3], calls[0]])[3]
    assert not isinstance(first, Exception) and not isinstance(second, Exception)
    for a, b in ((first.loss, second.loss), (first.input_grad, second.input_grad)):
        assert same_bits(torch.as_tensor(a), torch.as_tensor(b))


def test_a_failed_merge_retries_each_call_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import lossd.server.engine.loss_engine as engine_module

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated merged failure")

    monkeypatch.setattr(engine_module, "compute_merged", broken)
    cases = [
        c
        for c in all_cases()
        if c.kind == "nll_loss"
        and c.shape == (7, 5)
        and c.dtype == torch.float64
        and c.reduction == "sum"
        and not c.weight
        and c.ignore == "class"
    ]
    prepared = [(c, c.tensors()) for c in cases[:3]]
    calls = [as_call(c, t) for c, t in prepared]
    assert len({ENGINE.merge_key(c) for c in calls}) == 1
    outputs = ENGINE.compute_batch(calls)
    for (case, tensors), output in zip(prepared, outputs, strict=True):
        assert not isinstance(output, Exception)
        check_result(Result(output), reference(case, tensors), case)


def test_one_bad_call_in_a_failed_merge_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LossEngine("cpu")
    original = engine._run
    case = next(c for c in all_cases() if c.kind == "kl_div" and c.shape == (4, 6) and c.target_shape is None)
    calls = [as_call(case, case.tensors()) for _ in range(3)]

    def run(call: LossCall) -> Any:
        if call is calls[1]:
            raise RuntimeError("this one is bad")
        return original(call)

    import lossd.server.engine.loss_engine as engine_module

    monkeypatch.setattr(engine, "_run", run)
    monkeypatch.setattr(
        engine_module, "compute_merged", lambda *a: (_ for _ in ()).throw(RuntimeError("merge"))
    )
    outputs = engine.compute_batch(calls)
    assert isinstance(outputs[1], RuntimeError)
    assert not isinstance(outputs[0], Exception) and not isinstance(outputs[2], Exception)


def test_staging_concatenates_every_dtype_on_the_cpu() -> None:
    """The logic of the CUDA staging path (pinned memory and non-blocking copies aside)."""
    staging = Staging(torch.device("cpu"), pinned=False)
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.float16):
        parts = [torch.arange(6).reshape(3, 2).to(dtype), torch.arange(4).reshape(2, 2).to(dtype)]
        from lossd.server.engine.staging import host_array

        tensor = staging.host_rows([host_array(p) for p in parts], dtype)
        assert tensor.dtype == dtype and torch.equal(tensor, torch.cat(parts))
        (back,) = staging.to_host([tensor])
        assert np.array_equal(back, host_array(torch.cat(parts)))


def test_concurrent_mixed_requests_each_get_their_own_numbers(
    server_factory: Callable[..., RunningServer],
) -> None:
    """Many concurrent requests of every loss and option through one batching server.

    The compute threads are held until every request is queued, so that merging does not depend on
    how fast a (busy) machine delivers them."""
    engine = GatedEngine()
    running = server_factory(engine=engine, max_concurrent_streams=1024)
    # Every sixth case, four times with different data: mixed, yet mergeable in fours and more.
    cases = [
        dataclasses.replace(case, seed=case.seed * 10 + k) for case in all_cases()[::6] for k in range(4)
    ]

    async def main() -> list[Any]:
        # Not coalesced: every call must reach the server's queue on its own (tests/test_batch.py
        # covers coalesced calls).
        async with AsyncLossClient(running.target, timeout=120, coalesce=False) as client:
            return await asyncio.gather(*(_remote_async(client, case) for case in cases))

    with ThreadPoolExecutor(1) as pool:
        calls = pool.submit(asyncio.run, main())
        deadline = time.monotonic() + 120
        while running.server.batcher.depth + engine.held < len(cases) and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.release.set()
        results = calls.result(120)
    for case, (tensors, result) in zip(cases, results, strict=True):
        check_result(result, reference(case, tensors), case)
    registry = running.server.metrics.registry
    batches = registry.get_sample_value("lossd_batch_requests_count")
    requests = registry.get_sample_value("lossd_batch_requests_sum")
    assert requests == len(cases)
    assert batches is not None and batches < len(cases) / 2, "concurrent compatible requests must merge"


class GatedEngine(LossEngine):
    """Holds each compute thread's first batch until `release` is set; `held` counts the requests
    held."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.release = threading.Event()
        self.held = 0

    def compute_batch(self, calls: Any, merge: bool = True) -> Any:
        if not self.release.is_set():
            self.held += len(calls)
            self.release.wait(120)
        return super().compute_batch(calls, merge)


async def _remote_async(client: AsyncLossClient, case: Case) -> tuple[dict[str, Any], Any]:
    tensors = case.tensors()
    return tensors, await remote(client, case, tensors)  # type: ignore[arg-type]


def test_queued_requests_past_their_deadline_are_never_computed(
    server_factory: Callable[..., RunningServer],
) -> None:
    engine = SlowEngine(delay=1.0)
    running = server_factory(engine=engine)
    logits, labels = np.zeros((2, 3), np.float32), np.array([0, 1])

    async def main() -> list[Any]:
        async with AsyncLossClient(running.target) as client:
            holder = asyncio.ensure_future(client.cross_entropy(logits, labels, timeout=30))
            await asyncio.sleep(0.3)  # the holder is computing; the next ones queue behind it
            late = [asyncio.ensure_future(client.nll_loss(logits, labels, timeout=0.2)) for _ in range(3)]
            return list(await asyncio.gather(holder, *late, return_exceptions=True))

    results = asyncio.run(main())
    assert not isinstance(results[0], Exception)
    assert all(isinstance(r, errors.DeadlineExceededError) for r in results[1:]), results
    assert engine.calls == 1, "expired requests must not be computed"
    dropped = running.server.metrics.registry.get_sample_value(
        "lossd_dropped_requests_total", {"reason": "deadline"}
    )
    assert dropped is None or dropped <= 3  # cancelled by the client first, or dropped at dispatch


def test_a_full_queue_answers_resource_exhausted(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(engine=SlowEngine(delay=1.0), max_queue_size=1)
    logits, labels = np.zeros((2, 3), np.float32), np.array([0, 1])

    async def main() -> list[Any]:
        # One attempt: lossd's client would retry a QUEUE_FULL after its pushback, and count again.
        async with AsyncLossClient(running.target, timeout=30, retry_attempts=1) as client:
            holder = asyncio.ensure_future(client.cross_entropy(logits, labels))
            await asyncio.sleep(0.3)
            queued = asyncio.ensure_future(client.cross_entropy(logits, labels))
            await asyncio.sleep(0.1)
            refused = asyncio.ensure_future(client.cross_entropy(logits, labels))
            return list(await asyncio.gather(holder, queued, refused, return_exceptions=True))

    holder, queued, refused = asyncio.run(main())
    assert not isinstance(holder, Exception) and not isinstance(queued, Exception)
    assert isinstance(refused, errors.ResourceExhaustedError) and refused.reason == "QUEUE_FULL"
    registry = running.server.metrics.registry
    assert registry.get_sample_value("lossd_dropped_requests_total", {"reason": "queue_full"}) == 1
    # RetryInfo: about the time the queue ahead takes (1 s per call here), within [0.01, 5] s.
    assert refused.retry_after is not None and 0.01 <= refused.retry_after <= 5.0


def test_batching_off_computes_each_request_alone(exact_server: RunningServer) -> None:
    with LossClient(exact_server.target) as client:
        before = exact_server.server.metrics.registry.get_sample_value("lossd_batch_requests_sum") or 0

        async def main() -> None:
            async with AsyncLossClient(exact_server.target) as aio:
                await asyncio.gather(
                    *(aio.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1])) for _ in range(20))
                )

        asyncio.run(main())
        registry = exact_server.server.metrics.registry
        assert registry.get_sample_value("lossd_batch_requests_sum") - before == 20
        buckets = registry.get_sample_value("lossd_batch_requests_bucket", {"le": "1.0"})
        assert buckets == registry.get_sample_value("lossd_batch_requests_count")
        assert client.nll_loss(np.zeros((2, 3), np.float32), np.array([0, 1])).loss == 0.0


def test_float16_reductions_that_overflow_in_torch_overflow_in_lossd(
    server_factory: Callable[..., RunningServer],
) -> None:
    """torch sums the label-smoothing term (and probability-target and batchmean losses) in float16
    before scaling it: past 65504 that is inf. Merged, the float64 reduction would stay finite; such
    calls are computed alone, and agree with torch."""
    running = server_factory(max_queue_delay_us=20000, max_concurrent_streams=1024)
    torch.manual_seed(0)
    x = torch.randn(27, 1000, 3, dtype=torch.float64).to(torch.float16)
    labels = torch.randint(0, 1000, (27, 3))
    probabilities = torch.randn(60, 1000, dtype=torch.float64).softmax(1).to(torch.float16)
    logits = torch.randn(60, 1000, dtype=torch.float16)
    student = torch.randn(100, 1000, dtype=torch.float64).log_softmax(1).to(torch.float16)
    teacher = torch.randn(100, 1000, dtype=torch.float64).softmax(1).to(torch.float16)
    expected = [
        F.cross_entropy(x, labels, label_smoothing=0.1),
        F.cross_entropy(x, labels, label_smoothing=0.1, reduction="sum"),
        F.cross_entropy(logits * 30, probabilities),
        F.kl_div(student * 30, teacher, reduction="batchmean"),
    ]
    assert not expected[0].isfinite(), "the case must overflow in torch"

    async def main() -> list[Any]:
        async with AsyncLossClient(running.target, timeout=60) as client:
            calls = [
                client.cross_entropy(x, labels, label_smoothing=0.1),
                client.cross_entropy(x, labels, label_smoothing=0.1, reduction="sum"),
                client.cross_entropy(logits * 30, probabilities),
                client.kl_div(student * 30, teacher, reduction="batchmean"),
            ]
            return list(await asyncio.gather(*(calls * 3)))

    results = asyncio.run(main())
    for i, result in enumerate(results):
        assert same_bits(result.loss, expected[i % 4]), (i, result.loss, expected[i % 4])


def _spy_merges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the merged computations the engine runs from now on."""
    import lossd.server.engine.loss_engine as engine_module

    sizes: list[int] = []
    original = engine_module.compute_merged

    def spy(calls: Any, *args: Any) -> Any:
        sizes.append(len(calls))
        return original(calls, *args)

    monkeypatch.setattr(engine_module, "compute_merged", spy)
    return sizes


@pytest.mark.parametrize("loss", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weighted_calls_merge_and_keep_torchs_numbers(
    monkeypatch: pytest.MonkeyPatch, loss: str, dtype: torch.dtype
) -> None:
    """Calls that share their class weights (equal bytes) are merged; each call's 'mean' divides by
    its own targets' summed weights, ignored targets left out, as torch's does alone."""
    generator = torch.Generator().manual_seed(11)
    classes = 7
    weight = (torch.rand(classes, generator=generator, dtype=torch.float64) + 0.1).to(dtype)
    function = getattr(F, loss)
    calls, expected = [], []
    for i, (shape, reduction) in enumerate(
        [
            ((5, classes), "mean"),
            ((3, classes, 4), "mean"),
            ((9, classes), "sum"),
            ((2, classes, 2, 2), "none"),
        ]
    ):
        x = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        if loss == "nll_loss":
            x = torch.log_softmax(x, 1)
        t = torch.randint(0, classes, (shape[0], *shape[2:]), generator=generator)
        t.view(-1)[i] = 3  # an ignored target in every call
        options = make_options(loss, reduction, ignore_index=3)
        call = LossCall(options, x, t, tensors={"weight": weight.clone()}, grads=frozenset({"input"}))
        calls.append(ENGINE.prepare(call))
        leaf = x.clone().requires_grad_()
        value = function(leaf, t, weight=weight, ignore_index=3, reduction=reduction)
        (grad,) = torch.autograd.grad(value, leaf, torch.ones_like(value))
        expected.append((value.detach(), grad))
    assert len({ENGINE.merge_key(call) for call in calls}) == 1
    merges = _spy_merges(monkeypatch)
    outputs = ENGINE.compute_batch(calls)
    assert merges == [4]
    tolerance = 1e-6 if dtype == torch.float32 else 1e-13
    for output, (value, grad) in zip(outputs, expected, strict=True):
        assert not isinstance(output, Exception)
        torch.testing.assert_close(torch.as_tensor(output.loss), value, rtol=tolerance, atol=0)
        torch.testing.assert_close(torch.as_tensor(output.input_grad), grad, rtol=tolerance, atol=1e-300)


def test_merged_float64_reductions_keep_float64_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float64 call's sum over its rows and its denominator stay in float64 when merged: within
    1e-13 of torch alone, where a float32 reduction would be off by about 1e-7."""
    generator = torch.Generator().manual_seed(5)
    calls, expected = [], []
    for reduction, rows in (("sum", 3000), ("mean", 2000), ("mean", 777)):
        x = torch.randn(rows, 13, generator=generator, dtype=torch.float64) * 3 + 1e-3
        t = torch.randint(0, 13, (rows,), generator=generator)
        calls.append(
            ENGINE.prepare(LossCall(make_options("cross_entropy", reduction, label_smoothing=0.1), x, t))
        )
        expected.append(F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1))
    merges = _spy_merges(monkeypatch)
    outputs = ENGINE.compute_batch(calls)
    assert merges == [3]
    for output, value in zip(outputs, expected, strict=True):
        assert not isinstance(output, Exception)
        loss = torch.as_tensor(output.loss)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, value, rtol=1e-13, atol=0)
