"""`lossd.v1.LossService` on the call lifecycle (`lossd.server.rpc.lifecycle`): each method is its
label and what it does between reading and answering.

`ComputeLoss` carries whole tensors in one message (`unary`). `StreamLoss` carries them in chunks
(`streaming`): its header is checked (every dtype, shape, limit and option) and each tensor's
memory allocated once before any data arrives. `ComputeLossBatch` carries many calls in one
message (`batch`); the resident-tensor methods hold tensors for later calls (`resident`).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from lossd.server.rpc.batch import DEFAULT_MAX_ENTRIES, answer_batch
from lossd.server.rpc.lifecycle import UNKNOWN_LOSS, Call, Context, Lifecycle
from lossd.server.rpc.requests import encode_response, read_request
from lossd.server.rpc.resident import delete_tensor, list_tensors, put_tensor
from lossd.server.rpc.streaming import BLOCK_BYTES, StreamedCall
from lossd.server.rpc.unary import answer_whole

__all__ = ["LossServicer"]

Handler = Callable[[AsyncIterator[bytes], Context], Awaitable[None]]


class LossServicer:
    """Implements `lossd.v1.LossService` on a `Lifecycle`. Validation runs before a request is
    queued, so a bad request is answered at once and never reaches the device; compute runs on
    the batcher's executors, off the event loop."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        *,
        block_bytes: int = BLOCK_BYTES,
        max_batch_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self.lifecycle = lifecycle
        self._block_bytes = block_bytes
        self._max_batch_entries = max_batch_entries

    def handlers(self) -> dict[str, Callable[[Call], Awaitable[None]]]:
        """Each method's name, and what it does within the lifecycle."""
        return {
            "ComputeLoss": functools.partial(answer_whole, build=read_request, encode=encode_response),
            "StreamLoss": lambda call: StreamedCall(call, self._block_bytes).serve(),
            "ComputeLossBatch": functools.partial(answer_batch, max_entries=self._max_batch_entries),
            "PutTensor": put_tensor,
            "ListTensors": list_tensors,
            "DeleteTensor": delete_tensor,
        }

    def add_to_server(self, server: grpc.aio.Server, service: str) -> None:
        """Registers the methods, reading and writing raw messages (parsed in the handler, so that
        bytes that are not a request get INVALID_ARGUMENT; gRPC's own failure would answer UNKNOWN)."""
        methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            name: grpc.stream_stream_rpc_method_handler(self._serving(name, handle))
            for name, handle in self.handlers().items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))

    def _serving(self, method: str, handle: Callable[[Call], Awaitable[None]]) -> Handler:
        label = _LABELS.get(method, UNKNOWN_LOSS)

        async def serve(requests: AsyncIterator[bytes], context: Context) -> None:
            await self.lifecycle.serve(requests, context, label, handle)

        return serve


_LABELS = {
    "ComputeLossBatch": "batch",
    "PutTensor": "put_tensor",
    "ListTensors": "list_tensors",
    "DeleteTensor": "delete_tensor",
}
"""The `loss` label of the methods that are not one loss call (those learn theirs from the request)."""
