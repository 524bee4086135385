"""`lossd serve` with a fault-injecting engine, for tests that need a real process.

    python tests/injected_server.py [--delay SECONDS] [--poison] -- [lossd serve flags]

`--delay` holds every computation that long (calls stay in flight, as on a loaded server);
`--poison`: a call whose input starts with `POISON` raises the error a CUDA device-side assert
raises, after which the device stops working (as a poisoned CUDA context does). The rest is
`lossd serve` itself: the same configuration, log lines, signals and exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from lossd.cli import configure
from lossd.server.app import serve
from lossd.server.config import ServerConfig
from lossd.server.engine import LossEngine
from lossd.server.engine.merging import MergeKey
from lossd.server.losses import LossCall, LossOutput

POISON = 1234.5


class InjectedEngine(LossEngine):
    """A CPU engine with injected delays and a simulated sticky device error."""

    def __init__(self, delay: float = 0.0, poison: bool = False, **kwargs: Any) -> None:
        super().__init__("cpu", **kwargs)
        self.delay = delay
        self.poison = poison
        self.broken = False
        self.computed = 0

    def _inject(self, calls: Sequence[LossCall]) -> None:
        if self.broken:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        if self.poison and any(float(call.input.reshape(-1)[0]) == POISON for call in calls):
            self.broken = True
            raise torch.AcceleratorError(
                "CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA to enable "
                "device-side assertions."
            )

    def compute_batch(self, calls: Sequence[LossCall], merge: bool = True) -> list[LossOutput | Exception]:
        if self.delay:
            time.sleep(self.delay)
        self.computed += len(calls)
        return super().compute_batch(calls, merge)

    def _run(self, call: LossCall) -> LossOutput:
        self._inject([call])
        return super()._run(call)

    def _merged(self, calls: Sequence[LossCall], key: MergeKey) -> list[LossOutput]:
        self._inject(calls)
        return super()._merged(calls, key)

    def device_works(self) -> bool:
        return not self.broken


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--poison", action="store_true")
    args, serve_args = parser.parse_known_args(argv)
    config = ServerConfig.parse([a for a in serve_args if a != "--"])
    configure(config)
    engine = InjectedEngine(args.delay, args.poison, reject_nonfinite=config.reject_nonfinite)
    return asyncio.run(serve(config, engine=engine))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
