"""What a new user hits first, said so that it names the fix: no server at the address, an address
written as a URL, a timeout (and whether the call was batched with others), and every client error
with a reason."""

from __future__ import annotations

import socket
from collections.abc import Callable

import numpy as np
import pytest

from lossd.client import LossClient, errors
from lossd.client.channels import resolve_target

from conftest import RunningServer, SlowEngine

LOGITS = np.zeros((4, 3), np.float32)
LABELS = np.array([0, 1, 2, 0])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("scheme", ["", "http://", "grpc://"])
def test_no_server_at_the_address_names_it_and_asks_whether_lossd_runs_there(scheme: str) -> None:
    target = f"{scheme}127.0.0.1:{_closed_port()}"
    with (
        LossClient(target, timeout=5, retry_attempts=1) as client,
        pytest.raises(errors.UnavailableError) as gone,
    ):
        client.cross_entropy(LOGITS, LABELS)
    assert gone.value.reason == "UNREACHABLE"
    assert target in str(gone.value) and "is lossd running there" in str(gone.value)
    assert gone.value.metadata["target"] == target


@pytest.mark.parametrize(
    ("target", "plain"),
    [
        ("http://localhost:50051", "localhost:50051"),
        ("grpc://10.0.0.1:7000/", "10.0.0.1:7000"),
        ("dns:///lossd.example:50051", "dns:///lossd.example:50051"),
        ("localhost:50051", "localhost:50051"),
        ("unix:/tmp/lossd.sock", "unix:/tmp/lossd.sock"),
    ],
)
def test_url_schemes_are_taken_as_grpc_understands_them(target: str, plain: str) -> None:
    assert resolve_target(target)[0] == plain


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("https://x:1", "credentials="),
        ("ftp://x:1", "dns:///"),
        ("http://x", "no port"),
        ("http://x:1/v2/models", "path"),
        ("", "host:port"),
    ],
)
def test_addresses_grpc_cannot_take_are_refused_with_a_hint(target: str, says: str) -> None:
    with pytest.raises(errors.InvalidArgumentError) as refused:
        LossClient(target)
    assert refused.value.reason == "TARGET_INVALID" and refused.value.field == "target"
    assert says in str(refused.value)


def test_a_lone_call_past_its_timeout_names_the_timeout_not_a_batch(
    server_factory: Callable[..., RunningServer],
) -> None:
    running = server_factory(engine=SlowEngine(0.5))
    for coalesce in (True, False):
        client = LossClient(running.target, timeout=0.05, coalesce=coalesce)
        with client, pytest.raises(errors.DeadlineExceededError) as late:
            client.cross_entropy(LOGITS, LABELS)
        message = str(late.value)
        assert late.value.reason == "TIMEOUT", message
        assert "0.05 s" in message and "timeout=" in message
        assert "batched" not in message


def test_a_streamed_call_past_its_timeout_says_so(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(engine=SlowEngine(0.5))
    client = LossClient(running.target, timeout=0.05, stream_threshold_bytes=0)
    with client, pytest.raises(errors.DeadlineExceededError) as late:
        client.cross_entropy(LOGITS, LABELS)
    assert late.value.reason == "TIMEOUT" and "0.05 s" in str(late.value)


def test_a_timed_out_call_says_batched_only_when_it_was(server_factory: Callable[..., RunningServer]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    running = server_factory(engine=SlowEngine(0.4))
    with LossClient(running.target, timeout=2.0, coalesce_in_flight=1) as client:
        slow = ThreadPoolExecutor(8)
        first = slow.submit(client.cross_entropy, LOGITS, LABELS)  # holds the one RPC in flight
        messages = []

        def late() -> str:
            try:
                client.cross_entropy(LOGITS, LABELS, timeout=0.6)
            except errors.DeadlineExceededError as error:
                return str(error)
            return ""

        messages = list(slow.map(lambda _: late(), range(4)))
        first.result()
        slow.shutdown()
    said = [message for message in messages if message]
    assert said, "some waited past their timeout"
    for message in said:
        assert "batched with" in message or "waiting in the client" in message, message
        if "batched with" in message:
            assert "batched with 0" not in message
