"""What lossd's client and server share on the wire, imported by both and by neither's internals.

- `codec`: numpy / torch arrays <-> `lossd.v1.Tensor` (torch optional).
- `chunks`: StreamLoss framing: headers and chunks, read and written with one copy each way.
- `errors`: one exception per gRPC status code, with lossd's ErrorInfo reason (no gRPC import).
- `status`: those errors <-> a gRPC status with the rich error model (google.rpc.Status).
- `version`: the release.

Installed with the client's base dependencies (numpy, protobuf, grpcio, googleapis-common-protos).
"""

from lossd.wire.version import __version__

__all__ = ["__version__"]
