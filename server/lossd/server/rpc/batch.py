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
import time
from typing import Any

from lossd.server.losses import LossCall, LossOutput
from lossd.server.metrics import ServerMetrics
from lossd.server.rpc.lifecycle import MESSAGE_OVERHEAD, UNKNOWN_LOSS, Call, entry_status
from lossd.server.rpc.requests import call_from_request, encode_response, parse_message
from lossd.v1 import loss_service_pb2 as pb
from lossd.wire import messages
from lossd.wire.errors import LossdError, ResourceExhaustedError
from lossd.wire.status import status_of

__all__ = ["DEFAULT_MAX_ENTRIES", "answer_batch"]

DEFAULT_MAX_ENTRIES = 1024
YIELD_FROM = 128
YIELD_EVERY = 8
"""Entries a batch of more than `YIELD_FROM` decodes or encodes before it lets go of the
interpreter lock: the compute thread takes it back after each torch operation, and waiting up to
Python's switch interval (5 ms) each time would make every computation a convoy behind a large
batch being decoded. (A small batch is over before that matters.)"""
ENQUEUE_STEP = 64
"""Entries queued per turn of the event loop: a 1024-entry batch never holds it for long."""
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


async def answer_batch(call: Call, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
    """One ComputeLossBatch call: its message read and its entries counted before protobuf parses
    it, each entry decoded and checked as a ComputeLoss call would be, the memory for all of them
    reserved, every prepared entry queued at once, and each answered or refused on its own."""
    lifecycle = call.lifecycle
    raw = await call.first()
    received = len(raw)
    if _more_fields_than(raw, max_entries):
        raise ResourceExhaustedError(
            f"the batch holds more than {max_entries} entries, the most this server takes in one call "
            "(max_batch_entries): send several",
            reason="BATCH_TOO_LARGE",
            field="requests",
            metadata={"maxBatchEntries": str(max_entries)},
        )
    parse = functools.partial(parse_message, pb.ComputeLossBatchRequest.FromString, raw, "the request", _KIND)
    batch = await lifecycle.wire(received, parse)
    # The parsed message holds every entry's bytes once more than `raw`.
    results, need, answers = await lifecycle.wire(received, functools.partial(_prepare, call, batch))
    works = call.admit([value for _, value in results if isinstance(value, LossCall)])
    if answers + MESSAGE_OVERHEAD > lifecycle.max_message_bytes:
        raise ResourceExhaustedError(
            f"the answers would hold {answers} bytes of tensors, more than one message may carry "
            f"({lifecycle.max_message_bytes} bytes, max_message_bytes): send fewer entries",
            reason="RESPONSE_TOO_LARGE",
            metadata={"answerBytes": str(answers), "maxMessageBytes": str(lifecycle.max_message_bytes)},
        )
    need += 2 * received + MESSAGE_OVERHEAD
    await call.reservation.grow_to(need, call.deadline, "this call")
    call.reservation.shrink_to(need)
    del raw, batch
    await call.write(await _compute(call, results, answers, works))


Entry = tuple[str, LossCall[Any] | LossdError]
"""A batch entry: its loss's name, and its prepared call or the error that refused it."""


def _prepare(call: Call, batch: pb.ComputeLossBatchRequest) -> tuple[list[Entry], int, int]:
    """Each entry as a prepared call, or the error that refuses it; the memory the calls need
    (their computations and answers, twice: tensors, then serialized); their answers' bytes."""
    lifecycle = call.lifecycle
    engine = lifecycle.engine
    results: list[Entry] = []
    need = answers = 0
    resident = call.resident
    large = len(batch.requests) > YIELD_FROM
    for index, request in enumerate(batch.requests):
        if large and index % YIELD_EVERY == YIELD_EVERY - 1:
            time.sleep(0)  # the interpreter lock's turn for the compute thread and the event loop
        loss = request.WhichOneof("loss") or UNKNOWN_LOSS
        try:
            entry = call_from_request(request, lifecycle.limits, None, resident)
            entry = engine.prepare(entry, lifecycle.limits)
            lifecycle.admission.check_cost(engine.work(entry))
            answer = lifecycle.check_answer(entry)
            need += 2 * answer
            answers += answer
            results.append((loss, entry))
        except LossdError as error:
            results.append((loss, error))
    # The entries compute one after another: a resident tensor they all name is counted once.
    need += engine.footprints([value for _, value in results if isinstance(value, LossCall)])
    return results, need, answers


async def _compute(call: Call, results: list[Entry], answers: int, works: list[float]) -> bytes:
    """Submits every prepared entry at once (they merge in the batcher), then frames each answer or
    status in order (on the wire thread for a large batch: the event loop serves other calls)."""
    lifecycle = call.lifecycle
    indices = [index for index, (_, value) in enumerate(results) if isinstance(value, LossCall)]
    calls = [value for _, value in results if isinstance(value, LossCall)]
    queued: list[asyncio.Future[LossOutput]] = []
    entered: list[asyncio.Future[LossOutput] | Exception] = []
    for start in range(0, len(calls), ENQUEUE_STEP):
        if start:  # other calls' turn on the event loop, and the compute thread's, between steps
            time.sleep(0)
            await asyncio.sleep(0)
        entered += lifecycle.batcher.enqueue_many(
            calls[start : start + ENQUEUE_STEP],
            call.deadline,
            tenant=call.tenant.name,
            weight=call.tenant.weight,
            works=works[start : start + ENQUEUE_STEP],
        )
    for index, outcome in zip(indices, entered, strict=True):
        if isinstance(outcome, LossdError):  # the queue is full, or the server is draining
            results[index] = (results[index][0], outcome)
        elif isinstance(outcome, asyncio.Future):
            queued.append(outcome)
    done = await asyncio.gather(*queued, return_exceptions=True)
    for finished in done:
        if isinstance(finished, asyncio.CancelledError):
            raise finished
    return await lifecycle.wire(answers, functools.partial(_frame, lifecycle.metrics, results, done))


def _frame(metrics: ServerMetrics, results: list[Entry], outcomes: list[LossOutput | BaseException]) -> bytes:
    """The batch's answer: each entry's response or status, in order."""
    done = iter(outcomes)
    pieces = []
    answered: collections.Counter[tuple[str, str]] = collections.Counter()
    computed_by: collections.Counter[tuple[str, str]] = collections.Counter()
    large = len(results) > YIELD_FROM
    for index, (loss, value) in enumerate(results):
        if large and index % YIELD_EVERY == YIELD_EVERY - 1:
            time.sleep(0)
        outcome: LossOutput | BaseException = value if isinstance(value, LossdError) else next(done)
        if isinstance(outcome, Exception):
            _, error = entry_status(outcome)
            answered[loss, error.code] += 1
            if error.reason == "NONFINITE_VALUE":
                metrics.nonfinite(loss, tuple(error.metadata["fields"].split(",")))
            pieces.append(_result(_ERROR, status_of(error).SerializeToString()))
            continue
        if isinstance(outcome, BaseException):
            raise outcome
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
