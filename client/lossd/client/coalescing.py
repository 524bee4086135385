"""Concurrent calls of one client gathered into `ComputeLossBatch` calls.

gRPC's own cost per call (about 166 us of Python and C-core on each side here) is most of a small
loss's cost. When callers (threads, or asyncio tasks) call one client at once, the coalescer keeps at
most `in_flight` RPCs going: a call that finds a free slot goes at once, alone (so a caller alone
is never delayed: there is no timer), and calls that arrive while every slot is busy wait for the
next free slot and go together, up to `max_entries` per batch. Busy clients pay the per-call cost
once per batch; idle ones pay nothing extra.

Each caller gets its own outcome, as a value (`lossd.client._core`): its response, its entry's own
error, the failure of the RPC that carried it alone, or `BatchFailed` when the batch RPC failed as a
whole (the server is draining, the connection broke, a server too old to have the method): the
caller then sends its call again alone, so retries behave exactly as for single calls. A call's
timeout is its own: a caller whose time runs out while its entry waits or travels gets
DEADLINE_EXCEEDED, as alone.

What the blocking and the asyncio coalescer share is here once (`_Queue`: which calls go next;
`_outcomes`: what each caller gets); each only waits and sends its own way.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc

from lossd.client._core import BatchFailed, RpcFailed, connection_lost
from lossd.client.diagnosis import timed_out
from lossd.v1 import loss_service_pb2 as pb
from lossd.wire import messages
from lossd.wire.errors import DeadlineExceededError, LossdError
from lossd.wire.status import from_rpc_error, from_status

__all__ = [
    "BATCH_METHOD",
    "DEFAULT_IN_FLIGHT",
    "DEFAULT_MAX_ENTRIES",
    "AsyncCoalescer",
    "Coalesced",
    "Coalescer",
]

BATCH_METHOD = "/lossd.v1.LossService/ComputeLossBatch"
COMPUTE_METHOD = "/lossd.v1.LossService/ComputeLoss"
DEFAULT_MAX_ENTRIES = 64
"""Most calls in one batch."""
DEFAULT_IN_FLIGHT = 4
"""RPCs one client keeps going before further calls wait to be batched (several, so that a client of
several replicas keeps more than one busy)."""

F = TypeVar("F")


Coalesced = pb.ComputeLossResponse | LossdError | RpcFailed | BatchFailed
"""What a coalesced call gets: see the module docstring."""


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


@dataclass(eq=False)
class _Entry(Generic[F]):
    request: pb.ComputeLossRequest
    deadline: float | None
    future: F
    sent_with: int = 0
    """How many calls its RPC carried (itself included); 0 while it waits to be sent."""


def _expired(entry: _Entry[Any], timeout: float | None) -> DeadlineExceededError:
    """The caller's timeout passed: said with what the call was doing meanwhile."""
    if entry.sent_with > 1:
        where = f" while batched with {entry.sent_with - 1} other calls in one ComputeLossBatch"
    elif entry.sent_with == 1:
        where = ""
    else:
        where = " while waiting in the client for earlier calls to be answered (coalesce_in_flight)"
    return timed_out(timeout, where)


def _deliver(
    entries: Sequence[_Entry[concurrent.futures.Future[Coalesced]]]
    | Sequence[_Entry[asyncio.Future[Coalesced]]],
    outcomes: Sequence[Coalesced],
) -> None:
    """Each caller's outcome to its future (threads' or tasks'), unless it gave up already."""
    futures: list[concurrent.futures.Future[Coalesced] | asyncio.Future[Coalesced]]
    futures = [entry.future for entry in entries]
    for future, outcome in zip(futures, outcomes, strict=True):
        if not future.done():
            future.set_result(outcome)


@dataclass
class _Queue(Generic[F]):
    """The calls waiting for a slot, and the slots taken; guarded by the coalescer's lock (sync) or
    touched from the event loop only (asyncio)."""

    max_entries: int
    in_flight: int
    pending: collections.deque[_Entry[F]] = field(default_factory=collections.deque)
    busy: int = 0
    batching: bool = True

    def take(self) -> list[_Entry[F]] | None:
        """The next calls to send, a slot taken for them; None while every slot is busy."""
        if not self.pending or self.busy >= self.in_flight:
            return None
        count = min(len(self.pending), self.max_entries if self.batching else 1)
        self.busy += 1
        return [self.pending.popleft() for _ in range(count)]


def _batch_bytes(entries: Sequence[_Entry[Any]]) -> bytes:
    """A serialized ComputeLossBatchRequest of the entries' requests."""
    pieces = []
    for entry in entries:
        data = entry.request.SerializeToString()
        pieces += [messages.varint(1 << 3 | 2), messages.varint(len(data)), data]
    return b"".join(pieces)


def _batch_deadline(entries: Sequence[_Entry[Any]]) -> float | None:
    """The batch RPC's timeout: the latest entry's (each caller enforces its own)."""
    deadlines = [entry.deadline for entry in entries]
    return None if None in deadlines else _remaining(max(d for d in deadlines if d is not None))


