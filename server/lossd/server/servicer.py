"""The gRPC face of the engine: decode and check the request, await the batcher, encode.

`ComputeLoss` carries whole tensors in one message. `StreamLoss` carries them in chunks: its header
is checked (every dtype, shape, limit and option) and each tensor's memory allocated once before any
data arrives; chunks are copied straight into place (see `lossd.client.chunks`), and the gradients
go back in chunks the same way.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from lossd.client import chunks, codec
from lossd.client.errors import (
    DeadlineExceededError,
    InternalError,
    LossdError,
    ResourceExhaustedError,
)
from lossd.server.batcher import Batcher
from lossd.server.calls import LossCall, LossOutput
from lossd.server.convert import call_from_request, parse_request, response_from_output
from lossd.server.engine import LossEngine
from lossd.server.metrics import ServerMetrics
from lossd.server.status import abort
from lossd.server.streaming import BLOCK_BYTES, ByteBudget, StreamedCall
from lossd.v1 import loss_service_pb2 as pb

__all__ = ["LossServicer"]

_LOGGER = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[object, object]
Answer = TypeVar("Answer", bound=Message)


class LossServicer:
    """Implements `lossd.v1.LossService` on a `LossEngine` behind a `Batcher`.

    Validation runs here, before the request is queued, so a bad request is answered at once and
    never reaches the device; compute runs on the batcher's executor, off the event loop.

    `max_request_s` (0: none) bounds each call's whole time in the server; `stream_budget` the
    bytes all streams being received may hold. `active` counts calls in progress and `answered`
    the finished ones by status code (for the drain report); once `fail()` is called, every call
    still reading or arriving fails with that error.
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
        stream_budget: ByteBudget | None = None,
    ) -> None:
        self._engine = engine
        self._batcher = batcher
        self._limits = limits
        self._metrics = metrics
        self._chunk_bytes = chunk_bytes
        self._block_bytes = block_bytes
        self._max_request_s = max_request_s
        self._stream_budget = stream_budget if stream_budget is not None else ByteBudget(2**62)
        self._failure: LossdError | None = None
        self.active = 0
        self.answered: collections.Counter[str] = collections.Counter()

    def fail(self, error: LossdError) -> None:
        """From now on every call fails with `error` (the device is gone)."""
        self._failure = error

    def _time_limit(self) -> asyncio.Timeout:
        return asyncio.timeout(self._max_request_s or None)

    def _check_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _unless_failed(self, requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The stream's messages, cut short with the failure once the server has failed."""
        async for message in requests:
            self._check_failure()
            yield message

    def add_to_server(self, server: grpc.aio.Server, service: str) -> None:
        """Registers both methods; StreamLoss reads and writes raw messages (see `lossd.client.chunks`)."""
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            # Parsed in the handler, so that bytes that are not a request get INVALID_ARGUMENT
            # (gRPC's own deserialization failure would answer UNKNOWN).
            "ComputeLoss": grpc.unary_unary_rpc_method_handler(
                self.ComputeLoss, response_serializer=pb.ComputeLossResponse.SerializeToString
            ),
            "StreamLoss": grpc.stream_stream_rpc_method_handler(self.StreamLoss),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))

    async def _submit(self, call: LossCall, context: Context, started: float) -> LossOutput:
        """Queues a prepared call for compute, with the caller's deadline or the server's limit."""
        remaining = context.time_remaining()
        now = time.monotonic()
        deadline = now + remaining if remaining is not None else None
        if self._max_request_s:
            limit = now + self._max_request_s - (time.perf_counter() - started)
            deadline = limit if deadline is None else min(deadline, limit)
        return await self._batcher.submit(call, deadline)

    def _begin(self, context: Context) -> None:
        self.active += 1
        self._metrics.in_flight.inc()
        for key, _ in context.invocation_metadata() or ():
            if key == "grpc-previous-rpc-attempts":  # gRPC's retry policy sent this call again
                self._metrics.retried_requests.inc()

    async def ComputeLoss(self, raw: bytes, context: Context) -> pb.ComputeLossResponse:
        return await self.answer(lambda: parse_request(raw), len(raw), context, response_from_output)

    async def answer(
        self,
        build: Callable[[], pb.ComputeLossRequest],
        received: int,
        context: Context,
        encode: Callable[[LossOutput], Answer],
    ) -> Answer:
        """One whole-message call: `build()` makes the request (its errors are the caller's),
        then it is checked, queued, computed, and `encode`d into the response message, with
        limits, metrics and failures as for every call. Other protocols (`lossd.server.inference`)
        answer through here too, each encoding the engine's output straight into its own message."""
        started = time.perf_counter()
        loss = "unset"
        self._begin(context)
        try:
            async with self._time_limit():
                self._check_failure()
                request = build()
                loss = request.WhichOneof("loss") or "unset"
                call = self._engine.prepare(call_from_request(request, self._limits), self._limits)
                output = await self._submit(call, context, started)
                response = encode(output)
        except BaseException as error:
            await self._fail(error, context, loss, started, received, 0)
            raise
        self._metrics.nonfinite(loss, output.nonfinite)
        self._finish(loss, "OK", started, received, response.ByteSize())
        return response

    @property
    def failed(self) -> bool:
        """Whether the device failed (every call is refused)."""
        return self._failure is not None

    async def StreamLoss(self, requests: AsyncIterator[bytes], context: Context) -> None:
        started = time.perf_counter()
        self._begin(context)
        call = StreamedCall(
            self._engine,
            lambda call: self._submit(call, context, started),
            context.write,
            self._limits,
            self._chunk_bytes,
            self._block_bytes,
            self._stream_budget,
        )
        try:
            async with self._time_limit():
                self._check_failure()
                await call.serve(self._unless_failed(requests))
        except BaseException as error:
            # The traceback's frames hold the stream's buffers; they must go now, not whenever the
            # error object does.
            traceback.clear_frames(error.__traceback__)
            await call.close()
            await self._fail(error, context, call.loss, started, call.received, call.sent)
            raise
        self._metrics.nonfinite(call.loss, tuple(call.nonfinite))
        self._finish(call.loss, "OK", started, call.received, call.sent)

    def _finish(self, loss: str, code: str, started: float, received: int, sent: int) -> None:
        self.active -= 1
        self.answered[code] += 1
        self._metrics.in_flight.dec()
        self._metrics.request(loss, code, time.perf_counter() - started, received, sent)

    async def _fail(
        self, error: BaseException, context: Context, loss: str, started: float, received: int, sent: int
    ) -> None:
        """Counts the failed call, then ends it with its status (the client hears at once, so the
        count comes first); cancellations and aborts under way pass through."""
        code, status = self._status(error)
        if status is not None and status.reason == "NONFINITE_VALUE":
            self._metrics.nonfinite(loss, tuple(status.metadata["fields"].split(",")))
        self._finish(loss, code, started, received, sent)
        if status is not None:
            await abort(context, status)

    def _status(self, error: BaseException) -> tuple[str, LossdError | None]:
        """The status code a failure ends the call with, and the error to send (None: let it pass:
        a cancellation, or an abort already under way)."""
        if isinstance(error, asyncio.CancelledError):
            return "CANCELLED", None
        if isinstance(error, grpc.aio.AbortError) or not isinstance(error, Exception):
            return "UNKNOWN", None
        if isinstance(error, TimeoutError):  # the server's max_request_s, from _time_limit
            error = DeadlineExceededError(
                f"the call took longer than the server allows ({self._max_request_s:g} s, max_request_s)",
                reason="MAX_REQUEST_TIME",
                metadata={"maxRequestSeconds": f"{self._max_request_s:g}"},
            )
        elif isinstance(error, MemoryError):
            error = ResourceExhaustedError(
                "the server could not allocate memory for this request", reason="ALLOCATION_FAILED"
            )
        elif not isinstance(error, LossdError):
            _LOGGER.exception("a loss call failed unexpectedly", exc_info=error)
            error = InternalError("internal error; the server log has the details", reason="INTERNAL")
        return error.code, error
