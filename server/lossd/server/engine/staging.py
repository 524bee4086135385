"""Host arrays in and out of the device: numpy views of host tensors, and `Staging`, which moves
concatenated rows to the device and results back (page-locked memory and one synchronisation per
batch on CUDA)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

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
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def recycle(self, buffer: torch.Tensor) -> None:
        """Offers a buffer from `host_buffer` back once nothing refers to its contents any more."""
        if self.pinned or buffer.numel() > SPARE_BYTES:
            return
        base = buffer if buffer._base is None else buffer._base
        if self._spare is None or base.numel() > self._spare.numel():
            self._spare = base

    def to_device(self, parts: Sequence[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
        """One device tensor of `dtype`: `parts` (host arrays, bfloat16 as int16) concatenated."""
        shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
        host = torch.empty(shape, dtype=dtype, pin_memory=self.pinned)
        np.concatenate(parts, axis=0, out=host_array(host))
        return host if self.device.type == "cpu" else host.to(self.device, non_blocking=self.pinned)

    def to_host(self, tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """Host arrays of device tensors, complete when this returns."""
        if self.device.type == "cpu":
            return [host_array(tensor) for tensor in tensors]
        copies = []
        for tensor in tensors:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.pinned)
            host.copy_(tensor, non_blocking=self.pinned)
            copies.append(host)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return [host_array(copy) for copy in copies]
