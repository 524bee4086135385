"""numpy / torch arrays <-> `lossd.v1.Tensor` (defined in `lossd.wire.codec`, which the server
shares), for clients that build `lossd.v1` messages themselves."""

from lossd.wire.codec import *  # noqa: F403
from lossd.wire.codec import __all__  # noqa: F401  (the same public names)
