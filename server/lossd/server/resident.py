"""Tensors held for requests (`LossService.PutTensor`): uploaded once, named by id afterwards.

The id is a digest of dtype, shape and bytes (`lossd.wire.resident.content_id`), so the same tensor
is held once whoever uploads it. The store holds at most `max_bytes`; when an upload would pass that,
the least recently used tensors are let go (`policy="lru"`), or the upload is refused
(`policy="refuse"`). A tensor let go while a call uses it lives until that call ends. A request naming
an id the store does not hold fails with NOT_FOUND (reason RESIDENT_NOT_FOUND), which lossd's client
answers by uploading again: replicas, workers and restarted servers each fill their own store.

Tensors are held in host memory, and the engine may keep a copy on its device while one is held
(`place`): on a GPU, a call naming a resident classifier then copies nothing up. Safe to use from
the event loop and the wire threads alike.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lossd.wire.errors import NotFoundError, ResourceExhaustedError

__all__ = ["POLICIES", "ResidentInfo", "ResidentStore"]

POLICIES = ("lru", "refuse")


@dataclass(frozen=True)
class ResidentInfo:
    """What the store says of one held tensor."""

    id: str
    dtype: int
    shape: tuple[int, ...]
    nbytes: int


Event = Callable[[str, int, int], None]
"""Called with (event, held bytes, held tensors) after each change: upload, hit, miss, eviction,
delete."""


class ResidentStore:
    def __init__(
        self,
        max_bytes: int,
        policy: str = "lru",
        on_event: Event | None = None,
        place: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"resident policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.max_bytes = max_bytes
        self.policy = policy
        self.held = 0
        self._on_event = on_event
        self._place = place
        self._lock = threading.Lock()
        self._tensors: collections.OrderedDict[str, tuple[torch.Tensor, ResidentInfo]] = (
            collections.OrderedDict()
        )

    def _event(self, event: str) -> None:
        if self._on_event is not None:
            self._on_event(event, self.held, len(self._tensors))

    def get(self, id: str, field: str) -> tuple[torch.Tensor, ResidentInfo]:
        """The held tensor `id` (now the most recently used), or NOT_FOUND naming `field`."""
        with self._lock:
            found = self._tensors.get(id)
            if found is not None:
                self._tensors.move_to_end(id, last=False)
            self._event("hit" if found is not None else "miss")
        if found is None:
            shown = id if len(id) <= 80 else id[:80] + "..."
            raise NotFoundError(
                f"{field}.resident_id {shown!r} names no tensor this server holds (never uploaded here, "
                "let go to make room, or deleted): upload it with PutTensor and send the call again",
                reason="RESIDENT_NOT_FOUND",
                field=f"{field}.resident_id",
                metadata={"residentId": shown},
            )
        return found

    def room(self, nbytes: int) -> None:
        """Refuses, before it is received, an upload that could never be held."""
        if nbytes > self.max_bytes:
            raise ResourceExhaustedError(
                f"the tensor holds {nbytes} bytes, more than this server holds for requests altogether "
                f"({self.max_bytes} bytes, --max-resident-bytes)",
                reason="RESIDENT_TOO_LARGE",
                field="header",
                metadata={"bytes": str(nbytes), "maxResidentBytes": str(self.max_bytes)},
            )

    def placed(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as it will be held, its device copy made (`place`). May copy a gigabyte: call it
        off the event loop."""
        return tensor if self._place is None else self._place(tensor)

    def put(self, tensor: torch.Tensor, info: ResidentInfo) -> ResidentInfo:
        """Holds `tensor` as `info.id` (already held: nothing changes), making room by policy."""
        self.room(info.nbytes)
        with self._lock:
            if info.id in self._tensors:
                self._tensors.move_to_end(info.id, last=False)
                return self._tensors[info.id][1]
            if self.held + info.nbytes > self.max_bytes and self.policy == "refuse":
                raise ResourceExhaustedError(
                    f"this server holds {self.held} bytes of tensors and {info.nbytes} more would pass "
                    f"--max-resident-bytes ({self.max_bytes}); delete some (DeleteTensor) or retry later",
                    reason="RESIDENT_FULL",
                    retry_after=1.0,
                    metadata={"heldBytes": str(self.held), "maxResidentBytes": str(self.max_bytes)},
                )
            while self.held + info.nbytes > self.max_bytes:
                _, (_, old) = self._tensors.popitem(last=True)
                self.held -= old.nbytes
                self._event("eviction")
            self._tensors[info.id] = (tensor, info)
            self._tensors.move_to_end(info.id, last=False)
            self.held += info.nbytes
            self._event("upload")
        return info

    def delete(self, id: str) -> bool:
        with self._lock:
            found = self._tensors.pop(id, None)
            if found is not None:
                self.held -= found[1].nbytes
                self._event("delete")
        return found is not None

    def list(self) -> list[ResidentInfo]:
        """Most recently used first."""
        with self._lock:
            return [info for _, info in self._tensors.values()]
