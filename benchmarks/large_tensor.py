#!/usr/bin/env python3
"""Large-tensor benchmark: lossd end to end against the transport limit and the compute floor.

For cross-entropy with gradient on 1024x32000 float32 logits (131 MB in, 131 MB back) and on
4096x32000 bfloat16, measured in one run:

- `lossd_s`: lossd end to end through the Python client (server in another process, loopback;
  the client streams because the call is over its threshold);
- `raw_tcp_s`: a raw TCP socket moving the same bytes both ways (the transport limit);
- `local_compute_s`: the same loss and gradient computed locally with torch (the compute floor);
- `ideal_s` = `raw_tcp_s` + `local_compute_s`, and `ratio_vs_ideal` = `lossd_s` / `ideal_s`;
- `unary_grpc_s`: one unary gRPC message of the same bytes each way (what a naive service pays);
- `server_peak_rss_bytes` (the server's high-water mark while it served the calls),
  `server_rss_growth_bytes` (that mark over the RSS of the fresh, idle server), `payload_bytes`
  (request bytes plus gradient bytes) and `growth_vs_payload`.

Each time is the median of the repetitions. Prints one JSON line per case and a summary line for
the float32 case.

    python benchmarks/large_tensor.py            # 3 repetitions
    python benchmarks/large_tensor.py --quick    # 1 repetition, under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from _servers import free_port, reset_peak_rss, rss

CASES = [("float32", 1024, 32000, torch.float32), ("bfloat16", 4096, 32000, torch.bfloat16)]
OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


# -- peers in their own processes -------------------------------------------------------------------


def run_tcp_server(port: int) -> None:
    """Reads the two sizes and the request, answers with as many bytes as asked.

    Its buffers are allocated once per size and reused, so that the timed exchanges are the
    transport and nothing else.
    """
    buffers: dict[int, memoryview] = {}

    def buffer(size: int) -> memoryview:
        if size not in buffers:
            buffers[size] = memoryview(bytearray(size))
        return buffers[size]

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        print("ready", flush=True)
        while True:
            connection, _ = listener.accept()
            with connection:
                header = _recv_into(connection, memoryview(bytearray(16)))
                request, reply = int.from_bytes(header[:8], "little"), int.from_bytes(header[8:], "little")
                _recv_into(connection, buffer(request))
                connection.sendall(buffer(reply))


def _recv_into(connection: socket.socket, buffer: memoryview) -> memoryview:
    got = 0
    while got < buffer.nbytes:
        got += connection.recv_into(buffer[got:], buffer.nbytes - got)
    return buffer


def run_echo_server(port: int) -> None:
    """A grpc.aio server whose one method answers N request bytes with a reply of the size asked."""
    import grpc

    replies: dict[int, bytes] = {}

    async def echo(request: bytes, context: Any) -> bytes:
        size = int.from_bytes(request[:8], "little")
        return replies.setdefault(size, bytes(size))

    async def main() -> None:
        server = grpc.aio.server(options=OPTIONS)
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


@contextmanager
def _process(command: list[str], ready: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if ready in line:
                break
        else:
            raise RuntimeError(f"{command} exited")
        yield process
    finally:
        process.terminate()
        process.wait(30)


# -- measurements -----------------------------------------------------------------------------------


def _median_time(repeat: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _raw_tcp(port: int, payload: memoryview, reply: memoryview) -> None:
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(payload.nbytes.to_bytes(8, "little") + reply.nbytes.to_bytes(8, "little"))
        connection.sendall(payload)
        _recv_into(connection, reply)


def _check(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """lossd's numbers against local torch: within 1e-6 (float32) or 4 bfloat16 units of the scale."""
    tolerance = 1e-6 if expected.dtype == torch.float32 else 4 * torch.finfo(expected.dtype).eps
    scale = float(expected.abs().max())
    error = float((actual.double() - expected.double()).abs().max())
    if actual.dtype != expected.dtype or error > tolerance * scale:
        raise AssertionError(f"wrong {what}: off by {error} at scale {scale}")


