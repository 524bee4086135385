"""Several ways to compute one loss, and the choice among them on a device: the fastest that agrees
with the loss's own computation within the tolerances the .proto states.

A loss with implementations (`Loss.implementations`) lists its own torch computation first: the
reference, always available, used for every call the chosen one does not support. The others
(Liger Kernel, cut-cross-entropy, torch.compile) are candidates on the devices they run on: at
start-up each is run on the loss's probes (`Loss.probes`), refused if it fails or disagrees with the
reference on any probe it supports, and timed on the first; the fastest is chosen. Nothing falls back
silently: the start-up line and a metric name what was chosen and why the others were not, and a
counter names the implementation of every call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lossd.server.losses.base import Computed, Implementation, LossCall, Upload

__all__ = ["Choice", "choose", "disagreement"]


@dataclass(frozen=True)
class Choice:
    """The implementation chosen for one loss on one device, its reference (the loss's own), and
    what became of every candidate (name -> "chosen, 1.23 ms", "disagrees: ...", "not installed")."""

    chosen: Implementation
    reference: Implementation
    report: Mapping[str, str] = field(default_factory=dict)

    def for_call(self, call: LossCall[Any]) -> Implementation:
        """The chosen implementation if it supports the call, else the reference."""
        return self.chosen if self.chosen.supports(call) else self.reference

    def describe(self) -> str:
        return "; ".join(f"{name}: {what}" for name, what in self.report.items())


def _tolerances(dtype: torch.dtype, gradient: bool) -> tuple[float, float]:
    """(rtol, atol relative to the largest value) the .proto states for the fused losses."""
    if dtype == torch.float64:
        return 1e-10, 1e-12
    if dtype in (torch.float16, torch.bfloat16) and gradient:
        eps = torch.finfo(dtype).eps
        return eps, eps
    return (1e-4, 1e-6) if gradient else (1e-5, 1e-6)


def _differs(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, gradient: bool) -> str | None:
    if actual.shape != expected.shape:
        return f"shape {list(actual.shape)}, not {list(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = e[torch.isfinite(e)]
    scale = max(float(finite.abs().max()) if finite.numel() else 1.0, 1e-3)
    rtol, atol = _tolerances(dtype, gradient)
    excess = (a - e).abs() - (atol * scale + rtol * e.abs())
    bad = (excess > 0) | (torch.isnan(a) != torch.isnan(e))
    if not bool(bad.any()):
        return None
    worst = int(torch.where(bad.reshape(-1), excess.reshape(-1).nan_to_num(float("inf")), -1.0).argmax())
    return f"{a.reshape(-1)[worst].item():.6g} where the reference has {e.reshape(-1)[worst].item():.6g}"


def disagreement(actual: Computed, expected: Computed, dtype: torch.dtype) -> str | None:
    """How `actual` differs from `expected` beyond the stated tolerances (the first difference), or
    None: the loss, its outputs, every gradient."""
    pairs: list[tuple[str, torch.Tensor | None, torch.Tensor, bool]] = [
        ("loss", actual.loss, expected.loss, False)
    ]
    pairs += [(name, actual.outputs.get(name), value, False) for name, value in expected.outputs.items()]
    if set(actual.grads) != set(expected.grads):
        return f"gradients of {sorted(actual.grads)}, not {sorted(expected.grads)}"
    pairs += [(f"{name} gradient", actual.grads[name], value, True) for name, value in expected.grads.items()]
    for what, a, e, gradient in pairs:
        if a is None:
            return f"no {what}"
        found = _differs(a, e, dtype, gradient)
        if found is not None:
            return f"{what}: {found}"
    return None


def choose(
    candidates: Sequence[Implementation],
    probes: Sequence[LossCall[Any]],
    device: torch.device,
    upload: Upload,
    synchronize: Callable[[], None],
    repeats: int = 3,
) -> Choice:
    """The fastest of `candidates` (the first is the reference) that runs on `device` and agrees with
    the reference on every probe it supports; it must support the first, on which it is timed."""
    reference = candidates[0]
    report: dict[str, str] = {}
    usable = []
    for candidate in candidates[1:]:
        why = candidate.unavailable(device)
        if why is None:
            usable.append(candidate)
        else:
            report[candidate.name] = why
    if not usable or not probes:
        return Choice(
            reference, reference, {reference.name: "chosen (no other candidate runs here)", **report}
        )

    def timed(implementation: Implementation) -> float:
        best = float("inf")
        for _ in range(repeats):
            synchronize()
            started = time.perf_counter()
            implementation.compute(probes[0], upload)
            synchronize()
            best = min(best, time.perf_counter() - started)
        return best

    expected = [reference.compute(probe, upload) for probe in probes]
    times = {reference.name: timed(reference)}
    for candidate in usable:
        if not candidate.supports(probes[0]):
            report[candidate.name] = "does not support the timing probe"
            continue
        try:
            found = None
            for probe, wanted in zip(probes, expected, strict=True):
                if candidate.supports(probe):
                    found = disagreement(candidate.compute(probe, upload), wanted, probe.input.dtype)
                    if found is not None:
                        break
            if found is not None:
                report[candidate.name] = f"disagrees with {reference.name}: {found}"
                continue
            times[candidate.name] = timed(candidate)
        except Exception as error:  # a candidate that fails is not chosen; the server still starts
            report[candidate.name] = f"failed: {type(error).__name__}: {str(error)[:200]}"
    by_name = {implementation.name: implementation for implementation in candidates}
    fastest = min(times, key=times.__getitem__)
    for name, seconds in times.items():
        report[name] = f"{'chosen' if name == fastest else 'agrees'}, {seconds * 1e3:.2f} ms"
    ordered = {name: report[name] for name in by_name if name in report}
    return Choice(by_name[fastest], reference, ordered)
