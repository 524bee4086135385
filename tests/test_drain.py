"""Deadlines, cancellation, the server's maximum request time, and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lossd.client import AsyncLossClient, LossClient, errors
from lossd.client._calls import prepare_call
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc

from conftest import RunningServer, SlowEngine
from processes import INJECTED, ServeProcess

LOGITS = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)
LABELS = np.array([0, 5, 2, 1])


def test_a_cancelled_queued_call_is_never_computed(server_factory: Callable[..., RunningServer]) -> None:
    engine = SlowEngine(delay=0.6)
    running = server_factory(engine=engine, batching=False)
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        with LossClient(running.target, timeout=30) as client:
            raw = _request()
            holder = stub.ComputeLoss.future(raw, timeout=30)
            time.sleep(0.2)  # computing now
            queued = [stub.ComputeLoss.future(raw, timeout=30) for _ in range(3)]
            time.sleep(0.1)
            for future in queued:
                assert future.cancel()
            holder.result()
            assert client.cross_entropy(LOGITS, LABELS).loss.shape == ()
    assert engine.calls == 2, "cancelled calls must never be computed"
    assert running.server.batcher.depth == 0


def _request() -> pb.ComputeLossRequest:
    return prepare_call("cross_entropy", LOGITS, LABELS).unary()


def test_the_servers_maximum_request_time_ends_calls_and_drops_them_from_the_queue(
    server_factory: Callable[..., RunningServer],
) -> None:
    engine = SlowEngine(delay=1.0)
    running = server_factory(engine=engine, batching=False, max_request_s=0.3)

    async def main() -> list[Any]:
        async with AsyncLossClient(running.target, timeout=30) as client:
            calls = [client.cross_entropy(LOGITS, LABELS) for _ in range(3)]
            return list(await asyncio.gather(*calls, return_exceptions=True))

    started = time.monotonic()
    results = asyncio.run(main())
    assert time.monotonic() - started < 1.5, "the limit must answer calls, not wait for compute"
    for result in results:
        assert isinstance(result, errors.DeadlineExceededError), result
        assert result.reason == "MAX_REQUEST_TIME" and result.metadata["maxRequestSeconds"] == "0.3"
    time.sleep(1.2)  # the first call's compute ends; the queued ones must not start
    assert engine.calls == 1
    assert running.server.batcher.depth == 0


def test_draining_refuses_new_calls_and_finishes_those_in_progress(
    server_factory: Callable[..., RunningServer],
) -> None:
    engine = SlowEngine(delay=3.0)  # long beside the refusal's bound below, even on a busy machine
    running = server_factory(engine=engine, batching=False)
    with (
        LossClient(running.target, timeout=30, retry_attempts=1) as client,
        grpc.insecure_channel(running.target) as channel,
    ):
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        results: list[Any] = []
        worker = threading.Thread(target=lambda: results.append(client.cross_entropy(LOGITS, LABELS)))
        worker.start()
        deadline = time.monotonic() + 10
        while running.server.lifecycle.active < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the call is in progress
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(5.0), running.loop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        # New calls are refused at once (the server closed its listener and sent GOAWAY).
        refused_at = time.monotonic()
        with pytest.raises(errors.UnavailableError):
            client.cross_entropy(LOGITS, LABELS)
        assert time.monotonic() - refused_at < 2.0  # not after the call in progress (3 s)
        worker.join(10)
        assert stopping.result(10) == 0  # nothing left unfinished
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(LOGITS), torch.from_numpy(LABELS))
    assert results and np.array_equal(results[0].loss, expected.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("retry_attempts", [1, 5], ids=["no-retries", "retries"])
def test_sigterm_under_load_loses_no_accepted_call(
    serve_process: Callable[..., ServeProcess], retry_attempts: int
) -> None:
    """Clients keep calling while the server is stopped: every call the server accepted is answered
    with the right numbers; the others are refused and never computed.

    Refused means UNAVAILABLE, except in one race that gRPC decides: a call that reached the server
    just as it stopped taking calls, before any handler saw it, is cancelled (CANCELLED, no
    details). The client's retry policy sends those elsewhere like UNAVAILABLE ones; with it on,
    every refusal a caller sees is UNAVAILABLE."""
    served = serve_process(
        "--delay=0.05",
        "--",
        "--host=127.0.0.1",
        "--port=0",
        "--metrics-port=0",
        "--shutdown-grace-s=20",
        "--max-queue-delay-us=2000",
        command=[sys.executable, INJECTED],
    )
    target = served.serving()
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(LOGITS), torch.from_numpy(LABELS)).numpy()
    outcomes: Counter[str] = Counter()
    wrong: list[Any] = []
    lock = threading.Lock()
    signalled = threading.Event()

    def load() -> None:
        with LossClient(target, timeout=30, retry_attempts=retry_attempts) as client:
            while True:
                try:
                    result = client.cross_entropy(LOGITS, LABELS)
                except errors.LossdError as error:
                    with lock:
                        outcomes[f"{error.code} {error.reason}".strip()] += 1
                    if signalled.is_set():
                        return
                    continue
                with lock:
                    outcomes["OK"] += 1
                    if not np.allclose(result.loss, expected, rtol=1e-6, atol=0):  # merged: to rounding
                        wrong.append(result.loss)

    threads = [threading.Thread(target=load) for _ in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    served.process.send_signal(signal.SIGTERM)
    signalled.set()
    for thread in threads:
        thread.join(60)
    code, log = served.finish(60)
    assert code == 0, log
    in_progress = re.search(r"(\d+) in progress get up to", log)
    assert in_progress and int(in_progress.group(1)) > 0, "the test must stop the server under load"
    stopped = re.search(r"lossd stopped: (\d+) calls ended \(([^)]*)\); (\d+) of them cut off", log)
    assert stopped, log
    server_codes = dict(item.split(" ") for item in stopped.group(2).split(", "))
    assert stopped.group(3) == "0"
    assert int(server_codes["OK"]) == outcomes["OK"], (server_codes, outcomes)
    # Calls that reached a handler as the server stopped taking calls are counted, as CANCELLED.
    assert set(server_codes) <= {"OK", "CANCELLED"}, "the server failed an accepted call"
    assert not wrong
    refused = {key for key in outcomes if key != "OK"}
    allowed = {"UNAVAILABLE UNREACHABLE", "UNAVAILABLE SHUTTING_DOWN"} | (
        {"CANCELLED CANCELLED"} if retry_attempts == 1 else set()
    )
    assert refused <= allowed, outcomes
    print(f"client outcomes {dict(outcomes)}; server {stopped.group(0)}")
