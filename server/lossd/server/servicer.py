"""The gRPC face of the engine: decode and check the request, await the batcher, encode."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from lossd.client import codec
from lossd.client.errors import InternalError, LossdError
from lossd.server.batcher import Batcher
from lossd.server.calls import LossCall, LossOutput
from lossd.server.convert import call_from_request, response_from_output
from lossd.server.engine import LossEngine
from lossd.server.metrics import ServerMetrics
from lossd.server.status import abort
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc

__all__ = ["LossServicer"]

_LOGGER = logging.getLogger(__name__)


class LossServicer(pb_grpc.LossServiceServicer):
    """Implements `lossd.v1.LossService` on a `LossEngine` behind a `Batcher`.

    Validation runs here, before the request is queued, so a bad request is answered at once and
    never reaches the device; compute runs on the batcher's executor, off the event loop.
    """

    def __init__(
        self,
        engine: LossEngine,
        batcher: Batcher[LossCall, LossOutput],
        limits: codec.TensorLimits,
        metrics: ServerMetrics,
    ) -> None:
        self._engine = engine
        self._batcher = batcher
        self._limits = limits
        self._metrics = metrics

    async def ComputeLoss(
        self, request: pb.ComputeLossRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ComputeLossResponse:
        started = time.perf_counter()
        loss = request.WhichOneof("loss") or "unset"
        code, sent = "OK", 0
        self._metrics.in_flight.inc()
        try:
            call = self._engine.prepare(call_from_request(request, self._limits))
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None else None
            output = await self._batcher.submit(call, deadline)
            response = response_from_output(output)
            sent = response.ByteSize()
            return response
        except LossdError as error:
            code = error.code
            await abort(context, error)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            _LOGGER.exception("ComputeLoss failed unexpectedly")
            await abort(
                context, InternalError("internal error; the server log has the details", reason="INTERNAL")
            )
        finally:
            self._metrics.in_flight.dec()
            self._metrics.request(loss, code, time.perf_counter() - started, request.ByteSize(), sent)
        raise AssertionError("unreachable: abort() raises")
