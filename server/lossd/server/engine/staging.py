"""Host arrays in and out of the device: numpy views of host tensors, and `Staging`, which moves
concatenated rows to the device and results back (page-locked memory and one synchronisation per
batch on CUDA)."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import numpy as np
import torch

_LOGGER = logging.getLogger(__name__)

__all__ = ["SPARE_BYTES", "Staging", "as_float64", "as_result", "host_array"]


def host_array(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a host tensor; bfloat16, which numpy lacks, as its int16 bit patterns."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def as_float64(tensor: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of a host tensor."""
    if tensor.dtype == torch.bfloat16:
        return tensor.double().numpy()
    return tensor.numpy().astype(np.float64)


_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def as_result(
    array: np.ndarray, dtype: torch.dtype, wanted: torch.dtype | None = None
) -> np.ndarray | torch.Tensor:
    """`array` (of `dtype`) as the codec takes it, converted to `wanted` as torch converts.

    numpy where it can; torch for bfloat16, which numpy lacks.
    """
    target = wanted or dtype
    if torch.bfloat16 in (dtype, target):
        tensor = torch.from_numpy(array if array.flags.c_contiguous else array.copy())  # keeps 0-d
        tensor = tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor
        return tensor.to(target) if target != tensor.dtype else tensor
    if target == dtype:
        return array
    if target == torch.float16:  # torch narrows float64 to half through float32
        array = array.astype(np.float32)
    return array.astype(_NUMPY[target])


SPARE_BYTES = 1 << 30
"""The largest receive buffer kept for reuse (one at a time)."""

RELEASE_PINNED_BYTES = 64 << 20
"""Pinned buffers this large go back to the driver once their stream is over (smaller ones stay
in torch's cache for the next call)."""


def pinned_bytes(nbytes: int) -> int:
    """What a pinned buffer of `nbytes` takes: torch's caching host allocator rounds each block up
    to a power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 1 else nbytes


_EMPTY_HOST_CACHE = ("_host_emptyCache", "_accelerator_emptyHostCache")
"""torch's private calls that return cached, unused pinned blocks to the driver, by version."""


def empty_pinned_cache() -> bool:
    """Returns torch's cached pinned blocks that no tensor uses to the driver; False where this
    torch has no way to (the blocks then stay cached, counted by the memory budget while used)."""
    public = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if callable(public):
        public()
        return True
    for name in _EMPTY_HOST_CACHE:
        function = getattr(torch._C, name, None)
        if callable(function):
            function()
            return True
    return False


class Staging:
    """Moves concatenated host arrays to the device and results back.

    For CUDA (`pinned=True`) the host side is page-locked memory from torch's caching host
    allocator: the arrays are concatenated straight into it and copied with non-blocking DMA, and
    one synchronisation ends each batch. On the CPU the concatenation is the tensor.
    """

    def __init__(self, device: torch.device, pinned: bool) -> None:
        self.device = device
        self.pinned = pinned
        self._spare: torch.Tensor | None = None
        self.large_pinned = 0  # pinned bytes handed out since the cache was last emptied
        self._mirrors: dict[int, torch.Tensor] = {}  # id(host tensor) -> its device copy

    def buffer_cost(self, nbytes: int) -> int:
        """Host memory a `host_buffer(nbytes)` takes: what the memory budget reserves for it."""
        return pinned_bytes(nbytes) if self.pinned else nbytes

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 host tensor to receive request bytes into (pinned memory on CUDA).

        On the CPU the last recycled buffer is reused when it fits: fresh memory costs a page fault
        per 4 KiB on first touch (about a third of a large stream's receive time here). CUDA's
        pinned buffers come from torch's caching host allocator, which reuses them anyway.
        """
        spare = self._spare
        if spare is not None and nbytes <= spare.numel() <= 2 * nbytes:
            self._spare = None
            return spare[:nbytes]
        if self.pinned and nbytes >= RELEASE_PINNED_BYTES:
            self.large_pinned += pinned_bytes(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def release(self) -> None:
        """After a stream's buffers are gone: large pinned blocks go back to the driver, so that
        page-locked memory does not stay at its peak for the life of the process."""
        if self.large_pinned:
            self.large_pinned = 0
            try:  # housekeeping after the answer went out: it must not fail the call
                empty_pinned_cache()
            except Exception:
                _LOGGER.warning("could not return cached pinned memory to the driver", exc_info=True)

    def recycle(self, buffer: torch.Tensor) -> None:
        """Offers a buffer from `host_buffer` back once nothing refers to its contents any more."""
        if self.pinned or buffer.numel() > SPARE_BYTES:
            return
        base = buffer if buffer._base is None else buffer._base
        if self._spare is None or base.numel() > self._spare.numel():
            self._spare = base

    def host_rows(self, parts: Sequence[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
        """One host tensor of `dtype` (page-locked on CUDA, so that `upload` copies it without a
        stage): `parts` (host arrays, bfloat16 as int16) concatenated."""
        shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
        host = torch.empty(shape, dtype=dtype, pin_memory=self.pinned)
        np.concatenate(parts, axis=0, out=host_array(host))
        return host

    def to_host(self, tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """Host arrays of device tensors, complete when this returns."""
        if self.device.type == "cpu":
            return [host_array(tensor) for tensor in tensors]
        return [host_array(copy) for copy in self.download(tensors)]

    def mirror(self, tensor: torch.Tensor) -> torch.Tensor:
        """Keeps a device copy of a host tensor for as long as the host tensor lives (a resident
        tensor): `upload` of that very tensor then copies nothing. Returns the host tensor."""
        if self.device.type == "cpu" or id(tensor) in self._mirrors:
            return tensor
        copy = tensor.to(self.device)
        key = id(tensor)
        self._mirrors[key] = copy
        weakref.finalize(tensor, self._mirrors.pop, key, None)
        return tensor

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device: its mirror if it has one, else through page-locked memory
        (staged there unless it is already) and an asynchronous copy on CUDA (no synchronisation:
        `download` ends the batch with one)."""
        if tensor.device == self.device:
            return tensor
        mirrored = self._mirrors.get(id(tensor))
        if mirrored is not None:
            return mirrored
        if self.pinned and tensor.is_pinned():  # already staged (merged rows)
            return tensor.to(self.device, non_blocking=True)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.pinned)
        host.copy_(tensor)
        return host.to(self.device, non_blocking=self.pinned)

    def download(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Host copies of device tensors, complete when this returns: one synchronisation for all."""
        copies = []
        for tensor in tensors:
            if tensor.device.type == "cpu":
                copies.append(tensor)
                continue
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.pinned)
            host.copy_(tensor, non_blocking=self.pinned)
            copies.append(host)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return copies
