"""`LossClient` and `AsyncLossClient`: one method per loss, torch's argument names and defaults."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc

from lossd.client import chunks, codec
from lossd.client._calls import (
    DEFAULT_IGNORE_INDEX,
    ArrayT,
    LossResult,
    PreparedCall,
    ReductionName,
    StreamReceiver,
    decode_response,
    prepare_call,
)
from lossd.client._rpc_errors import from_rpc_error
from lossd.client.channels import DEFAULT_RETRY_ATTEMPTS, auth_metadata, make_aio_channel, make_channel
from lossd.client.errors import FailedPreconditionError, LossdError, ResourceExhaustedError, UnavailableError
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc

__all__ = ["DEFAULT_TARGET", "AsyncLossClient", "LossClient"]

DEFAULT_TARGET = "localhost:50051"
DEFAULT_STREAM_THRESHOLD = 4 << 20
"""Calls whose tensors hold more bytes than this go as a StreamLoss stream (4 MiB)."""
STREAM_METHOD = "/lossd.v1.LossService/StreamLoss"
_UNLIMITED = -1

ChannelOptions = Sequence[tuple[str, Any]]


R = TypeVar("R")


def _connection_lost(error: LossdError) -> bool:
    """A call that failed because its connection broke (the server died) after the server began to
    answer: gRPC's retry policy no longer retries it (the answer's headers commit the call), but a
    loss call is idempotent, so the client sends it once more. lossd's own UNAVAILABLE answers carry
    a reason and were already retried by the policy."""
    return isinstance(error, UnavailableError) and not error.reason


class LossMethods(Generic[R]):
    """The per-loss methods, written once, with torch's signatures (`weight` is positional, as in
    `torch.nn.functional`); `_send` makes them blocking or awaitable."""

    def __init__(
        self, timeout: float | None, stream_threshold_bytes: int, stream_chunk_bytes: int, token: str | None
    ) -> None:
        self._timeout = timeout
        self._closed = False
        self._resend = False  # set by the clients from retry_attempts
        self._metadata = auth_metadata(token)
        self._stream_threshold = stream_threshold_bytes
        self._chunk_bytes = stream_chunk_bytes

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

    def nll_loss(
        self,
        input: ArrayT,
        target: codec.TensorLike,
        weight: codec.TensorLike | None = None,
        *,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        reduction: ReductionName = "mean",
        return_grad: bool = False,
        grad_dtype: object = None,
        grad_output: codec.TensorLike | None = None,
        timeout: float | None = None,
    ) -> R:
        """`torch.nn.functional.nll_loss(input, target, ...)`, computed by the server.

        `return_grad` also returns d(loss)/d(input); `grad_dtype` sets its dtype (default: the
        input's); `grad_output` is the upstream gradient (default: ones).
        """
        return self._send(
            lambda: prepare_call(
                "nll_loss",
                input,
                target,
                weight=weight,
                ignore_index=ignore_index,
                reduction=reduction,
                return_grad=return_grad,
                grad_dtype=grad_dtype,
                grad_output=grad_output,
            ),
            input,
            timeout,
        )

    def cross_entropy(
        self,
        input: ArrayT,
        target: codec.TensorLike,
        weight: codec.TensorLike | None = None,
        *,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        reduction: ReductionName = "mean",
        label_smoothing: float = 0.0,
        return_grad: bool = False,
        return_target_grad: bool = False,
        grad_dtype: object = None,
        grad_output: codec.TensorLike | None = None,
        timeout: float | None = None,
    ) -> R:
        """`torch.nn.functional.cross_entropy(input, target, ...)`, computed by the server.

        `target` holds class indices, or class probabilities when it has the input's shape.
        `return_target_grad` (probability targets only) also returns d(loss)/d(target).
        """
        return self._send(
            lambda: prepare_call(
                "cross_entropy",
                input,
                target,
                weight=weight,
                ignore_index=ignore_index,
                reduction=reduction,
                label_smoothing=label_smoothing,
                return_grad=return_grad,
                return_target_grad=return_target_grad,
                grad_dtype=grad_dtype,
                grad_output=grad_output,
            ),
            input,
            timeout,
        )

    def kl_div(
        self,
        input: ArrayT,
        target: codec.TensorLike,
        *,
        reduction: ReductionName = "mean",
        log_target: bool = False,
        return_grad: bool = False,
        return_target_grad: bool = False,
        grad_dtype: object = None,
        grad_output: codec.TensorLike | None = None,
        timeout: float | None = None,
    ) -> R:
        """`torch.nn.functional.kl_div(input, target, ...)`, computed by the server.

        `input` holds log-probabilities; `target` probabilities (log-probabilities with
        `log_target=True`). As in torch, the default reduction 'mean' divides by every element;
        'batchmean' is the KL divergence proper.
        """
        return self._send(
            lambda: prepare_call(
                "kl_div",
                input,
                target,
                reduction=reduction,
                log_target=log_target,
                return_grad=return_grad,
                return_target_grad=return_target_grad,
                grad_dtype=grad_dtype,
                grad_output=grad_output,
            ),
            input,
            timeout,
        )


class LossClient(LossMethods[LossResult[Any]]):
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
    """

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
        channel: grpc.Channel | None = None,
        stream_threshold_bytes: int = DEFAULT_STREAM_THRESHOLD,
        stream_chunk_bytes: int = chunks.DEFAULT_CHUNK_BYTES,
    ) -> None:
        super().__init__(timeout, stream_threshold_bytes, stream_chunk_bytes, token)
        self._resend = retry_attempts > 1
        self._owns_channel = channel is None
        if channel is None:
            channel = make_channel(
                target,
                credentials=credentials,
                max_message_bytes=max_message_bytes,
                retry_attempts=retry_attempts,
                options=options,
            )
        self._channel = channel
        self._stub = pb_grpc.LossServiceStub(channel)
        # Raw bytes both ways: see lossd.client.chunks.
        self._stream_call: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(STREAM_METHOD)

    def compute(
        self, request: pb.ComputeLossRequest, *, timeout: float | None = None
    ) -> pb.ComputeLossResponse:
        """Sends a raw request; for callers that build `lossd.v1` messages themselves."""
        self._check_open()
        for attempt in (1, 2):
            try:
                return self._stub.ComputeLoss(
                    request, timeout=self._deadline(timeout), metadata=self._metadata
                )
            except grpc.RpcError as exc:
                error = self._resending(exc, attempt)
                if error is None:
                    continue
                raise error from None
        raise AssertionError("unreachable")

    def _send(self, build: Callable[[], PreparedCall], like: Any, timeout: float | None) -> LossResult[Any]:
        self._check_open()
        call = build()
        if not self._streams(call):
            try:
                return decode_response(self.compute(call.unary(), timeout=timeout), like)
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


