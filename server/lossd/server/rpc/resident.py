"""`PutTensor`, `ListTensors` and `DeleteTensor`: the resident tensors of `lossd.server.resident`,
behind the same memory budget, idle timeout, time limit, auth and metrics as the loss calls (the
methods read raw messages through the `LossServicer`'s steps)."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from lossd.server.resident import ResidentInfo, ResidentStore
from lossd.server.rpc.requests import parse_message
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import tensor_pb2
from lossd.wire import chunks, codec
from lossd.wire.errors import InvalidArgumentError
from lossd.wire.resident import content_id

if TYPE_CHECKING:
    from lossd.server.memory import Reservation
    from lossd.server.rpc.servicer import Context, LossServicer

__all__ = ["ResidentServicer"]

_SLOT = int(pb.TENSOR_SLOT_RESIDENT)


def _message(info: ResidentInfo) -> pb.ResidentTensor:
    return pb.ResidentTensor(id=info.id, dtype=info.dtype, shape=info.shape, nbytes=info.nbytes)  # type: ignore[arg-type]


class ResidentServicer:
    """The resident-tensor methods of `lossd.v1.LossService` on `store`."""

    def __init__(self, servicer: LossServicer, store: ResidentStore) -> None:
        self._servicer = servicer
        self.store = store

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        return {
            "PutTensor": grpc.stream_stream_rpc_method_handler(self.PutTensor),
            "ListTensors": grpc.stream_stream_rpc_method_handler(self.ListTensors),
            "DeleteTensor": grpc.stream_stream_rpc_method_handler(self.DeleteTensor),
        }

    async def PutTensor(self, requests: AsyncIterator[bytes], context: Context) -> None:
        await self._serve(requests, context, "put_tensor", self._put)

    async def ListTensors(self, requests: AsyncIterator[bytes], context: Context) -> None:
        async def answer(call: _Call) -> bytes:
            raw = await call.first()
            parse_message(pb.ListTensorsRequest.FromString, raw, "the request", "lossd.v1.ListTensorsRequest")
            tensors = [_message(info) for info in self.store.list()]
            return pb.ListTensorsResponse(
                tensors=tensors, resident_bytes=self.store.held, max_resident_bytes=self.store.max_bytes
            ).SerializeToString()

        await self._serve(requests, context, "list_tensors", answer)

    async def DeleteTensor(self, requests: AsyncIterator[bytes], context: Context) -> None:
        async def answer(call: _Call) -> bytes:
            raw = await call.first()
            request = parse_message(
                pb.DeleteTensorRequest.FromString, raw, "the request", "lossd.v1.DeleteTensorRequest"
            )
            return pb.DeleteTensorResponse(deleted=self.store.delete(request.id)).SerializeToString()

        await self._serve(requests, context, "delete_tensor", answer)

    async def _put(self, call: _Call) -> bytes:
        """Receives one upload into memory reserved from its header, and holds it."""
        servicer = self._servicer
        raw = await call.first()
        part = chunks.decode_part(raw)
        if isinstance(part, chunks.Chunk):
            raise InvalidArgumentError(
                "a PutTensor stream opens with its header", reason="STREAM_HEADER_MISSING", field="header"
            )
        header = parse_message(tensor_pb2.Tensor.FromString, bytes(part), "the header", "lossd.v1.Tensor")
        if header.resident_id:
            raise InvalidArgumentError(
                "header.resident_id is set: an upload carries the tensor itself",
                reason="RESIDENT_MISMATCH",
                field="header.resident_id",
            )
        limits = servicer.limits
        streamed = codec.streamed_bytes(header, "header", limits)
        nbytes = streamed if streamed is not None else len(header.data)
        self.store.room(nbytes)
        await call.reservation.grow_to(call.received + 2 * nbytes, call.deadline, "this upload")
        if streamed is None:
            data = np.frombuffer(header.data, dtype=np.uint8).copy()
        else:
            assembly = chunks.Assembly(
                {_SLOT: streamed}, lambda n: np.empty(n, dtype=np.uint8), {_SLOT: "tensor"}
            )
            async for message in call.messages:
                call.received += len(message)
                chunk = chunks.decode_part(message)
                if not isinstance(chunk, chunks.Chunk):
                    raise InvalidArgumentError(
                        "a PutTensor stream holds one header, first",
                        reason="STREAM_HEADER_REPEATED",
                        field="header",
                    )
                assembly.add(*chunk)
            assembly.check_complete()
            data = np.asarray(assembly.by_field()["tensor"])
        shape = tuple(int(d) for d in header.shape)
        id = await servicer._wire(nbytes, lambda: content_id(header.dtype, shape, data.data))
        tensor = codec.decode_torch(header, "header", limits=limits, copy=False, data=data.data)
        tensor = await servicer._wire(nbytes, functools.partial(self.store.placed, tensor))
        info = self.store.put(tensor, ResidentInfo(id, int(header.dtype), shape, nbytes))
        return pb.PutTensorResponse(tensor=_message(info)).SerializeToString()

    async def _serve(
        self,
        requests: AsyncIterator[bytes],
        context: Context,
        name: str,
        answer: Callable[[_Call], Awaitable[bytes]],
    ) -> None:
        """One call: memory reserved for its first message, its time limit, `answer`, its metrics
        and failures, as for the loss calls."""
        servicer = self._servicer
        started = time.perf_counter()
        servicer._begin(context)
        reservation = servicer._open(context)
        call = _Call(servicer, servicer.messages(requests), reservation, servicer._deadline(context, started))
        try:
            async with servicer._time_limit():
                await reservation.grow_to(
                    servicer.max_message_bytes, call.deadline, "receiving this call's message"
                )
                data = await answer(call)
                call.sent = len(data)
                await servicer.write(context, data)
        except BaseException as error:
            reservation.close()
            await servicer._fail(reservation.cause(error), context, name, started, call.received, call.sent)
            raise
        reservation.close()
        servicer._finish(name, "OK", started, call.received, call.sent)


class _Call:
    """One call's messages, reservation, deadline and byte counts."""

    def __init__(
        self,
        servicer: LossServicer,
        messages: AsyncIterator[bytes],
        reservation: Reservation,
        deadline: float | None,
    ) -> None:
        self._servicer = servicer
        self.messages = messages
        self.reservation = reservation
        self.deadline = deadline
        self.received = 0
        self.sent = 0

    async def first(self) -> bytes:
        raw = await self._servicer.first_message(self.messages)
        self.received += len(raw)
        return raw
