"""Bearer-token authentication: every call carries `authorization: Bearer <token>` in its metadata.

A server interceptor, so that no handler runs (and no tensor is decoded) for a caller without a
valid token. Tokens are compared as SHA-256 digests with `hmac.compare_digest`, against every
accepted token without stopping early: the time a comparison takes says nothing about how much of
a token was right, nor which token matched. Health checks may stay open for probes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeAlias

import grpc

from lossd.server.rpc.status import abort
from lossd.wire.errors import UnauthenticatedError

__all__ = ["HEALTH_METHODS", "TokenAuth"]

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_SCHEME = "bearer "


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted bearer token with `UNAUTHENTICATED`.

    `open_methods` ("/package.Service/Method") need no token; `on_refusal(reason)` counts refusals.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        open_methods: Iterable[str] = (),
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        if not tokens:
            raise ValueError("token authentication needs at least one token")
        self._digests = [_digest(token) for token in tokens]
        self._open = frozenset(open_methods)
        self._on_refusal = on_refusal

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> UnauthenticatedError | None:
        """None when the metadata carries an accepted token; else the error to answer with."""
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if not isinstance(header, str) or not header.lower().startswith(_SCHEME):
            return UnauthenticatedError(
                "this server needs a bearer token: send the metadata 'authorization: Bearer <token>'",
                reason="TOKEN_MISSING",
            )
        given = _digest(header[len(_SCHEME) :].strip())
        matched = False
        for digest in self._digests:  # no early exit: equal time whichever token matches
            matched |= hmac.compare_digest(given, digest)
        if matched:
            return None
        return UnauthenticatedError("the bearer token is not accepted by this server", reason="TOKEN_INVALID")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._open:
            return handler
        error = self.check(handler_call_details.invocation_metadata)
        if error is None:
            return handler
        if self._on_refusal is not None:
            self._on_refusal(error.reason)
        return _refusing(handler, error)


def _refusing(handler: Handler, error: UnauthenticatedError) -> Handler:
    """A handler of the same shape as `handler` that only answers `error`."""

    async def refuse(_request: object, context: grpc.aio.ServicerContext[object, object]) -> None:
        await abort(context, error)

    codecs: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse, **codecs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    return grpc.stream_stream_rpc_method_handler(refuse, **codecs)
