#!/usr/bin/env python3
"""Distillation benchmark: what a top-k teacher saves in bytes and time, and how close a dense
distillation call comes to the transport limit plus the compute floor.

At V = 32000, float32 student logits, forward KL (the defaults) with the gradient, on a peaked,
Zipf-like teacher distribution, measured in one run:

- `dense_teacher_bytes` (tokens x V float32) and `sparse_teacher_bytes` (k = 64: int32 ids and
  float32 log-probabilities), `teacher_bytes_ratio`; `dense_request_bytes` and
  `sparse_request_bytes` (the student's logits included: they still travel);
- `dense_s`, `sparse_s`: lossd end to end through the Python client (server in another process on
  loopback; calls over the client's threshold stream);
- `local_dense_s`: the same loss and gradient computed by local torch (log_softmax, KL, autograd);
- `raw_tcp_dense_s`: a raw TCP socket moving the dense request up and the gradient back;
  `ideal_dense_s` = `raw_tcp_dense_s` + `local_dense_s`, `dense_ratio_vs_ideal` = `dense_s` / it;
- `grad_cosine_sparse_vs_dense`: the cosine of the top-k call's gradient with the dense one's;
- `server_peak_rss_bytes`, `payload_bytes` (request + gradient bytes) and `peak_vs_payload`, for
  one dense call with gradient of `--memory-tokens` (4096) x 32000 float32 on a fresh server: its
  high-water mark over the idle server's RSS.

Each time is the median of the repetitions. Prints one JSON line per measurement group and a
summary line.

    python benchmarks/distillation.py            # 3 repetitions
    python benchmarks/distillation.py --quick    # 1 repetition, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from _servers import LossdProcess, free_port, reset_peak_rss, rss
from large_tensor import _median_time, _process, _raw_tcp

VOCABULARY = 32000
TOP_K = 64


def zipf_teacher(tokens: int, vocabulary: int, generator: torch.Generator) -> torch.Tensor:
    """Teacher logits whose distribution is peaked like a language model's: Zipf over a random
    order of the vocabulary per token, p(rank r) ~ r^-1.1, with a little noise."""
    ranks = torch.arange(1, vocabulary + 1, dtype=torch.float32)
    logits = torch.empty(tokens, vocabulary)
    for row in range(tokens):
        order = torch.randperm(vocabulary, generator=generator)
        logits[row, order] = -1.1 * torch.log(ranks)
    return logits + 0.1 * torch.randn(tokens, vocabulary, generator=generator)


def local_forward_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The compute floor: forward KL summed over the vocabulary, mean over tokens, and its gradient."""
    leaf = student.detach().requires_grad_()
    ls, lt = F.log_softmax(leaf, -1), F.log_softmax(teacher, -1)
    loss = (lt.exp() * (lt - ls)).sum(-1).mean()
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def measure_calls(tokens: int, repeat: int, tcp_port: int, device: str) -> dict[str, Any]:
    from lossd.client import LossClient

    generator = torch.Generator().manual_seed(0)
    teacher = zipf_teacher(tokens, VOCABULARY, generator)
    student = teacher + torch.randn(tokens, VOCABULARY, generator=generator)  # a student near it
    top = torch.log_softmax(teacher, -1).topk(TOP_K, dim=-1)
    ids, values = top.indices.to(torch.int32), top.values
    dense_teacher = teacher.nbytes
    sparse_teacher = ids.nbytes + values.nbytes
    gradient_bytes = student.nbytes
    dense_request = student.nbytes + dense_teacher
    sparse_request = student.nbytes + sparse_teacher

    local_grad = local_forward_kl(student, teacher)
    local_s = _median_time(repeat, lambda: local_forward_kl(student, teacher))
    payload, reply = memoryview(bytearray(dense_request)), memoryview(bytearray(gradient_bytes))
    _raw_tcp(tcp_port, payload, reply)  # the peer allocates its buffers for these sizes
    raw_tcp_s = _median_time(repeat, lambda: _raw_tcp(tcp_port, payload, reply))
    payload = reply = memoryview(b"")  # free them before lossd runs

    server = LossdProcess(["--device", device])
    try:
        with LossClient(server.target, timeout=600) as client:
            client.distillation(student[:2], teacher[:2], return_grad=True)  # connect, warm up
            dense = client.distillation(student, teacher, return_grad=True)
            sparse = client.distillation(student, values, teacher_ids=ids, return_grad=True)
            error = float((dense.grad - local_grad).abs().max())
            if error > 1e-6 * float(local_grad.abs().max()):
                raise AssertionError(f"the dense gradient is off local torch's by {error}")
            cosine = float(F.cosine_similarity(sparse.grad.reshape(1, -1), dense.grad.reshape(1, -1)))
            del dense, sparse
            dense_s = _median_time(repeat, lambda: client.distillation(student, teacher, return_grad=True))
            sparse_s = _median_time(
                repeat, lambda: client.distillation(student, values, teacher_ids=ids, return_grad=True)
            )
    finally:
        server.stop()
    ideal = raw_tcp_s + local_s
    return {
        "case": f"distillation {tokens}x{VOCABULARY} float32 + gradient, k = {TOP_K}",
        "dense_teacher_bytes": dense_teacher,
        "sparse_teacher_bytes": sparse_teacher,
        "teacher_bytes_ratio": round(dense_teacher / sparse_teacher, 1),
        "dense_request_bytes": dense_request,
        "sparse_request_bytes": sparse_request,
        "request_bytes_ratio": round(dense_request / sparse_request, 3),
        "dense_s": round(dense_s, 4),
        "sparse_s": round(sparse_s, 4),
        "sparse_speedup": round(dense_s / sparse_s, 3),
        "local_dense_s": round(local_s, 4),
        "raw_tcp_dense_s": round(raw_tcp_s, 4),
        "ideal_dense_s": round(ideal, 4),
        "dense_ratio_vs_ideal": round(dense_s / ideal, 3),
        "grad_cosine_sparse_vs_dense": round(cosine, 5),
    }