def _outcomes(
    entries: Sequence[_Entry[Any]], response: Any, error: grpc.RpcError | None, queue: _Queue[Any]
) -> list[Coalesced]:
    """Each entry's outcome, from the RPC's response or error."""
    if error is not None:
        if len(entries) == 1:  # the single call's own rules: resend, or its error
            failed = from_rpc_error(error)
            return [RpcFailed(failed, connection_lost(failed))]
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            queue.batching = False  # a server without ComputeLossBatch: no more batches
        return [BatchFailed() for _ in entries]
    if len(entries) == 1:
        return [response]
    results = list(response.results)
    if len(results) != len(entries):
        return [BatchFailed() for _ in entries]
    return [
        result.response if result.WhichOneof("result") == "response" else from_status(result.error)
        for result in results
    ]


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _methods(channel: grpc.Channel | grpc.aio.Channel) -> tuple[Any, Any]:
    """The single call (a ComputeLossRequest in) and the batch call (its bytes in) on `channel`."""
    single = channel.unary_unary(
        COMPUTE_METHOD,
        request_serializer=pb.ComputeLossRequest.SerializeToString,
        response_deserializer=pb.ComputeLossResponse.FromString,
    )
    batch: Any = channel.unary_unary(
        BATCH_METHOD, response_deserializer=pb.ComputeLossBatchResponse.FromString
    )
    return single, batch


class Coalescer:
    """Coalescing for a blocking client (`lossd.client.LossClient`): callers are threads."""

    def __init__(
        self,
        channel: grpc.Channel,
        metadata: tuple[tuple[str, str], ...],
        max_entries: int = DEFAULT_MAX_ENTRIES,
        in_flight: int = DEFAULT_IN_FLIGHT,
    ) -> None:
        self._metadata = metadata
        self._lock = threading.Lock()
        self._queue: _Queue[concurrent.futures.Future[Coalesced]] = _Queue(
            max(max_entries, 1), max(in_flight, 1)
        )
        self._single, self._batch = _methods(channel)

    def compute(self, request: pb.ComputeLossRequest, timeout: float | None) -> Coalesced:
        """The outcome of `request` (see `Coalesced`)."""
        entry = _Entry(request, _deadline(timeout), concurrent.futures.Future[Coalesced]())
        with self._lock:
            self._queue.pending.append(entry)
            taken = self._queue.take()
        if taken is not None:
            self._start(taken)
        try:
            return entry.future.result(timeout)
        except concurrent.futures.TimeoutError:
            with self._lock:
                if entry in self._queue.pending:
                    self._queue.pending.remove(entry)
            return _expired(entry, timeout)

    def _start(self, entries: list[_Entry[concurrent.futures.Future[Coalesced]]]) -> None:
        for entry in entries:
            entry.sent_with = len(entries)
        try:
            if len(entries) == 1:
                call = self._single.future(
                    entries[0].request, timeout=_remaining(entries[0].deadline), metadata=self._metadata
                )
            else:
                call = self._batch.future(
                    _batch_bytes(entries), timeout=_batch_deadline(entries), metadata=self._metadata
                )
        except Exception:  # the channel is closed, say: each caller learns it alone
            _deliver(entries, [BatchFailed() for _ in entries])
            self._finished()
            return
        call.add_done_callback(lambda done: self._done(entries, done))

    def _done(self, entries: list[_Entry[concurrent.futures.Future[Coalesced]]], call: Any) -> None:
        try:
            response, error = call.result(), None
        except grpc.RpcError as failed:
            response, error = None, failed
        except Exception:  # cancelled: the channel closed under it
            _deliver(entries, [BatchFailed() for _ in entries])
            self._finished()
            return
        with self._lock:
            outcomes = _outcomes(entries, response, error, self._queue)
        _deliver(entries, outcomes)
        self._finished()

    def _finished(self) -> None:
        with self._lock:
            self._queue.busy -= 1
            taken = self._queue.take()
        if taken is not None:
            self._start(taken)


class AsyncCoalescer:
    """Coalescing for an asyncio client (`lossd.client.AsyncLossClient`): callers are tasks of one
    event loop."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: tuple[tuple[str, str], ...],
        max_entries: int = DEFAULT_MAX_ENTRIES,
        in_flight: int = DEFAULT_IN_FLIGHT,
    ) -> None:
        self._metadata = metadata
        self._queue: _Queue[asyncio.Future[Coalesced]] = _Queue(max(max_entries, 1), max(in_flight, 1))
        self._single, self._batch = _methods(channel)
        self._tasks: set[asyncio.Task[None]] = set()

    async def compute(self, request: pb.ComputeLossRequest, timeout: float | None) -> Coalesced:
        """The outcome of `request` (see `Coalesced`)."""
        future: asyncio.Future[Coalesced] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)  # a caller gone (timed out, cancelled) reads it no more
        entry = _Entry(request, _deadline(timeout), future)
        self._queue.pending.append(entry)
        self._start_next()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return _expired(entry, timeout)
        finally:
            if entry in self._queue.pending:  # timed out or cancelled before it was sent
                self._queue.pending.remove(entry)

    def _start_next(self) -> None:
        taken = self._queue.take()
        if taken is not None:
            task = asyncio.ensure_future(self._run(taken))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, entries: list[_Entry[asyncio.Future[Coalesced]]]) -> None:
        for entry in entries:
            entry.sent_with = len(entries)
        outcomes: list[Coalesced]
        try:
            if len(entries) == 1:
                response = await self._single(
                    entries[0].request, timeout=_remaining(entries[0].deadline), metadata=self._metadata
                )
            else:
                response = await self._batch(
                    _batch_bytes(entries), timeout=_batch_deadline(entries), metadata=self._metadata
                )
            outcomes = _outcomes(entries, response, None, self._queue)
        except grpc.RpcError as error:
            outcomes = _outcomes(entries, None, error, self._queue)
        except Exception:  # the channel closed under it: each caller learns it alone
            outcomes = [BatchFailed() for _ in entries]
        finally:
            self._queue.busy -= 1
        _deliver(entries, outcomes)
        self._start_next()
