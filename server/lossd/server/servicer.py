"""The gRPC face of the engine: decode the request, await the engine off the event loop, encode."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

import grpc

from lossd.client import codec
from lossd.client.errors import InternalError, LossdError
from lossd.server.convert import call_from_request, response_from_output
from lossd.server.engine import LossEngine
from lossd.server.status import abort
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc

__all__ = ["LossServicer"]

_LOGGER = logging.getLogger(__name__)


class LossServicer(pb_grpc.LossServiceServicer):
    """Implements `lossd.v1.LossService` on a `LossEngine`.

    Compute runs on `executor`, so the event loop keeps accepting calls and answering health
    checks while a large loss is computed.
    """

    def __init__(self, engine: LossEngine, limits: codec.TensorLimits, executor: Executor) -> None:
        self._engine = engine
        self._limits = limits
        self._executor = executor

    async def ComputeLoss(
        self, request: pb.ComputeLossRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ComputeLossResponse:
        try:
            call = call_from_request(request, self._limits)
            output = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._engine.compute, call
            )
            return response_from_output(output)
        except LossdError as error:
            await abort(context, error)
        except Exception:
            _LOGGER.exception("ComputeLoss failed unexpectedly")
            await abort(
                context, InternalError("internal error; the server log has the details", reason="INTERNAL")
            )
        raise AssertionError("unreachable: abort() raises")
