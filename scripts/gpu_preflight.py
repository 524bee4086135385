"""Before a GPU host's scarce minutes go to tests: everything imports, `lossd serve` starts on the
host's default device and answers one call as local torch does, and the GPU tests collect.

Run by `scripts/gpu-check` (with PYTHONPATH set to the checkout and the carried wheels); prints one
JSON line and exits non-zero on the first failure, naming it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fail(step: str, detail: str) -> None:
    print(json.dumps({"check": "gpu_preflight", "ok": False, "step": step, "detail": detail[-3000:]}))
    sys.exit(1)


def main() -> None:
    report: dict[str, object] = {"check": "gpu_preflight"}
    try:
        import grpc
        import ml_dtypes  # noqa: F401
        import torch

        import lossd.server.app
        import lossd.server.rpc.open_inference  # noqa: F401
        from lossd.client import LossClient
    except ImportError as exc:
        fail("imports", f"{exc}: run scripts/gpu-wheels and carry .whl/")
    report.update(
        python=sys.version.split()[0],
        torch=torch.__version__,
        grpcio=grpc.__version__,
        cuda=torch.cuda.is_available(),
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "lossd.server", "serve", "--host=127.0.0.1", "--port=0", "--metrics-port=0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stderr is not None
    lines: list[str] = []
    target = None
    deadline = time.monotonic() + 180
    while target is None and time.monotonic() < deadline:
        line = server.stderr.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"serving lossd\.v1\.LossService on (\S+):(\d+) \(device (\S+),", line)
        if found:
            target, report["device"] = f"{found.group(1)}:{found.group(2)}", found.group(3)
    if target is None:
        server.kill()
        fail("serve", "".join(lines))
    try:
        logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
        with LossClient(target, timeout=120) as client:
            result = client.cross_entropy(logits, labels, return_grad=True)
        expected = torch.nn.functional.cross_entropy(logits, labels)
        if not torch.allclose(result.loss, expected, rtol=1e-5, atol=1e-6):
            fail("call", f"loss {float(result.loss)} where local torch gives {float(expected)}")
    finally:
        server.terminate()
        rest = server.communicate(timeout=60)[1]
    if server.returncode != 0:
        fail("drain", "".join(lines) + rest)
    collected = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "tests/test_gpu.py",
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    found_tests = re.search(r"(\d+) tests? collected", collected.stdout)
    if collected.returncode != 0 or not found_tests:
        fail("collect", collected.stdout + collected.stderr)
    report.update(gpu_tests=int(found_tests.group(1)), ok=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
