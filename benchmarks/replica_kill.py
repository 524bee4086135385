#!/usr/bin/env python3
"""Replica kill: three lossd servers, one client balancing over them, one server SIGKILLed mid-run.

Three `lossd serve` processes on loopback; `--callers` threads share one `LossClient` given the
three addresses (round-robin per call, retries of UNAVAILABLE: see `lossd.client.channels`). A
third of the way through, one server is killed with SIGKILL: no drain, its connections drop with
calls in flight. Every answer is checked against torch. A call is `lost` if it finally failed or
came back wrong; `retried` counts the calls the surviving servers saw as retries of an attempt that
failed elsewhere (`lossd_retried_requests_total`). Prints one JSON line; exits 1 if any call was lost.

    python benchmarks/replica_kill.py            # 30 s
    python benchmarks/replica_kill.py --quick    # 10 s
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

import torch
import torch.nn.functional as F
from _servers import LossdProcess, scrape

from lossd.client import LossClient, LossdError


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10 s instead of 30 s")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument(
        "--retry-attempts",
        type=int,
        default=5,
        help="the client's attempts per call (1: no retries, to compare)",
    )
    args = parser.parse_args()
    if args.quick:
        args.duration = 10.0
    torch.manual_seed(0)
    logits = torch.randn(32, 1000)
    labels = torch.randint(0, 1000, (32,))
    leaf = logits.clone().requires_grad_()
    expected = F.cross_entropy(leaf, labels)
    (expected_grad,) = torch.autograd.grad(expected, leaf)

    servers = [LossdProcess(["--device=cpu"]) for _ in range(3)]
    counts: dict[str, int] = {"requests": 0, "lost": 0}
    failures: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    started = time.monotonic()
    stop_at = started + args.duration
    try:
        with LossClient(
            [s.target for s in servers], timeout=30, retry_attempts=args.retry_attempts
        ) as client:

            def call() -> None:
                while time.monotonic() < stop_at:
                    began = time.perf_counter()
                    try:
                        result = client.cross_entropy(logits, labels, return_grad=True)
                        ok = bool(
                            torch.allclose(result.loss, expected, rtol=1e-6, atol=0)
                            and torch.allclose(result.grad, expected_grad, rtol=1e-5, atol=1e-9)
                        )
                        problem = "" if ok else "wrong result"
                    except LossdError as error:
                        problem = str(error)
                    with lock:
                        counts["requests"] += 1
                        latencies.append(time.perf_counter() - began)
                        if problem:
                            counts["lost"] += 1
                            failures.append(problem[:200])

            threads = [threading.Thread(target=call) for _ in range(args.callers)]
            for thread in threads:
                thread.start()
            time.sleep(args.duration / 3)
            with lock:
                before_kill = counts["requests"]
            servers[1].kill()
            killed_at = time.monotonic() - started
            for thread in threads:
                thread.join()
        retried = sum(
            scrape(s.metrics_port, "lossd_retried_requests_total") for s in (servers[0], servers[2])
        )
        answered = [scrape(s.metrics_port, "lossd_requests_total") for s in (servers[0], servers[2])]
    finally:
        exits = [s.stop() for s in servers]
    latencies.sort()
    report: dict[str, Any] = {
        "benchmark": "replica_kill",
        "duration_s": round(time.monotonic() - started, 1),
        "callers": args.callers,
        "retry_attempts": args.retry_attempts,
        "requests": counts["requests"],
        "requests_before_kill": before_kill,
        "killed_at_s": round(killed_at, 2),
        "lost": counts["lost"],
        "retried": int(retried),
        "survivors_answered": [int(a) for a in answered],
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2),
        "max_ms": round(1000 * latencies[-1], 2),
        "server_exits": exits,
        "failures": failures[:3],
    }
    report["ok"] = counts["lost"] == 0 and exits[0] == 0 and exits[2] == 0
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
