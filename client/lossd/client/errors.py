"""lossd's exceptions, one class per gRPC status code (defined in `lossd.wire.errors`, which the
server shares): catch `LossdError`, or the class of one status code."""

from lossd.wire.errors import *  # noqa: F403
from lossd.wire.errors import __all__  # noqa: F401  (the same public names)
