"""`scripts/gpu-check` on an environment like the bare GPU host image: only the image's packages,
the rest from the wheels `scripts/gpu-wheels` fetches. Its preflight must pass here (without CUDA, on
the CPU), so that a broken gpu-check is a red CI rather than a wasted GPU session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from processes import pip_install

ROOT = Path(__file__).resolve().parent.parent
IMAGE_PACKAGES = ("torch", "numpy", "grpcio", "protobuf", "prometheus-client", "pytest")
"""What the GPU host image has (its versions differ: torch 2.11, Python 3.12; these are pinned)."""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "LOSSD_"))}
    return {**env, **extra}


@pytest.mark.slow
def test_gpu_check_needs_its_wheels_and_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check")],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(LOSSD_WHEELS=str(tmp_path / "none")),
    )
    assert done.returncode == 2
    assert "scripts/gpu-wheels" in done.stderr


@pytest.mark.slow
def test_gpu_check_preflight_passes_on_an_image_like_environment(tmp_path: Path) -> None:
    venv = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [*pip_install(str(venv / "bin" / "python")), *IMAGE_PACKAGES],
        capture_output=True,
        text=True,
        timeout=600,
        env=_clean_env(),
    )
    assert install.returncode == 0, install.stderr[-3000:]
    wheels = tmp_path / "wheels"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = _clean_env(LOSSD_WHEELS=str(wheels), PATH=f"{venv / 'bin'}:{os.environ['PATH']}", OUT=str(tmp_path))
    fetched = subprocess.run(
        [str(ROOT / "scripts" / "gpu-wheels"), version], capture_output=True, text=True, timeout=300, env=env
    )
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    checked = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--preflight"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    report = json.loads(checked.stdout.strip().splitlines()[-1])
    assert report["ok"] is True and report["device"] == "cpu" and report["gpu_tests"] > 200
    assert (tmp_path / "gpu-check.log").read_text().strip().splitlines()[
        -1
    ] == checked.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("script", ["gpu_faults.py", "gpu_preflight.py"])
def test_what_the_gpu_scripts_import_exists(script: str) -> None:
    """Every lossd name the GPU scripts import, inside functions too, exists: their CUDA-only parts
    cannot run here, but a renamed module or function must not wait for a GPU to be found."""
    import ast
    import importlib

    tree = ast.parse((ROOT / "scripts" / script).read_text())
    checked = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lossd"):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(
                    f"{node.module}.{alias.name}"
                ), f"{script}: {node.module} has no {alias.name}"
                checked += 1
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lossd"):
                    importlib.import_module(alias.name)
                    checked += 1
    assert checked >= 3
