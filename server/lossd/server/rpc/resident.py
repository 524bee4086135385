"""`PutTensor`, `ListTensors` and `DeleteTensor`: the resident tensors of `lossd.server.resident`,
through the same lifecycle as the loss calls (memory budget, idle timeout, time limit, auth and
metrics), each scoped to the caller's tenant: what ListTensors counts is the tenant's own and its
quota."""

from __future__ import annotations

import functools

import numpy as np

from lossd.server.resident import ResidentInfo, finiteness
from lossd.server.rpc.lifecycle import Call
from lossd.server.rpc.requests import parse_message
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import tensor_pb2
from lossd.wire import chunks, codec
from lossd.wire.errors import InvalidArgumentError
from lossd.wire.resident import content_id

__all__ = ["delete_tensor", "list_tensors", "put_tensor"]

_TENSOR = ""
"""A PutTensor stream's one tensor: its chunks name none."""


def _message(info: ResidentInfo) -> pb.ResidentTensor:
    return pb.ResidentTensor(
        id=info.id,
        dtype=info.dtype,  # type: ignore[arg-type]
        shape=info.shape,
        nbytes=info.nbytes,
        shared=info.shared,
    )


async def put_tensor(call: Call) -> None:
    """Receives one upload into memory reserved from its header, and holds it."""
    lifecycle = call.lifecycle
    store = lifecycle.resident
    raw = await call.first(last=False)
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
    limits = lifecycle.limits
    streamed = codec.streamed_bytes(header, "header", limits)
    nbytes = streamed if streamed is not None else len(header.data)
    store.room(call.tenant, nbytes)
    await call.reservation.grow_to(call.received + 2 * nbytes, call.deadline, "this upload")
    if streamed is None:
        data = np.frombuffer(header.data, dtype=np.uint8).copy()
    else:
        assembly = chunks.Assembly({_TENSOR: streamed}, lambda n: np.empty(n, dtype=np.uint8))
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
        if not assembly.all_complete():
            await lifecycle.ended_early()
        assembly.check_complete()
        data = np.asarray(assembly.by_name()[_TENSOR])
    call.reservation.receiving = False
    shape = tuple(int(d) for d in header.shape)
    id = await lifecycle.wire(nbytes, lambda: content_id(header.dtype, shape, data.data))
    tensor = codec.decode_torch(header, "header", limits=limits, copy=False, data=data.data)
    # Checked once, here: calls that name it trust it (it is immutable).
    nonfinite, nonfinite_log = await lifecycle.wire(nbytes, functools.partial(finiteness, tensor))
    tensor = await lifecycle.wire(nbytes, functools.partial(store.placed, tensor))
    info = ResidentInfo(id, int(header.dtype), shape, nbytes, nonfinite, nonfinite_log)
    info = store.put(call.tenant, tensor, info)
    await call.write(pb.PutTensorResponse(tensor=_message(info)).SerializeToString())


async def list_tensors(call: Call) -> None:
    raw = await call.first()
    parse_message(pb.ListTensorsRequest.FromString, raw, "the request", "lossd.v1.ListTensorsRequest")
    store = call.lifecycle.resident
    tensors = [_message(info) for info in store.list(call.tenant)]
    answer = pb.ListTensorsResponse(
        tensors=tensors,
        resident_bytes=store.held_by(call.tenant.name),
        max_resident_bytes=store.quota(call.tenant),
    )
    await call.write(answer.SerializeToString())


async def delete_tensor(call: Call) -> None:
    raw = await call.first()
    request = parse_message(
        pb.DeleteTensorRequest.FromString, raw, "the request", "lossd.v1.DeleteTensorRequest"
    )
    deleted = call.lifecycle.resident.delete(call.tenant, request.id)
    await call.write(pb.DeleteTensorResponse(deleted=deleted).SerializeToString())