class AsyncLossClient(LossMethods[Awaitable[LossResult[Any]]]):
    """The asyncio twin of `LossClient`: the same loss methods, awaited.

    ```python
    async with AsyncLossClient("localhost:50051") as client:
        result = await client.kl_div(student_log_probs, teacher_probs, reduction="batchmean")
    ```
    """

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
        channel: grpc.aio.Channel | None = None,
        stream_threshold_bytes: int = DEFAULT_STREAM_THRESHOLD,
        stream_chunk_bytes: int = chunks.DEFAULT_CHUNK_BYTES,
    ) -> None:
        super().__init__(timeout, stream_threshold_bytes, stream_chunk_bytes, token)
        self._resend = retry_attempts > 1
        self._owns_channel = channel is None
        if channel is None:
            channel = make_aio_channel(
                target,
                credentials=credentials,
                max_message_bytes=max_message_bytes,
                retry_attempts=retry_attempts,
                options=options,
            )
        self._channel = channel
        self._stub = pb_grpc.LossServiceStub(channel)
        # Raw bytes both ways: see lossd.client.chunks.
        self._stream_call: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            STREAM_METHOD
        )

    async def compute(
        self, request: pb.ComputeLossRequest, *, timeout: float | None = None
    ) -> pb.ComputeLossResponse:
        """Sends a raw request; for callers that build `lossd.v1` messages themselves."""
        self._check_open()
        for attempt in (1, 2):
            try:
                return await self._stub.ComputeLoss(
                    request, timeout=self._deadline(timeout), metadata=self._metadata
                )
            except grpc.RpcError as exc:
                error = self._resending(exc, attempt)
                if error is None:
                    continue
                raise error from None
        raise AssertionError("unreachable")

    def _send(
        self, build: Callable[[], PreparedCall], like: Any, timeout: float | None
    ) -> Awaitable[LossResult[Any]]:
        async def send() -> LossResult[Any]:
            self._check_open()
            call = build()
            if not self._streams(call):
                try:
                    return decode_response(await self.compute(call.unary(), timeout=timeout), like)
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
