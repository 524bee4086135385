"""Device faults, injected at the engine boundary: out-of-memory split and contained, sticky errors
stop the server (NOT_SERVING, UNAVAILABLE, non-zero exit), dead workers restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lossd.client import AsyncLossClient, LossClient, errors
from lossd.server.engine import LossEngine
from lossd.server.engine.faults import DeviceFailure, is_device_error, is_out_of_memory
from lossd.server.engine.merging import MergeKey
from lossd.server.losses import LossCall, LossOutput, make_options

from conftest import RunningServer
from injected_server import POISON, InjectedEngine
from processes import INJECTED, ServeProcess

RNG = np.random.default_rng(5)
OOM = "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.11 GiB"


def _logits(rows: int = 4, classes: int = 5, first: float | None = None) -> np.ndarray:
    x = RNG.standard_normal((rows, classes)).astype(np.float32)
    if first is not None:
        x[0, 0] = first
    return x


def _labels(rows: int = 4, classes: int = 5) -> np.ndarray:
    return RNG.integers(0, classes, rows)


def _call(rows: int = 4) -> LossCall:
    return LossCall(
        make_options("cross_entropy"),
        torch.from_numpy(_logits(rows)),
        torch.from_numpy(_labels(rows)),
        grads=frozenset({"input"}),
    )


class OomEngine(LossEngine):
    """Runs out of memory on merged computations of more than `fits` calls, and on single calls of
    more than `max_rows` rows."""

    def __init__(self, fits: int = 2, max_rows: int = 10**9) -> None:
        super().__init__("cpu")
        self.fits = fits
        self.max_rows = max_rows
        self.attempts: list[int] = []
        self.released = 0

    def _merged(self, calls: Sequence[LossCall], key: MergeKey) -> list[LossOutput]:
        self.attempts.append(len(calls))
        if len(calls) > self.fits:
            raise torch.OutOfMemoryError(OOM)
        return super()._merged(calls, key)

    def _run(self, call: LossCall) -> LossOutput:
        if call.input.shape[0] > self.max_rows:
            raise torch.OutOfMemoryError(OOM)
        return super()._run(call)

    def release_memory(self) -> None:
        self.released += 1


# -- classification ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "oom", "device"),
    [
        (torch.OutOfMemoryError(OOM), True, False),
        (MemoryError(), True, False),
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
            True,
            False,
        ),
        (torch.AcceleratorError("CUDA error: device-side assert triggered"), False, True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False, True),
        (RuntimeError("CUDA error: uncorrectable ECC error encountered"), False, True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`"), False, True),
        (RuntimeError("Expected all tensors to be on the same device"), False, False),
        (ValueError("bad"), False, False),
    ],
)
def test_errors_are_classified(error: Exception, oom: bool, device: bool) -> None:
    assert is_out_of_memory(error) is oom
    assert is_device_error(error) is device


# -- the engine -----------------------------------------------------------------------------------


def test_a_merged_batch_out_of_memory_is_split_until_it_fits() -> None:
    engine = OomEngine(fits=2)
    calls = [engine.prepare(_call()) for _ in range(8)]
    results = engine.compute_batch(calls)
    assert engine.attempts == [8, 4, 2, 2, 4, 2, 2]
    assert engine.released == 3
    for call, result in zip(calls, results, strict=True):
        assert isinstance(result, LossOutput)
        alone = LossEngine("cpu").compute(call)
        np.testing.assert_allclose(np.asarray(result.loss), alone.loss.numpy(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(result.input_grad), alone.input_grad, rtol=1e-6, atol=1e-7)


def test_a_single_call_out_of_memory_fails_alone_with_resource_exhausted() -> None:
    engine = OomEngine(fits=0, max_rows=8)
    big, small = engine.prepare(_call(rows=16)), engine.prepare(_call(rows=4))
    results = engine.compute_batch([big, small])
    error, output = results
    assert isinstance(error, errors.ResourceExhaustedError)
    assert error.reason == "DEVICE_OUT_OF_MEMORY"
    assert error.retry_after == 1.0
    assert error.metadata["requestBytes"] == str(big.input.nbytes + big.target.nbytes)
    assert isinstance(output, LossOutput)


def test_a_sticky_device_error_raises_device_failure_for_the_batch() -> None:
    engine = InjectedEngine(poison=True)
    calls = [engine.prepare(_call()) for _ in range(3)]
    poisoned = engine.prepare(
        LossCall(make_options("cross_entropy"), torch.from_numpy(_logits(first=POISON)), calls[0].target)
    )
    with pytest.raises(DeviceFailure) as failure:
        engine.compute_batch([calls[0], poisoned, calls[1]])
    assert failure.value.code == "UNAVAILABLE" and failure.value.reason == "DEVICE_FAILED"
    assert "device-side assert triggered" in failure.value.message
    with pytest.raises(DeviceFailure):  # and every later computation
        engine.compute_batch([calls[2]])


def test_a_device_error_that_leaves_the_device_working_fails_only_its_call() -> None:
    class OneOff(LossEngine):
        def _run(self, call: LossCall) -> LossOutput:
            if call.input.shape[0] == 3:
                raise RuntimeError("CUDA error: invalid configuration argument")
            return super()._run(call)

    engine = OneOff("cpu")
    failed, fine = engine.compute_batch([engine.prepare(_call(3)), engine.prepare(_call(4))], merge=False)
    assert isinstance(failed, RuntimeError) and not isinstance(failed, DeviceFailure)
    assert isinstance(fine, LossOutput)


# -- through a server -----------------------------------------------------------------------------


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)


def test_out_of_memory_fails_one_request_and_the_server_keeps_serving(
    server_factory: Callable[..., RunningServer],
) -> None:
    running = server_factory(engine=OomEngine(fits=0, max_rows=8))
    with LossClient(running.target, timeout=30) as client:
        with pytest.raises(errors.ResourceExhaustedError) as exhausted:
            client.cross_entropy(_logits(16), _labels(16))
        assert exhausted.value.reason == "DEVICE_OUT_OF_MEMORY"
        assert exhausted.value.retry_after == 1.0
        assert client.cross_entropy(_logits(4), _labels(4)).loss.shape == ()
    assert _health(running.target) == health_pb2.HealthCheckResponse.SERVING


def test_concurrent_requests_survive_a_merged_out_of_memory(
    server_factory: Callable[..., RunningServer],
) -> None:
    engine = OomEngine(fits=2)
    running = server_factory(engine=engine, max_queue_delay_us=100_000)
    inputs = [(_logits(), _labels()) for _ in range(12)]

    async def main() -> list[Any]:
        async with AsyncLossClient(running.target, timeout=60) as client:
            return await asyncio.gather(*(client.cross_entropy(x, t) for x, t in inputs))

    results = asyncio.run(main())
    for (x, t), result in zip(inputs, results, strict=True):
        expected = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t))
        np.testing.assert_allclose(result.loss, expected.numpy(), rtol=1e-6)
    assert max(engine.attempts) > 2, "the test must merge more calls than fit"


def test_a_sticky_device_error_fails_queued_and_new_calls_and_turns_health_off(
    server_factory: Callable[..., RunningServer],
) -> None:
    engine = InjectedEngine(delay=0.3, poison=True)
    running = server_factory(engine=engine, batching=False)
    with LossClient(running.target, timeout=30, retry_attempts=1) as client, ThreadPoolExecutor(6) as pool:
        poisoned = pool.submit(client.cross_entropy, _logits(first=POISON), _labels())
        time.sleep(0.1)  # computing now; the next ones queue behind it
        queued = [pool.submit(client.cross_entropy, _logits(), _labels()) for _ in range(5)]
        for future in [poisoned, *queued]:
            with pytest.raises(errors.UnavailableError) as unavailable:
                future.result(30)
            assert unavailable.value.reason == "DEVICE_FAILED"
        assert running.server.failed.is_set()
        assert _health(running.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(errors.UnavailableError) as later:
            client.cross_entropy(_logits(), _labels())
        assert later.value.reason == "DEVICE_FAILED"
    assert engine.computed == 1, "nothing queued behind the failure may be computed"


def test_lossd_exits_non_zero_after_a_sticky_device_error(serve_process: Callable[..., ServeProcess]) -> None:
    served = serve_process(
        "--poison",
        "--",
        "--host=127.0.0.1",
        "--port=0",
        "--metrics-port=0",
        command=[sys.executable, INJECTED],
    )
    target = served.serving()
    with LossClient(target, timeout=30, retry_attempts=1) as client:
        assert client.cross_entropy(_logits(), _labels()).loss.shape == ()
        with pytest.raises(errors.UnavailableError) as unavailable:
            client.cross_entropy(_logits(first=POISON), _labels())
    assert unavailable.value.reason == "DEVICE_FAILED"
    code, log = served.finish(timeout=30)
    assert code == 3, log
    assert "device-side assert triggered" in log and "exiting with status 3" in log


@pytest.mark.slow
def test_the_parent_restarts_a_worker_that_dies(serve_process: Callable[..., ServeProcess]) -> None:
    served = serve_process("--host=127.0.0.1", "--port=0", "--metrics-port=0", "--device=cpu", "--workers=2")
    pids = {}
    for _ in range(2):
        found = served.wait_for(r"serving lossd\.v1\.LossService on \S+:(\d+) .*worker (\d)/2 pid (\d+)", 120)
        port, pids[found.group(2)] = found.group(1), int(found.group(3))
    os.kill(pids["1"], signal.SIGKILL)
    served.wait_for(rf"worker 1/2 \(pid {pids['1']}\) exited with status -9 .*; restarting it", 30)
    again = served.wait_for(r"serving lossd\.v1\.LossService .*worker 1/2 pid (\d+)", 120)
    assert int(again.group(1)) != pids["1"]
    with LossClient(f"127.0.0.1:{port}", timeout=30) as client:
        for _ in range(20):
            assert client.cross_entropy(_logits(), _labels()).loss.shape == ()
    served.process.send_signal(signal.SIGTERM)
    code, log = served.finish(60)
    assert code == 0, log


def test_the_device_check_tells_memory_pressure_and_hangs_from_a_dead_device() -> None:
    """`device_works`' logic with stand-in probes (the real one needs CUDA): an out-of-memory on the
    probe itself is pressure, not death; an error is death; a probe that hangs is death too, and the
    check returns after its timeout instead of hanging the compute thread."""
    import threading as _threading

    from lossd.server.engine.faults import device_works

    cpu = torch.device("cpu")
    assert device_works(cpu)  # no probe off CUDA: the CPU always computes
    assert device_works(cpu, probe=lambda: True)

    def oom() -> bool:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    def dead() -> bool:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    hang = _threading.Event()
    assert device_works(cpu, probe=oom)
    assert not device_works(cpu, probe=dead)
    started = time.monotonic()
    assert not device_works(cpu, timeout_s=0.2, probe=lambda: hang.wait(30))
    assert time.monotonic() - started < 10
    hang.set()


def test_a_device_that_fails_its_warm_up_never_reports_serving() -> None:
    """The server computes each loss once before SERVING; a device that cannot fails the start."""
    from lossd.server.app import LossServer
    from lossd.server.engine import LossEngine
    from lossd.server.engine.faults import DeviceFailure

    from conftest import make_config

    class Broken(LossEngine):
        def _run(self, call: Any) -> Any:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        def device_works(self) -> bool:
            return False

    async def start() -> None:
        server = LossServer(make_config(), engine=Broken("cpu"))
        try:
            with pytest.raises(DeviceFailure):
                await server.start()
        finally:
            await server.stop(0)

    asyncio.run(start())
    warmed = LossEngine("cpu")
    warmed.warm_up()  # a working device passes
