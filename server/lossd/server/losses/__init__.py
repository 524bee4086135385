"""The losses: one module each (`nll`, `cross_entropy`, `kl_div`), the `Loss` interface they
implement (`base`), and the registry that maps a request's loss to its module.

To add a loss: write its module (a `Loss` subclass and its options), add it to `registry.LOSSES`,
add its options message to the .proto's `loss` oneof, and declare it in the client (see
CONTRIBUTING.md).
"""

from lossd.server.losses.base import REDUCTIONS, Loss, LossCall, LossFunction, LossOptions, LossOutput
from lossd.server.losses.registry import LOSSES, make_options
from lossd.server.losses.validation import loss_shape, validate

__all__ = [
    "LOSSES",
    "REDUCTIONS",
    "Loss",
    "LossCall",
    "LossFunction",
    "LossOptions",
    "LossOutput",
    "loss_shape",
    "make_options",
    "validate",
]
