"""The wheel: one `lossd` namespace (lossd.v1, lossd.server, lossd.client), a client without torch."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("lossd-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_installs_only_the_lossd_namespace(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"lossd"}
    for module in (
        "lossd/v1/loss_service_pb2.py",
        "lossd/v1/loss_service_pb2_grpc.py",
        "lossd/v1/tensor.proto",
        "lossd/server/engine/loss_engine.py",
        "lossd/server/losses/cross_entropy.py",
        "lossd/wire/codec.py",
        "lossd/cli.py",
        "lossd/client/_client.py",
        "lossd/client/py.typed",
    ):
        assert module in names
    assert "lossd/__init__.py" not in names  # a namespace shared by three source roots


def test_client_requirements_leave_out_torch(wheel: zipfile.ZipFile) -> None:
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    requires = [
        line.split(":", 1)[1].strip()
        for line in wheel.read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    base = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith("torch") for r in base), base
    assert any(r.startswith("torch") and "extra == 'server'" in r for r in requires)
    assert any(r.startswith("grpcio>=1.84.0") for r in base)
    (entry_points,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    assert "lossd = lossd.cli:main" in wheel.read(entry_points).decode()
