"""Tensors held for requests (`LossService.PutTensor`): uploaded once, named by id afterwards.

Each tenant has a space of its own (`lossd.server.tenants`): it lists, uses and deletes only what it
put, and another tenant's id answers NOT_FOUND exactly as an id that was never put (reason
RESIDENT_NOT_FOUND; there is no dedup across tenants, so neither an answer nor its timing says what
someone else holds). The id is a digest of dtype, shape and bytes (`lossd.wire.resident.content_id`),
so a tenant that uploads the same tensor twice holds it once.

The store holds at most `max_bytes` in all and each tenant at most its quota (its
`max_resident_bytes`, else its weight's share of `max_bytes`). When an upload would pass either,
the tenant's own least recently used tensors are let go (`policy="lru"`), never another's, or the
upload is refused (`policy="refuse"`, or when letting the tenant's own go cannot make the room) with
RESOURCE_EXHAUSTED and the numbers. A tensor let go while a call uses it lives until that call
ends. lossd's client answers NOT_FOUND by uploading again. Tensors the operator loads at start-up
(`share`) are read-only to the tenants named for them, outside every quota.

A tensor is checked once, when it is put (dtype and shape by the codec; NaN and infinity here,
`ResidentInfo.nonfinite`): it is immutable, so no call reads it again to check it.

Tensors are held in host memory, and the engine may keep a copy on its device while one is held
(`place`): on a GPU, a call naming a resident classifier then copies nothing up. Safe to use from
the event loop and the wire threads alike.
"""

from __future__ import annotations

import collections
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lossd.server.engine.finite import holds_nonfinite
from lossd.server.tenants import DEFAULT, Tenant
from lossd.wire.errors import NotFoundError, ResourceExhaustedError

__all__ = [
    "NO_RESIDENTS",
    "POLICIES",
    "ResidentInfo",
    "ResidentStore",
    "ResidentView",
    "finiteness",
    "load_tensor",
]

POLICIES = ("lru", "refuse")


@dataclass(frozen=True)
class ResidentInfo:
    """What the store says of one held tensor. `nonfinite`: it holds NaN or an infinity;
    `nonfinite_log`: NaN or +inf (what is not finite in log-probabilities, where -inf is 0)."""

    id: str
    dtype: int
    shape: tuple[int, ...]
    nbytes: int
    nonfinite: bool = False
    nonfinite_log: bool = False
    shared: bool = field(default=False, compare=False)


def finiteness(tensor: torch.Tensor) -> tuple[bool, bool]:
    """(`nonfinite`, `nonfinite_log`) of a tensor being put: read once, at upload (twice only when
    it holds a NaN or an infinity)."""
    if not holds_nonfinite(tensor):
        return False, False
    return True, holds_nonfinite(tensor, log_probabilities=True)


def load_tensor(path: str) -> torch.Tensor:
    """A tensor the operator shares: a `.npy` file (no pickles), or a tensor saved by `torch.save`
    (weights only); a ValueError names the file."""
    try:
        if path.endswith(".npy"):
            tensor = torch.from_numpy(np.load(path, allow_pickle=False).copy())
        else:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ValueError(f"shared tensor {path!r} cannot be loaded: {exc}") from None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"shared tensor {path!r} holds a {type(tensor).__name__}, not one tensor")
    return tensor.contiguous()


Event = Callable[[str, str, int, int, int], None]
"""Called with (tenant, event, the tenant's held bytes, held bytes, held tensors) after each
change: upload, hit, miss, eviction, delete."""


class _Space:
    """One tenant's tensors, most recently used first."""

    def __init__(self) -> None:
        self.held = 0
        self.tensors: collections.OrderedDict[str, tuple[torch.Tensor, ResidentInfo]] = (
            collections.OrderedDict()
        )


def _not_found(id: str, field: str) -> NotFoundError:
    shown = id if len(id) <= 80 else id[:80] + "..."
    return NotFoundError(
        f"{field}.resident_id {shown!r} names no tensor this server holds for you (never uploaded here, let "
        "go to make room, or deleted): upload it with PutTensor and send the call again",
        reason="RESIDENT_NOT_FOUND",
        field=f"{field}.resident_id",
        metadata={"residentId": shown},
    )


