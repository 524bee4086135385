"""lossd's exceptions: one class per gRPC status code, shared by the client and the server.

```
LossdError
├── InvalidArgumentError (also a ValueError)  INVALID_ARGUMENT: bad input; `field` names it
├── ResourceExhaustedError                     RESOURCE_EXHAUSTED: over a size limit, or a full queue
├── UnavailableError                           UNAVAILABLE: not reachable, starting or draining
├── DeadlineExceededError                      DEADLINE_EXCEEDED
├── CancelledError                             CANCELLED
├── InternalError                              INTERNAL: a bug in lossd
└── UnknownError, NotFoundError, AlreadyExistsError, PermissionDeniedError,
    FailedPreconditionError, AbortedError, OutOfRangeError, UnimplementedError,
    DataLossError, UnauthenticatedError
```

The server raises these from its validation and maps them onto the gRPC status with a
`google.rpc.ErrorInfo` (domain "lossd", `reason`, `metadata`); the client rebuilds the same class
from that status. This module imports nothing of gRPC, so the server's pure-torch loss engine can
use it too: the status code travels as its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

__all__ = [
    "DOMAIN",
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "LossdError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "error_class",
]

DOMAIN = "lossd"
"""The `ErrorInfo.domain` of every error lossd itself raises."""


class LossdError(Exception):
    """An error from lossd, with the gRPC status code it travels as.

    **Attributes:**
    - `code`: the gRPC status code's name, e.g. `"INVALID_ARGUMENT"`.
    - `message`: the human-readable message (the status details).
    - `reason`: the stable `ErrorInfo.reason` (UPPER_SNAKE) to branch on, or `""` when the error
      did not come from lossd (a transport failure, say).
    - `field`: the request field at fault (`"target"`, `"cross_entropy.weight"`), if any.
    - `metadata`: the values behind the message (`ErrorInfo.metadata`), strings keyed in lowerCamelCase.
    - `retry_after`: seconds the server suggests waiting before retrying (`google.rpc.RetryInfo`),
      or None when it gave no hint (retrying would not help, or it did not say).
    """

    code: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.field = field
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_after = retry_after

    def __str__(self) -> str:
        reason = f" {self.reason}" if self.reason and self.reason != self.code else ""
        return f"{self.message} [{self.code}{reason}]"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r}, field={self.field!r})"


class CancelledError(LossdError):
    """The call was cancelled, usually by the caller."""

    code = "CANCELLED"


class UnknownError(LossdError):
    """An error the server or transport could not classify."""

    code = "UNKNOWN"


class InvalidArgumentError(LossdError, ValueError):
    """The request is malformed or disagrees with itself; retrying it unchanged fails again."""

    code = "INVALID_ARGUMENT"


class DeadlineExceededError(LossdError):
    """The call's deadline passed before it completed."""

    code = "DEADLINE_EXCEEDED"


class NotFoundError(LossdError):
    """The requested method or resource does not exist."""

    code = "NOT_FOUND"


class AlreadyExistsError(LossdError):
    """The entity a call tried to create already exists."""

    code = "ALREADY_EXISTS"


class PermissionDeniedError(LossdError):
    """The caller is not allowed to make this call."""

    code = "PERMISSION_DENIED"


class ResourceExhaustedError(LossdError):
    """A size limit was exceeded or the server is out of capacity."""

    code = "RESOURCE_EXHAUSTED"


class FailedPreconditionError(LossdError):
    """The server is not in a state that allows the call."""

    code = "FAILED_PRECONDITION"


class AbortedError(LossdError):
    """The call was aborted, typically by a concurrency conflict."""

    code = "ABORTED"


class OutOfRangeError(LossdError):
    """A value was past the valid range."""

    code = "OUT_OF_RANGE"


class UnimplementedError(LossdError):
    """The server does not implement the method (an older server, say)."""

    code = "UNIMPLEMENTED"


class InternalError(LossdError):
    """A bug in lossd; the message is deliberately generic and the server logged the details."""

    code = "INTERNAL"


class UnavailableError(LossdError):
    """The server cannot be reached, or is starting or draining; retrying elsewhere or later helps."""

    code = "UNAVAILABLE"


class DataLossError(LossdError):
    """Unrecoverable data loss or corruption."""

    code = "DATA_LOSS"


class UnauthenticatedError(LossdError):
    """The call lacks valid credentials."""

    code = "UNAUTHENTICATED"


_BY_CODE: dict[str, type[LossdError]] = {
    cls.code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def error_class(code: str) -> type[LossdError]:
    """The exception class for a gRPC status code name (`UnknownError` for unknown names)."""
    return _BY_CODE.get(code, UnknownError)
