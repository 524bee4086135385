"""`LossClient` and `AsyncLossClient`: one method per loss, torch's argument names and defaults."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar

import grpc

from lossd.client._calls import (
    LossResult,
    PreparedCall,
    Resident,
    StreamReceiver,
    decode_response,
    prepare_call,
)
from lossd.client.channels import DEFAULT_RETRY_ATTEMPTS, auth_metadata, make_aio_channel, make_channel
from lossd.client.coalescing import (
    DEFAULT_IN_FLIGHT,
    DEFAULT_MAX_ENTRIES,
    AsyncCoalescer,
    Coalescer,
    SendAlone,
)
from lossd.client.losses import DECLARATIONS, LossDeclaration, Losses
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd.wire import chunks
from lossd.wire.errors import (
    FailedPreconditionError,
    LossdError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
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


def _connection_lost(error: LossdError) -> bool:
    """A call that failed because its connection broke (the server died) after the server began to
    answer: gRPC's retry policy no longer retries it (the answer's headers commit the call), but a
    loss call is idempotent, so the client sends it once more. lossd's own UNAVAILABLE answers carry
    a reason and were already retried by the policy."""
    return isinstance(error, UnavailableError) and not error.reason


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
        return self._send(lambda: prepare_call(declaration, input, target, **kwargs), input, timeout)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = declaration.doc
    method.__signature__ = declaration.signature  # type: ignore[attr-defined]
    return method


class LossMethods(Generic[R, C]):
    """What the blocking and the asyncio client share: the channel, the settings, and one method
    per loss, made from its declaration in `lossd.client.losses.Losses` (`_send` makes them
    blocking or awaitable)."""

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
    ) -> None:
        self._timeout = timeout
        self._closed = False
        self._resend = retry_attempts > 1
        self._metadata = auth_metadata(token)
        self._stream_threshold = stream_threshold_bytes
        self._chunk_bytes = stream_chunk_bytes
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
        self._residents: dict[str, Resident] = {}
        """Tensors uploaded through this client, by id."""
        self._coalescer: Any = None
        if coalesce:
            self._coalescer = type(self)._make_coalescer(
                channel, self._metadata, coalesce_max_entries, coalesce_in_flight
            )

    def _upload_messages(self, resident: Resident) -> Iterator[bytes]:
        yield chunks.encode_header(resident.header())
        yield from chunks.iter_chunks(int(pb.TENSOR_SLOT_RESIDENT), resident.data, self._chunk_bytes)

    def _known(self, tensor: Any) -> tuple[Resident, bool]:
        """The handle for `tensor`, and whether this client already uploaded it."""
        self._check_open()
        resident = tensor if isinstance(tensor, Resident) else Resident.of(tensor)
        known = self._residents.get(resident.id)
        return (known, True) if known is not None else (resident, False)

    @staticmethod
    def _missing(error: LossdError, call: PreparedCall) -> bool:
        """Whether a call failed only because the server does not hold a resident tensor it names."""
        return (
            isinstance(error, NotFoundError) and error.reason == "RESIDENT_NOT_FOUND" and bool(call.residents)
        )

    def _resending(self, exc: grpc.RpcError, attempt: int) -> LossdError | None:
        """None to send a unary call again (its connection broke mid-answer, first attempt),
        else the error to raise."""
        error = from_rpc_error(exc)
        return None if attempt == 1 and self._resend and _connection_lost(error) else error

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPreconditionError(
                f"this {type(self).__name__} is closed (its `with` block ended, or close() was "
                "called); make a new one",
                reason="CLIENT_CLOSED",
            )

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def _send(self, build: Callable[[], PreparedCall], like: Any, timeout: float | None) -> R:
        raise NotImplementedError

    def _streams(self, call: PreparedCall) -> bool:
        """Whether a call goes as a StreamLoss stream: when its tensors, or its answer's, outgrow
        the threshold (a server refuses a unary answer that no message could carry)."""
        return call.nbytes > self._stream_threshold or call.answer_nbytes > self._stream_threshold


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
    - `retry_attempts`: attempts per call while servers answer `UNAVAILABLE` (1: no retries).
    - `max_message_bytes`: send and receive limit for one message; -1 (default) is unlimited.
    - `options`: further gRPC channel options, applied last.
    - `channel`: an existing channel to use instead (the client then does not close it).
    - `coalesce`: gather calls made at once from several threads (tasks) into `ComputeLossBatch`
      calls (`lossd.client.coalescing`): on by default, since a caller alone is never delayed.
      `coalesce_in_flight` RPCs go at once (default 4; raise it for many replicas), and calls that
      find them all busy go together when one returns, up to `coalesce_max_entries` (64) per batch.
      Streamed calls (large tensors) are never coalesced.
    """

    _make_channel = staticmethod(make_channel)
    _make_coalescer = Coalescer

    def compute(
        self, request: pb.ComputeLossRequest, *, timeout: float | None = None
    ) -> pb.ComputeLossResponse:
        """Sends a raw request; for callers that build `lossd.v1` messages themselves."""
        self._check_open()
        for attempt in (1, 2):
            try:
                response: pb.ComputeLossResponse = self._stub.ComputeLoss(
                    request, timeout=self._deadline(timeout), metadata=self._metadata
                )
                return response
            except grpc.RpcError as exc:
                error = self._resending(exc, attempt)
                if error is None:
                    continue
                raise error from None
        raise AssertionError("unreachable")

    def _unary(self, request: pb.ComputeLossRequest, timeout: float | None) -> pb.ComputeLossResponse:
        """A unary call, coalesced with concurrent ones where coalescing is on."""
        if self._coalescer is None:
            return self.compute(request, timeout=timeout)
        try:
            response: pb.ComputeLossResponse = self._coalescer.compute(request, self._deadline(timeout))
            return response
        except SendAlone as failed:
            if not (failed.alone and failed.cause is not None):
                return self.compute(request, timeout=timeout)  # a batch failed: as a single call
            error = self._resending(failed.cause, 1)
            if error is not None:
                raise error from None
        try:  # the call went alone and its connection broke: once more, and only once
            again: pb.ComputeLossResponse = self._stub.ComputeLoss(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
            return again
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def resident(self, tensor: Any, *, timeout: float | None = None) -> Resident:
        """Uploads `tensor` (numpy or torch) for the server to hold, once: pass the handle wherever a
        loss takes a tensor and only its id travels. A tensor this client already uploaded is not
        sent again (handles are cached by content); a server that does not hold it (another
        replica, a restart, one that let it go) gets it again when a call names it."""
        resident, known = self._known(tensor)
        if not known:
            self._upload(resident, timeout)
        return resident

    def _upload(self, resident: Resident, timeout: float | None) -> None:
        try:
            self._put_call(
                self._upload_messages(resident), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        self._residents[resident.id] = resident

    def delete_resident(self, resident: Resident, *, timeout: float | None = None) -> bool:
        """Asks the server to let go of a resident tensor; whether it held it."""
        self._check_open()
        self._residents.pop(resident.id, None)
        try:
            answer = self._stub.DeleteTensor(
                pb.DeleteTensorRequest(id=resident.id),
                timeout=self._deadline(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return bool(answer.deleted)

    def _send(self, build: Callable[[], PreparedCall], like: Any, timeout: float | None) -> LossResult[Any]:
        try:
            return self._send_once(build, like, timeout)
        except LossdError as error:
            call = build()
            if not self._missing(error, call):
                raise
            for resident in call.residents:  # this server does not hold them: upload, then again
                self._upload(resident, timeout)
            return self._send_once(build, like, timeout)

    def _send_once(
        self, build: Callable[[], PreparedCall], like: Any, timeout: float | None
    ) -> LossResult[Any]:
        self._check_open()
        call = build()
        if not self._streams(call):
            try:
                return decode_response(self._unary(call.unary(), timeout), like)
            except ResourceExhaustedError as refused:
                if refused.reason != "RESPONSE_TOO_LARGE":
                    raise
                call = build()  # this server's messages are smaller than the answer: stream it
        receiver = StreamReceiver(like)
        try:
            stream = self._stream_call(
                call.stream(self._chunk_bytes), timeout=self._deadline(timeout), metadata=self._metadata
            )
            for raw in stream:
                receiver.feed(raw)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return receiver.result()

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
        for attempt in (1, 2):
            try:
                response: pb.ComputeLossResponse = await self._stub.ComputeLoss(
                    request, timeout=self._deadline(timeout), metadata=self._metadata
                )
                return response
            except grpc.RpcError as exc:
                error = self._resending(exc, attempt)
                if error is None:
                    continue
                raise error from None
        raise AssertionError("unreachable")

    async def _unary(self, request: pb.ComputeLossRequest, timeout: float | None) -> pb.ComputeLossResponse:
        """See `LossClient._unary`."""
        if self._coalescer is None:
            return await self.compute(request, timeout=timeout)
        try:
            response: pb.ComputeLossResponse = await self._coalescer.compute(request, self._deadline(timeout))
            return response
        except SendAlone as failed:
            if not (failed.alone and failed.cause is not None):
                return await self.compute(request, timeout=timeout)  # a batch failed: as a single call
            error = self._resending(failed.cause, 1)
            if error is not None:
                raise error from None
        try:  # the call went alone and its connection broke: once more, and only once
            again: pb.ComputeLossResponse = await self._stub.ComputeLoss(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
            return again
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def resident(self, tensor: Any, *, timeout: float | None = None) -> Resident:
        """See `LossClient.resident`."""
        resident, known = self._known(tensor)
        if not known:
            await self._upload(resident, timeout)
        return resident

    async def _upload(self, resident: Resident, timeout: float | None) -> None:
        try:
            await self._put_call(
                self._upload_messages(resident), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        self._residents[resident.id] = resident

    async def delete_resident(self, resident: Resident, *, timeout: float | None = None) -> bool:
        """See `LossClient.delete_resident`."""
        self._check_open()
        self._residents.pop(resident.id, None)
        try:
            answer = await self._stub.DeleteTensor(
                pb.DeleteTensorRequest(id=resident.id),
                timeout=self._deadline(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return bool(answer.deleted)

    def _send(
        self, build: Callable[[], PreparedCall], like: Any, timeout: float | None
    ) -> Awaitable[LossResult[Any]]:
        async def send_again() -> LossResult[Any]:
            try:
                return await self._send_once(build, like, timeout)
            except LossdError as error:
                call = build()
                if not self._missing(error, call):
                    raise
                for resident in call.residents:
                    await self._upload(resident, timeout)
                return await self._send_once(build, like, timeout)

        return send_again()

    def _send_once(
        self, build: Callable[[], PreparedCall], like: Any, timeout: float | None
    ) -> Awaitable[LossResult[Any]]:
        async def send() -> LossResult[Any]:
            self._check_open()
            call = build()
            if not self._streams(call):
                try:
                    return decode_response(await self._unary(call.unary(), timeout), like)
                except ResourceExhaustedError as refused:
                    if refused.reason != "RESPONSE_TOO_LARGE":
                        raise
                    call = build()  # this server's messages are smaller than the answer: stream it
            receiver = StreamReceiver(like)
            try:
                stream = self._stream_call(
                    call.stream(self._chunk_bytes), timeout=self._deadline(timeout), metadata=self._metadata
                )
                async for raw in stream:
                    receiver.feed(raw)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
            return receiver.result()

        return send()

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
