"""TLS, mutual TLS and bearer tokens, with certificates made at test time."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lossd.client import LossClient, errors
from lossd.client.channels import tls_credentials
from lossd.server.rpc.auth import Authenticator
from lossd.server.tenants import TenantDirectory
from lossd.wire.tokens import load_tokens

from certificates import Pki, make_pki
from conftest import RunningServer
from processes import ServeProcess, free_port

LOGITS = np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32)
LABELS = np.array([0, 2, 1, 1])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _works(client: LossClient) -> bool:
    return bool(client.cross_entropy(LOGITS, LABELS).loss.shape == ())


def test_tls_serves_clients_that_trust_the_ca(server_factory: Callable[..., RunningServer], pki: Pki) -> None:
    running = server_factory(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    with LossClient(running.target, timeout=10, credentials=tls_credentials(pki.ca)) as client:
        assert _works(client)
    with LossClient(f"localhost:{running.port}", timeout=10, credentials=tls_credentials(pki.ca)) as client:
        assert _works(client)
    with (
        LossClient(running.target, timeout=5, retry_attempts=1) as plaintext,
        pytest.raises(errors.UnavailableError),
    ):
        plaintext.cross_entropy(LOGITS, LABELS)


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(
    server_factory: Callable[..., RunningServer], pki: Pki
) -> None:
    running = server_factory(
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca
    )
    trusted = tls_credentials(pki.ca, pki.client_cert, pki.client_key)
    with LossClient(running.target, timeout=10, credentials=trusted) as client:
        assert _works(client)
    for credentials in (
        tls_credentials(pki.ca),
        tls_credentials(pki.ca, pki.stranger_cert, pki.stranger_key),
    ):
        with (
            LossClient(running.target, timeout=5, credentials=credentials, retry_attempts=1) as client,
            pytest.raises(errors.UnavailableError),
        ):
            client.cross_entropy(LOGITS, LABELS)


def test_tls_settings_must_come_in_pairs() -> None:
    from lossd.server.config import ServerConfig

    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file go together"):
        ServerConfig(tls_cert_file="a.pem").check()
    with pytest.raises(ValueError, match="needs tls_cert_file"):
        ServerConfig(tls_client_ca_file="ca.pem").check()


def test_an_unreadable_certificate_names_the_setting(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(OSError, match=r"tls_key_file .*missing\.key"):
        server_factory(tls_cert_file=missing + ".pem", tls_key_file=missing + ".key")


# -- bearer tokens --------------------------------------------------------------------------------


def _health(target: str, token: str | None = None) -> int:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10, metadata=metadata).status)


def test_calls_need_an_accepted_token(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(auth_token="s3cret-token")
    with (
        LossClient(running.target, timeout=10) as anonymous,
        pytest.raises(errors.UnauthenticatedError) as missing,
    ):
        anonymous.cross_entropy(LOGITS, LABELS)
    assert missing.value.reason == "TOKEN_MISSING"
    with (
        LossClient(running.target, timeout=10, token="s3cret-tokeN") as wrong,
        pytest.raises(errors.UnauthenticatedError) as invalid,
    ):
        wrong.cross_entropy(LOGITS, LABELS)
    assert invalid.value.reason == "TOKEN_INVALID"
    assert "s3cret" not in invalid.value.message
    with LossClient(running.target, timeout=10, token="s3cret-token", stream_threshold_bytes=0) as client:
        assert _works(client)  # a StreamLoss call
    with LossClient(running.target, timeout=10, token="s3cret-token") as client:
        assert _works(client)  # a ComputeLoss call
    # Health stays open for probes; reflection does not.
    assert _health(running.target) == health_pb2.HealthCheckResponse.SERVING
    listing = [reflection_pb2.ServerReflectionRequest(list_services="")]
    with grpc.insecure_channel(running.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as reflected:
            list(stub.ServerReflectionInfo(iter(listing), timeout=10))
    assert reflected.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    refusals = running.server.metrics.registry.get_sample_value
    assert refusals("lossd_auth_refusals_total", {"reason": "TOKEN_MISSING"}) == 2
    assert refusals("lossd_auth_refusals_total", {"reason": "TOKEN_INVALID"}) == 1


def test_health_can_require_the_token_too(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(auth_token="t", health_without_auth=False)
    with pytest.raises(grpc.RpcError) as refused:
        _health(running.target)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert _health(running.target, "t") == health_pb2.HealthCheckResponse.SERVING


def test_a_token_file_holds_several_tokens_for_rotation(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated weekly\nold-token\n\n  new-token  \n")
    running = server_factory(auth_token_file=str(tokens))
    for token in ("old-token", "new-token"):
        with LossClient(running.target, timeout=10, token=token) as client:
            assert _works(client)
    with (
        LossClient(running.target, timeout=10, token="# rotated weekly") as client,
        pytest.raises(errors.UnauthenticatedError),
    ):
        client.cross_entropy(LOGITS, LABELS)


def test_token_checks(tmp_path: Path) -> None:
    listed = tmp_path / "tokens"
    listed.write_text("a-much-longer-token\n")
    auth = Authenticator(TenantDirectory(token="abc", token_file=str(listed)))
    for token in ("Bearer abc", "bearer a-much-longer-token"):
        tenant, error = auth.check([("authorization", token)])
        assert error is None and tenant is not None and tenant.name == "default"
    for metadata in ([], [("authorization", "abc")], [("authorization", "Basic abc")], [("x", "Bearer abc")]):
        tenant, error = auth.check(metadata)
        assert tenant is None and error is not None and error.reason == "TOKEN_MISSING"
    for given in ("ab", "abcd", "", "a-much-longer-tokem"):
        tenant, error = auth.check([("authorization", f"Bearer {given}")])
        assert tenant is None and error is not None and error.reason in ("TOKEN_INVALID", "TOKEN_MISSING")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no token"):
        load_tokens("", str(empty))
    with pytest.raises(ValueError, match="cannot be read"):
        load_tokens("", str(tmp_path / "absent"))
    assert load_tokens(" x ", "") == ["x"]


def test_the_token_is_an_environment_setting_never_a_flag_nor_logged(
    serve_process: Callable[..., ServeProcess],
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lossd.server", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "--auth-token " not in done.stdout and "--auth-token-file" in done.stdout
    served = serve_process(
        "--host=127.0.0.1",
        "--port=0",
        "--metrics-port=0",
        "--device=cpu",
        "--log-level=DEBUG",
        env={"LOSSD_AUTH_TOKEN": "env-token-1234"},
    )
    target = served.serving()
    with LossClient(target, timeout=10, token="env-token-1234") as client:
        assert _works(client)
    with LossClient(target, timeout=10) as client, pytest.raises(errors.UnauthenticatedError):
        client.cross_entropy(LOGITS, LABELS)
    served.process.terminate()
    code, log = served.finish()
    assert code == 0
    assert "env-token-1234" not in log


def test_the_metrics_port_is_separate_and_carries_no_tensor_data(
    server_factory: Callable[..., RunningServer], pki: Pki
) -> None:
    metrics_port = free_port()
    running = server_factory(
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, auth_token="t", metrics_port=metrics_port
    )
    marker = np.full((4, 3), 0.123456789, np.float32)
    with LossClient(running.target, timeout=10, credentials=tls_credentials(pki.ca), token="t") as client:
        client.cross_entropy(marker, LABELS)
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert "lossd_requests_total" in text
    assert "0.1234" not in text
    assert metrics_port != running.port
