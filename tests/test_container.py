"""The container image, tested without a Docker engine: hadolint, and what the image runs (its
entrypoint with its environment, its HEALTHCHECK, its stop signal) run here as they would in it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from processes import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in _instructions():
        if instruction == "ENV":
            for item in shlex.split(args):
                key, value = item.split("=", 1)
                env[key] = value
    return env


def _exec_form(args: str) -> list[str]:
    import json

    return list(json.loads(args[args.index("[") :]))


def test_hadolint_finds_nothing() -> None:
    done = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_runs_as_a_user_exposes_its_ports_and_copies_what_it_needs() -> None:
    instructions = dict(_instructions())  # the last of each kind
    user = instructions["USER"].split(":")[0]
    assert user.isdigit() and int(user) > 0, "the image must not run as root"
    env = _env()
    assert set(instructions["EXPOSE"].split()) == {env["LOSSD_PORT"], env["LOSSD_METRICS_PORT"]}
    assert _exec_form(instructions["ENTRYPOINT"]) == ["lossd", "serve"]
    assert instructions["STOPSIGNAL"] == "SIGTERM"
    kept = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for instruction, args in _instructions():
        if instruction == "COPY":
            for source in args.split()[:-1]:
                assert f"!{source.rstrip('/')}" in kept, f".dockerignore leaves {source} out"


def test_the_entrypoint_and_healthcheck_work_with_the_images_environment() -> None:
    instructions = dict(_instructions())
    healthcheck = _exec_form(instructions["HEALTHCHECK"])
    assert healthcheck[:2] == ["lossd", "health"]
    port = str(free_port())
    env = {**os.environ, **_env(), "LOSSD_PORT": port, "LOSSD_METRICS_PORT": str(free_port())}
    env |= {"LOSSD_DEVICE": "cpu", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        _exec_form(instructions["ENTRYPOINT"]), env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        healthy = False
        while time.monotonic() < deadline and not healthy:
            healthy = subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode == 0
            time.sleep(0.2)
        assert healthy, "the HEALTHCHECK never passed"
        server.send_signal(signal.SIGTERM)
        _, log = server.communicate(timeout=60)
        assert server.returncode == 0, log
        assert f"serving lossd.v1.LossService on [::]:{port}" in log
        assert subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode == 1
    finally:
        if server.poll() is None:
            server.kill()
