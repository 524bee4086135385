"""Standard services (health, reflection, the Open Inference Protocol's metadata methods) under a
memory budget and the idle timeout, like lossd's own methods.

gRPC reads a unary request's whole message before it calls a handler, up to `max_message_bytes`,
outside any budget. Here every method of those services is served as a raw stream instead: the call
reserves one message in a budget of its own (so that probes answer while loss calls fill theirs),
its messages are read with the idle timeout and parsed by the method's own deserializer, and its
answers are serialized and written as for lossd's calls.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from lossd.server.memory import MemoryBudget
from lossd.server.rpc.lifecycle import Context, Lifecycle
from lossd.server.rpc.requests import parse_message
from lossd.server.rpc.status import abort
from lossd.wire.errors import LossdError

__all__ = ["HandlerCollector", "guarded"]


class HandlerCollector:
    """Stands in for a server when generated `add_..._to_server` functions register handlers."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Registered methods would bypass the guard; the generic handlers serve them."""


class _Context:
    """The call's context for the wrapped method: its writes are serialized and bounded."""

    def __init__(self, context: Context, losses: Lifecycle, serialize: Callable[[Any], bytes]) -> None:
        self._context = context
        self._losses = losses
        self._serialize = serialize

    async def write(self, message: Any) -> None:
        await self._losses.write(self._context, self._serialize(message))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _Guard(grpc.GenericRpcHandler):
    def __init__(
        self,
        losses: Lifecycle,
        inner: Sequence[grpc.GenericRpcHandler],
        budget: MemoryBudget,
        open_methods: frozenset[str],
    ) -> None:
        self._losses = losses
        self._inner = inner
        self._budget = budget
        self._open = open_methods

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        for inner in self._inner:
            handler = inner.service(handler_call_details)
            if handler is not None:
                return self._wrap(handler, handler_call_details.method in self._open)
        return None

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any], open: bool) -> grpc.RpcMethodHandler[Any, Any]:
        losses = self._losses
        budget = self._budget
        parse = handler.request_deserializer or (lambda raw: raw)
        serialize = handler.response_serializer or (lambda message: message)
        method: Callable[..., Any] | None = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        )
        assert method is not None, "a method handler has a behaviour"
        behaviour: Callable[..., Any] = method

        async def requests(raw: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            async for message in losses.messages(raw, failing=False):
                yield _parse(parse, message)

        async def serve(raw: AsyncIterator[bytes], context: Context) -> None:
            reservation = budget.open_for_task(context.peer() or "unknown")
            proxy = _Context(context, losses, serialize)
            try:
                if not open:
                    losses.identify(context)
                await reservation.grow_to(losses.max_message_bytes, None, "receiving this call's message")
                if handler.request_streaming:
                    argument: Any = requests(raw)
                else:
                    first = await losses.first_message(losses.messages(raw, failing=False))
                    argument = _parse(parse, first)
                    reservation.receiving = False
                result = behaviour(argument, proxy)
                if inspect.isasyncgen(result):
                    async for response in result:
                        await proxy.write(response)
                    return
                if inspect.isawaitable(result):
                    result = await result
                if handler.response_streaming:
                    if result is not None:  # a synchronous iterator
                        for response in result:
                            await proxy.write(response)
                    return
                await proxy.write(result)
            except (asyncio.CancelledError, LossdError) as error:
                cause = reservation.cause(error)
                if not isinstance(cause, LossdError):
                    raise
                await abort(context, cause)
            finally:
                reservation.close()

        return grpc.stream_stream_rpc_method_handler(serve)


def _parse(parse: Callable[[bytes], Any], raw: bytes) -> Any:
    return parse_message(parse, raw, "the request")


def guarded(
    losses: Lifecycle,
    handlers: Sequence[grpc.GenericRpcHandler],
    budget: MemoryBudget,
    open_methods: frozenset[str] = frozenset(),
) -> grpc.GenericRpcHandler:
    """`handlers`, served under `budget` and `losses`' idle timeout and message limit, each call
    identified first (as every call of lossd is) but for `open_methods` ("/package.Service/Method":
    probes)."""
    return _Guard(losses, handlers, budget, open_methods)
