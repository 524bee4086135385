"""Hostile and careless clients against one lossd server with a stated memory budget.

A fresh `lossd serve` (CPU, `--max-memory-bytes` 2 GiB by default) on loopback. A legitimate client
keeps calling throughout (small 32x10 cross-entropy calls with gradient, and 5 MiB calls that
stream) while a health checker probes; first alone (idle), then while each attack runs in turn:
partial unary messages, stalled streams with inline header data, a header declaring a client's whole
share, many concurrent unary calls, large kl_div broadcasts, empty shapes with huge dimensions,
Open Inference typed-contents requests, unread answers, and a metrics scrape flood. The server's RSS
is sampled every 20 ms. Prints one JSON line per attack and a summary line.

    python benchmarks/hostile.py [--quick] [--budget-bytes N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _servers import LossdProcess
from rawh2 import RawConnection, grpc_frame

from lossd.client import LossClient
from lossd.client._calls import prepare_call
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import tensor_pb2
from lossd.v1.oip import open_inference_pb2 as oip
from lossd.wire import chunks

COMPUTE = "/lossd.v1.LossService/ComputeLoss"
STREAM = "/lossd.v1.LossService/StreamLoss"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Legit:
    """The legitimate client: small calls back to back, a 5 MiB streamed call every 0.25 s, health
    checks every 50 ms. Latencies are recorded per phase."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.phase = "warmup"
        self.small: dict[str, list[float]] = {}
        self.ok = 0
        self.failed = 0
        self.failures: dict[str, int] = {}
        self.health_max = 0.0
        self.health: dict[str, float] = {}
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=f, daemon=True) for f in (self._small, self._large, self._health)
        ]
        rng = np.random.default_rng(0)
        self.logits = rng.standard_normal((32, 10)).astype(np.float32)
        self.labels = rng.integers(0, 10, 32)
        self.big = rng.standard_normal((1280, 1024)).astype(np.float32)  # 5 MiB: streamed
        self.big_labels = rng.integers(0, 1024, 1280)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _record(self, error: Exception | None) -> None:
        if error is None:
            self.ok += 1
        else:
            self.failed += 1
            key = f"{type(error).__name__}: {str(error)[:80]}"
            self.failures[key] = self.failures.get(key, 0) + 1

    def _small(self) -> None:
        with LossClient(self.target, timeout=30) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    client.cross_entropy(self.logits, self.labels, return_grad=True)
                except Exception as error:  # counted, not raised: the run goes on
                    self._record(error)
                    continue
                self._record(None)
                self.small.setdefault(self.phase, []).append(time.perf_counter() - started)

    def _large(self) -> None:
        with LossClient(self.target, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    client.cross_entropy(self.big, self.big_labels, return_grad=True)
                except Exception as error:
                    self._record(error)
                else:
                    self._record(None)
                self.stop.wait(0.25)

    def _health(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                except grpc.RpcError as error:
                    self._record(error)
                if self.phase not in ("warmup",):
                    took = time.perf_counter() - started
                    self.health_max = max(self.health_max, took)
                    self.health[self.phase] = max(self.health.get(self.phase, 0.0), took)
                self.stop.wait(0.05)


def p99(values: list[float]) -> float:
    return float(np.quantile(values, 0.99)) * 1000 if values else float("nan")


# -- attacks: each runs for `seconds`, then lets go of everything it holds ------------------------


def _raw_calls(
    port: int,
    seconds: float,
    method: str,
    message: bytes,
    shape: tuple[int, int],
    *,
    end: bool = False,
    read: bool = True,
    send_timeout: float = 0.05,
) -> None:
    """`shape` = (connections, calls each) raw calls of `method` that send `message` (as far as flow
    control lets them), then hold their connections open for `seconds` and close them."""
    connections = [RawConnection("127.0.0.1", port, window=None if read else 1) for _ in range(shape[0])]
    try:
        for connection in connections:
            for _ in range(shape[1]):
                connection.open(method, read=read).send(message, end=end, timeout=send_timeout)
        _hold(connections, seconds)
    finally:
        for connection in connections:
            connection.close()


def partial_unary(target: str, port: int, seconds: float) -> None:
    """Calls declaring 6 MiB that send 3 MiB (what the windows let through) and stall, on 8
    connections of 128 calls."""
    _raw_calls(
        port, seconds, COMPUTE, grpc_frame(b"\0" * (3 << 20), declared=6 << 20), (8, 128), send_timeout=0.01
    )


def stalled_streams(target: str, port: int, seconds: float) -> None:
    """StreamLoss headers carrying 6 MiB inline, then nothing: 4 connections of 40 streams."""
    call = prepare_call("nll_loss", np.ones((1024, 1536), np.float32), np.zeros(1024, np.int64))
    call.request.input.data = np.ones((1024, 1536), np.float32).tobytes()
    _raw_calls(port, seconds, STREAM, grpc_frame(chunks.encode_header(call.request)), (4, 40))


def whole_share_header(target: str, port: int, seconds: float) -> None:
    """Headers of a few dozen bytes declaring a GiB to come, then nothing: 8 connections of 16."""
    request = pb.ComputeLossRequest(nll_loss=pb.NllLossOptions())
    request.input.dtype = tensor_pb2.DATA_TYPE_FLOAT32
    request.input.shape.extend([1 << 18, 1024])  # 1 GiB
    request.target.dtype = tensor_pb2.DATA_TYPE_INT64
    request.target.shape.extend([1 << 18])
    _raw_calls(port, seconds, STREAM, grpc_frame(chunks.encode_header(request)), (8, 16))


def unread_answers(target: str, port: int, seconds: float) -> None:
    """Complete calls whose 4 MiB gradients are never read: 8 connections of 16."""
    logits = np.ones((1024, 1024), np.float32)
    request = prepare_call("cross_entropy", logits, np.zeros(1024, np.int64), return_grad=True).unary()
    message = grpc_frame(request.SerializeToString())
    _raw_calls(port, seconds, COMPUTE, message, (8, 16), end=True, read=False, send_timeout=0.2)


def _hold(connections: list[RawConnection], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for connection in connections:
            connection.pump(0.01)


def _flood(seconds: float, threads: int, work: Callable[[], None]) -> None:
    deadline = time.monotonic() + seconds

    def loop() -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # refusals are the point
                work()

    with ThreadPoolExecutor(threads) as pool:
        for _ in range(threads):
            pool.submit(loop)


def concurrent_unary(target: str, port: int, seconds: float) -> None:
    """64 threads sending 3.5 MiB unary calls back to back."""
    logits = np.ones((896, 1024), np.float32)
    raw = (
        prepare_call("cross_entropy", logits, np.zeros(896, np.int64), return_grad=True)
        .unary()
        .SerializeToString()
    )
    channels = [
        grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)
    ]
    calls = [channel.unary_unary(COMPUTE) for channel in channels]
    counter = iter(range(1 << 30))
    try:
        _flood(seconds, 64, lambda: calls[next(counter) % 8](raw, timeout=30))
    finally:
        for channel in channels:
            channel.close()


def broadcasts(target: str, port: int, seconds: float) -> None:
    """kl_div calls of a few KiB that broadcast to 256 MiB with reduction none."""
    student = np.log(np.full((256, 1, 1024), 1 / 1024, np.float32))
    teacher = np.full((256, 1024), 1 / 1024, np.float32)
    with LossClient(target, timeout=60, retry_attempts=1) as client:
        _flood(seconds, 8, lambda: client.kl_div(student, teacher, reduction="none"))


def empty_huge(target: str, port: int, seconds: float) -> None:
    request = pb.ComputeLossRequest(cross_entropy=pb.CrossEntropyLossOptions())
    request.input.dtype = tensor_pb2.DATA_TYPE_FLOAT32
    request.input.shape.extend([0, 2**62])
    request.target.dtype = tensor_pb2.DATA_TYPE_INT64
    request.target.shape.extend([0])
    raw = request.SerializeToString()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(COMPUTE)
        _flood(seconds, 8, lambda: call(raw, timeout=30))


def typed_contents(target: str, port: int, seconds: float) -> None:
    """Open Inference requests with 1.5 M typed UINT8 values (7 MiB), six at once."""
    infer = oip.ModelInferRequest(model_name="cross_entropy")
    given = infer.inputs.add(name="input", datatype="FP32", shape=[1536, 1024])
    given.contents.fp32_contents.extend(np.zeros(1536 * 1024, np.float32))
    target_input = infer.inputs.add(name="target", datatype="INT64", shape=[1536])
    target_input.contents.int64_contents.extend(np.zeros(1536, np.int64))
    raw = infer.SerializeToString()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(INFER)
        _flood(seconds, 6, lambda: call(raw, timeout=30))


def scrape_flood(metrics_port: int) -> Callable[[str, int, float], None]:
    def attack(target: str, port: int, seconds: float) -> None:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        _flood(seconds, 4, lambda: urllib.request.urlopen(url, timeout=5).read())

    return attack


def _attack(name: str, target: str, port: int, seconds: float, metrics_port: int) -> None:
    """Runs one attack in its own process: the legitimate client's latency is the server's, not
    the attacking threads' share of this process's interpreter lock."""
    attacks: dict[str, Callable[[str, int, float], None]] = {
        "partial_unary": partial_unary,
        "stalled_streams_inline": stalled_streams,
        "whole_share_headers": whole_share_header,
        "unread_answers": unread_answers,
        "concurrent_unary": concurrent_unary,
        "kl_div_broadcasts": broadcasts,
        "empty_huge_shapes": empty_huge,
        "oip_typed_contents": typed_contents,
        "metrics_scrape_flood": scrape_flood(metrics_port),
    }
    attacks[name](target, port, seconds)


ATTACKS = (
    "partial_unary",
    "stalled_streams_inline",
    "whole_share_headers",
    "unread_answers",
    "concurrent_unary",
    "kl_div_broadcasts",
    "empty_huge_shapes",
    "oip_typed_contents",
    "metrics_scrape_flood",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases: under two minutes")
    parser.add_argument("--budget-bytes", type=int, default=2 << 30, help="the server's --max-memory-bytes")
    args = parser.parse_args()
    seconds = 5.0 if args.quick else 15.0
    server = LossdProcess(
        ["--device=cpu", f"--max-memory-bytes={args.budget_bytes}", "--idle-timeout-s=5", "--workers=1"]
    )
    try:
        legit = Legit(server.target)
        legit.start()
        time.sleep(3.0)  # warm-up: imports, first calls, allocator pools
        baseline = rss(server.pid)
        legit.phase = "idle"
        time.sleep(seconds)
        peak_growth = 0
        worst_p99 = 0.0
        spawn = multiprocessing.get_context("spawn")
        for name in ATTACKS:
            legit.phase = name
            peak = 0
            done = threading.Event()

            def sample(done: threading.Event = done) -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss(server.pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.monotonic()
            attacker = spawn.Process(
                target=_attack, args=(name, server.target, server.port, seconds, server.metrics_port)
            )
            attacker.start()
            attacker.join(seconds + 120)
            if attacker.exitcode is None:
                attacker.kill()
                attacker.join()
            time.sleep(1.0)  # what it left behind is freed
            done.set()
            sampler.join()
            growth = peak - baseline
            peak_growth = max(peak_growth, growth)
            small = legit.small.get(name, [])
            worst_p99 = max(worst_p99, p99(small))
            print(
                json.dumps(
                    {
                        "attack": name,
                        "seconds": round(time.monotonic() - started, 2),
                        "peak_rss_growth_bytes": growth,
                        "small_calls": len(small),
                        "small_call_p99_ms": round(p99(small), 2),
                        "health_max_ms": round(legit.health.get(name, 0.0) * 1000, 1),
                    }
                ),
                flush=True,
            )
        legit.stop.set()
        for thread in legit.threads:
            thread.join(60)
        idle = legit.small.get("idle", [])
        total = legit.ok + legit.failed
        summary = {
            "benchmark": "hostile",
            "budget_bytes": args.budget_bytes,
            "baseline_rss_bytes": baseline,
            "peak_rss_growth_bytes": peak_growth,
            "legit_calls": total,
            "legit_success_ratio": round(legit.ok / total, 5) if total else 0.0,
            "legit_failures": legit.failures,
            "health_max_ms": round(legit.health_max * 1000, 1),
            "small_call_p50_ms_idle": round(statistics.median(idle) * 1000, 2) if idle else None,
            "small_call_p99_ms_idle": round(p99(idle), 2),
            "small_call_p99_ms_under_attack": round(worst_p99, 2),
        }
        summary["goals_met"] = {
            "peak_growth_within_budget_plus_256MiB": peak_growth <= args.budget_bytes + (256 << 20),
            "legit_success_ratio_at_least_0.99": summary["legit_success_ratio"] >= 0.99,
            "health_max_under_1000ms": summary["health_max_ms"] < 1000,
            "p99_under_attack_at_most_10x_idle": worst_p99 <= 10 * p99(idle),
        }
        print(json.dumps(summary), flush=True)
    finally:
        server.kill()


if __name__ == "__main__":
    main()
