"""The lossd server: PyTorch's NLL, cross-entropy and KL-divergence losses, with gradients, over gRPC.

- `lossd.server.engine`: the pure-torch loss engine (no gRPC).
- `lossd.server.app`: `LossServer` (loss service, health, reflection) and `serve()`.
- `lossd.server.config`: `ServerConfig`, from flags and `LOSSD_*` variables.
- `lossd serve` / `python -m lossd.server serve`: the command line.
"""

from lossd.client._version import __version__

__all__ = ["__version__"]
