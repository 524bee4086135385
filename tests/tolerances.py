"""The tolerances the .proto states for the fused linear losses against their unfused references."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["close"]


def close(actual: Any, expected: torch.Tensor, dtype: torch.dtype, what: str, gradient: bool = False) -> None:
    """Within the .proto's tolerances (NaN where torch has NaN: a mean over no counted token)."""
    actual = torch.as_tensor(actual).double()
    expected = expected.double()
    finite = expected[torch.isfinite(expected)]
    scale = max(float(finite.abs().max()) if finite.numel() else 1.0, 1e-3)
    if dtype == torch.float64:
        rtol, atol = 1e-10, 1e-12 * scale
    elif dtype == torch.float32:
        rtol, atol = (1e-4, 1e-6 * scale) if gradient else (1e-5, 1e-6 * scale)
    else:  # the composition in float32 on the same inputs; the gradient rounded to its dtype once
        eps = torch.finfo(dtype).eps
        rtol, atol = (eps, eps * scale) if gradient else (1e-5, 1e-6 * scale)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=what)
