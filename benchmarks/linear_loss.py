#!/usr/bin/env python3
"""Hidden states in, never the logits: one training step's loss and gradient from hidden states `h`
to `grad_h`, done two ways against the same server in the same run.

- The logits path, as a client does it without fusion: `logits = h @ W.T` locally, cross-entropy
  through lossd with the logits' gradient back, then `grad_h = grad_logits @ W` locally.
- The hidden path: `linear_cross_entropy` through lossd with `W` resident (uploaded once, before
  the timing), the hidden states' gradient back.

Shape: H = 512, V = 32000, 4096 tokens, float32 (`--tokens` to change). Measured:

- `logits_request_bytes`, `logits_response_bytes`, `hidden_request_bytes`, `hidden_response_bytes`:
  what the server received and sent for one step (its `lossd_received_bytes` / `lossd_sent_bytes`);
  `wire_ratio`: all bytes both ways, logits path over hidden path;
- `logits_path_s`, `hidden_path_s` (medians) and `hidden_speedup`;
- `server_peak_rss_bytes`: on a fresh server, the memory high-water mark over its idle RSS (after
  the resident upload and a two-token warm-up call) during one hidden-path step;
  `unfused_peak_bytes`: the same loss and gradient computed unfused by local torch (logits whole),
  its peak over its own baseline (inputs allocated), in a fresh process; `server_peak_vs_unfused`.

The server runs with `--torch-threads` equal to local torch's threads (every core, here both), so
the matmuls cost the same on either side and the wire is what differs. With `--device cuda` the
client's tensors and its local matmuls are on the GPU too (where they cost microseconds and the
wire is everything). The gradients of both paths
are checked against each other. Prints one JSON line per group and a summary line.

    python benchmarks/linear_loss.py            # 3 repetitions
    python benchmarks/linear_loss.py --quick    # 1 repetition, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import torch
import torch.nn.functional as F
from _servers import LossdProcess, reset_peak_rss, rss, scrape
from large_tensor import _median_time

HIDDEN = 512
VOCABULARY = 32000


def problem(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, HIDDEN, generator=generator)
    classifier = torch.randn(VOCABULARY, HIDDEN, generator=generator) / HIDDEN**0.5
    targets = torch.randint(0, VOCABULARY, (tokens,), generator=generator)
    return hidden, classifier, targets


def unfused_step(hidden: torch.Tensor, classifier: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss's gradient w.r.t. the hidden states by torch with the logits whole."""
    leaf = hidden.detach().requires_grad_()
    loss = F.cross_entropy(leaf @ classifier.T, targets)
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def unfused_peak(tokens: int) -> int:
    """In this (fresh) process: the unfused step's RSS high-water mark over the inputs' baseline."""
    hidden, classifier, targets = problem(tokens)
    pid = os.getpid()
    baseline = rss(pid, "VmRSS")
    if not reset_peak_rss(pid):
        return -1
    unfused_step(hidden, classifier, targets)
    return rss(pid, "VmHWM") - baseline


def _traffic(server: LossdProcess) -> tuple[float, float]:
    return scrape(server.metrics_port, "lossd_received_bytes_total"), scrape(
        server.metrics_port, "lossd_sent_bytes_total"
    )