class ResidentStore:
    """Every tenant's resident tensors; `quota(tenant)` is what one may hold (default: its
    `max_resident_bytes`, else all of `max_bytes`)."""

    def __init__(
        self,
        max_bytes: int,
        policy: str = "lru",
        on_event: Event | None = None,
        place: Callable[[torch.Tensor], torch.Tensor] | None = None,
        quota: Callable[[Tenant], int] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"resident policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.max_bytes = max_bytes
        self.policy = policy
        self.held = 0
        self._count = 0
        self._on_event = on_event
        self._place = place
        self._quota = quota
        self._lock = threading.Lock()
        self._spaces: dict[str, _Space] = {}
        self._shared: dict[str, tuple[torch.Tensor, ResidentInfo, frozenset[str]]] = {}

    def quota(self, tenant: Tenant) -> int:
        """The most `tenant`'s tensors may hold."""
        if self._quota is not None:
            return min(self._quota(tenant), self.max_bytes)
        if tenant.max_resident_bytes is not None:
            return min(tenant.max_resident_bytes, self.max_bytes)
        return self.max_bytes

    def view(self, tenant: Tenant) -> ResidentView:
        """The store as `tenant` sees it."""
        return ResidentView(self, tenant)

    def held_by(self, tenant: str) -> int:
        with self._lock:
            space = self._spaces.get(tenant)
            return space.held if space is not None else 0

    def _event(self, tenant: str, event: str) -> None:
        if self._on_event is not None:
            space = self._spaces.get(tenant)
            self._on_event(tenant, event, space.held if space else 0, self.held, self._count)

    def get(self, tenant: Tenant, id: str, field: str) -> tuple[torch.Tensor, ResidentInfo]:
        """`tenant`'s tensor `id` (now its most recently used), or an operator's tensor shared with
        it; else NOT_FOUND naming `field`."""
        with self._lock:
            space = self._spaces.get(tenant.name)
            found = space.tensors.get(id) if space is not None else None
            if found is not None:
                assert space is not None
                space.tensors.move_to_end(id, last=False)
            else:
                shared = self._shared.get(id)
                if shared is not None and tenant.name in shared[2]:
                    found = shared[0], shared[1]
            self._event(tenant.name, "hit" if found is not None else "miss")
        if found is None:
            raise _not_found(id, field)
        return found

    def room(self, tenant: Tenant, nbytes: int) -> None:
        """Refuses, before it is received, an upload that could never be held."""
        quota = self.quota(tenant)
        if nbytes > quota:
            raise ResourceExhaustedError(
                f"the tensor holds {nbytes} bytes, more than tenant {tenant.name!r} may hold on this server "
                f"altogether ({quota} bytes; --max-resident-bytes {self.max_bytes}, the tenant's "
                "max_resident_bytes or its weight's share)",
                reason="RESIDENT_TOO_LARGE",
                field="header",
                metadata={
                    "bytes": str(nbytes),
                    "quotaBytes": str(quota),
                    "maxResidentBytes": str(self.max_bytes),
                },
            )

    def placed(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as it will be held, its device copy made (`place`). May copy a gigabyte: call it
        off the event loop."""
        return tensor if self._place is None else self._place(tensor)

    def put(self, tenant: Tenant, tensor: torch.Tensor, info: ResidentInfo) -> ResidentInfo:
        """Holds `tensor` as `info.id` for `tenant` (already held: nothing changes), making room
        among its own tensors by policy."""
        self.room(tenant, info.nbytes)
        quota = self.quota(tenant)
        with self._lock:
            space = self._spaces.setdefault(tenant.name, _Space())
            if info.id in space.tensors:
                space.tensors.move_to_end(info.id, last=False)
                return space.tensors[info.id][1]

            def over() -> bool:
                return space.held + info.nbytes > quota or self.held + info.nbytes > self.max_bytes

            others = self.held - space.held
            if over() and (self.policy == "refuse" or others + info.nbytes > self.max_bytes):
                full = others + info.nbytes > self.max_bytes or self.held + info.nbytes > self.max_bytes
                raise ResourceExhaustedError(
                    f"tenant {tenant.name!r} holds {space.held} bytes of tensors (its quota: {quota}) and "
                    f"this server {self.held} (--max-resident-bytes {self.max_bytes}); {info.nbytes} more "
                    "do not fit"
                    + ("" if self.policy == "refuse" else " even if all of its own were let go")
                    + ": delete some (DeleteTensor) or retry later",
                    reason="RESIDENT_FULL",
                    retry_after=1.0,
                    metadata={
                        "tenant": tenant.name,
                        "tenantHeldBytes": str(space.held),
                        "quotaBytes": str(quota),
                        "heldBytes": str(self.held),
                        "maxResidentBytes": str(self.max_bytes),
                        "full": "server" if full else "tenant",
                    },
                )
            while over():
                _, (_, old) = space.tensors.popitem(last=True)
                space.held -= old.nbytes
                self.held -= old.nbytes
                self._count -= 1
                self._event(tenant.name, "eviction")
            space.tensors[info.id] = (tensor, info)
            space.tensors.move_to_end(info.id, last=False)
            space.held += info.nbytes
            self.held += info.nbytes
            self._count += 1
            self._event(tenant.name, "upload")
        return info

    def share(self, tensor: torch.Tensor, info: ResidentInfo, tenants: frozenset[str]) -> ResidentInfo:
        """Holds an operator's tensor, read-only to `tenants`, outside every quota."""
        shared = ResidentInfo(
            info.id, info.dtype, info.shape, info.nbytes, info.nonfinite, info.nonfinite_log, shared=True
        )
        with self._lock:
            self._shared[info.id] = (tensor, shared, tenants)
        return shared

    def delete(self, tenant: Tenant, id: str) -> bool:
        """Lets go of `tenant`'s tensor `id`; False when it holds none by that id (an operator's
        shared tensor is not its to delete)."""
        with self._lock:
            space = self._spaces.get(tenant.name)
            found = space.tensors.pop(id, None) if space is not None else None
            if found is not None:
                assert space is not None
                space.held -= found[1].nbytes
                self.held -= found[1].nbytes
                self._count -= 1
                self._event(tenant.name, "delete")
        return found is not None

    def list(self, tenant: Tenant) -> list[ResidentInfo]:
        """`tenant`'s tensors, most recently used first, then those shared with it."""
        with self._lock:
            space = self._spaces.get(tenant.name)
            own = [info for _, info in space.tensors.values()] if space is not None else []
            return own + [info for _, info, readers in self._shared.values() if tenant.name in readers]


class ResidentView:
    """The store as one tenant sees it: what the decoding of its requests looks ids up in."""

    def __init__(self, store: ResidentStore, tenant: Tenant) -> None:
        self.store = store
        self.tenant = tenant

    def get(self, id: str, field: str) -> tuple[torch.Tensor, ResidentInfo]:
        return self.store.get(self.tenant, id, field)


NO_RESIDENTS = ResidentView(ResidentStore(0), Tenant(DEFAULT))
"""A view that holds nothing (decoding without a server)."""
