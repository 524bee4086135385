"""What one large whole-message call costs the server: its memory, and its time end to end.

1. Memory: a fresh `lossd serve` (message limit raised to 1 GiB, so the call is one message each
   way) answers one unary 256 MiB float32 cross-entropy call with its gradient, sent by lossd's
   client with streaming off. Reported: the server's peak RSS over its RSS just before the call,
   and that growth over the request's bytes. Each extra copy of the request or the answer alive
   during the call shows up here as another 256 MiB.
2. Time: one 1024 x 32000 float32 cross-entropy `ModelInfer` with its gradient through the Open
   Inference Protocol, sent by Triton's own Python client (`tritonclient.grpc`) when a Python with
   it is given (`--tritonclient-python`, e.g. the test suite's `.venv-tritonclient`), else by the
   generated `lossd.v1.oip` stub (reported as such). Median of `--repeat` calls after one warm-up;
   results are checked against local torch.

    python benchmarks/unary_copies.py [--quick] [--tritonclient-python PATH]

Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import LossdProcess, reset_peak_rss, rss

MEMORY_ROWS, MEMORY_CLASSES = 2048, 32768  # 256 MiB of float32 logits
OIP_ROWS, OIP_CLASSES = 1024, 32000


def memory(server: LossdProcess) -> dict[str, Any]:
    from lossd.client import LossClient

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(MEMORY_ROWS, MEMORY_CLASSES, generator=generator)
    labels = torch.randint(0, MEMORY_CLASSES, (MEMORY_ROWS,), generator=generator)
    with LossClient(server.target, timeout=600, stream_threshold_bytes=1 << 40) as client:
        client.cross_entropy(logits[:2], labels[:2], return_grad=True)  # connect, warm up
        time.sleep(0.5)
        idle = rss(server.pid)
        if not reset_peak_rss(server.pid):
            raise RuntimeError("this kernel does not let the peak RSS be reset")
        started = time.perf_counter()
        result = client.cross_entropy(logits, labels, return_grad=True)
        elapsed = time.perf_counter() - started
        peak = rss(server.pid, "VmHWM")
    leaf = logits.clone().requires_grad_()
    loss = F.cross_entropy(leaf, labels)
    loss.backward()
    assert leaf.grad is not None
    if not (torch.allclose(result.loss, loss.detach(), rtol=1e-6) and torch.allclose(result.grad, leaf.grad)):
        raise AssertionError("lossd's answer differs from torch's")
    nbytes = logits.nbytes + labels.nbytes
    return {
        "case": f"unary cross_entropy {MEMORY_ROWS}x{MEMORY_CLASSES} float32 + gradient: server memory",
        "request_bytes": nbytes,
        "server_idle_rss_bytes": idle,
        "server_peak_rss_bytes": peak,
        "server_rss_growth_bytes": peak - idle,
        "growth_vs_request": round((peak - idle) / nbytes, 3),
        "call_s": round(elapsed, 3),
    }


_TRITON_CALL = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import tritonclient.grpc as triton
    target, rows, classes, repeat = sys.argv[1], *map(int, sys.argv[2:5])
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((rows, classes), dtype=np.float32)
    labels = rng.integers(0, classes, rows, dtype=np.int64)
    np.save(sys.argv[5], logits); np.save(sys.argv[6], labels)
    client = triton.InferenceServerClient(target)
    def call():
        inputs = [triton.InferInput("input", [rows, classes], "FP32"),
                  triton.InferInput("target", [rows], "INT64")]
        inputs[0].set_data_from_numpy(logits)
        inputs[1].set_data_from_numpy(labels)
        outputs = [triton.InferRequestedOutput("loss"), triton.InferRequestedOutput("input_grad")]
        return client.infer("cross_entropy", inputs, outputs=outputs)
    call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter(); result = call(); times.append(time.perf_counter() - started)
    np.save(sys.argv[7], result.as_numpy("input_grad"))
    print(json.dumps({"times": times, "loss": float(result.as_numpy("loss"))}))
    """
)


def _stub_times(target: str, logits: np.ndarray, labels: np.ndarray, repeat: int) -> tuple[list[float], Any]:
    import grpc

    from lossd.v1.oip import open_inference_pb2 as oip
    from lossd.v1.oip import open_inference_pb2_grpc as oip_grpc

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)

        def call() -> Any:
            request = oip.ModelInferRequest(
                model_name="cross_entropy",
                inputs=[
                    oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=logits.shape),
                    oip.ModelInferRequest.InferInputTensor(
                        name="target", datatype="INT64", shape=labels.shape
                    ),
                ],
                outputs=[
                    oip.ModelInferRequest.InferRequestedOutputTensor(name="loss"),
                    oip.ModelInferRequest.InferRequestedOutputTensor(name="input_grad"),
                ],
                raw_input_contents=[logits.tobytes(), labels.tobytes()],
            )
            return stub.ModelInfer(request, timeout=600)

        call()
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            answer = call()
            times.append(time.perf_counter() - started)
    grad = np.frombuffer(answer.raw_output_contents[1], dtype=np.float32).reshape(logits.shape)
    return times, grad


def oip_time(server: LossdProcess, repeat: int, triton_python: str | None) -> dict[str, Any]:
    client = "generated lossd.v1.oip stub"
    if triton_python:
        work = Path(os.environ.get("TMPDIR", "/tmp"))
        files = [str(work / f"lossd-bench-{os.getpid()}-{name}.npy") for name in ("x", "t", "g")]
        out = subprocess.run(
            [
                triton_python,
                "-c",
                _TRITON_CALL,
                server.target,
                str(OIP_ROWS),
                str(OIP_CLASSES),
                str(repeat),
                *files,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        times = json.loads(out.stdout)["times"]
        logits, labels, grad = (np.load(name) for name in files)
        for name in files:
            os.unlink(name)
        client = "tritonclient.grpc"
    else:
        rng = np.random.default_rng(0)
        logits = rng.standard_normal((OIP_ROWS, OIP_CLASSES), dtype=np.float32)
        labels = rng.integers(0, OIP_CLASSES, OIP_ROWS, dtype=np.int64)
        times, grad = _stub_times(server.target, logits, labels, repeat)
    leaf = torch.from_numpy(logits).requires_grad_()
    F.cross_entropy(leaf, torch.from_numpy(labels)).backward()
    assert leaf.grad is not None
    if not np.allclose(grad, leaf.grad.numpy(), rtol=1e-5, atol=1e-9):
        raise AssertionError("lossd's OIP gradient differs from torch's")
    return {
        "case": f"OIP ModelInfer cross_entropy {OIP_ROWS}x{OIP_CLASSES} float32 + gradient",
        "client": client,
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "repeat": len(times),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 timed OIP calls instead of 7")
    parser.add_argument("--tritonclient-python", help="a Python with tritonclient[grpc] installed")
    args = parser.parse_args()
    server = LossdProcess(["--max-message-bytes", str(1 << 30)])
    try:
        print(json.dumps(memory(server)), flush=True)
        print(json.dumps(oip_time(server, 3 if args.quick else 7, args.tritonclient_python)), flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