def measure(tokens: int, repeat: int, device: str) -> dict[str, Any]:
    from lossd.client import LossClient

    hidden, classifier, targets = (tensor.to(device) for tensor in problem(tokens))
    threads = torch.get_num_threads()
    server = LossdProcess(["--device", device, "--torch-threads", str(threads)])

    def done(grad: torch.Tensor) -> torch.Tensor:
        if grad.device.type == "cuda":  # the client's local matmuls are asynchronous there
            torch.cuda.synchronize(grad.device)
        return grad

    try:
        with LossClient(server.target, timeout=600) as client:
            head = client.resident(classifier)

            def logits_path() -> torch.Tensor:
                logits = hidden @ classifier.T
                result = client.cross_entropy(logits, targets, return_grad=True)
                return done(result.grad @ classifier)

            def hidden_path() -> torch.Tensor:
                return done(client.linear_cross_entropy(hidden, targets, head, return_grad=True).grad)

            logits_path(), hidden_path()  # connect, warm up both
            before = _traffic(server)
            via_logits = logits_path()
            middle = _traffic(server)
            via_hidden = hidden_path()
            after = _traffic(server)
            scale = float(via_logits.abs().max())
            error = float((via_hidden - via_logits).abs().max())
            if error > 1e-4 * scale:
                raise AssertionError(f"the two paths' gradients differ by {error} at scale {scale}")
            logits_s = _median_time(repeat, logits_path)
            hidden_s = _median_time(repeat, hidden_path)
            implementation = [line for line in server.log if "computed by" in line]
    finally:
        server.stop()
    logits_request, logits_response = middle[0] - before[0], middle[1] - before[1]
    hidden_request, hidden_response = after[0] - middle[0], after[1] - middle[1]
    return {
        "case": f"linear cross-entropy {tokens} tokens, H {HIDDEN}, V {VOCABULARY}, float32 + gradient",
        "server_torch_threads": threads,
        "implementation": implementation[0].split("lossd.server: ")[-1].strip() if implementation else None,
        "logits_request_bytes": int(logits_request),
        "logits_response_bytes": int(logits_response),
        "hidden_request_bytes": int(hidden_request),
        "hidden_response_bytes": int(hidden_response),
        "resident_classifier_bytes": classifier.nbytes,
        "wire_ratio": round((logits_request + logits_response) / (hidden_request + hidden_response), 2),
        "logits_path_s": round(logits_s, 4),
        "hidden_path_s": round(hidden_s, 4),
        "hidden_speedup": round(logits_s / hidden_s, 3),
        "grad_max_abs_difference": error,
    }


def measure_memory(tokens: int, device: str) -> dict[str, Any]:
    """On a fresh server (whose memory no logits-path call has touched): the classifier resident, a
    two-token call to warm up, then one full hidden-path step; its high-water mark over idle."""
    from lossd.client import LossClient

    hidden, classifier, targets = problem(tokens)
    server = LossdProcess(["--device", device, "--torch-threads", str(torch.get_num_threads())])
    try:
        with LossClient(server.target, timeout=600) as client:
            head = client.resident(classifier)
            client.linear_cross_entropy(hidden[:2], targets[:2], head, return_grad=True)
            idle = rss(server.pid, "VmRSS")
            can_reset = reset_peak_rss(server.pid)
            client.linear_cross_entropy(hidden, targets, head, return_grad=True)
            peak = rss(server.pid, "VmHWM") - idle if can_reset else None
    finally:
        server.stop()
    return {
        "case": f"one hidden-path step of {tokens} tokens on a fresh server: its peak over idle",
        "server_idle_rss_bytes": idle,
        "server_peak_rss_bytes": peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one repetition: under a minute")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions per path (median)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step")
    parser.add_argument("--device", default="cpu", help="lossd's device, and the client's tensors'")
    parser.add_argument("--unfused-peak", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.unfused_peak:
        print(unfused_peak(args.unfused_peak))
        return 0
    repeat = args.repeat or (1 if args.quick else 3)
    print(json.dumps({"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "repeat": repeat}))
    report = measure(args.tokens, repeat, args.device)
    print(json.dumps(report), flush=True)
    server_memory = measure_memory(args.tokens, args.device)
    print(json.dumps(server_memory), flush=True)
    done = subprocess.run(
        [sys.executable, __file__, "--unfused-peak", str(args.tokens)],
        capture_output=True,
        text=True,
        check=True,
    )
    unfused = int(done.stdout.strip())
    memory = {
        "case": "the same loss and gradient unfused by local torch (logits whole): peak over its inputs",
        "unfused_peak_bytes": unfused if unfused >= 0 else None,
    }
    print(json.dumps(memory), flush=True)
    peak = server_memory["server_peak_rss_bytes"]
    ratio = None if peak is None or unfused <= 0 else round(peak / unfused, 3)
    summary = {
        "summary": True,
        **{k: v for k, v in report.items() if k != "case"},
        "server_idle_rss_bytes": server_memory["server_idle_rss_bytes"],
        "server_peak_rss_bytes": peak,
        "unfused_peak_bytes": memory["unfused_peak_bytes"],
        "server_peak_vs_unfused": ratio,
        "goal_wire_ratio_10x": report["wire_ratio"] >= 10,
        "goal_server_peak_within_25pct_of_unfused": ratio is not None and ratio <= 0.25,
        "goal_hidden_no_slower": report["hidden_path_s"] <= report["logits_path_s"],
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
