"""The gRPC face of the engine: decode and check the request, await the batcher, encode.

`ComputeLoss` carries whole tensors in one message. `StreamLoss` carries them in chunks: its header
is checked (every dtype, shape, limit and option) and each tensor's memory allocated once before any
data arrives; chunks are copied straight into place (see `lossd.wire.chunks`), and the gradients
go back in chunks the same way.

Every method reads and writes raw messages through a streaming handler, unary ones included (on the
wire a unary call is a stream of one message each way): lossd's code runs before gRPC reads a
request's message, so that memory is reserved (`lossd.server.memory`) before it is taken, a client
that stalls mid-message is cut off after `idle_timeout_s`, and every call the server saw is counted.
Decoding and encoding of large messages run on a wire thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from lossd.server.batcher import Batcher
from lossd.server.engine import LossEngine
from lossd.server.engine.faults import is_out_of_memory
from lossd.server.losses import LossCall, LossOutput
from lossd.server.memory import MemoryBudget, Reservation
from lossd.server.metrics import ServerMetrics
from lossd.server.resident import ResidentStore
from lossd.server.rpc.batch import BatchServicer
from lossd.server.rpc.requests import call_from_request, encode_response, read_request
from lossd.server.rpc.resident import ResidentServicer
from lossd.server.rpc.status import abort
from lossd.server.rpc.streaming import BLOCK_BYTES, StreamedCall
from lossd.v1 import loss_service_pb2 as pb
from lossd.wire import chunks, codec
from lossd.wire.errors import CancelledError as ClientGoneError
from lossd.wire.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LossdError,
    ResourceExhaustedError,
)

__all__ = ["WIRE_INLINE_BYTES", "LossServicer"]

_LOGGER = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[object, object]
T = TypeVar("T")

WIRE_INLINE_BYTES = 256 * 1024
"""Messages up to this size are decoded and encoded on the event loop (a thread hop costs more);
larger ones on the wire thread."""
_MESSAGE_OVERHEAD = 64 * 1024
"""Room for a response's protobuf framing besides its tensors' bytes."""


class LossServicer:
    """Implements `lossd.v1.LossService` on a `LossEngine` behind a `Batcher`.

    Validation runs here, before the request is queued, so a bad request is answered at once and
    never reaches the device; compute runs on the batcher's executor, off the event loop.

    `max_request_s` (0: none) bounds each call's whole time in the server, `idle_timeout_s` (0:
    none) each wait for a client's next message or for it to read an answer; `budget` holds every
    call's memory; `max_message_bytes` is gRPC's message limit (each call reserves that much before
    its message is read). `active` counts calls in progress, `answered` the finished ones by status
    code, and `cut_off` those cancelled by the end of a drain's grace period (the drain report);
    once `fail()` is called, every call still reading or arriving fails with that error.
    """

    def __init__(
        self,
        engine: LossEngine,
        batcher: Batcher[LossCall, LossOutput],
        limits: codec.TensorLimits,
        metrics: ServerMetrics,
        chunk_bytes: int = chunks.DEFAULT_CHUNK_BYTES,
        block_bytes: int = BLOCK_BYTES,
        *,
        max_request_s: float = 0.0,
        idle_timeout_s: float = 0.0,
        budget: MemoryBudget | None = None,
        max_message_bytes: int = 2**31 - 1,
        wire: Executor | None = None,
        resident: ResidentStore | None = None,
        max_batch_entries: int = 1024,
    ) -> None:
        self._engine = engine
        self.max_batch_entries = max_batch_entries
        self.resident = resident if resident is not None else ResidentStore(0)
        self._batcher = batcher
        self.limits = limits
        self._metrics = metrics
        # An answer chunk and its framing fit in one message.
        self._chunk_bytes = max(min(chunk_bytes, max_message_bytes - _MESSAGE_OVERHEAD), 4096)
        self._block_bytes = block_bytes
        self._max_request_s = max_request_s
        self._idle_timeout_s = idle_timeout_s
        self.budget = budget if budget is not None else MemoryBudget(2**62)
        self.max_message_bytes = max_message_bytes
        self._wire_executor = wire
        self._failure: LossdError | None = None
        self.active = 0
        self.answered: collections.Counter[str] = collections.Counter()
        self.cut_off = 0
        self.grace_ends: float | None = None

    def fail(self, error: LossdError) -> None:
        """From now on every call fails with `error` (the device is gone)."""
        self._failure = error

    @property
    def failed(self) -> bool:
        """Whether the device failed (every call is refused)."""
        return self._failure is not None

    def _time_limit(self) -> asyncio.Timeout:
        return asyncio.timeout(self._max_request_s or None)

    def _check_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def add_to_server(self, server: grpc.aio.Server, service: str) -> None:
        """Registers the methods, reading and writing raw messages (parsed in the handler, so that
        bytes that are not a request get INVALID_ARGUMENT; gRPC's own failure would answer UNKNOWN)."""
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "ComputeLoss": grpc.stream_stream_rpc_method_handler(self.ComputeLoss),
            "StreamLoss": grpc.stream_stream_rpc_method_handler(self.StreamLoss),
            **ResidentServicer(self, self.resident).handlers(),
            **BatchServicer(self).handlers(),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))

    # -- shared steps ----------------------------------------------------------------------------

    def _deadline(self, context: Context, started: float) -> float | None:
        """The call's deadline as a `time.monotonic()` instant: the caller's or the server's limit."""
        remaining = context.time_remaining()
        now = time.monotonic()
        deadline = now + remaining if remaining is not None else None
        if self._max_request_s:
            limit = now + self._max_request_s - (time.perf_counter() - started)
            deadline = limit if deadline is None else min(deadline, limit)
        return deadline

    async def _wire(self, nbytes: int, work: Callable[[], T]) -> T:
        """Runs decoding or encoding work on `nbytes`: inline when small, else on the wire thread."""
        if nbytes <= WIRE_INLINE_BYTES or self._wire_executor is None:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._wire_executor, work)

    async def _idle(self, waiting: Awaitable[T], what: str) -> T:
        """Awaits a client (its next message, or room for our answer) at most `idle_timeout_s`."""
        if not self._idle_timeout_s:
            return await waiting
        try:
            async with asyncio.timeout(self._idle_timeout_s):
                return await waiting
        except TimeoutError:
            raise DeadlineExceededError(
                f"the client sent nothing for {self._idle_timeout_s:g} s while lossd waited for {what} "
                "(idle_timeout_s)",
                reason="IDLE_TIMEOUT",
                metadata={"idleTimeoutSeconds": f"{self._idle_timeout_s:g}"},
            ) from None

    async def messages(self, requests: AsyncIterator[bytes], *, failing: bool = True) -> AsyncIterator[bytes]:
        """The call's messages, each awaited at most `idle_timeout_s`; with `failing`, cut short once
        the server failed."""
        iterator = requests.__aiter__()
        while True:
            try:
                message = await self._idle(iterator.__anext__(), "the call's next message")
            except StopAsyncIteration:
                return
            if failing:
                self._check_failure()
            yield message

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

    def _open(self, context: Context) -> Reservation:
        return self.budget.open_for_task(context.peer() or "unknown")

    async def receive(
        self, requests: AsyncIterator[bytes], reservation: Reservation, deadline: float | None
    ) -> bytes:
        """A whole-message call's request, read once the call's budget holds room for the largest
        message a client may send (so that what gRPC buffers for it is admitted first)."""
        await reservation.grow_to(self.max_message_bytes, deadline, "receiving this call's message")
        raw = await self.first_message(requests)
        reservation.receiving = False
        return raw

    async def first_message(self, requests: AsyncIterator[bytes], *, failing: bool = True) -> bytes:
        """A whole-message call's request, awaited at most `idle_timeout_s`."""
        try:
            return await self.messages(requests, failing=failing).__anext__()
        except StopAsyncIteration:
            raise InvalidArgumentError(
                "the call ended without a request message", reason="REQUEST_MALFORMED"
            ) from None

    def _check_answer(self, call: LossCall) -> int:
        """The answer's size; refused before computing when no message could carry it."""
        answer = self._engine.answer_bytes(call)
        if answer + _MESSAGE_OVERHEAD > self.max_message_bytes:
            raise ResourceExhaustedError(
                f"the answer would hold {answer} bytes of tensors, more than one message may carry "
                f"({self.max_message_bytes} bytes, max_message_bytes): call StreamLoss instead "
                "(lossd's Python client does so by itself)",
                reason="RESPONSE_TOO_LARGE",
                metadata={"answerBytes": str(answer), "maxMessageBytes": str(self.max_message_bytes)},
            )
        return answer

    async def _submit(self, call: LossCall, context: Context, started: float) -> LossOutput:
        """Queues a prepared call for compute, with the caller's deadline or the server's limit."""
        return await self._batcher.submit(call, self._deadline(context, started))

    def _begin(self, context: Context) -> None:
        self.active += 1
        self._metrics.in_flight.inc()
        for key, _ in context.invocation_metadata() or ():
            if key == "grpc-previous-rpc-attempts":  # gRPC's retry policy sent this call again
                self._metrics.retried_requests.inc()

    # -- whole messages --------------------------------------------------------------------------

    async def ComputeLoss(self, requests: AsyncIterator[bytes], context: Context) -> None:
        await self.answer(requests, context, read_request, encode_response)

    async def answer(
        self,
        requests: AsyncIterator[bytes],
        context: Context,
        build: Callable[[bytes], tuple[pb.ComputeLossRequest, Mapping[str, memoryview]]],
        encode: Callable[[LossOutput], bytes],
    ) -> None:
        """One whole-message call: reserves memory for the message, reads it, `build`s the request
        from its bytes (its errors are the caller's): the request without its tensors' bytes, and
        those bytes by field, as views of the message where it can. Then checks, queues, computes,
        `encode`s and writes the answer, with limits, metrics and failures as for every call. Other
        protocols (`lossd.server.rpc.open_inference`) answer through here too, each with its own
        message types.

        One copy of the request (gRPC's) and one of the answer (`encode`'s, which gRPC sends) are
        made: the tensors are views of the message, and the message goes once nothing views it."""
        started = time.perf_counter()
        loss, received, sent = "unset", 0, 0
        self._begin(context)
        reservation = self._open(context)
        try:
            async with self._time_limit():
                self._check_failure()
                deadline = self._deadline(context, started)
                raw = await self.receive(requests, reservation, deadline)
                received = len(raw)

                named: list[str] = []

                def decode(raw: bytes) -> tuple[LossCall, int]:
                    request, data = build(raw)
                    named.append(request.WhichOneof("loss") or "unset")
                    # Tensors that are no view of the message (OIP typed contents) were copies; a
                    # message parsed whole holds its bytes once more, and its tensors read them out.
                    copies = sum(view.nbytes for view in data.values() if view.obj is not raw)
                    if not any(view.obj is raw for view in data.values()):
                        copies += 2 * len(raw)
                    call = call_from_request(request, self.limits, data, self.resident)
                    return self._engine.prepare(call, self.limits), copies

                try:
                    call, copies = await self._wire(received, functools.partial(decode, raw))
                finally:
                    loss = named[0] if named else loss
                answer = self._check_answer(call)
                # The message (its tensors view it) and any copies, the computation, and the answer
                # twice (tensors, then serialized).
                need = received + copies + self._engine.footprint(call) + 2 * answer + _MESSAGE_OVERHEAD
                await reservation.grow_to(need, deadline, "this call")
                reservation.shrink_to(need)
                del raw  # the call's tensors hold what they view of it
                output = await self._submit(call, context, started)
                del call  # and with it the message, before the answer is encoded
                data = await self._wire(answer, functools.partial(encode, output))
                nonfinite = output.nonfinite
                self._metrics.implementation_call(loss, output.implementation)
                del output
                sent = len(data)
                await self.write(context, data)
        except BaseException as error:
            reservation.close()
            await self._fail(reservation.cause(error), context, loss, started, received, sent)
            raise
        reservation.close()
        self._metrics.nonfinite(loss, nonfinite)
        self._finish(loss, "OK", started, received, sent)

    # -- streams ---------------------------------------------------------------------------------

    async def StreamLoss(self, requests: AsyncIterator[bytes], context: Context) -> None:
        started = time.perf_counter()
        self._begin(context)
        reservation = self._open(context)
        deadline = self._deadline(context, started)
        call = StreamedCall(
            self._engine,
            lambda call: self._submit(call, context, started),
            lambda message: self.write(context, message),
            self.limits,
            self._chunk_bytes,
            self._block_bytes,
            reservation=reservation,
            deadline=deadline,
            message_bytes=self.max_message_bytes,
            wire=self._wire,
            resident=self.resident,
        )
        try:
            async with self._time_limit():
                self._check_failure()
                await reservation.grow_to(self.max_message_bytes, deadline, "receiving this stream's header")
                await call.serve(self.messages(requests))
        except BaseException as error:
            # The traceback's frames hold the stream's buffers; they must go now, not whenever the
            # error object does.
            traceback.clear_frames(error.__traceback__)
            await call.close()
            reservation.close()  # before the client hears: a retry must find the memory free
            await self._fail(reservation.cause(error), context, call.loss, started, call.received, call.sent)
            raise
        reservation.close()
        self._metrics.nonfinite(call.loss, tuple(call.nonfinite))
        self._metrics.implementation_call(call.loss, call.implementation)
        self._finish(call.loss, "OK", started, call.received, call.sent)

    # -- endings ---------------------------------------------------------------------------------

    def _finish(self, loss: str, code: str, started: float, received: int, sent: int) -> None:
        self.active -= 1
        self.answered[code] += 1
        if code == "CANCELLED" and self.grace_ends is not None and time.monotonic() >= self.grace_ends - 0.05:
            self.cut_off += 1
        self._metrics.in_flight.dec()
        self._metrics.request(loss, code, time.perf_counter() - started, received, sent)

    async def _fail(
        self, error: BaseException, context: Context, loss: str, started: float, received: int, sent: int
    ) -> None:
        """Counts the failed call, then ends it with its status (the client hears at once, so the
        count comes first); cancellations and aborts under way pass through."""
        code, status = self._status(error, context)
        if status is not None and status.reason == "NONFINITE_VALUE":
            self._metrics.nonfinite(loss, tuple(status.metadata["fields"].split(",")))
        self._finish(loss, code, started, received, sent)
        if status is not None:
            await abort(context, status)

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
        if isinstance(error, TimeoutError):  # the server's max_request_s, from _time_limit
            error = DeadlineExceededError(
                f"the call took longer than the server allows ({self._max_request_s:g} s, max_request_s)",
                reason="MAX_REQUEST_TIME",
                metadata={"maxRequestSeconds": f"{self._max_request_s:g}"},
            )
        elif is_out_of_memory(error):  # host memory, or pinned memory for a stream on CUDA
            error = ResourceExhaustedError(
                "the server could not allocate memory for this request; retry later or elsewhere",
                reason="ALLOCATION_FAILED",
                retry_after=1.0,
            )
        elif not isinstance(error, LossdError):
            _LOGGER.exception("a loss call failed unexpectedly", exc_info=error)
            error = InternalError("internal error; the server log has the details", reason="INTERNAL")
        return error.code, error
