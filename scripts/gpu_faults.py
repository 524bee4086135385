#!/usr/bin/env python3
"""Real device faults on a CUDA host, each provoked in a child `lossd` server process.

1. Out of memory: the child caps its CUDA memory (`torch.cuda.set_per_process_memory_fraction`)
   and serves with batches large enough to merge past the cap. Concurrent requests that fit alone
   but not merged must all succeed (the merged batch is split and retried); one request too big
   to fit alone must fail RESOURCE_EXHAUSTED (DEVICE_OUT_OF_MEMORY); the server keeps serving.
2. Device-side assert: the child's engine indexes a CUDA tensor out of bounds (a real kernel
   assert, which poisons the CUDA context) for an input marked POISON. The call must fail
   UNAVAILABLE (DEVICE_FAILED), health must turn NOT_SERVING, and the process must exit with
   status 3.

Prints one JSON line per check and a summary; exits 0 only if every check passed, 2 without CUDA.

    python scripts/gpu_faults.py
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POISON = 1234.5
MEMORY_BYTES = 3 << 30  # the child's CUDA memory cap


def _child(mode: str, argv: Sequence[str]) -> int:
    """The server process: `lossd serve` with a memory cap (oom) or an asserting engine (assert)."""
    import torch

    from lossd.cli import configure
    from lossd.server.app import serve, torch_threads
    from lossd.server.config import ServerConfig
    from lossd.server.engine import LossEngine
    from lossd.server.losses import LossCall, LossOutput

    config = ServerConfig.parse(argv)
    configure(config)
    engine: LossEngine | None = None
    if mode == "oom":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(MEMORY_BYTES / total, 0)
    else:

        class AssertingEngine(LossEngine):
            def _run(self, call: LossCall) -> LossOutput:
                if float(call.input.reshape(-1)[0]) == POISON:
                    index = torch.tensor([1 << 20], device=self.device)
                    torch.zeros(4, device=self.device)[index].sum().item()  # a device-side assert
                return super()._run(call)

        engine = AssertingEngine("cuda", torch_threads(config))
    return asyncio.run(serve(config, engine=engine))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    def __init__(self, mode: str, *flags: str) -> None:
        self.port = _free_port()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / d) for d in ("proto", "wire", "server", "client")]
                + [os.environ.get("PYTHONPATH", "")]
            ),
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--host=127.0.0.1",
                f"--port={self.port}",
                "--metrics-port=0",
                "--device=cuda",
                *flags,
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.log: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(180):
            raise RuntimeError("the child did not start:\n" + "".join(self.log))
        self.target = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if "serving lossd.v1.LossService" in line:
                self.ready.set()

    def health(self) -> str:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.target) as channel:
            try:
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(), timeout=5)
                    .status
                )
            except grpc.RpcError as error:
                return f"unreachable ({error.code().name})"  # type: ignore[attr-defined]
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def check_oom() -> dict[str, Any]:
    import torch

    from lossd.client import AsyncLossClient, LossClient, LossdError

    # 128 MiB of float32 logits per request, about 3x that on the device with the gradient: alone
    # each fits the cap, twelve merged do not. Sent unary (not streamed), so that each request is
    # one computation rather than blocks of a stream.
    rows, classes = 32768, 1000
    unary = {"timeout": 300, "retry_attempts": 1, "stream_threshold_bytes": 1 << 40}
    child = Child(
        "oom",
        "--max-batch-bytes=4294967296",
        "--max-batch-rows=1048576",
        "--max-queue-delay-us=300000",
        # Unary calls of 128 MiB (gRPC's message limit), and host memory for twelve at once.
        "--max-message-bytes=167772160",
        f"--max-memory-bytes={64 << 30}",
    )
    report: dict[str, Any] = {"check": "out_of_memory", "cap_bytes": MEMORY_BYTES}
    try:
        torch.manual_seed(0)
        inputs = [(torch.randn(rows, classes), torch.randint(0, classes, (rows,))) for _ in range(12)]

        async def concurrent() -> list[Any]:
            async with AsyncLossClient(child.target, **unary) as client:
                return list(
                    await asyncio.gather(
                        *(client.cross_entropy(x, t, return_grad=True) for x, t in inputs),
                        return_exceptions=True,
                    )
                )

        results = asyncio.run(concurrent())
        wrong = 0
        for (x, t), result in zip(inputs, results, strict=True):
            if isinstance(result, Exception):
                wrong += 1
                continue
            expected = torch.nn.functional.cross_entropy(x.cuda(), t.cuda()).cpu()
            wrong += not torch.allclose(result.loss, expected, rtol=1e-5)
        report["merged_requests"] = len(inputs)
        report["merged_failed_or_wrong"] = wrong
        report["errors"] = [str(r)[:200] for r in results if isinstance(r, Exception)][:3]
        report["splits_logged"] = sum("ran out of memory; retrying it as" in line for line in child.log)
        with LossClient(child.target, **unary) as client:
            try:
                # 8 MiB of operands that broadcast to 4 GiB on the device: one computation (a unary
                # call is never split into blocks), over the 3 GiB cap.
                student = torch.log_softmax(torch.randn(1024, 1, 1024), -1)
                teacher = torch.softmax(torch.randn(1024, 1024), -1)
                client.kl_div(student, teacher, reduction="sum")
                report["alone_too_big"] = "succeeded (the cap did not bite)"
            except LossdError as error:
                report["alone_too_big"] = f"{error.code} {error.reason}"
            after = client.cross_entropy(*inputs[0], return_grad=True)
            report["after"] = (
                "OK"
                if torch.allclose(
                    after.loss, results[0].loss if not isinstance(results[0], Exception) else after.loss
                )
                else "wrong"
            )
        report["health"] = child.health()
        report["ok"] = (
            wrong == 0
            and report["splits_logged"] > 0
            and report["alone_too_big"] == "RESOURCE_EXHAUSTED DEVICE_OUT_OF_MEMORY"
            and report["after"] == "OK"
            and report["health"] == "SERVING"
        )
    finally:
        child.process.terminate()
        report["exit"] = child.process.wait(60)
    return report


def check_assert() -> dict[str, Any]:
    import torch

    from lossd.client import LossClient, LossdError

    child = Child("assert", "--batching=off")
    report: dict[str, Any] = {"check": "device_side_assert"}
    x, t = torch.randn(8, 10), torch.randint(0, 10, (8,))
    poisoned = x.clone()
    poisoned[0, 0] = POISON
    with LossClient(child.target, timeout=60, retry_attempts=1) as client:
        report["before"] = "OK" if client.cross_entropy(x, t).loss.isfinite() else "wrong"
        try:
            client.cross_entropy(poisoned, t)
            report["poisoned"] = "succeeded"
        except LossdError as error:
            report["poisoned"] = f"{error.code} {error.reason}"
        report["health_after"] = child.health()
        try:
            client.cross_entropy(x, t)
            report["next_call"] = "succeeded"
        except LossdError as error:
            report["next_call"] = f"{error.code} {error.reason}"
    try:
        report["exit"] = child.process.wait(60)
    except subprocess.TimeoutExpired:
        child.process.kill()
        report["exit"] = "did not exit"
    report["logged"] = [line.strip()[:200] for line in child.log if re.search("device|exiting", line)][:4]
    report["ok"] = (
        report["before"] == "OK"
        and report["poisoned"] == "UNAVAILABLE DEVICE_FAILED"
        and report["health_after"] in ("NOT_SERVING", "unreachable (UNAVAILABLE)")
        and report["next_call"].startswith("UNAVAILABLE")
        and report["exit"] == 3
    )
    return report


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"check": "gpu_faults", "skipped": "needs a CUDA device"}))
        return 2
    reports = []
    for check in (check_oom, check_assert):
        started = time.monotonic()
        try:
            report = check()
        except Exception as error:  # report and go on to the next check
            report = {"check": check.__name__, "ok": False, "error": repr(error)[:500]}
        report["seconds"] = round(time.monotonic() - started, 1)
        reports.append(report)
        print(json.dumps(report), flush=True)
    ok = all(r.get("ok") for r in reports)
    print(json.dumps({"check": "gpu_faults", "ok": ok, "device": torch.cuda.get_device_name(0)}))
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2], sys.argv[3:]))
    sys.exit(main())
