"""The loss engine: validated calls computed with torch on one device, alone or merged by rows,
large streams in blocks, device faults contained. Pure torch and numpy; nothing of gRPC, protobuf
or metrics.

- `loss_engine`: `LossEngine`, the entry point (`compute`, `prepare`, `compute_batch`).
- `merging`: many calls as rows of one computation, each with its own reduction.
- `blocks`: one streamed call in blocks of samples while its input still arrives.
- `staging`: host arrays to the device and back (pinned memory on CUDA).
- `faults`: out-of-memory and device errors told apart; whether the device still works.
- `finite`: NaN and infinity found before compute.
"""

from lossd.server.engine.loss_engine import LossEngine, resolve_device

__all__ = ["LossEngine", "resolve_device"]
