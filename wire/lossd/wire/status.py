"""`LossdError` <-> a gRPC status with the rich error model: `google.rpc.Status` in the trailer,
carrying ErrorInfo (reason, metadata), BadRequest (the field) and RetryInfo. The server writes it
(`rich_status`), the client reads it back into the same class (`from_rpc_error`)."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from lossd.wire.errors import DOMAIN, LossdError, error_class

__all__ = [
    "PUSHBACK_KEY",
    "PUSHBACK_REASONS",
    "STATUS_DETAILS_KEY",
    "from_rpc_error",
    "from_status",
    "pushback_ms",
    "rich_status",
    "status_of",
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""The trailer that carries a serialized `google.rpc.Status` (the gRPC rich error model)."""


def from_rpc_error(error: grpc.RpcError) -> LossdError:
    """The `LossdError` subclass for the call's status code, carrying reason, field and metadata.

    Works for both `grpc.Call` errors and `grpc.aio.AioRpcError`.
    """
    code = error.code()
    message = error.details() or code.name
    details: list[any_pb2.Any] = []
    # Sync calls yield (key, value) namedtuples, aio calls plain tuples; the stubs know only the first.
    trailers: Any = error.trailing_metadata()
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            details.extend(status_pb2.Status.FromString(value).details)
    return _error(code.name, message, details)


def from_status(status: status_pb2.Status | Any) -> LossdError:
    """The `LossdError` a `google.rpc.Status` (or a message with its fields: `lossd.v1.EntryStatus`)
    stands for: a batch entry's failure."""
    name = _NAMES.get(status.code, "UNKNOWN")
    return _error(name, status.message or name, list(status.details))


_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _error(name: str, message: str, details: list[any_pb2.Any]) -> LossdError:
    """The error class for the status code `name`, with what the details say."""
    reason, field, metadata, retry_after = "", None, {}, None
    for detail in details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field = bad.field_violations[0].field
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return error_class(name)(message, reason=reason, field=field, metadata=metadata, retry_after=retry_after)


def _pack(
    message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest | error_details_pb2.RetryInfo,
) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""gRPC's retry pushback (gRFC A6): a retrying client waits this many milliseconds before its next
attempt, and does not retry at all when it is negative."""
PUSHBACK_REASONS = frozenset({"TENANT_CALLS", "TENANT_MEMORY", "TENANT_COST_RATE", "QUEUE_FULL"})
"""The RESOURCE_EXHAUSTED refusals a retry after their delay can get past: a tenant's limits and a
full queue. Every other one (a call too large or too costly for the server, memory not freed in
the admission wait) tells a retrying client not to try again."""


def pushback_ms(error: LossdError) -> str | None:
    """The `grpc-retry-pushback-ms` a refusal carries: its delay, "-1" (no retry), or None for an
    error that is not RESOURCE_EXHAUSTED (gRPC's own backoff applies to what is retryable)."""
    if error.code != "RESOURCE_EXHAUSTED":
        return None
    if error.reason in PUSHBACK_REASONS and error.retry_after is not None:
        return str(max(1, round(error.retry_after * 1000)))
    return "-1"


def rich_status(error: LossdError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """The status code, message and trailing metadata that carry `error` to a client."""
    status = status_of(error)
    trailers: tuple[tuple[str, str | bytes], ...] = ((STATUS_DETAILS_KEY, status.SerializeToString()),)
    pushback = pushback_ms(error)
    if pushback is not None:
        trailers += ((PUSHBACK_KEY, pushback),)
    return grpc.StatusCode[error.code], error.message, trailers


def status_of(error: LossdError) -> status_pb2.Status:
    """`error` as a `google.rpc.Status`: code, message, ErrorInfo, BadRequest and RetryInfo."""
    code = grpc.StatusCode[error.code]
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata))
    ]
    if error.field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.message, reason=error.reason
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(error.retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=code.value[0], message=error.message, details=details)
