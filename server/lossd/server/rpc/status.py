"""Ends a call with a `LossdError` as its gRPC status (see `lossd.wire.status`)."""

from __future__ import annotations

import grpc

from lossd.wire.errors import LossdError
from lossd.wire.status import rich_status

__all__ = ["abort"]


async def abort(context: grpc.aio.ServicerContext[object, object], error: LossdError) -> None:
    """Ends the call with `error`'s status; never returns normally."""
    code, message, trailers = rich_status(error)
    await context.abort(code, message, trailing_metadata=trailers)
