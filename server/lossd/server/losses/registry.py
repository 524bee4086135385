"""The losses lossd serves, by name: the only list of them, one line per loss. A request's loss is
looked up here."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from lossd.server.losses.base import Loss, LossOptions
from lossd.server.losses.cross_entropy import CROSS_ENTROPY
from lossd.server.losses.distillation import DISTILLATION
from lossd.server.losses.kl_div import KL_DIV
from lossd.server.losses.linear_cross_entropy import LINEAR_CROSS_ENTROPY
from lossd.server.losses.linear_distillation import LINEAR_DISTILLATION
from lossd.server.losses.nll import NLL_LOSS

__all__ = ["LOSSES", "make_options"]

LOSSES: Mapping[str, Loss[Any]] = MappingProxyType(
    {
        loss.name: loss
        for loss in (NLL_LOSS, CROSS_ENTROPY, KL_DIV, DISTILLATION, LINEAR_CROSS_ENTROPY, LINEAR_DISTILLATION)
    }
)
"""Every loss by its name (the .proto `loss` oneof field, the torch function, the OIP model)."""


def make_options(name: str, reduction: str = "mean", **options: Any) -> LossOptions:
    """The options of the loss `name`, e.g. `make_options("cross_entropy", "sum", label_smoothing=0.1)`."""
    made: LossOptions = LOSSES[name].make_options(reduction, **options)
    return made
