"""The install story the README tells: build the wheel and the sdist, install the wheel into a fresh
virtual environment, first the client alone (its `lossd` command checks health and says in one line
what `lossd serve` needs), then with the server extra, serve from it and call it."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import RunningServer
from processes import ServeProcess, pip_install

ROOT = Path(__file__).resolve().parent.parent
CALL = """
import numpy as np
from lossd.client import LossClient
with LossClient({target!r}, timeout=30) as client:
    result = client.cross_entropy(np.array([[1.0, 2.0]], np.float32), np.array([1]), return_grad=True)
print(repr(float(result.loss)), result.grad.dtype)
"""


def _run(*command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("VIRTUAL_ENV", "PYTHONPATH"))
    }
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = _run(sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", str(out), str(ROOT))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


@pytest.mark.slow
def test_the_sdist_holds_what_a_wheel_is_built_from(dist: Path) -> None:
    (sdist,) = dist.glob("lossd-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for path in (
        "pyproject.toml",
        "README.md",
        "proto/lossd/v1/loss_service.proto",
        "server/lossd/server/app.py",
    ):
        assert path in names, path


@pytest.mark.slow
def test_the_wheel_installs_and_works_client_alone_then_with_the_server(
    dist: Path, tmp_path: Path, server: RunningServer, serve_process: object
) -> None:
    (wheel,) = dist.glob("lossd-*.whl")
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", str(venv)).returncode == 0
    python, lossd = str(venv / "bin" / "python"), str(venv / "bin" / "lossd")
    pip = pip_install(python)

    # The client alone: numpy, no torch.
    done = _run(*pip, str(wheel))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _run(python, "-c", "import torch").returncode != 0, "the client alone must not pull torch"
    health = _run(lossd, "health", "--target", server.target, "--timeout", "10")
    assert health.returncode == 0, health.stderr
    serve = _run(lossd, "serve", "--port", "0")
    assert serve.returncode == 2
    assert serve.stderr.count("\n") == 1, serve.stderr
    assert "scripts/serve" in serve.stderr and ".whl[server]" in serve.stderr, serve.stderr
    assert "Traceback" not in serve.stderr
    called = _run(python, "-c", CALL.format(target=server.target))
    expected = torch.nn.functional.cross_entropy(torch.tensor([[1.0, 2.0]]), torch.tensor([1]))
    assert called.returncode == 0, called.stderr
    assert called.stdout.split() == [repr(float(expected)), "float32"]

    # With the server extra: serve from the installed package, call it from there too.
    done = _run(*pip, f"{wheel}[server]")
    assert done.returncode == 0, done.stderr[-3000:]
    served = ServeProcess(
        "serve", "--host=127.0.0.1", "--port=0", "--metrics-port=0", "--device=cpu", command=[lossd]
    )
    try:
        target = served.serving()
        called = _run(python, "-c", CALL.format(target=target))
        assert called.returncode == 0, called.stderr
        assert called.stdout.split()[0] == repr(float(expected))
        assert np.isfinite(float(called.stdout.split()[0]))
    finally:
        served.process.terminate()
        served.finish()
