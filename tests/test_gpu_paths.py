"""The logic of the CUDA-only paths, on the CPU: what pinned buffers cost the memory budget and when
they go back to the driver, the staged single-call path (uploads, one synchronisation), and the
per-process device memory cap of `--workers`. `tests/test_gpu.py` runs the real thing on a GPU."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from test_merged_compute import Result, as_call

import lossd.server.engine.staging as staging_module
from lossd.client._calls import prepare_call
from lossd.server.config import ServerConfig
from lossd.server.engine import LossEngine
from lossd.server.engine.staging import Staging, empty_pinned_cache, pinned_bytes

from cases import all_cases, reference
from conftest import RunningServer
from test_parity import check_result


def test_pinned_buffers_cost_what_torchs_host_allocator_takes() -> None:
    assert [pinned_bytes(n) for n in (0, 1, 2, 3, 4096, 4097, 5 << 20)] == [0, 1, 2, 4, 4096, 8192, 8 << 20]
    cpu = torch.device("cpu")
    assert Staging(cpu, pinned=True).buffer_cost(5 << 20) == 8 << 20
    assert Staging(cpu, pinned=False).buffer_cost(5 << 20) == 5 << 20


def test_large_pinned_buffers_go_back_to_the_driver_once(monkeypatch: pytest.MonkeyPatch) -> None:
    emptied: list[bool] = []
    monkeypatch.setattr(staging_module, "empty_pinned_cache", lambda: emptied.append(True) or True)
    staging = Staging(torch.device("cpu"), pinned=True)
    staging.release()
    assert emptied == []  # nothing large was handed out
    staging.large_pinned = 128 << 20
    staging.release()
    staging.release()
    assert emptied == [True] and staging.large_pinned == 0


def test_a_failure_to_empty_the_pinned_cache_fails_no_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> bool:
        raise RuntimeError("CUDA error: simulated")

    monkeypatch.setattr(staging_module, "empty_pinned_cache", broken)
    staging = Staging(torch.device("cpu"), pinned=True)
    staging.large_pinned = 128 << 20
    staging.release()  # logged, not raised
    assert staging.large_pinned == 0
    assert "could not return cached pinned memory" in caplog.text


def test_the_pinned_cache_is_emptied_with_what_this_torch_offers(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []
    if hasattr(torch, "accelerator"):
        monkeypatch.delattr(torch.accelerator, "empty_host_cache", raising=False)
    for name in ("_host_emptyCache", "_accelerator_emptyHostCache"):
        monkeypatch.delattr(torch._C, name, raising=False)
    assert empty_pinned_cache() is False
    monkeypatch.setattr(
        torch._C, "_accelerator_emptyHostCache", lambda: called.append("private"), raising=False
    )
    assert empty_pinned_cache() is True and called == ["private"]
    if hasattr(torch, "accelerator"):
        monkeypatch.setattr(
            torch.accelerator, "empty_host_cache", lambda: called.append("public"), raising=False
        )
        assert empty_pinned_cache() is True and called == ["private", "public"]


def test_a_streams_reservation_counts_its_buffers_as_the_staging_allocates_them(
    server_factory: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a stream reserves grows by exactly what the staging says its receive buffers cost
    (power-of-two pinned blocks on CUDA)."""
    from lossd.server import memory

    running = server_factory()
    needs: list[int] = []
    original = memory.Reservation.grow_to

    async def recording(self: memory.Reservation, nbytes: int, *args: Any, **kwargs: Any) -> None:
        needs.append(nbytes)
        await original(self, nbytes, *args, **kwargs)

    monkeypatch.setattr(memory.Reservation, "grow_to", recording)
    rows, classes = 64, 1000
    streamed = rows * classes * 4

    def reserved() -> int:
        needs.clear()
        call = prepare_call("cross_entropy", np.ones((rows, classes), np.float32), np.zeros(rows, np.int64))
        with grpc.insecure_channel(running.target) as channel:
            list(channel.stream_stream("/lossd.v1.LossService/StreamLoss")(call.stream(1 << 16), timeout=30))
        return max(needs)

    plain = reserved()
    staging = running.server.engine.staging
    monkeypatch.setattr(staging, "buffer_cost", lambda nbytes: 4 * nbytes)
    assert reserved() - plain == 3 * streamed


class CountingStaging(Staging):
    """The CPU staging, counting what the engine moves up and how often it waits for results."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"), pinned=False)
        self.uploads = 0
        self.downloads = 0

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        self.uploads += 1
        return super().upload(tensor)

    def download(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.downloads += 1
        return super().download(tensors)


def test_a_call_alone_moves_each_tensor_up_once_and_waits_once() -> None:
    """The single-call path stages every tensor it uses and brings all results down together (on
    CUDA: one synchronisation per call instead of one per result); the numbers stay torch's."""
    engine = LossEngine("cpu")
    staging = CountingStaging()
    engine.staging = staging
    cases = [c for c in all_cases() if c.dtype == torch.float32][:300]
    assert len(cases) == 300
    for case in cases:
        tensors = case.tensors()
        call = engine.prepare(as_call(case, tensors))
        staging.uploads = staging.downloads = 0
        (output,) = engine.compute_batch([call], merge=False)
        assert not isinstance(output, Exception), (case.id, output)
        check_result(Result(output), reference(case, tensors), case)
        expected_uploads = 2 + len(call.tensors) + (call.grad_output is not None and bool(call.grads))
        assert staging.uploads == expected_uploads, case.id
        assert staging.downloads == 1, case.id


def test_workers_share_the_device_memory_evenly() -> None:
    assert ServerConfig(workers=4).device_memory_share == 0.25
    assert ServerConfig(workers=1).device_memory_share == 0.0
    assert ServerConfig(workers=4, device_memory_fraction=0.6).device_memory_share == 0.6
    with pytest.raises(ValueError, match="device_memory_fraction"):
        ServerConfig(device_memory_fraction=1.5).check()


def test_the_cap_is_set_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    capped: list[tuple[float, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: capped.append((f, d)))
    engine = LossEngine("cpu")
    engine.limit_memory(0.25)
    assert capped == []
    engine.device = torch.device("cuda", 0)  # the engine's bookkeeping only: nothing runs on it here
    engine.limit_memory(0.0)
    engine.limit_memory(1.0)
    engine.limit_memory(0.25)
    assert capped == [(0.25, torch.device("cuda", 0))]


def test_a_resident_tensor_is_mirrored_on_the_device_while_it_lives() -> None:
    """The device copy of a resident tensor (CUDA), on the meta device here: `upload` of that very
    tensor returns the copy, of any other tensor copies it up, and the copy goes with the tensor."""
    import gc

    from lossd.server.engine.staging import Staging

    staging = Staging(torch.device("meta"), pinned=False)
    held = torch.randn(40, 8)
    assert staging.mirror(held) is held and staging.mirror(held) is held
    copy = staging.upload(held)
    assert copy.device.type == "meta" and staging.upload(held) is copy
    assert staging.upload(held.clone()) is not copy
    del held, copy
    gc.collect()
    assert not staging._mirrors
    assert Staging(torch.device("cpu"), pinned=False).mirror(torch.ones(2)) is not None
