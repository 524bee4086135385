"""What the blocking and the asyncio client share: how a call is sent, written once.

A call is a plan: a generator that yields the RPCs to make (`Unary`, `Stream`, `Upload`, `Delete`)
and is sent back each one's outcome as a value (a response, a result, or the `LossdError` it ended
with), never as an exception. The plan decides what comes next: a unary call whose answer is too
large for a message goes again as a stream, a coalesced call whose batch failed as a whole goes again
alone, a call whose connection broke mid-answer is sent once more, and a call naming resident
tensors the server does not hold uploads them and goes again. Each client only performs the RPCs,
blocking or awaited (`run` and `run_async` drive a plan); the plan returns the call's result or
error, which the client method raises.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from lossd.client._calls import LossResult, PreparedCall, Resident, decode_response
from lossd.v1 import loss_service_pb2 as pb
from lossd.wire.errors import LossdError, NotFoundError, ResourceExhaustedError, UnavailableError

__all__ = [
    "BatchFailed",
    "ClientCore",
    "Delete",
    "Outcome",
    "Plan",
    "RpcFailed",
    "Stream",
    "Unary",
    "Upload",
    "connection_lost",
    "run",
    "run_async",
]


@dataclass(frozen=True)
class Unary:
    """A ComputeLoss call; `coalesce`: through the coalescer, if the client has one."""

    request: pb.ComputeLossRequest
    timeout: float | None
    coalesce: bool


@dataclass(frozen=True)
class Stream:
    """A StreamLoss call; its outcome is the decoded result (like `like`) or its error."""

    call: PreparedCall
    like: Any
    timeout: float | None


@dataclass(frozen=True)
class Upload:
    """A PutTensor call; its outcome is None or its error."""

    resident: Resident
    timeout: float | None


@dataclass(frozen=True)
class Delete:
    """A DeleteTensor call; its outcome is whether the server held it, or its error."""

    id: str
    timeout: float | None


Operation = Unary | Stream | Upload | Delete


@dataclass(frozen=True)
class RpcFailed:
    """The RPC that carried this call alone failed with `error`; `connection_lost`: after the
    server began to answer (gRPC's retry policy no longer retries it)."""

    error: LossdError
    connection_lost: bool


@dataclass(frozen=True)
class BatchFailed:
    """The coalesced batch that carried this call failed as a whole (a draining server, a broken
    connection, a server without the method): send the call again alone."""


Outcome = pb.ComputeLossResponse | LossResult[Any] | LossdError | RpcFailed | BatchFailed | bool | None
"""What an operation ended with, as a value."""

T = TypeVar("T")
Plan = Generator[Operation, Outcome, T]


def connection_lost(error: LossdError) -> bool:
    """A call that failed because its connection broke (the server died) after the server began to
    answer: lossd's own UNAVAILABLE answers carry a reason, and were already retried by gRPC's
    policy; gRPC's own carry none."""
    return isinstance(error, UnavailableError) and not error.reason


class ClientCore:
    """A client's settings for sending calls, and the uploads it made (by id)."""

    def __init__(self, *, stream_threshold: int, resend: bool) -> None:
        self.stream_threshold = stream_threshold
        self.resend = resend
        self.residents: dict[str, Resident] = {}

    def known(self, tensor: Any) -> tuple[Resident, bool]:
        """The handle for `tensor`, and whether this client already uploaded it."""
        resident = tensor if isinstance(tensor, Resident) else Resident.of(tensor)
        known = self.residents.get(resident.id)
        return (known, True) if known is not None else (resident, False)

    def streams(self, call: PreparedCall) -> bool:
        """Whether a call goes as a StreamLoss stream: when its tensors, or its answer's, outgrow
        the threshold (a server refuses a unary answer that no message could carry)."""
        return call.nbytes > self.stream_threshold or call.answer_nbytes > self.stream_threshold

    # -- plans -----------------------------------------------------------------------------------

    def loss(
        self, build: Callable[[], PreparedCall], like: Any, timeout: float | None, coalesce: bool
    ) -> Plan[LossResult[Any] | LossdError]:
        """A loss call: sent, and once more after uploading the resident tensors it names if the
        server holds none of them."""
        outcome = yield from self._send(build, like, timeout, coalesce)
        if not isinstance(outcome, NotFoundError) or outcome.reason != "RESIDENT_NOT_FOUND":
            return outcome
        call = build()
        if not call.residents:
            return outcome
        for resident in call.residents:  # this server does not hold them: upload, then again
            uploaded = yield from self.upload(resident, timeout)
            if uploaded is not None:
                return uploaded
        return (yield from self._send(build, like, timeout, coalesce))

    def _send(
        self, build: Callable[[], PreparedCall], like: Any, timeout: float | None, coalesce: bool
    ) -> Plan[LossResult[Any] | LossdError]:
        call = build()
        if not self.streams(call):
            answer = yield from self.unary(call.unary(), timeout, coalesce)
            if isinstance(answer, pb.ComputeLossResponse):
                return decode_response(answer, like)
            if not (isinstance(answer, ResourceExhaustedError) and answer.reason == "RESPONSE_TOO_LARGE"):
                return answer
            call = build()  # this server's messages are smaller than the answer: stream it
        outcome = yield Stream(call, like, timeout)
        assert isinstance(outcome, (LossResult, LossdError))
        return outcome

    def unary(
        self, request: pb.ComputeLossRequest, timeout: float | None, coalesce: bool
    ) -> Plan[pb.ComputeLossResponse | LossdError]:
        """A ComputeLoss call, coalesced where asked; alone again when its batch failed as a whole,
        and once more when its connection broke mid-answer."""
        outcome = yield Unary(request, timeout, coalesce)
        if isinstance(outcome, BatchFailed):
            outcome = yield Unary(request, timeout, False)
        if isinstance(outcome, RpcFailed) and outcome.connection_lost and self.resend:
            outcome = yield Unary(request, timeout, False)
        if isinstance(outcome, RpcFailed):
            return outcome.error
        assert isinstance(outcome, (pb.ComputeLossResponse, LossdError)), outcome
        return outcome

    def upload(self, resident: Resident, timeout: float | None) -> Plan[LossdError | None]:
        """A PutTensor call; the tensor is known to this client once it succeeded."""
        outcome = yield Upload(resident, timeout)
        if isinstance(outcome, LossdError):
            return outcome
        self.residents[resident.id] = resident
        return None

    def delete(self, resident: Resident, timeout: float | None) -> Plan[bool | LossdError]:
        """A DeleteTensor call; the tensor is no longer known to this client either way."""
        self.residents.pop(resident.id, None)
        outcome = yield Delete(resident.id, timeout)
        assert isinstance(outcome, (bool, LossdError))
        return outcome


def run(plan: Plan[T], perform: Callable[[Operation], Outcome]) -> T:
    """Drives `plan`, performing each operation blocking; its return value."""
    outcome: Outcome = None
    while True:
        try:
            operation = plan.send(outcome)
        except StopIteration as done:
            result: T = done.value
            return result
        outcome = perform(operation)


async def run_async(plan: Plan[T], perform: Callable[[Operation], Awaitable[Outcome]]) -> T:
    """Drives `plan`, awaiting each operation; its return value."""
    outcome: Outcome = None
    while True:
        try:
            operation = plan.send(outcome)
        except StopIteration as done:
            result: T = done.value
            return result
        outcome = await perform(operation)
