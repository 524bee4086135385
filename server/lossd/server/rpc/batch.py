"""`LossService.ComputeLossBatch`: many ComputeLoss requests in one call, each answered on its own.

gRPC's own per-call cost (about 166 us of Python and C-core per call here) is most of a small loss's
cost; a batch pays it once for many. Each entry is decoded, checked and computed exactly as a
ComputeLoss call would be: the entries enter the batcher together, where they merge with each other
and with concurrent calls, and each ends with its response or its own status (one bad entry fails
only itself). The call itself is refused whole only for what concerns the whole: its message, its
number of entries, its memory, its deadline, a failed device.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from lossd.server.engine.faults import is_out_of_memory
from lossd.server.losses import LossCall, LossOutput
from lossd.server.rpc.requests import call_from_request, encode_response, parse_message
from lossd.v1 import loss_service_pb2 as pb
from lossd.wire import messages
from lossd.wire.errors import InternalError, LossdError, ResourceExhaustedError
from lossd.wire.status import status_of

if TYPE_CHECKING:
    from lossd.server.rpc.servicer import Context, LossServicer

__all__ = ["BatchServicer"]

_LOGGER = logging.getLogger(__name__)
_MESSAGE_OVERHEAD = 64 * 1024
_KIND = "lossd.v1.ComputeLossBatchRequest"
_RESULTS = pb.ComputeLossBatchResponse.DESCRIPTOR.fields_by_name["results"].number
_RESPONSE = pb.ComputeLossBatchResult.DESCRIPTOR.fields_by_name["response"].number
_ERROR = pb.ComputeLossBatchResult.DESCRIPTOR.fields_by_name["error"].number


_RESULT_TAG = messages.varint(_RESULTS << 3 | messages.LEN)
_ENTRY_TAGS = {number: messages.varint(number << 3 | messages.LEN) for number in (_RESPONSE, _ERROR)}


def _result(number: int, data: bytes) -> bytes:
    """A `results` entry holding `data` in its field `number` (the response or the error)."""
    entry = _ENTRY_TAGS[number] + messages.varint(len(data))
    return b"".join((_RESULT_TAG, messages.varint(len(entry) + len(data)), entry, data))


def _more_fields_than(raw: bytes, limit: int) -> bool:
    """Whether a message holds more than `limit` top-level fields (a batch's entries), counted
    before protobuf parses it: the parser would build every entry first, and a message holds
    millions of empty ones. Walks at most `limit` + 1 fields; a malformed message is the parser's
    to refuse."""
    data = memoryview(raw)
    pos = count = 0
    try:
        while pos < len(data):
            count += 1
            if count > limit:
                return True
            key, pos = messages.read_varint(data, pos)
            pos = messages.skip(data, pos, key & 7)
    except LossdError:
        return False
    return False


def _entry_error(error: BaseException) -> LossdError:
    """What a failed entry's status says: lossd's own errors as they are; anything else is ours."""
    if isinstance(error, LossdError):
        return error
    if is_out_of_memory(error):
        return ResourceExhaustedError(
            "the server could not allocate memory for this entry; retry later or elsewhere",
            reason="ALLOCATION_FAILED",
            retry_after=1.0,
        )
    _LOGGER.error("a batch entry failed unexpectedly", exc_info=error)
    return InternalError("internal error; the server log has the details", reason="INTERNAL")


class BatchServicer:
    """The batch method of `lossd.v1.LossService`, on a `LossServicer`'s limits, budget and batcher."""

    def __init__(self, servicer: LossServicer) -> None:
        self._servicer = servicer

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        return {"ComputeLossBatch": grpc.stream_stream_rpc_method_handler(self.ComputeLossBatch)}

    async def ComputeLossBatch(self, requests: AsyncIterator[bytes], context: Context) -> None:
        servicer = self._servicer
        started = time.perf_counter()
        received = sent = 0
        servicer._begin(context)
        reservation = servicer._open(context)
        try:
            async with servicer._time_limit():
                servicer._check_failure()
                deadline = servicer._deadline(context, started)
                raw = await servicer.receive(requests, reservation, deadline)
                received = len(raw)
                if _more_fields_than(raw, servicer.max_batch_entries):
                    raise ResourceExhaustedError(
                        f"the batch holds more than {servicer.max_batch_entries} entries, the most this "
                        "server takes in one call (max_batch_entries): send several",
                        reason="BATCH_TOO_LARGE",
                        field="requests",
                        metadata={"maxBatchEntries": str(servicer.max_batch_entries)},
                    )
                parse = functools.partial(
                    parse_message, pb.ComputeLossBatchRequest.FromString, raw, "the request", _KIND
                )
                batch = await servicer._wire(received, parse)
                # The parsed message holds every entry's bytes once more than `raw`.
                results, need, answers = await servicer._wire(
                    received, functools.partial(self._prepare, batch)
                )
                if answers + _MESSAGE_OVERHEAD > servicer.max_message_bytes:
                    raise ResourceExhaustedError(
                        f"the answers would hold {answers} bytes of tensors, more than one message may "
                        f"carry ({servicer.max_message_bytes} bytes, max_message_bytes): send fewer entries",
                        reason="RESPONSE_TOO_LARGE",
                        metadata={
                            "answerBytes": str(answers),
                            "maxMessageBytes": str(servicer.max_message_bytes),
                        },
                    )
                need += 2 * received + _MESSAGE_OVERHEAD
                await reservation.grow_to(need, deadline, "this call")
                reservation.shrink_to(need)
                del raw, batch
                data = await self._compute(results, context, started)
                sent = len(data)
                await servicer.write(context, data)
        except BaseException as error:
            reservation.close()
            await servicer._fail(reservation.cause(error), context, "batch", started, received, sent)
            raise
        reservation.close()
        servicer._finish("batch", "OK", started, received, sent)

    def _prepare(
        self, batch: pb.ComputeLossBatchRequest
    ) -> tuple[list[tuple[str, LossCall | LossdError]], int, int]:
        """Each entry as a prepared call, or the error that refuses it; the memory the calls need
        (their computations and answers, twice: tensors, then serialized); their answers' bytes."""
        servicer = self._servicer
        engine = servicer._engine
        results: list[tuple[str, LossCall | LossdError]] = []
        need = answers = 0
        for request in batch.requests:
            loss = request.WhichOneof("loss") or "unset"
            try:
                call = call_from_request(request, servicer.limits, None, servicer.resident)
                call = engine.prepare(call, servicer.limits)
                answer = servicer._check_answer(call)
                need += engine.footprint(call) + 2 * answer
                answers += answer
                results.append((loss, call))
            except LossdError as error:
                results.append((loss, error))
        return results, need, answers

    async def _compute(
        self, results: list[tuple[str, LossCall | LossdError]], context: Context, started: float
    ) -> bytes:
        """Submits every prepared entry at once (they merge in the batcher), then frames each
        answer or status in order."""
        servicer = self._servicer
        metrics = servicer._metrics
        deadline = servicer._deadline(context, started)
        indices = [index for index, (_, value) in enumerate(results) if isinstance(value, LossCall)]
        calls = [value for _, value in results if isinstance(value, LossCall)]
        queued: list[asyncio.Future[LossOutput]] = []
        for index, entered in zip(indices, servicer._batcher.enqueue_many(calls, deadline), strict=True):
            if isinstance(entered, LossdError):  # the queue is full, or the server is draining
                results[index] = (results[index][0], entered)
            elif isinstance(entered, asyncio.Future):
                queued.append(entered)
        done = iter(await asyncio.gather(*queued, return_exceptions=True))
        pieces = []
        answered: collections.Counter[tuple[str, str]] = collections.Counter()
        computed_by: collections.Counter[tuple[str, str]] = collections.Counter()
        for loss, value in results:
            outcome: LossOutput | BaseException = value if isinstance(value, LossdError) else next(done)
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException):
                error = _entry_error(outcome)
                answered[loss, error.code] += 1
                if error.reason == "NONFINITE_VALUE":
                    metrics.nonfinite(loss, tuple(error.metadata["fields"].split(",")))
                pieces.append(_result(_ERROR, status_of(error).SerializeToString()))
                continue
            answered[loss, "OK"] += 1
            if outcome.nonfinite:
                metrics.nonfinite(loss, outcome.nonfinite)
            if outcome.implementation:
                computed_by[loss, outcome.implementation] += 1
            pieces.append(_result(_RESPONSE, encode_response(outcome)))
        metrics.batch_entries_answered(answered)
        for (loss, implementation), count in computed_by.items():
            metrics.implementation_call(loss, implementation, count)
        return b"".join(pieces)
