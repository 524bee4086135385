"""One StreamLoss call: read the header and the chunks, compute, write the answer in chunks.

The header is checked completely (dtypes, shapes, limits, options) and each streamed tensor's
memory allocated once before any chunk is read. Chunks, each naming its tensor by its field path,
are copied straight into place. When the call can be split by samples
(`lossd.server.engine.blocks`) and the small tensors are in, blocks of complete samples are computed
while the rest of the input is still arriving, and their gradients written back at once: the
transfer in, the compute and the transfer out overlap. Otherwise the call is computed whole once
everything is in.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lossd.server.engine.blocks import BlockPlan, block_plan
from lossd.server.engine.staging import as_float64
from lossd.server.losses import LossCall, LossOutput
from lossd.server.rpc.lifecycle import Call
from lossd.server.rpc.requests import (
    answer_tensors,
    call_from_request,
    parse_request,
    stream_plan,
    stream_response,
    tensor_name,
)
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import tensor_pb2
from lossd.wire import chunks, codec
from lossd.wire.errors import InvalidArgumentError

__all__ = ["BLOCK_BYTES", "StreamedCall"]

BLOCK_BYTES = 8 << 20
"""Input bytes per block computed while the stream is still arriving."""


def _float64_sum(value: Any) -> float:
    array = as_float64(value) if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.float64)
    return float(array.sum())


class StreamedCall:
    """Serves one StreamLoss stream within its `Call` (which counts its bytes and names its loss)."""

    def __init__(self, call: Call, block_bytes: int = BLOCK_BYTES) -> None:
        self._call = call
        self._lifecycle = call.lifecycle
        self._block_bytes = block_bytes
        # Computing in blocks:
        self._plan: BlockPlan | None = None
        self._submitted = 0
        self._running: collections.deque[tuple[int, int, asyncio.Future[LossOutput]]] = collections.deque()
        self._header_sent = False
        self._totals: dict[str, float] = {}
        self._nonfinite: set[str] = set()
        call.on_failure(self.close)

    async def serve(self) -> None:
        """Reads the whole request stream and writes the whole answer; raises `LossdError`s.

        Memory is reserved before it is taken: one message before the header; the header, the
        streamed tensors, the computation and the answer from the header's shapes, before
        anything is allocated for them.
        """
        call, lifecycle = self._call, self._lifecycle
        engine = lifecycle.engine
        await call.reservation.grow_to(
            lifecycle.max_message_bytes, call.deadline, "receiving this stream's header"
        )
        messages = call.messages
        try:
            first = await messages.__anext__()
        except StopAsyncIteration:
            await lifecycle.ended_early()
            raise InvalidArgumentError(
                "the stream ended before its header", reason="STREAM_HEADER_MISSING", field="header"
            ) from None
        call.received += len(first)
        part = chunks.decode_part(first)
        if isinstance(part, chunks.Chunk):
            raise InvalidArgumentError(
                "a StreamLoss stream must open with its header",
                reason="STREAM_HEADER_MISSING",
                field="header",
            )
        header = bytes(part)

        def decode_header() -> tuple[pb.ComputeLossRequest, LossCall[Any], dict[str, int]]:
            request = parse_request(header, "the stream's header")
            call.label = request.WhichOneof("loss") or call.label
            shapes, plan = stream_plan(request, lifecycle.limits, call.resident)
            # Everything but the values, before any memory is taken.
            return request, engine.prepare(shapes, lifecycle.limits), plan

        request, shapes, plan = await lifecycle.wire(len(first), decode_header)
        call.admit((shapes,))  # the cost, from the header's shapes, before any data arrives
        # Receive buffers as the staging allocates them (pinned blocks round up on CUDA).
        streamed = sum(engine.staging.buffer_cost(nbytes) for nbytes in plan.values())
        need = (
            2 * len(first)  # the header as received, and its inline tensors decoded
            + streamed
            + (lifecycle.max_message_bytes if plan else 0)  # the chunk being received
            + engine.footprint(shapes)
            + engine.answer_bytes(shapes)
            + 2 * lifecycle.chunk_bytes  # an answer chunk being encoded and sent
        )
        await call.reservation.grow_to(need, call.deadline, "this stream")
        call.reservation.shrink_to(need)
        if not plan:
            call.reservation.receiving = False
        # Allocated off the event loop (pinned memory on CUDA can take long to page-lock), after
        # the reservation above; a failed allocation answers RESOURCE_EXHAUSTED.
        assembly = await lifecycle.wire(
            sum(plan.values()), lambda: chunks.Assembly(plan, engine.staging.host_buffer)
        )
        side = [name for name in plan if name != "input"]
        input_streams = "input" in plan
        prepared: LossCall[Any] | None = None
        async for raw in messages:
            call.received += len(raw)
            piece = chunks.decode_part(raw)
            if not isinstance(piece, chunks.Chunk):
                raise InvalidArgumentError(
                    "a StreamLoss stream holds one header, first",
                    reason="STREAM_HEADER_REPEATED",
                    field="header",
                )
            assembly.add(*piece)
            if not input_streams:
                continue
            if prepared is None and all(assembly.complete(name) for name in side):
                prepared = engine.prepare(
                    call_from_request(request, lifecycle.limits, assembly.by_name(), call.resident),
                    lifecycle.limits,
                )
                self._plan = block_plan(prepared)
            if self._plan is not None:
                done = assembly.received["input"] // self._plan.sample_bytes
                self._start_blocks(done, final=False)
                await self._finish_blocks(wait=False)
        if not assembly.all_complete():
            await lifecycle.ended_early()
        assembly.check_complete()
        call.reservation.receiving = False
        if prepared is None:
            prepared = engine.prepare(
                call_from_request(request, lifecycle.limits, assembly.by_name(), call.resident),
                lifecycle.limits,
            )
        buffers = list(assembly.by_name().values())
        del assembly, shapes, request
        if self._plan is None:
            await self._answer_whole(await call.submit(prepared))
        else:
            self._start_blocks(self._plan.samples, final=True)
            await self._finish_blocks(wait=True)
            await self._send_totals()
        call.nonfinite = tuple(sorted(self._nonfinite))
        # Every computation on these bytes is over: the next stream may reuse their memory.
        del prepared
        self._plan = None
        staging = engine.staging
        while buffers:  # no name left holding one: the pinned cache can then be emptied
            staging.recycle(buffers.pop())
        await self._release_pinned()

    async def _release_pinned(self) -> None:
        """Large pinned buffers back to the driver (off the event loop: freeing pinned memory can
        wait on the device)."""
        staging = self._lifecycle.engine.staging
        if staging.large_pinned:
            await self._lifecycle.wire(staging.large_pinned, staging.release)

    # -- whole -----------------------------------------------------------------------------------

    async def _answer_whole(self, output: LossOutput) -> None:
        self._nonfinite.update(output.nonfinite)
        self._call.implementation = output.implementation
        header, pieces = stream_response(output)
        await self._call.write(chunks.encode_header(header))
        chunk_bytes = self._lifecycle.chunk_bytes
        for name, data in pieces:
            for message in chunks.iter_chunks(name, data, chunk_bytes):
                await self._call.write(message)

    # -- in blocks -------------------------------------------------------------------------------

    def _start_blocks(self, available: int, final: bool) -> None:
        plan = self._plan
        assert plan is not None
        size = max(1, self._block_bytes // max(plan.sample_bytes, 1))
        while available - self._submitted >= (1 if final else size):
            stop = min(self._submitted + size, available)
            block = plan.block(self._submitted, stop)
            # The call's queue wait is its first block's: later blocks queue behind it by design.
            waits = self._submitted == 0
            future = asyncio.ensure_future(self._call.submit(block, waits=waits))
            self._running.append((self._submitted, stop, future))
            self._submitted = stop

    async def _finish_blocks(self, wait: bool) -> None:
        while self._running and (wait or self._running[0][2].done()):
            start, _, future = self._running.popleft()
            output = await future
            await self._send_block(start, output)

    def _header(self) -> pb.ComputeLossResponse:
        """The answer's header: every tensor's dtype and shape, its data to come in chunks."""
        plan = self._plan
        assert plan is not None
        call = plan.call
        header = pb.ComputeLossResponse(loss=_tensor_header(plan.loss_shape, plan.loss_dtype))
        for name in sorted(call.outputs):
            header.outputs[name].CopyFrom(_tensor_header(call.loss.output_shape(call, name), plan.loss_dtype))
        for name in sorted(call.grads):
            tensor = call.tensor(name)
            assert tensor is not None, "a checked call has the tensors it differentiates"
            header.gradients[name].CopyFrom(_tensor_header(tensor.shape, call.grad_dtype or tensor.dtype))
        return header

    async def _send_block(self, start: int, output: LossOutput) -> None:
        plan = self._plan
        assert plan is not None
        self._nonfinite.update(output.nonfinite)
        if not self._header_sent:
            await self._call.write(chunks.encode_header(self._header()))
            self._header_sent = True
        for field, key, value in answer_tensors(output):
            name = tensor_name(field, key)
            if field == "gradients" or plan.call.reduction == "none":
                await self._send_rows(name, value, start)
            else:
                self._totals[name] = self._totals.get(name, 0.0) + _float64_sum(value)

    async def _send_rows(self, name: str, rows: Any, start: int) -> None:
        """A block's rows of one tensor, at their place in the whole tensor."""
        array, _ = codec.to_wire(rows)
        data = codec.wire_view(array)
        row_bytes = math.prod(array.shape[1:]) * array.itemsize
        base = start * row_bytes
        chunk_bytes = self._lifecycle.chunk_bytes
        for offset in range(0, data.nbytes, chunk_bytes):
            await self._call.write(
                chunks.encode_chunk(name, base + offset, data[offset : offset + chunk_bytes])
            )

    async def _send_totals(self) -> None:
        """A reduced loss (and outputs), once every block's rows are summed."""
        plan = self._plan
        assert plan is not None
        if not self._header_sent:  # no block at all (cannot happen with two samples or more)
            await self._call.write(chunks.encode_header(self._header()))
            self._header_sent = True
        if plan.call.reduction != "none":
            names = ["loss", *(tensor_name("outputs", name) for name in sorted(plan.call.outputs))]
            for name in names:
                array, _ = codec.to_wire(plan.reduce(self._totals.get(name, 0.0)))
                await self._call.write(chunks.encode_chunk(name, 0, codec.wire_view(array)))

    async def close(self) -> None:
        """Cancels blocks still computing (the call failed or was cancelled)."""
        for _, _, future in self._running:
            future.cancel()
        self._running.clear()
        await self._release_pinned()


def _tensor_header(shape: Sequence[int], dtype: torch.dtype) -> tensor_pb2.Tensor:
    return codec.header(shape, codec.data_type_from_name(str(dtype)))
