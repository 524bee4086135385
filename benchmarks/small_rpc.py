#!/usr/bin/env python3
"""Small-RPC benchmark: lossd against a bare gRPC echo of the same bytes, on loopback.

Load: cross-entropy with gradient on 32x10 float32 logits, at 1, 16 and 64 requests in flight,
against (a) a grpc.aio echo server that answers every call with a response as large as lossd's
(no parsing, no work: the floor), (b) lossd with batching off, (c) lossd with batching on. Every
server and the load generator run in their own processes. The load generator sends the same
pre-serialized request to all three, so client-side cost is identical.

Then, on lossd with batching on, many losses per call: 64 asyncio callers of one `AsyncLossClient`
with coalescing on (`coalesced_losses_per_s`; each call built by the client, as a user's would be),
and `ComputeLossBatch` calls of 64 entries, 4 at a time (`batch_rpc_losses_per_s`); each against the
echo's calls a second at 64 in flight (`ratio_coalesced_vs_echo`, `ratio_batch_rpc_vs_echo`).

Prints one JSON line per configuration, then a summary line. Not a test: numbers, not verdicts.

    python benchmarks/small_rpc.py            # 5 s per configuration
    python benchmarks/small_rpc.py --quick    # under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from _servers import free_port

METHOD = "/lossd.v1.LossService/ComputeLoss"
BATCH_METHOD = "/lossd.v1.LossService/ComputeLossBatch"
BATCH_ENTRIES = 64
BATCH_IN_FLIGHT = 4
COALESCED_CALLERS = 64
IN_FLIGHT = (1, 16, 64)
OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def _request_and_response_size() -> tuple[bytes, int]:
    """The serialized CE request (32x10 float32, gradient asked) and lossd's response size."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lossd.client._calls import build_request
    from lossd.v1 import loss_service_pb2 as pb
    from lossd.wire import codec

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((32, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 32)
    request = build_request("cross_entropy", logits, labels, return_grad=True)
    x = torch.from_numpy(logits).requires_grad_()
    loss = F.cross_entropy(x, torch.from_numpy(labels))
    loss.backward()
    response = pb.ComputeLossResponse()
    codec.encode(loss.detach(), out=response.loss)
    codec.encode(x.grad, out=response.gradients["input"])  # type: ignore[arg-type]
    return request.SerializeToString(), response.ByteSize()


# -- the echo floor ---------------------------------------------------------------------------------


def run_echo_server(port: int, response_size: int) -> None:
    import grpc

    reply = b"\0" * response_size

    async def echo(request: bytes, context: Any) -> bytes:
        return reply

    async def main() -> None:
        server = grpc.aio.server(options=OPTIONS)
        handler = grpc.method_handlers_generic_handler(
            "lossd.v1.LossService", {"ComputeLoss": grpc.unary_unary_rpc_method_handler(echo)}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


# -- the load generator -----------------------------------------------------------------------------


def run_load(target: str, in_flight: int, seconds: float, warmup: float) -> None:
    import grpc

    request, _ = _request_and_response_size()

    async def main() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
            call = channel.unary_unary(METHOD)
            first = await call(request, timeout=30)
            latencies: list[float] = []
            measuring = False
            stop = time.perf_counter() + warmup + seconds

            async def worker() -> None:
                while time.perf_counter() < stop:
                    start = time.perf_counter()
                    await call(request, timeout=30)
                    if measuring:
                        latencies.append(time.perf_counter() - start)

            workers = [asyncio.create_task(worker()) for _ in range(in_flight)]
            await asyncio.sleep(warmup)
            measuring, began = True, time.perf_counter()
            await asyncio.gather(*workers)
            elapsed = time.perf_counter() - began
        latencies.sort()
        return {
            "requests": len(latencies),
            "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1e3, 3),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 3),
            "response_bytes": len(first),
        }

    print(json.dumps(asyncio.run(main())), flush=True)


def run_many(target: str, mode: str, seconds: float, warmup: float) -> None:
    """Losses a second, many per call: `coalesced`, 64 asyncio callers of one lossd client with
    coalescing on (each call built by the client, as a user's would be); `batch`, ComputeLossBatch
    calls of 64 pre-serialized entries, BATCH_IN_FLIGHT at a time."""
    import grpc
    import numpy as np

    from lossd.client import AsyncLossClient

    request, _ = _request_and_response_size()
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((32, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 32)
    entry = b"\x0a" + _varint(len(request)) + request
    batch = entry * BATCH_ENTRIES

    async def main() -> dict[str, Any]:
        latencies: list[float] = []
        losses = 0
        measuring = False
        stop = time.perf_counter() + warmup + seconds
        if mode == "coalesced":
            client = AsyncLossClient(target, timeout=30)
            await client.cross_entropy(logits, labels, return_grad=True)

            async def one() -> int:
                await client.cross_entropy(logits, labels, return_grad=True)
                return 1

            callers = COALESCED_CALLERS
        else:
            channel = grpc.aio.insecure_channel(target, options=OPTIONS)
            call = channel.unary_unary(BATCH_METHOD)

            async def one() -> int:
                await call(batch, timeout=30)
                return BATCH_ENTRIES

            await one()
            callers = BATCH_IN_FLIGHT

        async def worker() -> None:
            nonlocal losses
            while time.perf_counter() < stop:
                start = time.perf_counter()
                done = await one()
                if measuring:
                    latencies.append(time.perf_counter() - start)
                    losses += done

        workers = [asyncio.create_task(worker()) for _ in range(callers)]
        await asyncio.sleep(warmup)
        measuring, began = True, time.perf_counter()
        await asyncio.gather(*workers)
        elapsed = time.perf_counter() - began
        if mode == "coalesced":
            await client.close()
        else:
            await channel.close()
        latencies.sort()
        return {
            "calls": len(latencies),
            "losses_per_s": round(losses / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1e3, 3),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 3),
        }

    print(json.dumps(asyncio.run(main())), flush=True)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# -- orchestration ----------------------------------------------------------------------------------


@contextmanager
def _server(command: list[str], ready: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited: {command}")
            if ready in line:
                break
        yield process
    finally:
        process.terminate()
        process.wait(30)


def _load(target: str, in_flight: int, seconds: float, warmup: float) -> dict[str, Any]:
    return _child(["--load", target, str(in_flight), str(seconds), str(warmup)], seconds + warmup)


def _many(target: str, mode: str, seconds: float, warmup: float) -> dict[str, Any]:
    return _child(["--many", target, mode, str(seconds), str(warmup)], seconds + warmup)


def _child(args: list[str], seconds: float) -> dict[str, Any]:
    """Runs this script with `args` in a process of its own; its last JSON line."""
    done = subprocess.run(  # noqa: PLW1510 - the return code is checked below
        [sys.executable, __file__, *args], capture_output=True, text=True, timeout=seconds + 120
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _batch_stats(metrics_port: int) -> tuple[float, float]:
    """(requests, batches) so far, from lossd's own Prometheus metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("lossd_batch_requests_sum", "lossd_batch_requests_count")):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values.get("lossd_batch_requests_sum", 0.0), values.get("lossd_batch_requests_count", 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs: the whole benchmark in under a minute"
    )
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per configuration")
    parser.add_argument(
        "--workers", type=int, default=1, help="lossd server processes (lossd serve --workers)"
    )
    parser.add_argument("--device", default="cpu", help="lossd's device (cpu, cuda, auto)")
    parser.add_argument(
        "--echo-server", nargs=2, type=int, metavar=("PORT", "RESPONSE_BYTES"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--load", nargs=4, metavar=("TARGET", "IN_FLIGHT", "SECONDS", "WARMUP"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--many", nargs=4, metavar=("TARGET", "MODE", "SECONDS", "WARMUP"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.many:
        run_many(args.many[0], args.many[1], float(args.many[2]), float(args.many[3]))
        return 0
    if args.echo_server:
        run_echo_server(*args.echo_server)
        return 0
    if args.load:
        run_load(args.load[0], int(args.load[1]), float(args.load[2]), float(args.load[3]))
        return 0

    seconds = args.seconds if args.seconds is not None else (1.5 if args.quick else 5.0)
    warmup = 0.5 if args.quick else 1.0
    _, response_size = _request_and_response_size()
    print(
        json.dumps(
            {
                "cpus": os.cpu_count(),
                "device": args.device,
                "workers": args.workers,
                "seconds": seconds,
                "payload": "cross_entropy 32x10 float32 + gradient",
                "response_bytes": response_size,
            }
        ),
        flush=True,
    )
    results: dict[str, dict[int, dict[str, Any]]] = {}
    many: dict[str, dict[str, Any]] = {}
    servers = {
        "echo": (["--echo-server"], "ready"),
        "lossd_unbatched": (["--batching", "off"], "serving"),
        "lossd": (["--batching", "on"], "serving"),
    }
    for name, (flags, ready) in servers.items():
        port = free_port()
        metrics_port = free_port()
        if name == "echo":
            command = [sys.executable, __file__, "--echo-server", str(port), str(response_size)]
        else:
            command = [
                sys.executable,
                "-m",
                "lossd.server",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--device",
                args.device,
                "--workers",
                str(args.workers),
                "--metrics-port",
                str(metrics_port),
                *flags,
            ]
        results[name] = {}
        with _server(command, ready):
            for in_flight in IN_FLIGHT:
                before = _batch_stats(metrics_port) if name != "echo" else (0.0, 0.0)
                result = _load(f"127.0.0.1:{port}", in_flight, seconds, warmup)
                if name != "echo":
                    after = _batch_stats(metrics_port)
                    batches = after[1] - before[1]
                    result["mean_batch_requests"] = (
                        round((after[0] - before[0]) / batches, 2) if batches else None
                    )
                results[name][in_flight] = result
                print(json.dumps({"server": name, "in_flight": in_flight, **result}), flush=True)
            if name == "lossd":
                for mode in ("coalesced", "batch"):
                    before = _batch_stats(metrics_port)
                    many[mode] = _many(f"127.0.0.1:{port}", mode, seconds, warmup)
                    after = _batch_stats(metrics_port)
                    batches = after[1] - before[1]
                    many[mode]["mean_batch_requests"] = (
                        round((after[0] - before[0]) / batches, 2) if batches else None
                    )
                    print(json.dumps({"server": name, "mode": mode, **many[mode]}), flush=True)

    echo, lossd, unbatched = results["echo"], results["lossd"], results["lossd_unbatched"]
    summary = {
        "summary": True,
        "echo_rps": echo[64]["rps"],
        "lossd_rps": lossd[64]["rps"],
        "lossd_unbatched_rps": unbatched[64]["rps"],
        "ratio_vs_echo": round(lossd[64]["rps"] / echo[64]["rps"], 3),
        "unbatched_ratio_vs_echo": round(unbatched[64]["rps"] / echo[64]["rps"], 3),
        "batching_gain": round(lossd[64]["rps"] / unbatched[64]["rps"], 3),
        "p50_ratio_at_1": round(lossd[1]["p50_ms"] / echo[1]["p50_ms"], 3),
        "mean_batch_requests": lossd[64].get("mean_batch_requests"),
        "coalesced_losses_per_s": many["coalesced"]["losses_per_s"],
        "batch_rpc_losses_per_s": many["batch"]["losses_per_s"],
        "ratio_coalesced_vs_echo": round(many["coalesced"]["losses_per_s"] / echo[64]["rps"], 3),
        "ratio_batch_rpc_vs_echo": round(many["batch"]["losses_per_s"] / echo[64]["rps"], 3),
        "coalesced_p50_ms": many["coalesced"]["p50_ms"],
        "coalesced_mean_batch_requests": many["coalesced"]["mean_batch_requests"],
    }
    for name, by_load in results.items():
        for in_flight, result in by_load.items():
            summary[f"{name}_p50_ms_at_{in_flight}"] = result["p50_ms"]
            summary[f"{name}_p99_ms_at_{in_flight}"] = result["p99_ms"]
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
