"""The losses: one module each (`nll`, `cross_entropy`, `kl_div`, `distillation`,
`linear_cross_entropy`, `linear_distillation`), the `Loss` interface they implement (`base`), the
bases of their families (`functional`: one torch call; `classes`: class scores; `chunked`: tokens in
chunks; `heads`: a linear head), the rules every loss shares (`validation`), the choice among a
loss's implementations (`implementations`) and the registry that maps a request's loss to its
module.

To add a loss: write its module, add its line to `registry.LOSSES`, its options message to the
.proto's `loss` oneof, and its declaration to the client (see CONTRIBUTING.md).
"""

from lossd.server.losses.base import (
    REDUCTIONS,
    Computed,
    Cost,
    Loss,
    LossCall,
    LossOptions,
    LossOutput,
    OutputSpec,
    Rows,
    TensorSpec,
)
from lossd.server.losses.registry import LOSSES, make_options
from lossd.server.losses.validation import loss_shape, validate

__all__ = [
    "LOSSES",
    "REDUCTIONS",
    "Computed",
    "Cost",
    "Loss",
    "LossCall",
    "LossOptions",
    "LossOutput",
    "OutputSpec",
    "Rows",
    "TensorSpec",
    "loss_shape",
    "make_options",
    "validate",
]
