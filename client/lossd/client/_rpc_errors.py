"""Turns a failed gRPC call into the matching `LossdError`, with the server's ErrorInfo and RetryInfo."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from lossd.client.errors import LossdError, error_class

__all__ = ["STATUS_DETAILS_KEY", "from_rpc_error"]

STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""The trailer that carries a serialized `google.rpc.Status` (the gRPC rich error model)."""


def from_rpc_error(error: grpc.RpcError) -> LossdError:
    """The `LossdError` subclass for the call's status code, carrying reason, field and metadata.

    Works for both `grpc.Call` errors and `grpc.aio.AioRpcError`.
    """
    code = error.code()
    message = error.details() or code.name
    reason, field, metadata, retry_after = "", None, {}, None
    # Sync calls yield (key, value) namedtuples, aio calls plain tuples; the stubs know only the first.
    trailers: Any = error.trailing_metadata()
    for key, value in trailers or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
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
    return error_class(code.name)(
        message, reason=reason, field=field, metadata=metadata, retry_after=retry_after
    )
