"""`lossd health`: the exit status container HEALTHCHECKs and exec probes rely on."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from grpc_health.v1 import health_pb2

from certificates import Pki, make_pki
from conftest import RunningServer
from processes import free_port


def _health(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "lossd.server", "health", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    return done.returncode, done.stdout + done.stderr


def test_serving_is_zero_and_anything_else_is_one(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory()
    assert _health("--target", running.target) == (0, f"{running.target} (server): SERVING\n")
    code, out = _health("--target", running.target, "--service", "lossd.v1.LossService")
    assert code == 0 and "SERVING" in out
    code, out = _health("--target", running.target, "--service", "no.such.Service")
    assert code == 1 and "NOT_FOUND" in out
    running.run(running.server._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
    code, out = _health("--target", running.target)
    assert code == 1 and "NOT_SERVING" in out


def test_the_default_target_follows_lossd_port(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory()
    assert _health(env={"LOSSD_PORT": str(running.port)})[0] == 0


def test_an_unreachable_server_is_one_within_the_timeout() -> None:
    port = free_port()
    code, out = _health("--target", f"127.0.0.1:{port}", "--timeout", "1")
    assert (code == 1 and "UNAVAILABLE" in out) or "DEADLINE_EXCEEDED" in out


def test_tls_and_a_token_protected_health_check(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    pki: Pki = make_pki(tmp_path)
    running = server_factory(
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca,
        auth_token="probe-token",
        health_without_auth=False,
    )
    token = tmp_path / "token"
    token.write_text("probe-token\n")
    tls = ["--tls-ca-file", pki.ca, "--tls-cert-file", pki.client_cert, "--tls-key-file", pki.client_key]
    assert _health("--target", running.target, *tls, "--token-file", str(token))[0] == 0
    code, out = _health("--target", running.target, *tls)
    assert code == 1 and "UNAUTHENTICATED" in out
    assert _health("--target", running.target, "--timeout", "2")[0] == 1  # plaintext to a TLS server
    env = {"LOSSD_AUTH_TOKEN": "probe-token", "LOSSD_HEALTH_TLS_CA_FILE": pki.ca}
    env |= {"LOSSD_HEALTH_TLS_CERT_FILE": pki.client_cert, "LOSSD_HEALTH_TLS_KEY_FILE": pki.client_key}
    assert _health("--target", f"localhost:{running.port}", env=env)[0] == 0


def test_it_does_not_load_torch() -> None:
    script = (
        "import sys; from lossd.cli import main\n"
        "code = main(['health', '--target', '127.0.0.1:1', '--timeout', '0.2'])\n"
        "assert code == 1 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_help() -> None:
    code, out = _health("--help")
    assert code == 0 and "--target" in out and "--tls-ca-file" in out
