#!/usr/bin/env python3
"""Fused linear cross-entropy, forward and backward, by each implementation lossd can choose on this
device, against torch eager with the logits whole: time and peak device memory per implementation.

The shape is a language model's step: 8192 tokens, H = 4096, V = 128256 (Llama 3), bfloat16, the
hidden states' gradient (and, with `--head-grad`, the classifier's). Each implementation is the one
the server would run (`LinearCrossEntropyLoss.implementations()`: lossd's torch chunks,
torch.compile of them, Liger Kernel, cut-cross-entropy where installed), called directly on the
device, so that the numbers are the kernels' own, without the wire. Anchors: Liger's fused linear
cross-entropy, 50.4 ms forward and backward at 8192 tokens (H100, H = 4096, V = 131072).

Prints one JSON line per implementation (`seconds`, `peak_bytes` over the inputs, `loss_difference`
against torch eager) and a summary line. Without CUDA it runs a small shape on the CPU (peak memory
is then not measured): a check that the script works, not a measurement.

    python benchmarks/fused_kernels.py            # CUDA: 3 repetitions (median)
    python benchmarks/fused_kernels.py --quick    # 1 repetition
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lossd.server.losses import LossCall, make_options
from lossd.server.losses.linear_cross_entropy import LINEAR_CROSS_ENTROPY


def _timed(device: torch.device, repeat: int, run: Callable[[], Any]) -> tuple[float, int | None, Any]:
    """(median seconds, peak bytes over the start, last result) of `run` on `device`."""
    cuda = device.type == "cuda"
    result = run()  # warm up: kernels, autotuning, compilation
    del result
    times = []
    peak = None
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        result = run()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
        if cuda:
            peak = torch.cuda.max_memory_allocated(device) - start
    return statistics.median(times), peak, result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one repetition")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None, help="default 8192 on CUDA, 256 on the CPU")
    parser.add_argument("--hidden", type=int, default=None, help="default 4096 on CUDA, 64 on the CPU")
    parser.add_argument(
        "--vocabulary", type=int, default=None, help="default 128256 on CUDA, 1000 on the CPU"
    )
    parser.add_argument("--head-grad", action="store_true", help="the classifier's gradient too")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokens = args.tokens or (8192 if cuda else 256)
    size = args.hidden or (4096 if cuda else 64)
    classes = args.vocabulary or (128256 if cuda else 1000)
    repeat = args.repeat or (1 if args.quick else 3)
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(tokens, size, generator=generator) / 4).to(device, torch.bfloat16)
    classifier = (torch.randn(classes, size, generator=generator) / size**0.5).to(device, torch.bfloat16)
    targets = torch.randint(0, classes, (tokens,), generator=generator).to(device)
    print(json.dumps({"device": str(device), "tokens": tokens, "hidden": size, "vocabulary": classes}))

    def eager() -> tuple[torch.Tensor, ...]:
        leaf = hidden.detach().requires_grad_()
        head = classifier.detach().requires_grad_(args.head_grad)
        loss = F.cross_entropy((leaf @ head.T).float(), targets)
        wanted = [leaf, head] if args.head_grad else [leaf]
        return (loss.detach(), *torch.autograd.grad(loss, wanted))

    lines: list[dict[str, Any]] = []
    seconds, peak, reference = _timed(device, repeat, eager)
    lines.append(
        {"implementation": "torch-eager (logits whole)", "seconds": round(seconds, 5), "peak_bytes": peak}
    )
    print(json.dumps(lines[-1]), flush=True)
    call = LossCall(
        make_options("linear_cross_entropy", "mean"),
        hidden,
        targets,
        tensors={"classifier": classifier},
        grads=frozenset({"input", "classifier"}) if args.head_grad else frozenset({"input"}),
    )
    for implementation in LINEAR_CROSS_ENTROPY.implementations():
        why = implementation.unavailable(device)
        if why is not None:
            lines.append({"implementation": implementation.name, "unavailable": why})
        else:
            try:
                seconds, peak, computed = _timed(
                    device, repeat, lambda implementation=implementation: implementation.compute(call, _same)
                )
                difference = float((computed.loss.float() - reference[0].float()).abs())
                lines.append(
                    {
                        "implementation": implementation.name,
                        "seconds": round(seconds, 5),
                        "peak_bytes": peak,
                        "loss_difference": difference,
                    }
                )
            except Exception as error:  # one failing kernel does not hide the others' numbers
                lines.append(
                    {"implementation": implementation.name, "failed": f"{type(error).__name__}: {error}"}
                )
        print(json.dumps(lines[-1]), flush=True)
    timed = [line for line in lines if "seconds" in line]
    fastest = min(timed, key=lambda line: line["seconds"])
    print(json.dumps({"summary": True, "fastest": fastest["implementation"], "results": lines}), flush=True)
    return 0


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


if __name__ == "__main__":
    sys.exit(main())
