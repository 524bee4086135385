#!/usr/bin/env python3
"""Soak: many concurrent clients, every loss and option, 5% deliberately invalid, for a while.

A fresh `lossd serve` (default settings, batching on) in its own process; `--clients` asyncio
callers share `--channels` client channels and draw calls from a pool of mixed cases: nll_loss,
cross_entropy with indices and with probabilities, kl_div; 1-D to K-dimensional; float32, float64,
float16, bfloat16; every reduction; class weights, ignore_index, label smoothing, log targets;
gradients half the time; 1% large enough to stream. 5% are invalid on purpose (class index out of
range, mismatched shapes, label smoothing 1.5, weights of the wrong length): they must fail
INVALID_ARGUMENT and nothing else may fail. Every answer to a valid call is checked against torch
computed locally (`--check-fraction` of them; all by default) within rounding of the batched path.

The server's resident memory is sampled every second after a warm-up (caches, allocator arenas and
the reusable stream buffer are in place by then); `rss_start_bytes` and `rss_end_bytes` are the
medians of the first and second half of the measured time (large calls in flight swing it by up to
150 MB from one second to the next; `rss_peak_bytes` is the highest sample), and the growth between
them must stay under 10%. Prints one
JSON line; exits 1 if any check fails.

    python benchmarks/soak.py             # 60 s after a 10 s warm-up
    python benchmarks/soak.py --quick     # 20 s after a 10 s warm-up
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from _servers import LossdProcess

from lossd.client import AsyncLossClient, LossdError

# torch's notice about kl_div's default reduction; the soak calls it on purpose.
warnings.filterwarnings("ignore", message="reduction: 'mean' divides the total loss", category=UserWarning)

FLOATS = (torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}


@dataclass
class Case:
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    invalid: bool
    expected: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)


def _reference(case: Case) -> tuple[torch.Tensor, torch.Tensor | None]:
    x, target = case.args
    kwargs = {k: v for k, v in case.kwargs.items() if k not in ("return_grad",)}
    leaf = x.detach().clone().requires_grad_(case.kwargs.get("return_grad", False))
    loss = getattr(F, case.method)(leaf, target, **kwargs)
    grad = None
    if leaf.requires_grad:
        (grad,) = torch.autograd.grad(loss, leaf, torch.ones_like(loss))
    return loss.detach(), grad


def make_case(rng: random.Random, large: bool = False, flat: bool = False) -> Case:
    method = rng.choice(["nll_loss", "cross_entropy", "cross_entropy", "kl_div"])
    dtype = rng.choice(FLOATS)
    rows = 512 if large else rng.randint(1, 64)
    classes = 4096 if large else rng.choice([2, 10, 100, 1000])
    extra = () if large or flat or rng.random() < 0.8 else (rng.randint(1, 4),)
    shape = (rows, classes, *extra)
    x = torch.randn(shape, dtype=torch.float64)
    kwargs: dict[str, Any] = {
        "reduction": rng.choice(["none", "mean", "sum"]),
        "return_grad": rng.random() < 0.5,
    }
    if method == "kl_div":
        x = x.log_softmax(1).to(dtype)
        target = torch.randn(shape, dtype=torch.float64).softmax(1)
        if rng.random() < 0.3:
            target, kwargs["log_target"] = target.log(), True
        target = target.to(dtype)
        if rng.random() < 0.2:
            kwargs["reduction"] = "batchmean"
        return Case(method, (x, target), kwargs, False)
    x = (x.log_softmax(1) if method == "nll_loss" else x).to(dtype)
    if method == "cross_entropy" and rng.random() < 0.3:
        target = torch.randn(shape, dtype=torch.float64).softmax(1).to(dtype)
    else:
        target = torch.randint(0, classes, (rows, *extra))
        if rng.random() < 0.3:
            kwargs["ignore_index"] = rng.choice([-100, 0])
            target[0] = kwargs["ignore_index"]
        if rng.random() < 0.3:
            kwargs["weight"] = (torch.rand(classes, dtype=torch.float64) + 0.1).to(dtype)
    if method == "cross_entropy" and rng.random() < 0.3:
        kwargs["label_smoothing"] = 0.1
    return Case(method, (x, target), kwargs, False)


def make_invalid(rng: random.Random) -> Case:
    """A call torch refuses, and so must lossd (INVALID_ARGUMENT)."""
    case = make_case(rng, flat=True)
    x, target = case.args
    rows, classes = x.shape
    kind = rng.choice(["range", "shape", "smoothing", "weight"])
    case.kwargs.pop("ignore_index", None)
    if case.method == "kl_div" or kind == "shape":
        # (rows, C) against (rows, C + 1), or against rows + 1 labels: no broadcast makes them agree
        target = (
            torch.zeros(rows, classes + 1, dtype=x.dtype)
            if case.method == "kl_div"
            else torch.zeros(rows + 1, dtype=torch.int64)
        )
    elif kind == "smoothing" and case.method == "cross_entropy":
        case.kwargs["label_smoothing"] = 1.5
    elif kind == "weight" or target.is_floating_point():
        case.kwargs["weight"] = torch.ones(classes + 1, dtype=x.dtype)
    else:
        target = target.clone()
        target[0] = classes + 3
    return Case(case.method, (x, target), case.kwargs, True)


def close_enough(actual: Any, expected: torch.Tensor) -> bool:
    actual = torch.as_tensor(actual)
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return False
    a, e = actual.double(), expected.double()
    if not torch.equal(a.isnan(), e.isnan()):
        return False
    a, e = a.nan_to_num(), e.nan_to_num()
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    return bool(((a - e).abs() <= TOLERANCE[expected.dtype] * scale).all())


@dataclass
class Tally:
    requests: int = 0
    latencies: list[float] = field(default_factory=list)
    errors_by_code: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    checked: int = 0


async def caller(
    client: AsyncLossClient, pool: list[Case], stop_at: float, tally: Tally, rng: random.Random, check: float
) -> None:
    while time.monotonic() < stop_at:
        case = rng.choice(pool)
        started = time.perf_counter()
        try:
            result = await getattr(client, case.method)(*case.args, **case.kwargs)
        except LossdError as error:
            tally.latencies.append(time.perf_counter() - started)
            tally.requests += 1
            tally.errors_by_code[error.code] += 1
            if not (case.invalid and error.code == "INVALID_ARGUMENT"):
                tally.unexpected.append(f"{case.method} {error!s}"[:300])
            continue
        tally.latencies.append(time.perf_counter() - started)
        tally.requests += 1
        if case.invalid:
            tally.unexpected.append(f"{case.method}: an invalid call succeeded: {case.kwargs}")
            continue
        if rng.random() >= check:
            continue
        if case.expected is None:
            case.expected = _reference(case)
        loss, grad = case.expected
        tally.checked += 1
        if not close_enough(result.loss, loss) or (grad is not None and not close_enough(result.grad, grad)):
            tally.wrong.append(f"{case.method} {case.kwargs}")


async def soak(target: str, args: argparse.Namespace, server: LossdProcess) -> dict[str, Any]:
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    pool = []
    for i in range(args.pool):
        if i % 20 == 0:
            pool.append(make_invalid(rng))  # 5%
        else:
            pool.append(make_case(rng, large=i % 100 == 1))  # 1%
    for case in pool:
        if not case.invalid:
            case.expected = _reference(case)
    clients = [AsyncLossClient(target, timeout=60) for _ in range(args.channels)]
    tally = Tally()
    started = time.monotonic()
    rss_idle = server.rss()
    warm_until = started + args.warmup
    stop_at = warm_until + args.duration
    tasks = [
        asyncio.ensure_future(
            caller(clients[i % len(clients)], pool, stop_at, tally, random.Random(i), args.check_fraction)
        )
        for i in range(args.clients)
    ]
    await asyncio.sleep(max(warm_until - time.monotonic(), 0))
    counted_from = tally.requests
    samples = [server.rss()]
    while not all(task.done() for task in tasks):  # the RSS each second: a leak climbs, noise does not
        await asyncio.wait(tasks, timeout=1.0)
        samples.append(server.rss())
    await asyncio.gather(*tasks)
    # Large calls in flight make the RSS swing by up to 150 MB from one second to the next; the
    # medians of the two halves of the run see through those swings, and a leak still moves them.
    half = len(samples) // 2
    rss_start, rss_end = int(statistics.median(samples[:half])), int(statistics.median(samples[half:]))
    for client in clients:
        await client.close()
    latencies = sorted(tally.latencies)
    duration = time.monotonic() - started
    return {
        "benchmark": "soak",
        "duration_s": round(duration, 1),
        "clients": args.clients,
        "requests": tally.requests,
        "requests_after_warmup": tally.requests - counted_from,
        "rps": round(tally.requests / duration, 1),
        "invalid_share": round(sum(c.invalid for c in pool) / len(pool), 3),
        "errors_by_code": dict(tally.errors_by_code),
        "unexpected_errors": len(tally.unexpected),
        "checked": tally.checked,
        "wrong_results": len(tally.wrong),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
        "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2) if latencies else None,
        "rss_idle_bytes": rss_idle,
        "rss_start_bytes": rss_start,
        "rss_end_bytes": rss_end,
        "rss_growth": round(rss_end / rss_start - 1, 4),
        "rss_peak_bytes": max(samples),
        "rss_samples_mib": [round(sample / 2**20) for sample in samples],
        "examples": {"unexpected": tally.unexpected[:3], "wrong": tally.wrong[:3]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="20 s after a 10 s warm-up")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured after the warm-up")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--pool", type=int, default=400, help="distinct cases drawn from")
    parser.add_argument("--check-fraction", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[], help="extra `lossd serve` argument")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = 20.0, 10.0
    server = LossdProcess(args.server_arg)
    try:
        report = asyncio.run(soak(server.target, args, server))
    finally:
        code = server.stop()
    report["server_exit"] = code
    ok = (
        report["unexpected_errors"] == 0
        and report["wrong_results"] == 0
        and report["rss_growth"] < 0.10
        and report["checked"] > 0
        and code == 0
    )
    report["ok"] = ok
    print(json.dumps(report), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
