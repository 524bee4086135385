"""Client-side balancing: round-robin over several servers, retries of UNAVAILABLE (counted)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
import pytest

from lossd.client import LossClient, UnavailableError
from lossd.client.channels import channel_options, resolve_target, service_config
from lossd.server.engine import LossEngine
from lossd.server.losses import LossCall, LossOutput

from conftest import RunningServer

LOGITS = np.random.default_rng(6).standard_normal((4, 3)).astype(np.float32)
LABELS = np.array([0, 2, 1, 1])


def _answered(running: RunningServer) -> float:
    value = running.server.metrics.registry.get_sample_value(
        "lossd_requests_total", {"loss": "cross_entropy", "code": "OK"}
    )
    return value or 0.0


def test_calls_spread_over_every_server_and_survive_one_stopping(
    server_factory: Callable[..., RunningServer],
) -> None:
    servers = [server_factory() for _ in range(3)]
    with LossClient([s.target for s in servers], timeout=30) as client:
        for _ in range(60):
            client.cross_entropy(LOGITS, LABELS)
        counts = [_answered(s) for s in servers]
        assert sum(counts) == 60
        assert all(count >= 10 for count in counts), counts  # round-robin: about 20 each
        servers[1].run(servers[1].server.stop(0))  # one replica goes away
        for _ in range(60):
            assert client.cross_entropy(LOGITS, LABELS).loss.shape == ()
    assert sum(_answered(s) for s in servers) == 120
    assert _answered(servers[0]) > counts[0] and _answered(servers[2]) > counts[2]


def test_a_list_of_addresses_becomes_one_balanced_target() -> None:
    assert resolve_target("dns:///lossd.ml.svc:50051") == ("dns:///lossd.ml.svc:50051", None)
    assert resolve_target(["127.0.0.1:1", "localhost:2"]) == ("ipv4:127.0.0.1:1,127.0.0.1:2", "127.0.0.1")
    assert resolve_target(["[::1]:5", "[::1]:6"]) == ("ipv6:[::1]:5,[::1]:6", "::1")
    for bad in ([], ["nohost"], ["127.0.0.1:1", "[::1]:2"]):
        with pytest.raises(ValueError, match=r"target|address"):
            resolve_target(bad)


def test_the_channel_balances_retries_and_keeps_alive() -> None:
    options = dict(channel_options())
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    policy = config["methodConfig"][0]["retryPolicy"]
    assert config["methodConfig"][0]["name"] == [{"service": "lossd.v1.LossService"}]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED"]
    assert policy["maxAttempts"] == 5
    assert options["grpc.keepalive_time_ms"] == 30_000 and options["grpc.keepalive_permit_without_calls"] == 1
    assert "retryPolicy" not in json.loads(service_config(1))["methodConfig"][0]
    assert dict(channel_options(extra=[("grpc.keepalive_time_ms", 5)]))["grpc.keepalive_time_ms"] == 5


class FlakyEngine(LossEngine):
    """Fails its first `failures` calls with UNAVAILABLE, as a draining or failed replica would."""

    def __init__(self, failures: int) -> None:
        super().__init__("cpu")
        self.failures = failures

    def warm_up(self) -> None:
        """The server's start-up computations are not the calls this engine fails."""
        failures, self.failures = self.failures, 0
        super().warm_up()
        self.failures = failures

    def _run(self, call: LossCall) -> LossOutput:
        if self.failures:
            self.failures -= 1
            raise UnavailableError("not now", reason="SHUTTING_DOWN")
        return super()._run(call)


def test_unavailable_calls_are_retried_and_counted(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(engine=FlakyEngine(failures=2), batching=False)
    with LossClient(running.target, timeout=30) as client:
        assert client.cross_entropy(LOGITS, LABELS).loss.shape == ()  # the third attempt answers
    registry = running.server.metrics.registry
    assert registry.get_sample_value("lossd_retried_requests_total") == 2
    assert (
        registry.get_sample_value("lossd_requests_total", {"loss": "cross_entropy", "code": "UNAVAILABLE"})
        == 2
    )
    running.server.engine.failures = 1  # type: ignore[attr-defined]
    with LossClient(running.target, timeout=30, retry_attempts=1) as client, pytest.raises(UnavailableError):
        client.cross_entropy(LOGITS, LABELS)


def test_connections_are_renewed_without_losing_calls(server_factory: Callable[..., RunningServer]) -> None:
    """A server asks clients to reconnect every max_connection_age_s (so that DNS is asked again);
    calls in progress finish, and later calls go over the new connection."""
    running = server_factory(max_connection_age_s=0.3)
    with LossClient(running.target, timeout=30) as client:
        deadline = time.monotonic() + 2.0
        calls = 0
        while time.monotonic() < deadline:
            assert client.cross_entropy(LOGITS, LABELS).loss.shape == ()
            calls += 1
    assert _answered(running) == calls
