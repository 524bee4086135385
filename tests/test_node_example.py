"""examples/node: a Node.js client built from the .proto alone, against a real server, checked
against torch. Needs node and npm (CI installs them and sets LOSSD_REQUIRE_NODE)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import RunningServer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("LOSSD_REQUIRE_NODE"):
            pytest.fail("node and npm are required in this run (.ci/run installs them)")
        pytest.skip("node and npm are not installed")
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout + done.stderr
    return node


def _run(node: str, target: str, payload: dict[str, object]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(EXAMPLE / "cross_entropy.js"), target, json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_node_client_gets_torchs_numbers(
    node: str, exact_server: RunningServer, smoothing: float
) -> None:
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 5)
    payload = {"logits": logits.tolist(), "labels": labels.tolist(), "labelSmoothing": smoothing}
    done = _run(node, exact_server.target, payload)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    x = torch.from_numpy(logits).requires_grad_()
    loss = F.cross_entropy(x, torch.from_numpy(labels), label_smoothing=smoothing)
    (grad,) = torch.autograd.grad(loss, x)
    assert np.float32(answer["loss"]) == loss.item()  # float32 both ways: bit for bit
    np.testing.assert_array_equal(np.array(answer["grad"], dtype=np.float32), grad.numpy())


def test_the_node_client_reports_lossds_error(node: str, exact_server: RunningServer) -> None:
    done = _run(node, exact_server.target, {"logits": [[0.0, 1.0]], "labels": [5]})
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "target" in done.stderr
