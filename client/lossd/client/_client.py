"""`LossClient` and `AsyncLossClient`: one method per loss, torch's argument names and defaults."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar

import grpc

from lossd.client._calls import LossResult, PreparedCall, Resident, StreamReceiver, prepare_call
from lossd.client._core import (
    ClientCore,
    Delete,
    Operation,
    Outcome,
    Plan,
    RpcFailed,
    Stream,
    Unary,
    Upload,
    connection_lost,
    run,
    run_async,
)
from lossd.client.channels import DEFAULT_RETRY_ATTEMPTS, auth_metadata, make_aio_channel, make_channel
from lossd.client.coalescing import DEFAULT_IN_FLIGHT, DEFAULT_MAX_ENTRIES, AsyncCoalescer, Coalescer
from lossd.client.diagnosis import describe_target, explained
from lossd.client.losses import DECLARATIONS, LossDeclaration, Losses
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd.wire import chunks
from lossd.wire.errors import FailedPreconditionError, LossdError
from lossd.wire.status import from_rpc_error

__all__ = ["DEFAULT_TARGET", "AsyncLossClient", "LossClient"]

DEFAULT_TARGET = "localhost:50051"
DEFAULT_STREAM_THRESHOLD = 4 << 20
"""Calls whose tensors hold more bytes than this go as a StreamLoss stream (4 MiB)."""
STREAM_METHOD = "/lossd.v1.LossService/StreamLoss"
PUT_TENSOR_METHOD = "/lossd.v1.LossService/PutTensor"
_UNLIMITED = -1

ChannelOptions = Sequence[tuple[str, Any]]


R = TypeVar("R")
C = TypeVar("C", grpc.Channel, grpc.aio.Channel)
T = TypeVar("T")


def _loss_method(declaration: LossDeclaration) -> Callable[..., Any]:
    """The client method of one declared loss (see `lossd.client.losses`). Arguments are bound by
    hand, as Python would bind them to the declared signature (inspect's `bind` costs more than a
    small call's request takes to build)."""
    name, positional, accepts = declaration.name, declaration.positional, declaration.accepts

    def method(self: LossMethods[Any, Any], *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(positional):
            raise TypeError(
                f"{name}() takes {len(positional)} positional arguments but {len(args)} were given"
            )
        for parameter, value in zip(positional, args, strict=False):
            if parameter in kwargs:
                raise TypeError(f"{name}() got multiple values for argument {parameter!r}")
            kwargs[parameter] = value
        unknown = kwargs.keys() - accepts
        if unknown:
            raise TypeError(f"{name}() got unexpected keyword arguments {sorted(unknown)}")
        missing = [required for required in ("input", "target") if required not in kwargs]
        if missing:
            raise TypeError(f"{name}() missing required arguments {missing}")
        input, target = kwargs.pop("input"), kwargs.pop("target")
        timeout = kwargs.pop("timeout", None)
        nonfinite = self._nonfinite
        return self._send(
            lambda: prepare_call(declaration, input, target, nonfinite=nonfinite, **kwargs), input, timeout
        )

    method.__name__ = method.__qualname__ = name
    method.__doc__ = declaration.doc
    method.__signature__ = declaration.signature  # type: ignore[attr-defined]
    return method


class LossMethods(abc.ABC, Generic[R, C]):
    """What the blocking and the asyncio client share: the channel, the settings, the call plans
    (`lossd.client._core.ClientCore`), and one method per loss, made from its declaration in
    `lossd.client.losses.Losses`. Each client only performs the plans' RPCs, blocking or awaited."""

    _make_channel: ClassVar[Callable[..., Any]]
    _make_coalescer: ClassVar[Callable[..., Any]]

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        retry_attempts: int = DEFAULT_RETRY_ATTEMPTS,
        max_message_bytes: int = _UNLIMITED,
        options: ChannelOptions = (),
        channel: C | None = None,
        stream_threshold_bytes: int = DEFAULT_STREAM_THRESHOLD,
        stream_chunk_bytes: int = chunks.DEFAULT_CHUNK_BYTES,
        coalesce: bool = True,
        coalesce_max_entries: int = DEFAULT_MAX_ENTRIES,
        coalesce_in_flight: int = DEFAULT_IN_FLIGHT,
        nonfinite: str | None = None,
    ) -> None:
        self._timeout = timeout
        self._nonfinite = nonfinite
        self._target = describe_target(target)
        self._closed = False
        self._metadata = auth_metadata(token)
        self._chunk_bytes = stream_chunk_bytes
        self._core = ClientCore(stream_threshold=stream_threshold_bytes, resend=retry_attempts > 1)
        self._owns_channel = channel is None
        if channel is None:
            channel = type(self)._make_channel(
                target,
                credentials=credentials,
                max_message_bytes=max_message_bytes,
                retry_attempts=retry_attempts,
                options=options,
            )
        self._channel: C = channel
        self._stub: Any = pb_grpc.LossServiceStub(channel)
        # Raw bytes both ways: see lossd.wire.chunks.
        self._stream_call: Any = channel.stream_stream(STREAM_METHOD)
        self._put_call: Any = channel.stream_unary(
            PUT_TENSOR_METHOD, response_deserializer=pb.PutTensorResponse.FromString
        )
        self._coalescer: Any = None
        if coalesce:
            self._coalescer = type(self)._make_coalescer(
                channel, self._metadata, coalesce_max_entries, coalesce_in_flight
            )

    def _upload_messages(self, resident: Resident) -> Iterator[bytes]:
        yield chunks.encode_header(resident.header())
        yield from chunks.iter_chunks("", resident.data, self._chunk_bytes)

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPreconditionError(
                f"this {type(self).__name__} is closed (its `with` block ended, or close() was "
                "called); make a new one",
                reason="CLIENT_CLOSED",
            )

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def _raised(self, outcome: T | LossdError, timeout: float | None) -> T:
        """A plan's result, or its error raised: the one place a call's failure becomes an
        exception, said in lossd's words (`lossd.client.diagnosis`)."""
        if isinstance(outcome, LossdError):
            raise explained(outcome, self._target, self._deadline(timeout))
        return outcome

    @abc.abstractmethod
    def _send(self, build: Callable[[], PreparedCall], like: Any, timeout: float | None) -> R:
        """Runs a loss call's plan: blocking, or as an awaitable."""

    def _loss_plan(
        self, build: Callable[[], PreparedCall], like: Any, timeout: float | None
    ) -> Plan[LossResult[Any] | LossdError]:
        self._check_open()
        return self._core.loss(build, like, self._deadline(timeout), self._coalescer is not None)

    def _failed(self, exc: grpc.RpcError) -> RpcFailed:
        error = from_rpc_error(exc)
        return RpcFailed(error, connection_lost(error))


for _declaration in DECLARATIONS.values():
    setattr(LossMethods, _declaration.name, _loss_method(_declaration))


class LossClient(LossMethods[LossResult[Any], grpc.Channel], Losses[LossResult[Any]]):
    """A blocking lossd client.

    ```python
    with LossClient("localhost:50051") as client:
        result = client.cross_entropy(logits, labels, label_smoothing=0.1, return_grad=True)
        result.loss, result.grad
    ```

    Inputs are numpy arrays or torch tensors (any device); results come back as the same kind,
    torch tensors on the input's device. Failures raise `lossd.client.LossdError` subclasses.

    **Parameters:**
    - `target`: the server's address, any gRPC target (`host:port`, `dns:///name:port`, ...), or a
      list of `host:port` addresses. Calls are balanced round-robin over every address the target
      resolves to, and retried elsewhere when a server answers `UNAVAILABLE` (see
      `lossd.client.channels`).
    - `timeout`: default seconds per call (None: no deadline); each method can override it.
    - `credentials`: `grpc.ChannelCredentials` for TLS (`lossd.client.channels.tls_credentials`
      makes them from PEM files, mutual TLS included); None for a plaintext channel.
    - `token`: a bearer token sent with every call, for servers that require one.
    - `retry_attempts`: attempts per call while servers answer `UNAVAILABLE`, or
      `RESOURCE_EXHAUSTED` with a retry pushback (after its delay); 1: no retries.
    - `max_message_bytes`: send and receive limit for one message; -1 (default) is unlimited.
    - `options`: further gRPC channel options, applied last.
    - `channel`: an existing channel to use instead (the client then does not close it).
    - `coalesce`: gather calls made at once from several threads (tasks) into `ComputeLossBatch`
      calls (`lossd.client.coalescing`): on by default, since a caller alone is never delayed.
      `coalesce_in_flight` RPCs go at once (default 4; raise it for many replicas), and calls that
      find them all busy go together when one returns, up to `coalesce_max_entries` (64) per batch.
      Streamed calls (large tensors) are never coalesced.
    - `nonfinite`: what the server does with NaN or infinity in this client's calls: "refuse"
      (INVALID_ARGUMENT NONFINITE_VALUE, naming the tensor and its first such index), "compute"
      (as torch, IEEE arithmetic), or None for the server's default (`--reject-nonfinite`).
    """

    _make_channel = staticmethod(make_channel)
    _make_coalescer = Coalescer

    def compute(
        self, request: pb.ComputeLossRequest, *, timeout: float | None = None
    ) -> pb.ComputeLossResponse:
        """Sends a raw request; for callers that build `lossd.v1` messages themselves."""
        self._check_open()
        return self._raised(
            run(self._core.unary(request, self._deadline(timeout), False), self._perform), timeout
        )

    def resident(self, tensor: Any, *, timeout: float | None = None) -> Resident:
        """Uploads `tensor` (numpy or torch) for the server to hold, once: pass the handle wherever a
        loss takes a tensor and only its id travels. A tensor this client already uploaded is not
        sent again (handles are cached by content); a server that does not hold it (another
        replica, a restart, one that let it go) gets it again when a call names it."""
        self._check_open()
        resident, known = self._core.known(tensor)
        if not known:
            self._raised(run(self._core.upload(resident, self._deadline(timeout)), self._perform), timeout)
        return resident

    def delete_resident(self, resident: Resident, *, timeout: float | None = None) -> bool:
        """Asks the server to let go of a resident tensor; whether it held it."""
        self._check_open()
        return self._raised(run(self._core.delete(resident, self._deadline(timeout)), self._perform), timeout)

    def _send(self, build: Callable[[], PreparedCall], like: Any, timeout: float | None) -> LossResult[Any]:
        return self._raised(run(self._loss_plan(build, like, timeout), self._perform), timeout)

    def _perform(self, operation: Operation) -> Outcome:
        """One RPC of a plan, blocking; its outcome as a value."""
        if isinstance(operation, Unary) and operation.coalesce and self._coalescer is not None:
            outcome: Outcome = self._coalescer.compute(operation.request, operation.timeout)
            return outcome
        try:
            if isinstance(operation, Unary):
                response: pb.ComputeLossResponse = self._stub.ComputeLoss(
                    operation.request, timeout=operation.timeout, metadata=self._metadata
                )
                return response
            if isinstance(operation, Stream):
                receiver = StreamReceiver(operation.like)
                stream = self._stream_call(
                    operation.call.stream(self._chunk_bytes),
                    timeout=operation.timeout,
                    metadata=self._metadata,
                )
                for raw in stream:
                    receiver.feed(raw)
                return receiver.result()
            if isinstance(operation, Upload):
                messages = self._upload_messages(operation.resident)
                self._put_call(messages, timeout=operation.timeout, metadata=self._metadata)
                return None
            assert isinstance(operation, Delete)
            answer = self._stub.DeleteTensor(
                pb.DeleteTensorRequest(id=operation.id), timeout=operation.timeout, metadata=self._metadata
            )
            return bool(answer.deleted)
        except grpc.RpcError as exc:
            failed = self._failed(exc)
            return failed if isinstance(operation, Unary) else failed.error
        except LossdError as error:  # a malformed answer stream
            return error

    def close(self) -> None:
        """Closes the channel, unless it was passed in; later calls raise `FailedPreconditionError`."""
        self._closed = True
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> LossClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncLossClient(
    LossMethods[Awaitable[LossResult[Any]], grpc.aio.Channel], Losses[Awaitable[LossResult[Any]]]
):
    """The asyncio twin of `LossClient`: the same loss methods, awaited.

    ```python
    async with AsyncLossClient("localhost:50051") as client:
        result = await client.kl_div(student_log_probs, teacher_probs, reduction="batchmean")
    ```
    """

    _make_channel = staticmethod(make_aio_channel)
    _make_coalescer = AsyncCoalescer

    async def compute(
        self, request: pb.ComputeLossRequest, *, timeout: float | None = None
    ) -> pb.ComputeLossResponse:
        """Sends a raw request; for callers that build `lossd.v1` messages themselves."""
        self._check_open()
        return self._raised(
            await run_async(self._core.unary(request, self._deadline(timeout), False), self._perform), timeout
        )

    async def resident(self, tensor: Any, *, timeout: float | None = None) -> Resident:
        """See `LossClient.resident`."""
        self._check_open()
        resident, known = self._core.known(tensor)
        if not known:
            self._raised(
                await run_async(self._core.upload(resident, self._deadline(timeout)), self._perform), timeout
            )
        return resident

    async def delete_resident(self, resident: Resident, *, timeout: float | None = None) -> bool:
        """See `LossClient.delete_resident`."""
        self._check_open()
        return self._raised(
            await run_async(self._core.delete(resident, self._deadline(timeout)), self._perform), timeout
        )

    def _send(
        self, build: Callable[[], PreparedCall], like: Any, timeout: float | None
    ) -> Awaitable[LossResult[Any]]:
        async def send() -> LossResult[Any]:
            return self._raised(
                await run_async(self._loss_plan(build, like, timeout), self._perform), timeout
            )

        return send()

    async def _perform(self, operation: Operation) -> Outcome:
        """One RPC of a plan, awaited; its outcome as a value."""
        if isinstance(operation, Unary) and operation.coalesce and self._coalescer is not None:
            outcome: Outcome = await self._coalescer.compute(operation.request, operation.timeout)
            return outcome
        try:
            if isinstance(operation, Unary):
                response: pb.ComputeLossResponse = await self._stub.ComputeLoss(
                    operation.request, timeout=operation.timeout, metadata=self._metadata
                )
                return response
            if isinstance(operation, Stream):
                receiver = StreamReceiver(operation.like)
                stream = self._stream_call(
                    operation.call.stream(self._chunk_bytes),
                    timeout=operation.timeout,
                    metadata=self._metadata,
                )
                async for raw in stream:
                    receiver.feed(raw)
                return receiver.result()
            if isinstance(operation, Upload):
                messages = self._upload_messages(operation.resident)
                await self._put_call(messages, timeout=operation.timeout, metadata=self._metadata)
                return None
            assert isinstance(operation, Delete)
            answer = await self._stub.DeleteTensor(
                pb.DeleteTensorRequest(id=operation.id), timeout=operation.timeout, metadata=self._metadata
            )
            return bool(answer.deleted)
        except grpc.RpcError as exc:
            failed = self._failed(exc)
            return failed if isinstance(operation, Unary) else failed.error
        except LossdError as error:  # a malformed answer stream
            return error

    async def close(self) -> None:
        """Closes the channel, unless it was passed in; later calls raise `FailedPreconditionError`."""
        self._closed = True
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> AsyncLossClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
