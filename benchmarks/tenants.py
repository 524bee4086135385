#!/usr/bin/env python3
"""Tenants: isolation, a fair share, cost limits, key rotation and an early refusal of large calls.

A fresh `lossd serve` (CPU) with a tenants file of three tenants of equal weight (`a`, `b`, and
`rotating`, whose token changes during the run), a 2 GiB memory budget and `--max-call-cost`. In
turn:

- **isolation**: `a` puts tensors; `b` tries to list, use, delete and evict them, and to tell an id
  of `a`'s from one that never existed (answer and timing). `isolation_violations` counts every
  attempt that saw, touched or revealed anything of `a`'s.
- **fairness**: `b` makes small cross-entropy calls (32 x 10, gradient) one at a time, alone and
  then while `a` floods with 1024-entry ComputeLossBatch calls from 2 threads of another process
  (entries that cannot merge with `b`'s). `fair_p99_ratio` is `b`'s p99 under the flood over its p99
  alone, `fair_calls_ratio` its calls completed under the flood over alone, same run.
- **resident**: a 1-token `linear_cross_entropy` call with gradient naming a resident 32768 x 512
  float32 head: the server's CPU time per call over the same computation in this process (torch,
  one thread, as the server computes small calls): `resident_call_vs_local`.
- **cost**: a call estimated above `--max-call-cost` is refused; `cost_refusal_ms` is its median
  round trip, `cost_refusal_server_cpu_ms` the server's CPU per refusal.
- **reload**: a new token written to the tenants file works after `reload_s`; the old one is refused
  on its next call; a file that does not parse keeps the last good configuration (`bad_reload_kept`).
- **unary flood**: 200 concurrent 8 MiB ComputeLoss calls; `unary_flood_rss_over_budget_mb` is the
  server's peak RSS growth past the budget, `health_p99_ms` the health checks' p99 meanwhile.

Prints one JSON line per part and a summary line. Not a test: numbers, not verdicts.

    python benchmarks/tenants.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import LossdProcess, reset_peak_rss, rss, scrape

from lossd.client import LossClient
from lossd.client._calls import build_request
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd.v1 import tensor_pb2
from lossd.wire import codec

COMPUTE = "/lossd.v1.LossService/ComputeLoss"
BATCH = "/lossd.v1.LossService/ComputeLossBatch"
BUDGET = 2 << 30
TOKENS = {"a": "token-of-a", "b": "token-of-b", "rotating": "first-token"}
MAX_CALL_COST = 1e11


def digest(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def tenants_file(tokens: dict[str, str]) -> str:
    return "".join(f'[tenants.{name}]\ntokens = ["{digest(token)}"]\n\n' for name, token in tokens.items())


def auth(tenant: str, tokens: dict[str, str] = TOKENS) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {tokens[tenant]}")]


def p99(values: list[float]) -> float:
    return float(np.quantile(values, 0.99)) * 1000 if values else float("nan")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- isolation ------------------------------------------------------------------------------------


def isolation(target: str) -> dict[str, Any]:
    violations: list[str] = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        with LossClient(target, timeout=30, token=TOKENS["a"]) as a:
            secret = a.resident(torch.randn(64, 32))
            weight = a.resident(torch.rand(10))
        theirs = [secret.id, weight.id]
        listed = stub.ListTensors(pb.ListTensorsRequest(), metadata=auth("b"), timeout=30)
        if {t.id for t in listed.tensors} & set(theirs) or listed.resident_bytes:
            violations.append("list")

        def use(id: str) -> tuple[str, str]:
            request = build_request("cross_entropy", np.zeros((4, 10), np.float32), np.zeros(4, np.int64))
            request.cross_entropy.weight.CopyFrom(tensor_pb2.Tensor(resident_id=id))
            try:
                stub.ComputeLoss(request, metadata=auth("b"), timeout=30)
            except grpc.RpcError as error:
                return str(error.code()), str(error.details()).replace(id, "<id>")
            return "OK", ""

        never = digest("never uploaded")
        used, absent = use(weight.id), use(never)
        if used[0] == "OK" or used != absent:
            violations.append("use")
        # Existence by timing: B's lookups of A's id and of an absent id, interleaved, take the same
        # time; a second absent id is the control (how much two equal lookups differ here).
        known: list[float] = []
        unknown: list[float] = []
        control: list[float] = []
        other = digest("never uploaded either")
        for _ in range(150):
            for id, times in ((weight.id, known), (never, unknown), (other, control)):
                started = time.perf_counter()
                use(id)
                times.append(time.perf_counter() - started)
        known_s, unknown_s = statistics.median(known), statistics.median(unknown)
        noise = abs(statistics.median(control) - unknown_s)
        if abs(known_s - unknown_s) > max(3 * noise, 0.1 * unknown_s, 50e-6):
            violations.append("timing")
        deleted = stub.DeleteTensor(pb.DeleteTensorRequest(id=secret.id), metadata=auth("b"), timeout=30)
        if deleted.deleted:
            violations.append("delete")
        # B fills its quota with junk, and beyond: only its own tensors may go.
        quota = stub.ListTensors(pb.ListTensorsRequest(), metadata=auth("b"), timeout=30).max_resident_bytes
        junk = max(1, quota // 8)
        refused_beyond = False
        with LossClient(target, timeout=60, token=TOKENS["b"]) as b:
            for step in range(12):
                b.resident(torch.full((junk // 4,), float(step)))
            try:
                b.resident(torch.zeros(quota // 4 + 1))
            except Exception as error:
                refused_beyond = getattr(error, "code", "") == "RESOURCE_EXHAUSTED"
        if not refused_beyond:
            violations.append("quota")
        mine = stub.ListTensors(pb.ListTensorsRequest(), metadata=auth("a"), timeout=30)
        if {t.id for t in mine.tensors} != set(theirs):
            violations.append("evict")
    return {
        "part": "isolation",
        "isolation_violations": len(violations),
        "violated": violations,
        "attempts": ["list", "use", "timing", "delete", "quota", "evict"],
        "lookup_ms_known_vs_absent": [round(known_s * 1000, 3), round(unknown_s * 1000, 3)],
    }


# -- fairness -------------------------------------------------------------------------------------


def _small_request() -> bytes:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((32, 10)).astype(np.float32)
    return build_request(
        "cross_entropy", logits, rng.integers(0, 10, 32), return_grad=True
    ).SerializeToString()


def _flood_request() -> bytes:
    """1024 entries that cannot merge with the small calls (label smoothing: other params)."""
    rng = np.random.default_rng(1)
    entry = build_request(
        "cross_entropy",
        rng.standard_normal((32, 10)).astype(np.float32),
        rng.integers(0, 10, 32),
        return_grad=True,
        label_smoothing=0.1,
    )
    return pb.ComputeLossBatchRequest(requests=[entry] * 1024).SerializeToString()


def flood(target: str, seconds: float, threads: int, started: Any, entries: Any) -> None:
    """Tenant a's 1024-entry batches, back to back from `threads` threads (a process of its own);
    `entries` counts the entries answered."""
    raw = _flood_request()
    stop = time.monotonic() + seconds

    def loop() -> None:
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            call = channel.unary_unary(BATCH)
            started.set()
            while time.monotonic() < stop:
                call(raw, metadata=auth("a"), timeout=60)
                with entries.get_lock():
                    entries.value += 1024

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def small_calls(target: str, seconds: float) -> list[float]:
    raw = _small_request()
    times: list[float] = []
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(COMPUTE)
        for _ in range(50):
            call(raw, metadata=auth("b"), timeout=30)
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            began = time.perf_counter()
            call(raw, metadata=auth("b"), timeout=30)
            times.append(time.perf_counter() - began)
    return times


def fairness(target: str, seconds: float) -> dict[str, Any]:
    alone = small_calls(target, seconds)
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    entries = context.Value("q", 0)
    flooding = context.Process(target=flood, args=(target, seconds + 3.0, 2, started, entries))
    flooding.start()
    started.wait(60)
    time.sleep(1.0)  # both threads' first batches under way
    before = entries.value
    crowded = small_calls(target, seconds)
    a_entries = entries.value - before
    flooding.join()
    return {
        "part": "fairness",
        "b_alone_calls": len(alone),
        "b_alone_p50_ms": round(statistics.median(alone) * 1000, 3),
        "b_alone_p99_ms": round(p99(alone), 3),
        "b_flood_calls": len(crowded),
        "b_flood_p50_ms": round(statistics.median(crowded) * 1000, 3),
        "b_flood_p99_ms": round(p99(crowded), 3),
        "fair_p99_ratio": round(p99(crowded) / p99(alone), 3),
        "fair_calls_ratio": round(len(crowded) / len(alone), 3),
        "a_flood_entries_per_s": round(a_entries / seconds),
    }


# -- a resident head, and the cost limit ----------------------------------------------------------


def resident_and_cost(target: str, pid: int, calls: int) -> dict[str, Any]:
    torch.manual_seed(0)
    head = torch.randn(32768, 512) * 0.02
    hidden, label = torch.randn(1, 512), torch.tensor([7])
    with LossClient(target, timeout=60, token=TOKENS["b"]) as b:
        held = b.resident(head)
        request = build_request("linear_cross_entropy", hidden.numpy(), label.numpy(), return_grad=True)
        request.linear_cross_entropy.classifier.CopyFrom(tensor_pb2.Tensor(resident_id=held.id))
        raw = request.SerializeToString()
        with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
            call = channel.unary_unary(COMPUTE)
            answer = pb.ComputeLossResponse.FromString(call(raw, metadata=auth("b"), timeout=60))
            for _ in range(5):
                call(raw, metadata=auth("b"), timeout=60)
            before = cpu_seconds(pid)
            for _ in range(calls):
                call(raw, metadata=auth("b"), timeout=60)
            server_s = (cpu_seconds(pid) - before) / calls
            # Over the cost limit: 2048 tokens against the head, 2.1e11 estimated FLOPs.
            costly = build_request(
                "linear_cross_entropy",
                np.zeros((2048, 512), np.float32),
                np.zeros(2048, np.int64),
                return_grad=True,
            )
            costly.linear_cross_entropy.classifier.CopyFrom(tensor_pb2.Tensor(resident_id=held.id))
            costly_raw = costly.SerializeToString()
            refusals, reasons = [], set()
            before = cpu_seconds(pid)
            for _ in range(20):
                began = time.perf_counter()
                try:
                    call(costly_raw, metadata=auth("b"), timeout=60)
                    reasons.add("OK")
                except grpc.RpcError as error:
                    reasons.add(str(error.code()))
                refusals.append(time.perf_counter() - began)
            refusal_cpu = (cpu_seconds(pid) - before) / 20
    # The same computation in this process, as the server computes it: one torch thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:

        def local() -> torch.Tensor:
            x = hidden.clone().requires_grad_()
            loss = F.cross_entropy(x @ head.T, label)
            torch.autograd.grad(loss, x)
            return loss.detach()

        expected = local()
        for _ in range(5):
            local()
        began = time.process_time()
        for _ in range(calls):
            local()
        local_s = (time.process_time() - began) / calls
    finally:
        torch.set_num_threads(threads)
    got = float(codec.decode_numpy(answer.loss))
    return {
        "part": "resident_and_cost",
        "server_cpu_ms_per_call": round(server_s * 1000, 3),
        "local_cpu_ms_per_call": round(local_s * 1000, 3),
        "resident_call_vs_local": round(server_s / local_s, 3),
        "loss_difference": abs(got - float(expected)),
        "cost_refusal_ms": round(statistics.median(refusals) * 1000, 3),
        "cost_refusal_server_cpu_ms": round(refusal_cpu * 1000, 3),
        "cost_refusal_codes": sorted(reasons),
    }


# -- key rotation ---------------------------------------------------------------------------------


def _works(target: str, token: str) -> bool:
    raw = _small_request()
    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary(COMPUTE)(raw, metadata=[("authorization", f"Bearer {token}")], timeout=10)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                return False
            raise
    return True


def reload(target: str, path: Path, metrics_port: int) -> dict[str, Any]:
    rotated = dict(TOKENS, rotating="second-token")
    began = time.monotonic()
    tmp = path.with_suffix(".new")
    tmp.write_text(tenants_file(rotated))
    os.replace(tmp, path)  # as a secret volume swaps it: atomically
    while not _works(target, rotated["rotating"]):
        if time.monotonic() - began > 30:
            break
        time.sleep(0.02)
    reload_s = time.monotonic() - began
    old_refused = not _works(target, TOKENS["rotating"])
    path.write_text("[tenants.broken\n")
    time.sleep(1.5)
    kept = _works(target, rotated["rotating"]) and _works(target, TOKENS["a"])
    flagged = scrape(metrics_port, "lossd_tenants_config_ok") == 0
    path.write_text(tenants_file(rotated))
    return {
        "part": "reload",
        "reload_s": round(reload_s, 3),
        "old_token_refused": old_refused,
        "bad_reload_kept": kept and flagged,
    }


# -- 200 concurrent 8 MiB unary calls -------------------------------------------------------------


def unary_flood(target: str, pid: int, calls: int) -> dict[str, Any]:
    logits = np.ones((2048, 1024), np.float32)  # 8 MiB
    raw = build_request(
        "cross_entropy", logits, np.zeros(2048, np.int64), return_grad=True
    ).SerializeToString()
    health: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                began = time.perf_counter()
                stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                health.append(time.perf_counter() - began)
                stop.wait(0.02)

    peak = [0]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss(pid))
            stop.wait(0.01)

    async def send() -> dict[str, int]:
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
        channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(8)]
        methods = [channel.unary_unary(COMPUTE) for channel in channels]
        codes: dict[str, int] = {}

        async def one(index: int) -> None:
            try:
                await methods[index % 8](raw, metadata=auth("b"), timeout=120)
                code = "OK"
            except grpc.aio.AioRpcError as error:
                code = error.code().name
            codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(one(index) for index in range(calls)))
        for channel in channels:
            await channel.close()
        return codes

    baseline = rss(pid)
    reset_peak_rss(pid)
    threads = [threading.Thread(target=probe, daemon=True), threading.Thread(target=sample, daemon=True)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    codes = asyncio.run(send())
    stop.set()
    for thread in threads:
        thread.join(10)
    peak[0] = max(peak[0], rss(pid, "VmHWM"))
    after = rss(pid)
    return {
        "part": "unary_flood",
        "calls": calls,
        "codes": codes,
        "rss_baseline_mb": baseline >> 20,
        "rss_peak_mb": peak[0] >> 20,
        "rss_after_mb": after >> 20,
        "unary_flood_rss_over_budget_mb": round((peak[0] - baseline - BUDGET) / 2**20, 1),
        "health_p99_ms": round(p99(health), 3),
        "health_max_ms": round(max(health) * 1000, 3) if health else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases (under two minutes)")
    args = parser.parse_args()
    seconds = 4.0 if args.quick else 10.0
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "tenants.toml"
        path.write_text(tenants_file(TOKENS))
        server = LossdProcess(
            [
                f"--tenants-file={path}",
                f"--max-memory-bytes={BUDGET}",
                "--max-message-bytes=16777216",
                f"--max-call-cost={MAX_CALL_COST:g}",
            ]
        )
        try:
            parts = [
                isolation(server.target),
                fairness(server.target, seconds),
                resident_and_cost(server.target, server.pid, 30 if args.quick else 100),
                reload(server.target, path, server.metrics_port),
                unary_flood(server.target, server.pid, 200),
            ]
        finally:
            server.stop()
    for part in parts:
        print(json.dumps(part), flush=True)
    summary: dict[str, Any] = {"summary": "tenants", "cores": os.cpu_count()}
    for part in parts:
        summary |= {key: value for key, value in part.items() if key != "part"}
    goals = {
        "isolation_violations": summary["isolation_violations"] == 0,
        "fair_p99_ratio": summary["fair_p99_ratio"] <= 3,
        "fair_calls_ratio": summary["fair_calls_ratio"] >= 0.5,
        "resident_call_vs_local": summary["resident_call_vs_local"] <= 2,
        "cost_refusal_ms": summary["cost_refusal_ms"] < 5,
        "reload_s": summary["reload_s"] <= 2,
        "bad_reload_kept": bool(summary["bad_reload_kept"]),
        "unary_flood_rss_over_budget_mb": summary["unary_flood_rss_over_budget_mb"] <= 256,
        "health_p99_ms": summary["health_p99_ms"] < 100,
    }
    summary["goals_met"] = goals
    summary["ok"] = all(goals.values())
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
