"""One memory budget for everything the server holds on behalf of calls it has not answered.

A call reserves before it takes: the largest message it may receive before reading one, then its
tensors, the computation's temporaries (estimated from the shapes) and its answer until the client
has read it. What no call can reserve is refused at once with `RESOURCE_EXHAUSTED`; what does not
fit now waits until its deadline or the admission wait, then is refused with a `RetryInfo`.

Fairness: one client connection (a peer) may hold at most `peer_share` of the budget, and waiting
calls are served clients holding least first, then oldest first. When a call waits, calls still
*receiving* (their bytes not all in, so nothing is lost but a transfer) of a peer holding more than
its fair share (the budget over the peers holding or waiting) are evicted, oldest first, and what
they held goes to the waiting call: a client that opens calls and stalls cannot keep others out.

The event loop is the only user; no locks. Knows nothing of gRPC or torch.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import functools
import itertools
import time
from collections.abc import Callable

from lossd.server.admission import Account
from lossd.wire.errors import ResourceExhaustedError

__all__ = ["TRIM_AFTER_BYTES", "MemoryBudget", "Reservation", "return_freed_memory"]

TRIM_AFTER_BYTES = 256 << 20
"""Once calls that held at least this much have all ended, the freed heap goes back to the system."""


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        return None


def return_freed_memory() -> None:
    """Hands the heap's free pages back to the system (glibc keeps them for reuse otherwise: the
    process's RSS would stay at its peak). Takes milliseconds: call it off the event loop."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Reservation:
    """The bytes one call holds; `receiving` while its request is still arriving (evictable)."""

    _ids = itertools.count()

    def __init__(
        self, budget: MemoryBudget, peer: str, on_evict: Callable[[ResourceExhaustedError], None]
    ) -> None:
        self.budget = budget
        self.peer = peer
        self.held = 0
        self.receiving = True
        self.evicted: ResourceExhaustedError | None = None
        self.account: Account | None = None
        """The tenant whose `max_inflight_bytes` this reservation counts against (None: no tenant)."""
        self._on_evict = on_evict
        self.order = next(self._ids)

    async def grow_to(self, nbytes: int, deadline: float | None = None, what: str = "this call") -> None:
        """Holds at least `nbytes` in all (waiting at most until `deadline`, a monotonic instant)."""
        if nbytes > self.held:
            await self.budget._take(self, nbytes - self.held, deadline, what)

    def shrink_to(self, nbytes: int) -> None:
        """Gives back what is held beyond `nbytes`."""
        if nbytes < self.held:
            self.budget._give(self, self.held - nbytes)

    def close(self) -> None:
        """Gives everything back (idempotent)."""
        self.shrink_to(0)
        self.budget._forget(self)

    def cause(self, error: BaseException) -> BaseException:
        """`error`, or the eviction behind it when the eviction cancelled the call's task (which is
        then uncancelled, so that the call can answer with the eviction)."""
        if isinstance(error, asyncio.CancelledError) and self.evicted is not None:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return self.evicted
        return error

    def evict(self, error: ResourceExhaustedError) -> None:
        self.evicted = error
        self.close()
        self._on_evict(error)