def measure_memory(tokens: int, device: str) -> dict[str, Any]:
    from lossd.client import LossClient

    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(tokens, VOCABULARY, generator=generator)
    student = torch.randn(tokens, VOCABULARY, generator=generator)
    payload = student.nbytes + teacher.nbytes + student.nbytes
    server = LossdProcess(["--device", device])
    try:
        with LossClient(server.target, timeout=600) as client:
            client.distillation(student[:2], teacher[:2], return_grad=True)
            idle = rss(server.pid, "VmRSS")
            can_reset = reset_peak_rss(server.pid)
            client.distillation(student, teacher, return_grad=True)
            peak = rss(server.pid, "VmHWM") if can_reset else None
    finally:
        server.stop()
    return {
        "case": f"distillation {tokens}x{VOCABULARY} float32 dense + gradient: server memory",
        "server_idle_rss_bytes": idle,
        "server_peak_rss_bytes": peak,
        "server_rss_growth_bytes": None if peak is None else peak - idle,
        "payload_bytes": payload,
        "peak_vs_payload": None if peak is None else round((peak - idle) / payload, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one repetition: under a minute")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions per measurement (median)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the timed calls")
    parser.add_argument("--memory-tokens", type=int, default=4096, help="tokens of the memory call")
    parser.add_argument("--device", default="cpu", help="lossd's device")
    parser.add_argument("--tcp-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tcp_server:
        from large_tensor import run_tcp_server

        run_tcp_server(args.tcp_server)
        return 0
    repeat = args.repeat or (1 if args.quick else 3)
    print(json.dumps({"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "repeat": repeat}))
    tcp_port = free_port()
    with _process([sys.executable, __file__, "--tcp-server", str(tcp_port)], "ready"):
        calls = measure_calls(args.tokens, repeat, tcp_port, args.device)
    print(json.dumps(calls), flush=True)
    memory = measure_memory(args.memory_tokens, args.device)
    print(json.dumps(memory), flush=True)
    summary = {
        "summary": True,
        **{k: v for k, v in calls.items() if k != "case"},
        **{k: memory[k] for k in ("server_peak_rss_bytes", "server_rss_growth_bytes", "payload_bytes")},
        "memory_tokens": args.memory_tokens,
        "peak_vs_payload": memory["peak_vs_payload"],
        "goal_teacher_bytes_ratio_100x": calls["teacher_bytes_ratio"] >= 100,
        "goal_dense_within_1_5x_ideal": calls["dense_ratio_vs_ideal"] <= 1.5,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