def measure(
    name: str,
    rows: int,
    classes: int,
    dtype: torch.dtype,
    repeat: int,
    ports: dict[str, int],
    server_pid: int,
) -> dict[str, Any]:
    import grpc

    from lossd.client import LossClient

    logits = torch.randn(rows, classes).to(dtype)
    labels = torch.randint(0, classes, (rows,))
    request_bytes = logits.numel() * logits.element_size() + labels.numel() * 8
    gradient_bytes = logits.numel() * logits.element_size()

    leaf = logits.detach().requires_grad_()

    def local() -> None:  # the compute floor: no copies, no gradient accumulation
        torch.autograd.grad(F.cross_entropy(leaf, labels), leaf)

    local()
    local_s = _median_time(repeat, local)
    payload, reply = memoryview(bytearray(request_bytes)), memoryview(bytearray(gradient_bytes))
    _raw_tcp(ports["tcp"], payload, reply)  # the server allocates its buffers for these sizes
    raw_tcp_s = _median_time(repeat, lambda: _raw_tcp(ports["tcp"], payload, reply))
    payload = reply = memoryview(b"")  # free them before lossd runs
    with grpc.insecure_channel(f"127.0.0.1:{ports['echo']}", options=OPTIONS) as channel:
        call = channel.unary_unary("/bench.Echo/Call")
        blob = gradient_bytes.to_bytes(8, "little") + bytes(request_bytes - 8)
        call(blob[:8] + bytes(8), timeout=600)
        unary_s = _median_time(repeat, lambda: call(blob, timeout=600))
    with LossClient(f"127.0.0.1:{ports['lossd']}", timeout=600) as client:
        client.cross_entropy(logits[:2], labels[:2], return_grad=True)  # connect, warm up
        idle = rss(server_pid, "VmRSS")  # a fresh server's: nothing large has passed through it yet
        can_reset = reset_peak_rss(server_pid)
        result = client.cross_entropy(logits, labels, return_grad=True)
        expected = logits.clone().requires_grad_()
        loss = F.cross_entropy(expected, labels)
        loss.backward()
        _check(result.loss, loss.detach(), "loss")
        _check(result.grad, expected.grad, "gradient")
        del result, expected, loss
        lossd_s = _median_time(repeat, lambda: client.cross_entropy(logits, labels, return_grad=True))
        peak = rss(server_pid, "VmHWM") if can_reset else None
    ideal = raw_tcp_s + local_s
    return {
        "case": f"cross_entropy {rows}x{classes} {name} + gradient",
        "lossd_s": round(lossd_s, 4),
        "raw_tcp_s": round(raw_tcp_s, 4),
        "local_compute_s": round(local_s, 4),
        "ideal_s": round(ideal, 4),
        "ratio_vs_ideal": round(lossd_s / ideal, 3),
        "unary_grpc_s": round(unary_s, 4),
        "unary_ratio_vs_ideal": round(unary_s / ideal, 3),
        "payload_bytes": request_bytes + gradient_bytes,
        "server_idle_rss_bytes": idle,
        "server_peak_rss_bytes": peak,
        "server_rss_growth_bytes": None if peak is None else peak - idle,
        "growth_vs_payload": None
        if peak is None
        else round((peak - idle) / (request_bytes + gradient_bytes), 3),
        "lossd_GBps": round((request_bytes + gradient_bytes) / lossd_s / 1e9, 3),
        "raw_tcp_GBps": round((request_bytes + gradient_bytes) / raw_tcp_s / 1e9, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one repetition: under a minute")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions per measurement (median)")
    parser.add_argument("--device", default="cpu", help="lossd's device")
    parser.add_argument("--tcp-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tcp_server:
        run_tcp_server(args.tcp_server)
        return 0
    if args.echo_server:
        run_echo_server(args.echo_server)
        return 0
    repeat = args.repeat or (1 if args.quick else 3)
    ports = {"tcp": free_port(), "echo": free_port(), "lossd": free_port()}
    print(
        json.dumps(
            {
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "device": args.device,
                "repeat": repeat,
            }
        ),
        flush=True,
    )
    lossd = [
        sys.executable,
        "-m",
        "lossd.server",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(ports["lossd"]),
        "--device",
        args.device,
        "--metrics-port",
        "0",
    ]
    results = []
    with (
        _process([sys.executable, __file__, "--tcp-server", str(ports["tcp"])], "ready"),
        _process([sys.executable, __file__, "--echo-server", str(ports["echo"])], "ready"),
    ):
        for name, rows, classes, dtype in CASES:
            with _process(lossd, "serving") as server:  # a fresh server per case: honest RSS figures
                result = measure(name, rows, classes, dtype, repeat, ports, server.pid)
            results.append(result)
            print(json.dumps(result), flush=True)
    first = results[0]
    summary = {
        "summary": True,
        **{
            k: first[k]
            for k in (
                "lossd_s",
                "raw_tcp_s",
                "local_compute_s",
                "ideal_s",
                "ratio_vs_ideal",
                "unary_grpc_s",
                "server_peak_rss_bytes",
                "server_rss_growth_bytes",
                "payload_bytes",
                "growth_vs_payload",
            )
        },
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
