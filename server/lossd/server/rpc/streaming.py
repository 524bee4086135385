"""One StreamLoss call: read the header and the chunks, compute, write the answer in chunks.

The header is checked completely (dtypes, shapes, limits, options) and each streamed tensor's
memory allocated once before any chunk is read. Chunks are copied straight into place. When the
call can be split by samples (`lossd.server.engine.blocks`) and the small tensors are in, blocks of
complete samples are computed while the rest of the input is still arriving, and their gradients
written back at once: the transfer in, the compute and the transfer out overlap. Otherwise the call
is computed whole once everything is in.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from lossd.server.engine import LossEngine
from lossd.server.engine.blocks import BlockPlan, block_plan
from lossd.server.engine.staging import as_float64
from lossd.server.losses import LossCall, LossOutput
from lossd.server.memory import Reservation
from lossd.server.resident import ResidentStore
from lossd.server.rpc.requests import call_from_request, parse_request, stream_plan, stream_response
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import tensor_pb2
from lossd.wire import chunks, codec
from lossd.wire.errors import InvalidArgumentError

__all__ = ["StreamedCall"]

T = TypeVar("T")

BLOCK_BYTES = 8 << 20
"""Input bytes per block computed while the stream is still arriving."""


def _float64_sum(value: Any) -> float:
    array = as_float64(value) if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.float64)
    return float(array.sum())


class StreamedCall:
    """Serves one StreamLoss stream; `received` and `sent` count its bytes, `loss` names it,
    `nonfinite` the fields that held NaN or infinity."""

    def __init__(
        self,
        engine: LossEngine,
        submit: Callable[[LossCall], Awaitable[LossOutput]],
        write: Callable[[bytes], Awaitable[None]],
        limits: codec.TensorLimits,
        chunk_bytes: int,
        block_bytes: int = BLOCK_BYTES,
        *,
        reservation: Reservation | None = None,
        deadline: float | None = None,
        message_bytes: int = 0,
        wire: Callable[[int, Callable[[], Any]], Awaitable[Any]] | None = None,
        resident: ResidentStore | None = None,
    ) -> None:
        self._engine = engine
        self._resident = resident
        self._submit = submit
        self._write_message = write
        self._limits = limits
        self._chunk_bytes = chunk_bytes
        self._block_bytes = block_bytes
        self._reservation = reservation
        self._deadline = deadline
        self._message_bytes = message_bytes
        self._wire = wire
        self.loss = "unset"
        self.received = 0
        self.sent = 0
        self.nonfinite: set[str] = set()
        self.implementation = ""
        # Computing in blocks:
        self._plan: BlockPlan | None = None
        self._submitted = 0
        self._running: collections.deque[tuple[int, int, asyncio.Future[LossOutput]]] = collections.deque()
        self._header_sent = False
        self._totals: dict[str, float] = {}

    async def _write(self, message: bytes) -> None:
        self.sent += len(message)
        await self._write_message(message)

    async def serve(self, stream: AsyncIterator[bytes]) -> None:
        """Reads the whole request stream and writes the whole answer; raises `LossdError`s.

        Memory is reserved before it is taken: the caller reserved one message before the header;
        the header, the streamed tensors, the computation and the answer are reserved from the
        header's shapes, before anything is allocated for them.
        """
        await self._serve(stream)

    async def _decode(self, nbytes: int, work: Callable[[], T]) -> T:
        if self._wire is None:
            return work()
        result: T = await self._wire(nbytes, work)
        return result

    async def _serve(self, stream: AsyncIterator[bytes]) -> None:
        messages = stream.__aiter__()
        try:
            first = await messages.__anext__()
        except StopAsyncIteration:
            raise InvalidArgumentError(
                "the stream ended before its header", reason="STREAM_HEADER_MISSING", field="header"
            ) from None
        self.received += len(first)
        part = chunks.decode_part(first)
        if isinstance(part, chunks.Chunk):
            raise InvalidArgumentError(
                "a StreamLoss stream must open with its header",
                reason="STREAM_HEADER_MISSING",
                field="header",
            )

        header = bytes(part)

        def decode_header() -> tuple[pb.ComputeLossRequest, LossCall, dict[int, tuple[str, int]]]:
            request = parse_request(header, "the stream's header")
            shapes, plan = stream_plan(request, self._limits, self._resident)
            # Everything but the values, before any memory is taken.
            return request, self._engine.prepare(shapes, self._limits), plan

        request, shapes, plan = await self._decode(len(first), decode_header)
        self.loss = request.WhichOneof("loss") or "unset"
        if self._reservation is not None:
            # Receive buffers as the staging allocates them (pinned blocks round up on CUDA).
            streamed = sum(self._engine.staging.buffer_cost(nbytes) for _, nbytes in plan.values())
            answer = self._engine.answer_bytes(shapes)
            need = (
                2 * len(first)  # the header as received, and its inline tensors decoded
                + streamed
                + (self._message_bytes if plan else 0)  # the chunk being received
                + self._engine.footprint(shapes)
                + answer
                + 2 * self._chunk_bytes  # an answer chunk being encoded and sent
            )
            await self._reservation.grow_to(need, self._deadline, "this stream")
            self._reservation.shrink_to(need)
            if not plan:
                self._reservation.receiving = False
        # Allocated off the event loop (pinned memory on CUDA can take long to page-lock), after
        # the reservation above; a failed allocation answers RESOURCE_EXHAUSTED.
        assembly = await self._decode(
            sum(nbytes for _, nbytes in plan.values()),
            lambda: chunks.Assembly(
                {slot: nbytes for slot, (_, nbytes) in plan.items()},
                self._engine.staging.host_buffer,
                {slot: field for slot, (field, _) in plan.items()},
            ),
        )
        side = [slot for slot in plan if slot != pb.TENSOR_SLOT_INPUT]
        input_streams = pb.TENSOR_SLOT_INPUT in plan
        call: LossCall | None = None
        async for raw in messages:
            self.received += len(raw)
            part = chunks.decode_part(raw)
            if not isinstance(part, chunks.Chunk):
                raise InvalidArgumentError(
                    "a StreamLoss stream holds one header, first",
                    reason="STREAM_HEADER_REPEATED",
                    field="header",
                )
            assembly.add(*part)
            if not input_streams:
                continue
            if call is None and all(assembly.received[s] == assembly.expected(s) for s in side):
                call = self._engine.prepare(
                    call_from_request(request, self._limits, assembly.by_field(), self._resident),
                    self._limits,
                )
                self._plan = block_plan(call)
            if self._plan is not None:
                done = assembly.received[pb.TENSOR_SLOT_INPUT] // self._plan.sample_bytes
                self._start_blocks(done, final=False)
                await self._finish_blocks(wait=False)
        assembly.check_complete()
        if self._reservation is not None:
            self._reservation.receiving = False
        if call is None:
            call = self._engine.prepare(
                call_from_request(request, self._limits, assembly.by_field(), self._resident), self._limits
            )
        buffers = list(assembly.by_field().values())
        del assembly, shapes, request
        if self._plan is None:
            await self._answer_whole(await self._submit(call))
        else:
            self._start_blocks(self._plan.samples, final=True)
            await self._finish_blocks(wait=True)
            await self._send_loss()
        # Every computation on these bytes is over: the next stream may reuse their memory.
        del call
        self._plan = None
        staging = self._engine.staging
        while buffers:  # no name left holding one: the pinned cache can then be emptied
            staging.recycle(buffers.pop())
        await self._release_pinned()

    async def _release_pinned(self) -> None:
        """Large pinned buffers back to the driver (off the event loop: freeing pinned memory can
        wait on the device)."""
        staging = self._engine.staging
        if staging.large_pinned:
            await self._decode(staging.large_pinned, staging.release)

    # -- whole -----------------------------------------------------------------------------------

    async def _answer_whole(self, output: LossOutput) -> None:
        self.nonfinite.update(output.nonfinite)
        self.implementation = output.implementation
        header, gradients = stream_response(output)
        await self._write(chunks.encode_header(header))
        for slot, data in gradients:
            for message in chunks.iter_chunks(slot, data, self._chunk_bytes):
                await self._write(message)

    # -- in blocks -------------------------------------------------------------------------------

    def _start_blocks(self, available: int, final: bool) -> None:
        plan = self._plan
        assert plan is not None
        size = max(1, self._block_bytes // max(plan.sample_bytes, 1))
        while available - self._submitted >= (1 if final else size):
            stop = min(self._submitted + size, available)
            block = plan.block(self._submitted, stop)
            self._running.append((self._submitted, stop, asyncio.ensure_future(self._submit(block))))
            self._submitted = stop

    async def _finish_blocks(self, wait: bool) -> None:
        while self._running and (wait or self._running[0][2].done()):
            start, _, future = self._running.popleft()
            output = await future
            await self._send_block(start, output)

    def _header(self) -> pb.ComputeLossResponse:
        plan = self._plan
        assert plan is not None
        call = plan.call
        header = pb.ComputeLossResponse(loss=_tensor_header(plan.loss_shape, plan.loss_dtype))
        for name in call.loss.parts:
            getattr(header, name).CopyFrom(_tensor_header(plan.loss_shape, plan.loss_dtype))
        if call.input_grad:
            header.input_gradient.CopyFrom(
                _tensor_header(call.input.shape, call.grad_dtype or call.input.dtype)
            )
        if call.target_grad:
            header.target_gradient.CopyFrom(
                _tensor_header(call.target.shape, call.grad_dtype or call.target.dtype)
            )
        return header

    async def _send_block(self, start: int, output: LossOutput) -> None:
        plan = self._plan
        assert plan is not None
        self.nonfinite.update(output.nonfinite)
        if not self._header_sent:
            await self._write(chunks.encode_header(self._header()))
            self._header_sent = True
        losses = [("loss", output.loss), *output.parts.items()]
        for name, value in losses:
            if plan.call.options.reduction == "none":
                await self._send_rows(chunks.RESPONSE_SLOTS[name], value, start)
            else:
                self._totals[name] = self._totals.get(name, 0.0) + _float64_sum(value)
        if output.input_grad is not None:
            await self._send_rows(pb.TENSOR_SLOT_INPUT_GRADIENT, output.input_grad, start)
        if output.target_grad is not None:
            await self._send_rows(pb.TENSOR_SLOT_TARGET_GRADIENT, output.target_grad, start)

    async def _send_rows(self, slot: int, rows: Any, start: int) -> None:
        """A block's rows of one tensor, at their place in the whole tensor."""
        array, _ = codec.to_wire(rows)
        data = codec.wire_view(array)
        row_bytes = math.prod(array.shape[1:]) * array.itemsize
        base = start * row_bytes
        for offset in range(0, data.nbytes, self._chunk_bytes):
            await self._write(
                chunks.encode_chunk(slot, base + offset, data[offset : offset + self._chunk_bytes])
            )

    async def _send_loss(self) -> None:
        plan = self._plan
        assert plan is not None
        if not self._header_sent:  # no block at all (cannot happen with two samples or more)
            await self._write(chunks.encode_header(self._header()))
            self._header_sent = True
        if plan.call.options.reduction != "none":
            for name in ("loss", *plan.call.loss.parts):
                array, _ = codec.to_wire(plan.reduce(self._totals.get(name, 0.0)))
                await self._write(chunks.encode_chunk(chunks.RESPONSE_SLOTS[name], 0, codec.wire_view(array)))

    async def close(self) -> None:
        """Cancels blocks still computing (the call failed or was cancelled)."""
        for _, _, future in self._running:
            future.cancel()
        self._running.clear()
        await self._release_pinned()


def _tensor_header(shape: Sequence[int], dtype: torch.dtype) -> tensor_pb2.Tensor:
    return codec.header(shape, codec.data_type_from_name(str(dtype)))
