"""A failure gRPC reports in its own words, said in lossd's: what went wrong and what to do.

The server's errors carry a reason and a message of their own and pass as they are. What gRPC
reports by itself (no server at the address, the caller's own timeout) carries none: it is
rewritten here to name the address or the timeout and the fix, and every error leaves the client
with a non-empty `reason`.
"""

from __future__ import annotations

from lossd.wire.errors import DeadlineExceededError, LossdError, UnavailableError

__all__ = ["TIMEOUT_HINT", "describe_target", "explained", "timed_out"]

TIMEOUT_HINT = (
    "raise it with the client's timeout (LossClient(target, timeout=...)) or the call's own "
    "timeout= argument; None waits as long as it takes"
)


def describe_target(target: object) -> str:
    """The address as a user gave it, for messages."""
    if isinstance(target, str):
        return target
    return ", ".join(str(address) for address in target) if isinstance(target, (list, tuple)) else str(target)


def timed_out(timeout: float | None, where: str = "") -> DeadlineExceededError:
    """The caller's own deadline passed (`where`: what the call was doing meanwhile)."""
    limit = f"{timeout:g} s" if timeout is not None else "its deadline"
    return DeadlineExceededError(
        f"the call took longer than its timeout ({limit}){where}; {TIMEOUT_HINT}",
        reason="TIMEOUT",
        metadata={"timeoutSeconds": f"{timeout:g}"} if timeout is not None else {},
    )


def explained(error: LossdError, target: str, timeout: float | None) -> LossdError:
    """`error` as the user should see it: the server's own as it is; gRPC's with the fix named."""
    if error.reason:
        return error
    if isinstance(error, UnavailableError):
        return UnavailableError(
            f"no lossd server answered at {target}: is lossd running there (`lossd serve`, or "
            f"scripts/serve from a checkout), and is the address right? (gRPC said: {error.message})",
            reason="UNREACHABLE",
            metadata={"target": target, "grpcMessage": error.message[:500]},
        )
    if isinstance(error, DeadlineExceededError):
        return timed_out(timeout)
    return type(error)(
        error.message,
        reason=error.code,
        field=error.field,
        metadata=error.metadata,
        retry_after=error.retry_after,
    )