class MemoryBudget:
    """`limit` bytes shared by every call; see the module docstring. `admission_wait_s` bounds how
    long a call waits for memory (its own deadline may be shorter)."""

    def __init__(self, limit: int, *, peer_share: float = 0.5, admission_wait_s: float = 5.0) -> None:
        self.limit = limit
        self.peer_limit = max(1, int(limit * peer_share))
        self.admission_wait_s = admission_wait_s
        self.held = 0
        self.peak = 0
        self.peak_since_idle = 0
        """The most held since the budget was last empty (`idle`)."""
        self.evictions = 0
        self._evicting = False
        self._by_peer: collections.Counter[str] = collections.Counter()
        self._open: dict[int, Reservation] = {}
        self._waiting: collections.deque[tuple[Reservation, int, asyncio.Future[None]]] = collections.deque()

    def open(self, peer: str, on_evict: Callable[[ResourceExhaustedError], None]) -> Reservation:
        """A new, empty reservation for one call from `peer`."""
        reservation = Reservation(self, peer, on_evict)
        self._open[reservation.order] = reservation
        return reservation

    def open_for_task(self, peer: str) -> Reservation:
        """A reservation for the running task's call; evicting it cancels that task (see
        `Reservation.cause`)."""
        task = asyncio.current_task()
        assert task is not None, "called from the call's task"

        def cancel(_: ResourceExhaustedError) -> None:
            task.cancel()

        return self.open(peer, cancel)

    def _fits(self, reservation: Reservation, nbytes: int) -> bool:
        return (
            self.held + nbytes <= self.limit and self._by_peer[reservation.peer] + nbytes <= self.peer_limit
        )

    def _refusal(
        self, reservation: Reservation, nbytes: int, what: str, waited: bool
    ) -> ResourceExhaustedError:
        alone = reservation.held + nbytes > self.peer_limit
        if alone:
            message = (
                f"{what} needs {reservation.held + nbytes} bytes of server memory; one client may hold at "
                f"most {self.peer_limit} of the server's {self.limit} (max_memory_bytes): send less per call"
            )
        else:
            message = (
                f"{what} needs {nbytes} more bytes of server memory; calls under way hold {self.held} of "
                f"the server's {self.limit} (max_memory_bytes)"
                + (" and none was freed in time" if waited else "")
                + "; retry later or elsewhere"
            )
        return ResourceExhaustedError(
            message,
            reason="MEMORY_EXHAUSTED",
            metadata={
                "requestBytes": str(reservation.held + nbytes),
                "heldBytes": str(self.held),
                "maxMemoryBytes": str(self.limit),
                "maxClientBytes": str(self.peer_limit),
            },
            retry_after=None if alone else 1.0,
        )

    async def _take(self, reservation: Reservation, nbytes: int, deadline: float | None, what: str) -> None:
        if reservation.evicted is not None:
            raise reservation.evicted
        if reservation.account is not None:
            reservation.account.check_bytes(nbytes)
        if reservation.held + nbytes > self.peer_limit:
            raise self._refusal(reservation, nbytes, what, waited=False)
        if not self._ahead(reservation) and self._fits(reservation, nbytes):
            self._add(reservation, nbytes)
            return
        self._evicting = True  # what evictions free goes to this call, not to the hog's waiters
        try:
            self._evict_for(reservation, nbytes)
        finally:
            self._evicting = False
        if not self._ahead(reservation) and self._fits(reservation, nbytes):
            self._add(reservation, nbytes)
            self._wake()
            return
        self._wake()
        limit = time.monotonic() + self.admission_wait_s
        deadline = limit if deadline is None else min(deadline, limit)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (reservation, nbytes, future)
        self._waiting.append(entry)
        try:
            async with asyncio.timeout_at(
                asyncio.get_running_loop().time() + max(deadline - time.monotonic(), 0)
            ):
                await future
        except TimeoutError:
            raise self._refusal(reservation, nbytes, what, waited=True) from None
        finally:
            if not future.done():
                future.cancel()
            if entry in self._waiting:
                self._waiting.remove(entry)
        if reservation.evicted is not None:
            raise reservation.evicted

    def _add(self, reservation: Reservation, nbytes: int) -> None:
        reservation.held += nbytes
        if reservation.account is not None:
            reservation.account.inflight_bytes += nbytes
        self._by_peer[reservation.peer] += nbytes
        self.held += nbytes
        self.peak = max(self.peak, self.held)
        self.peak_since_idle = max(self.peak_since_idle, self.held)

    def _give(self, reservation: Reservation, nbytes: int) -> None:
        reservation.held -= nbytes
        if reservation.account is not None:
            reservation.account.inflight_bytes -= nbytes
        self._by_peer[reservation.peer] -= nbytes
        if self._by_peer[reservation.peer] <= 0:
            del self._by_peer[reservation.peer]
        self.held -= nbytes
        self._wake()

    def idle(self) -> bool:
        """True once, when nothing is held after at least `TRIM_AFTER_BYTES` was: the moment to
        give the freed heap back (`return_freed_memory`)."""
        if self.held or self.peak_since_idle < TRIM_AFTER_BYTES:
            return False
        self.peak_since_idle = 0
        return True

    def _forget(self, reservation: Reservation) -> None:
        self._open.pop(reservation.order, None)
        for entry in list(self._waiting):
            if entry[0] is reservation:
                self._waiting.remove(entry)
                if not entry[2].done() and reservation.evicted is not None:
                    entry[2].set_exception(reservation.evicted)
        self._wake()

    def _eligible(self) -> list[tuple[int, int, tuple[Reservation, int, asyncio.Future[None]]]]:
        """Waiting calls held back by the shared limit (not just their own client's share), in the
        order they are served: clients holding least first, then oldest first."""
        eligible = []
        for index, entry in enumerate(self._waiting):
            reservation, nbytes, future = entry
            if not future.done() and self._by_peer[reservation.peer] + nbytes <= self.peer_limit:
                eligible.append((self._by_peer[reservation.peer], index, entry))
        eligible.sort(key=lambda item: item[:2])
        return eligible

    def _ahead(self, reservation: Reservation) -> bool:
        """Whether a waiting call goes before a newcomer: one whose client holds no more than the
        newcomer's. A client holding much cannot keep a light one waiting behind its own calls."""
        mine = self._by_peer[reservation.peer]
        return any(held <= mine for held, _, _ in self._eligible())

    def _wake(self) -> None:
        """Grants waiting calls while the first in order (clients holding least first, then oldest)
        fits; a call held back only by its own client's share waits for that client alone."""
        if self._evicting:
            return
        while True:
            eligible = self._eligible()
            if not eligible:
                break
            _, _, entry = eligible[0]
            reservation, nbytes, future = entry
            if self.held + nbytes > self.limit:
                # The first in line may evict calls still arriving from clients over their share.
                self._evicting = True
                try:
                    self._evict_for(reservation, nbytes)
                finally:
                    self._evicting = False
                if future.done() or self.held + nbytes > self.limit:
                    break
            self._waiting.remove(entry)
            self._add(reservation, nbytes)
            future.set_result(None)
        for entry in list(self._waiting):
            if entry[2].done():
                self._waiting.remove(entry)

    def _evict_for(self, waiter: Reservation, nbytes: int) -> None:
        """Frees room for `waiter` by evicting calls still receiving from peers above their fair
        share (never the waiter's own peer), oldest first."""
        peers = set(self._by_peer) | {waiter.peer} | {entry[0].peer for entry in self._waiting}
        fair = self.limit // max(len(peers), 1)
        candidates = sorted(
            (
                r
                for r in self._open.values()
                if r.receiving and r.held and r.peer != waiter.peer and self._by_peer[r.peer] > fair
            ),
            key=lambda r: (-self._by_peer[r.peer], r.order),
        )
        for victim in candidates:
            if self._fits(waiter, nbytes):
                return
            if self._by_peer[victim.peer] <= fair:
                continue
            self.evictions += 1
            victim.evict(
                ResourceExhaustedError(
                    "this call was still arriving when its connection held more than its share of the "
                    f"server's memory ({self._by_peer[victim.peer]} of {self.limit} bytes, "
                    f"{len(peers)} clients) while others waited; retry it",
                    reason="MEMORY_EXHAUSTED",
                    metadata={
                        "heldBytes": str(self._by_peer[victim.peer]),
                        "maxMemoryBytes": str(self.limit),
                    },
                    retry_after=1.0,
                )
            )
