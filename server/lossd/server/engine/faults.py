"""Device failures: which errors one request survives, and which leave the device unusable.

A CUDA out-of-memory error is local: the allocator is intact, the memory can be freed, the request
retried smaller or answered `RESOURCE_EXHAUSTED`. A device-side assert, an illegal address or an
ECC error is sticky: the process's CUDA context is poisoned and every later CUDA call fails, so the
only honest answer is to stop serving and let a supervisor start a fresh process (Triton keeps
reporting ready in that state while every request fails; lossd must not).

Pure torch; nothing of gRPC.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch

from lossd.wire.errors import ResourceExhaustedError, UnavailableError

__all__ = [
    "DeviceFailure",
    "device_works",
    "is_device_error",
    "is_out_of_memory",
    "out_of_memory_error",
]

_DEVICE_ERROR_MARKS = (
    "cuda error",
    "device-side assert",
    "illegal memory access",
    "illegal address",
    "ecc error",
    "cublas_status",
    "cudnn_status",
    "cufft_internal",
    "nccl error",
    "unspecified launch failure",
)


class DeviceFailure(UnavailableError):
    """The compute device failed for good; the server stops serving and exits non-zero.

    Requests that meet it get `UNAVAILABLE` (reason DEVICE_FAILED): another replica, or this one
    restarted, can serve them.
    """

    def __init__(self, device: torch.device, cause: BaseException) -> None:
        super().__init__(
            f"the server's device {device} failed ({_first_line(cause)}); this replica is restarting, "
            "retry elsewhere or later",
            reason="DEVICE_FAILED",
            metadata={"device": str(device)},
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_out_of_memory(error: BaseException) -> bool:
    """A failed device (or host) allocation: torch's OutOfMemoryError, or the CPU allocator's error."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def is_device_error(error: BaseException) -> bool:
    """An error raised by the accelerator runtime (other than out-of-memory): maybe sticky."""
    if is_out_of_memory(error):
        return False
    if isinstance(error, torch.AcceleratorError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(mark in text for mark in _DEVICE_ERROR_MARKS)


DEVICE_CHECK_S = 30.0
"""How long the device check may take: a device that cannot run a tiny kernel in this time is hung."""


def _cuda_probe(device: torch.device) -> bool:
    torch.cuda.synchronize(device)
    probe = torch.ones(2, device=device)
    return float((probe + probe).sum().item()) == 4.0


def device_works(
    device: torch.device, timeout_s: float = DEVICE_CHECK_S, probe: Callable[[], bool] | None = None
) -> bool:
    """Whether `device` still computes: after a device error, tells a sticky failure from a one-off.

    A poisoned CUDA context fails every call, this synchronization and tiny kernel (`probe`)
    included. Running out of memory for the probe itself is memory pressure, not a dead device
    (the cache is emptied and the device counts as working); a probe that does not finish within
    `timeout_s` means a hung device. The probe runs on a thread of its own, so a hang cannot hold
    the caller past the timeout.
    """
    if probe is None:
        if device.type != "cuda":
            return True
        probe = functools.partial(_cuda_probe, device)
    outcome: list[bool] = []

    def check() -> None:
        try:
            outcome.append(probe())
        except Exception as error:
            if is_out_of_memory(error):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                outcome.append(True)
            else:
                outcome.append(False)

    thread = threading.Thread(target=check, name="lossd-device-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(outcome) and outcome[0]


def out_of_memory_error(device: torch.device, nbytes: int, error: BaseException) -> ResourceExhaustedError:
    """The answer to a request too big for the device's free memory even when computed alone."""
    return ResourceExhaustedError(
        f"the server's {device.type} device ran out of memory computing this request alone "
        f"({nbytes} tensor bytes; {_first_line(error)}); retry later or send it in smaller parts",
        reason="DEVICE_OUT_OF_MEMORY",
        metadata={"device": str(device), "requestBytes": str(nbytes)},
        retry_after=1.0,
    )
