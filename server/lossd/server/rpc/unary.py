"""A loss call carried whole in one message each way: ComputeLoss, and the Open Inference
Protocol's ModelInfer (each with its own message types, decoded to and encoded from the same
engine call)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from lossd.server.losses import LossCall, LossOutput
from lossd.server.rpc.lifecycle import MESSAGE_OVERHEAD, Call
from lossd.server.rpc.requests import call_from_request
from lossd.v1 import loss_service_pb2 as pb

__all__ = ["Build", "Encode", "answer_whole"]

Build = Callable[[bytes], tuple[pb.ComputeLossRequest, Mapping[str, memoryview]]]
"""A request's bytes to the lossd.v1 request without its tensors' bytes, and those bytes by field
(views of the message where they can be)."""
Encode = Callable[[LossOutput], bytes]


async def answer_whole(
    call: Call, build: Build, encode: Encode, expands: Callable[[bytes], int] | None = None
) -> None:
    """Reads the call's message, `build`s the request (its errors are the caller's), checks it,
    reserves its memory, queues it, computes, `encode`s and writes the answer. `expands(raw)`: what
    parsing the message may allocate besides it (typed contents that grow as they are read), held
    before `build` runs.

    One copy of the request (gRPC's) and one of the answer (`encode`'s, which gRPC sends) are made:
    the tensors are views of the message, and the message goes once nothing views it."""
    lifecycle = call.lifecycle
    raw = await call.first()
    received = len(raw)
    if expands is not None:
        await call.reservation.grow_to(received + expands(raw), call.deadline, "parsing this call's message")

    def decode(raw: bytes) -> tuple[LossCall[Any], int]:
        request, data = build(raw)
        call.label = request.WhichOneof("loss") or call.label
        # Tensors that are no view of the message (OIP typed contents) were copies; a message
        # parsed whole holds its bytes once more, and its tensors read them out.
        copies = sum(view.nbytes for view in data.values() if view.obj is not raw)
        if not any(view.obj is raw for view in data.values()):
            copies += 2 * len(raw)
        decoded = call_from_request(request, lifecycle.limits, data, call.resident)
        return lifecycle.engine.prepare(decoded, lifecycle.limits), copies

    prepared, copies = await lifecycle.wire(received, functools.partial(decode, raw))
    (work,) = call.admit((prepared,))
    answer = lifecycle.check_answer(prepared)
    # The message (its tensors view it) and any copies, the computation, and the answer twice
    # (tensors, then serialized).
    need = received + copies + lifecycle.engine.footprint(prepared) + 2 * answer + MESSAGE_OVERHEAD
    await call.reservation.grow_to(need, call.deadline, "this call")
    call.reservation.shrink_to(need)
    del raw  # the call's tensors hold what they view of it
    output = await call.submit(prepared, work=work)
    del prepared  # and with it the message, before the answer is encoded
    data = await lifecycle.wire(answer, functools.partial(encode, output))
    call.nonfinite, call.implementation = output.nonfinite, output.implementation
    del output
    await call.write(data)
