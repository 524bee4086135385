"""The lossd server: PyTorch losses and their gradients over gRPC.

- `lossd.server.losses`: one module per loss, the `Loss` interface, the registry (pure torch).
- `lossd.server.engine`: `LossEngine`, which computes them alone, merged or in blocks (pure torch).
- `lossd.server.rpc`: the call lifecycle and each method (lossd.v1, the Open Inference Protocol,
  health guards).
- `lossd.server.app`: `LossServer` (loss service, health, reflection) and `serve()`.
- `lossd.server.config`: `ServerConfig`, from flags and `LOSSD_*` variables.
- `lossd serve` / `python -m lossd.server serve`: the command line (`lossd.cli`).
"""

from lossd.wire.version import __version__

__all__ = ["__version__"]
