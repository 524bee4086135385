"""The lossd Python client: remote PyTorch losses and gradients over gRPC.

- `LossClient` / `AsyncLossClient`: one method per loss (`nll_loss`, `cross_entropy`, `kl_div`,
  `distillation`, `linear_cross_entropy`, `linear_distillation`) with torch's arguments; numpy
  arrays or torch tensors in, the same kind out.
- `lossd.client.torch`: the same losses as autograd functions (needs torch).
- `lossd.client.losses`: the losses, each declared once (what the methods and functions derive from).
- `lossd.client.errors`: one exception per gRPC status code, with the server's ErrorInfo reason.
- `lossd.client.codec`: numpy / torch <-> `lossd.v1.Tensor` (from `lossd.wire`, shared with the server).

Names are imported on first use, so `lossd.client.errors` and `lossd.client.codec` load without gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lossd.wire.version import __version__

if TYPE_CHECKING:
    from lossd.client._calls import LossResult, Resident
    from lossd.client._client import AsyncLossClient, LossClient
    from lossd.wire.errors import (
        DeadlineExceededError,
        InternalError,
        InvalidArgumentError,
        LossdError,
        ResourceExhaustedError,
        UnavailableError,
    )

__all__ = [
    "AsyncLossClient",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "LossClient",
    "LossResult",
    "LossdError",
    "Resident",
    "ResourceExhaustedError",
    "UnavailableError",
    "__version__",
]

_HOMES = {
    "AsyncLossClient": "lossd.client._client",
    "LossClient": "lossd.client._client",
    "LossResult": "lossd.client._calls",
    "Resident": "lossd.client._calls",
    "DeadlineExceededError": "lossd.client.errors",
    "InternalError": "lossd.client.errors",
    "InvalidArgumentError": "lossd.client.errors",
    "LossdError": "lossd.client.errors",
    "ResourceExhaustedError": "lossd.client.errors",
    "UnavailableError": "lossd.client.errors",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lossd.client' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
