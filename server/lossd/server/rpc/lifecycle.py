"""The one lifecycle every RPC of lossd goes through: identity, admission, budget, read, deadline,
cost, fair queueing, compute, answer, metrics, failure. ComputeLoss, StreamLoss, ComputeLossBatch,
the resident-tensor methods and the Open Inference Protocol's ModelInfer each give only what they do
between reading and answering; `Lifecycle.serve` does the rest, once.

Every method reads and writes raw messages through a streaming handler, unary ones included (on the
wire a unary call is a stream of one message each way): lossd's code runs before gRPC reads a
request's message, so that memory is reserved (`lossd.server.memory`) before it is taken, a client
that stalls mid-message is cut off after `idle_timeout_s`, and every call the server saw is counted.
Decoding and encoding of large messages run on a wire thread, never on the event loop.

Each call is its tenant's (`lossd.server.tenants`), identified before anything is read; the tenant's
limits admit it (`lossd.server.admission`), its memory counts against the tenant's, its estimated
cost is checked and charged before it is queued, and the fair queue serves it by its tenant's
weight. A call the client cancelled is counted and logged once, at INFO, without a traceback.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from lossd.server.admission import Account, Admission
from lossd.server.batcher import Batcher
from lossd.server.engine import LossEngine
from lossd.server.engine.faults import is_out_of_memory
from lossd.server.losses import LossCall, LossOutput
from lossd.server.memory import MemoryBudget, return_freed_memory
from lossd.server.metrics import ServerMetrics
from lossd.server.resident import ResidentStore, ResidentView
from lossd.server.rpc.auth import Authenticator
from lossd.server.rpc.status import abort
from lossd.server.tenants import DEFAULT, UNAUTHENTICATED, Tenant
from lossd.wire import chunks, codec
from lossd.wire.errors import CancelledError as ClientGoneError
from lossd.wire.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LossdError,
    ResourceExhaustedError,
)

__all__ = ["MESSAGE_OVERHEAD", "WIRE_INLINE_BYTES", "Call", "Context", "Lifecycle"]

_NO_TENANT = Tenant(UNAUTHENTICATED)
"""A call's tenant until it is identified (what its metrics say if it never is)."""

_LOGGER = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[object, object]
T = TypeVar("T")

WIRE_INLINE_BYTES = 256 * 1024
"""Messages up to this size are decoded and encoded on the event loop (a thread hop costs more);
larger ones on the wire thread."""
MESSAGE_OVERHEAD = 64 * 1024
"""Room for a response's protobuf framing besides its tensors' bytes."""

UNKNOWN_LOSS = "unknown"
"""The `loss` label of a loss call that ended before its loss was read: cancelled, timed out or
refused before its message (or stream header) was parsed, or a request that names no loss."""

EARLY_END_S = 0.1
"""How long a call whose messages ended too soon waits before it is refused as malformed: a
client's cancel reaches the handler as an early end first and as its cancellation a moment later,
and a cancelled call is counted CANCELLED, not INVALID_ARGUMENT."""


class Call:
    """One RPC in progress: its context, memory reservation, deadline, bytes both ways, and what its
    metrics say of it (`label`: the loss, or the method; `nonfinite`; `implementation`)."""

    def __init__(
        self, lifecycle: Lifecycle, requests: AsyncIterator[bytes], context: Context, label: str
    ) -> None:
        self.lifecycle = lifecycle
        self.context = context
        self.label = label
        self.started = time.perf_counter()
        self.reservation = lifecycle.budget.open_for_task(context.peer() or "unknown")
        self.deadline = lifecycle.deadline(context, self.started)
        self.messages = lifecycle.messages(requests)
        self.received = 0
        self.sent = 0
        self.nonfinite: tuple[str, ...] = ()
        self.implementation = ""
        self.tenant = _NO_TENANT
        self.account: Account | None = None
        self._cleanups: list[Callable[[], Awaitable[None]]] = []

    @property
    def resident(self) -> ResidentView:
        """The resident tensors as this call's tenant sees them."""
        return self.lifecycle.resident.view(self.tenant)

    def admit(self, calls: Sequence[LossCall[Any]]) -> list[float]:
        """Checks the estimated cost of prepared loss calls (this call's, or a batch's entries)
        against the server's limit per call and charges it to the tenant's cost rate, before
        anything is computed; refuses with RESOURCE_EXHAUSTED. Each call's estimate, for the queue."""
        engine = self.lifecycle.engine
        admission = self.lifecycle.admission
        works = [engine.work(prepared) for prepared in calls]
        for work in works:
            admission.check_cost(work)
        if self.account is not None:
            total = sum(works)
            self.account.spend(total)
            self.account.cost += total
        return works

    async def submit(
        self, prepared: LossCall[Any], *, waits: bool = True, work: float | None = None
    ) -> LossOutput:
        """Queues a prepared call in the fair queue as this call's tenant's (its estimated `work`
        from `admit`, if known), and awaits it."""
        return await self.lifecycle.batcher.submit(
            prepared,
            self.deadline,
            waits=waits,
            tenant=self.tenant.name,
            weight=self.tenant.weight,
            work=work,
        )

    async def first(self, what: str = "receiving this call's message", *, last: bool = True) -> bytes:
        """The call's first message, read once its reservation holds room for the largest message a
        client may send (what gRPC buffers for it is admitted first); `last`: the call sends no
        other (it can no longer be evicted as one still arriving)."""
        await self.reservation.grow_to(self.lifecycle.max_message_bytes, self.deadline, what)
        raw = await self.lifecycle.first_message(self.messages)
        self.received += len(raw)
        if last:
            self.reservation.receiving = False
        return raw

    async def write(self, data: bytes) -> None:
        """Sends one message of the answer."""
        self.sent += len(data)
        await self.lifecycle.write(self.context, data)

    def on_failure(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        """Runs `cleanup` if the call fails, before its memory is given back and the client hears."""
        self._cleanups.append(cleanup)

    async def _clean_up(self) -> None:
        for cleanup in reversed(self._cleanups):
            await cleanup()


class Lifecycle:
    """What every call of the server shares: the engine behind its batcher, the limits, the memory
    budget, the metrics, the resident tensors, the wire thread and the server's state.

    `max_request_s` (0: none) bounds each call's whole time in the server, `idle_timeout_s` (0:
    none) each wait for a client's next message or for it to read an answer; `max_message_bytes` is
    gRPC's message limit (each call reserves that much before its message is read). `active` counts
    calls in progress, `answered` the finished ones by status code, and `cut_off` those cancelled
    by the end of a drain's grace period (the drain report); once `fail()` is called, every call
    still reading or arriving fails with that error.
    """

    def __init__(
        self,
        engine: LossEngine,
        batcher: Batcher[LossCall[Any], LossOutput],
        limits: codec.TensorLimits,
        metrics: ServerMetrics,
        *,
        chunk_bytes: int = chunks.DEFAULT_CHUNK_BYTES,
        max_request_s: float = 0.0,
        idle_timeout_s: float = 0.0,
        budget: MemoryBudget | None = None,
        max_message_bytes: int = 2**31 - 1,
        wire: Executor | None = None,
        resident: ResidentStore | None = None,
        auth: Authenticator | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.engine = engine
        self.batcher = batcher
        self.limits = limits
        self.metrics = metrics
        self.resident = resident if resident is not None else ResidentStore(0)
        self.auth = auth
        self.admission = admission if admission is not None else Admission()
        # An answer chunk and its framing fit in one message.
        self.chunk_bytes = max(min(chunk_bytes, max_message_bytes - MESSAGE_OVERHEAD), 4096)
        self.max_request_s = max_request_s
        self.idle_timeout_s = idle_timeout_s
        self.budget = budget if budget is not None else MemoryBudget(2**62)
        self.max_message_bytes = max_message_bytes
        self._wire_executor = wire
        self._failure: LossdError | None = None
        self.active = 0
        self.answered: collections.Counter[str] = collections.Counter()
        self.cut_off = 0
        self.grace_ends: float | None = None

    # -- the server's state ----------------------------------------------------------------------

    def fail(self, error: LossdError) -> None:
        """From now on every call fails with `error` (the device is gone)."""
        self._failure = error

    @property
    def failed(self) -> bool:
        """Whether the device failed (every call is refused)."""
        return self._failure is not None

    def check_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    # -- one call --------------------------------------------------------------------------------

    async def serve(
        self,
        requests: AsyncIterator[bytes],
        context: Context,
        label: str,
        handle: Callable[[Call], Awaitable[None]],
    ) -> None:
        """One call from start to end: counted, held to the server's time limit, `handle`d, its
        memory given back, its metrics recorded, and a failure answered with its status."""
        self.active += 1
        self.metrics.in_flight.inc()
        for key, _ in context.invocation_metadata() or ():
            if key == "grpc-previous-rpc-attempts":  # gRPC's retry policy sent this call again
                self.metrics.retried_requests.inc()
        call = Call(self, requests, context, label)
        try:
            async with asyncio.timeout(self.max_request_s or None):
                self.check_failure()
                call.tenant = self.identify(context)
                call.account = self.admission.enter(call.tenant)
                call.reservation.account = call.account
                await handle(call)
        except BaseException as error:
            # The traceback's frames hold the call's buffers; they must go now, not whenever the
            # error object does.
            traceback.clear_frames(error.__traceback__)
            await call._clean_up()
            self._leave(call)  # before the client hears: a retry must find the memory free
            cause = call.reservation.cause(error)
            if await self._fail(cause, call) and not isinstance(cause, asyncio.CancelledError):
                return  # a client that went away: counted and logged, nothing to raise
            raise
        self._leave(call)
        self.metrics.nonfinite(call.label, call.nonfinite)
        self.metrics.implementation_call(call.label, call.implementation)
        self._finish(call, "OK")

    def identify(self, context: Context) -> Tenant:
        """The call's tenant (the default one on a server without credentials)."""
        if self.auth is None:
            return _DEFAULT_TENANT
        return self.auth.identify(context)

    def _leave(self, call: Call) -> None:
        """Gives back what the call held: its memory and its place among its tenant's calls; once
        the budget is empty after a large peak, the freed heap goes back to the system."""
        call.reservation.close()
        if self.budget.idle() and self._wire_executor is not None:
            asyncio.get_running_loop().run_in_executor(self._wire_executor, return_freed_memory)
        if call.account is not None:
            self.admission.leave(call.account)
            call.account = None

    def report_tenants(self) -> None:
        """Sets the tenants' gauges (calls in progress, memory reserved) and adds the cost admitted
        since the last report."""
        for account in self.admission.accounts.values():
            cost, account.cost = account.cost, 0.0
            self.metrics.tenant_holding(account.name, account.calls, account.inflight_bytes, cost)

    def deadline(self, context: Context, started: float) -> float | None:
        """The call's deadline as a `time.monotonic()` instant: the caller's or the server's limit."""
        remaining = context.time_remaining()
        now = time.monotonic()
        deadline = now + remaining if remaining is not None else None
        if self.max_request_s:
            limit = now + self.max_request_s - (time.perf_counter() - started)
            deadline = limit if deadline is None else min(deadline, limit)
        return deadline

    async def wire(self, nbytes: int, work: Callable[[], T]) -> T:
        """Runs decoding or encoding work on `nbytes`: inline when small, else on the wire thread."""
        if nbytes <= WIRE_INLINE_BYTES or self._wire_executor is None:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._wire_executor, work)

    async def _idle(self, waiting: Awaitable[T], what: str) -> T:
        """Awaits a client (its next message, or room for our answer) at most `idle_timeout_s`."""
        if not self.idle_timeout_s:
            return await waiting
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                return await waiting
        except TimeoutError:
            raise DeadlineExceededError(
                f"the client sent nothing for {self.idle_timeout_s:g} s while lossd waited for {what} "
                "(idle_timeout_s)",
                reason="IDLE_TIMEOUT",
                metadata={"idleTimeoutSeconds": f"{self.idle_timeout_s:g}"},
            ) from None

    async def messages(self, requests: AsyncIterator[bytes], *, failing: bool = True) -> AsyncIterator[bytes]:
        """A call's messages, each awaited at most `idle_timeout_s`; with `failing`, cut short once
        the server failed."""
        iterator = requests.__aiter__()
        while True:
            try:
                message = await self._idle(iterator.__anext__(), "the call's next message")
            except StopAsyncIteration:
                return
            if failing:
                self.check_failure()
            yield message

    async def ended_early(self) -> None:
        """Waits `EARLY_END_S` before a call whose messages ended too soon is refused: when its
        client cancelled it, the cancellation arrives meanwhile (and ends the wait)."""
        await asyncio.sleep(EARLY_END_S)

    async def first_message(self, messages: AsyncIterator[bytes]) -> bytes:
        """A whole-message call's request (from `messages`)."""
        try:
            return await messages.__anext__()
        except StopAsyncIteration:
            await self.ended_early()
            raise InvalidArgumentError(
                "the call ended without a request message", reason="REQUEST_MALFORMED"
            ) from None

    async def write(self, context: Context, message: bytes) -> None:
        """Sends one message, waiting at most `idle_timeout_s` for the client to make room."""
        try:
            await self._idle(context.write(message), "the client to read its answer")
        except (LossdError, asyncio.CancelledError):
            raise
        except Exception:  # gRPC could not send: the call was cancelled or its connection is gone
            raise ClientGoneError(
                "the call ended while its answer was being sent", reason="CLIENT_GONE"
            ) from None

    def check_answer(self, call: LossCall[Any]) -> int:
        """A prepared call's answer size; refused before computing when no message could carry it."""
        answer = self.engine.answer_bytes(call)
        if answer + MESSAGE_OVERHEAD > self.max_message_bytes:
            raise ResourceExhaustedError(
                f"the answer would hold {answer} bytes of tensors, more than one message may carry "
                f"({self.max_message_bytes} bytes, max_message_bytes): call StreamLoss instead "
                "(lossd's Python client does so by itself)",
                reason="RESPONSE_TOO_LARGE",
                metadata={"answerBytes": str(answer), "maxMessageBytes": str(self.max_message_bytes)},
            )
        return answer

    # -- endings ---------------------------------------------------------------------------------

    def _finish(self, call: Call, code: str, reason: str = "") -> None:
        self.active -= 1
        self.answered[code] += 1
        if code == "CANCELLED" and self.grace_ends is not None and time.monotonic() >= self.grace_ends - 0.05:
            self.cut_off += 1
        self.metrics.in_flight.dec()
        seconds = time.perf_counter() - call.started
        self.metrics.request(call.label, code, seconds, call.received, call.sent)
        self.metrics.tenant_call(call.tenant.name, code, reason)

    async def _fail(self, error: BaseException, call: Call) -> bool:
        """Counts the failed call, then ends it with its status (the client hears at once, so the
        count comes first); cancellations and aborts under way pass through. True for a call its
        client cancelled (or whose connection went): logged once, at INFO."""
        code, status = self._status(error, call.context)
        if status is not None and status.reason == "NONFINITE_VALUE":
            self.metrics.nonfinite(call.label, tuple(status.metadata["fields"].split(",")))
        self._finish(call, code, status.reason if status is not None else code)
        if status is not None:
            await abort(call.context, status)
        if code == "CANCELLED":
            _LOGGER.info(
                "%s call from %s (tenant %s) cancelled after %.3f s: %s",
                call.label,
                call.context.peer() or "unknown",
                call.tenant.name,
                time.perf_counter() - call.started,
                "the server is stopping" if self.grace_ends is not None else "the client went away",
            )
            return True
        return False

    def _status(self, error: BaseException, context: Context) -> tuple[str, LossdError | None]:
        """The status code a failure ends the call with, and the error to send (None: let it pass:
        a cancellation, or an abort already under way)."""
        grace_over = self.grace_ends is not None and time.monotonic() >= self.grace_ends - 0.05
        gone = isinstance(error, (asyncio.CancelledError, ClientGoneError))
        if gone or context.cancelled() or grace_over:
            # The client cancelled (or its deadline passed), or the server is stopping; a write
            # or read that failed for that reason is no bug of ours.
            return "CANCELLED", None
        if isinstance(error, grpc.aio.AbortError) or not isinstance(error, Exception):
            return "UNKNOWN", None
        return entry_status(error, self.max_request_s)


_DEFAULT_TENANT = Tenant(DEFAULT)


def entry_status(error: Exception, max_request_s: float = 0.0) -> tuple[str, LossdError]:
    """The status a failure ends a call (or a batch's entry) with: lossd's own errors as they are,
    the server's time limit, a failed allocation; anything else is a bug of ours (INTERNAL)."""
    if isinstance(error, TimeoutError):  # the server's max_request_s
        error = DeadlineExceededError(
            f"the call took longer than the server allows ({max_request_s:g} s, max_request_s)",
            reason="MAX_REQUEST_TIME",
            metadata={"maxRequestSeconds": f"{max_request_s:g}"},
        )
    elif is_out_of_memory(error):  # host memory, or pinned memory for a stream on CUDA
        error = ResourceExhaustedError(
            "the server could not allocate memory for this request; retry later or elsewhere",
            reason="ALLOCATION_FAILED",
            retry_after=1.0,
        )
    elif not isinstance(error, LossdError):
        _LOGGER.error("a loss call failed unexpectedly", exc_info=error)
        error = InternalError("internal error; the server log has the details", reason="INTERNAL")
    return error.code, error
