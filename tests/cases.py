"""Parity cases: every loss x option x shape kind x dtype x reduction x gradient, and local torch's answer.

Each `Case` builds its tensors from its own seed, so a failing case id reproduces alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CLASSES = 5


@dataclass(frozen=True)
class Case:
    kind: str  # nll_loss | cross_entropy | kl_div
    shape: tuple[int, ...]
    dtype: torch.dtype
    reduction: str
    target_mode: str = "index"  # index | prob (cross_entropy) ; kl_div: prob | log
    target_dtype: torch.dtype = torch.int64
    target_shape: tuple[int, ...] | None = None  # kl_div broadcasting
    weight: bool = False
    ignore: str = "none"  # none | default | class | uint8_255
    label_smoothing: float = 0.0
    input_grad: bool = True
    target_grad: bool = False
    grad_dtype: torch.dtype | None = None
    grad_output: bool = False
    seed: int = 0
    special: str = ""  # a named edge case

    @property
    def id(self) -> str:
        parts = [
            self.kind,
            "x".join(map(str, self.shape)) or "scalar",
            str(self.dtype).removeprefix("torch."),
            self.reduction,
            self.target_mode,
            str(self.target_dtype).removeprefix("torch."),
        ]
        if self.target_shape is not None:
            parts.append("t" + ("x".join(map(str, self.target_shape)) or "scalar"))
        if self.weight:
            parts.append("w")
        if self.ignore != "none":
            parts.append("ign-" + self.ignore)
        if self.label_smoothing:
            parts.append(f"ls{self.label_smoothing}")
        if not self.input_grad:
            parts.append("nograd")
        if self.target_grad:
            parts.append("tgrad")
        if self.grad_dtype is not None:
            parts.append("gd-" + str(self.grad_dtype).removeprefix("torch."))
        if self.grad_output:
            parts.append("upstream")
        if self.special:
            parts.append(self.special)
        return "-".join(parts)

    # -- tensors ---------------------------------------------------------------------------------

    def classes(self) -> int:
        return self.shape[1] if len(self.shape) >= 2 else self.shape[0]

    def tensors(self) -> dict[str, Any]:
        """input, target, weight, grad_output and the loss options, as torch takes them."""
        gen = torch.Generator().manual_seed(self.seed)
        scale = 1000.0 if self.special == "huge_logits" else 3.0
        x = (torch.randn(self.shape, generator=gen, dtype=torch.float64) * scale).to(self.dtype)
        options: dict[str, Any] = {"reduction": self.reduction}
        weight = None
        if self.kind == "kl_div":
            target_shape = self.shape if self.target_shape is None else self.target_shape
            x = torch.log_softmax(x.double(), dim=-1).to(self.dtype) if x.dim() else -x.abs()
            probs = torch.rand(target_shape, generator=gen, dtype=torch.float64)
            if probs.dim():
                probs = probs / probs.sum(-1, keepdim=True)
            if self.special == "zero_targets":
                probs.view(-1)[::3] = 0.0
            t = probs.log() if self.target_mode == "log" else probs
            target = t.to(self.target_dtype)
            options["log_target"] = self.target_mode == "log"
        else:
            if self.kind == "nll_loss":
                x = torch.log_softmax(x.double(), dim=1 if x.dim() >= 2 else 0).to(self.dtype)
            classes = self.classes()
            if self.target_mode == "prob":
                logits = torch.randn(self.shape, generator=gen, dtype=torch.float64)
                target = torch.softmax(logits, dim=1 if len(self.shape) >= 2 else 0).to(self.target_dtype)
            else:
                target_shape = () if len(self.shape) == 1 else (self.shape[0], *self.shape[2:])
                target = torch.randint(0, classes, target_shape, generator=gen)
                ignore_index = None
                if self.ignore == "default":
                    ignore_index = -100
                elif self.ignore == "class":
                    ignore_index = 2
                elif self.ignore == "uint8_255":
                    ignore_index = 255
                if self.special == "all_ignored":
                    target.fill_(ignore_index if ignore_index is not None else -100)
                elif ignore_index is not None and target.dim():
                    mask = torch.rand(target_shape, generator=gen) < 0.3
                    target[mask] = ignore_index
                if ignore_index is not None:
                    options["ignore_index"] = ignore_index
                target = target.to(self.target_dtype)
            if self.weight:
                weight = (torch.rand(classes, generator=gen, dtype=torch.float64) + 0.25).to(self.dtype)
            if self.kind == "cross_entropy":
                options["label_smoothing"] = self.label_smoothing
        upstream = None
        if self.grad_output:
            shape = reference_loss_shape(self, x, target)
            upstream = torch.randn(shape, generator=gen, dtype=torch.float64).to(self.dtype)
        return {"input": x, "target": target, "weight": weight, "grad_output": upstream, "options": options}


def reference_loss_shape(case: Case, x: torch.Tensor, target: torch.Tensor) -> tuple[int, ...]:
    if case.reduction != "none":
        return ()
    if case.kind == "kl_div":
        return tuple(torch.broadcast_shapes(x.shape, target.shape))
    return tuple(x.shape[:1]) + tuple(x.shape[2:]) if x.dim() >= 2 else ()


def _torch_loss(case: Case, x: torch.Tensor, t: torch.Tensor, tensors: dict[str, Any]) -> torch.Tensor:
    options = dict(tensors["options"])
    if case.kind == "kl_div":
        return F.kl_div(x, t, **options)
    if case.kind == "nll_loss":
        return F.nll_loss(x, t, weight=tensors["weight"], **options)
    return F.cross_entropy(x, t, weight=tensors["weight"], **options)


def reference(case: Case, tensors: dict[str, Any], device: str = "cpu") -> dict[str, torch.Tensor | None]:
    """Local torch on `device`: the loss and autograd's gradients of that same call, on the CPU.

    torch takes int32 class indices never and uint8 ones only on some paths; lossd widens both to
    int64, so where torch refuses them the reference widens too.
    """
    tensors = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
    x = tensors["input"].clone().requires_grad_(case.input_grad)
    t = tensors["target"].clone().requires_grad_(case.target_grad)
    try:
        loss = _torch_loss(case, x, t, tensors)
    except RuntimeError:
        if t.dtype not in (torch.int32, torch.uint8):
            raise
        loss = _torch_loss(case, x, t.long(), tensors)
    result: dict[str, torch.Tensor | None] = {"loss": loss.detach(), "grad": None, "target_grad": None}
    leaves = [leaf for leaf in (x, t) if leaf.requires_grad]
    if leaves:
        upstream = tensors["grad_output"] if tensors["grad_output"] is not None else torch.ones_like(loss)
        grads = list(torch.autograd.grad(loss, leaves, upstream))
        if case.input_grad:
            result["grad"] = grads.pop(0)
        if case.target_grad:
            result["target_grad"] = grads.pop(0)
        for name in ("grad", "target_grad"):
            if result[name] is not None and case.grad_dtype is not None:
                result[name] = result[name].to(case.grad_dtype)  # type: ignore[union-attr]
    return {name: None if value is None else value.cpu() for name, value in result.items()}


def tolerance(expected: torch.Tensor, *dtypes: torch.dtype | None) -> dict[str, float]:
    """How close lossd must come to local torch: relative to the tensor's largest finite magnitude.

    1e-6 when every dtype involved (the result's and `dtypes`: input, target, gradient) is float32
    or float64; otherwise 4 units of rounding (eps) of the least precise one. Element-wise relative
    error is no measure for entries near zero: a different but equally valid order of the same
    floating-point operations moves them by a few ulps of the tensor's scale, not of themselves.
    """
    floats = [d for d in (expected.dtype, *dtypes) if d is not None and d.is_floating_point]
    eps = max((torch.finfo(d).eps for d in floats), default=0.0)
    rtol = 1e-6 if eps < 1e-6 else 4 * eps
    finite = expected[torch.isfinite(expected)] if expected.is_floating_point() else expected
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return {"rtol": rtol, "atol": rtol * scale + 1e-30}


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal dtype, shape and values, NaN where NaN."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return False
    if not expected.is_floating_point():
        return torch.equal(actual, expected)
    both_nan = torch.isnan(actual) & torch.isnan(expected)
    return bool(((actual == expected) | both_nan).all())


def _classification_cases() -> list[Case]:
    shapes = ((CLASSES,), (7, CLASSES), (3, CLASSES, 4, 2))
    index_dtypes = itertools.cycle((torch.int64, torch.uint8, torch.int32))
    cases = []
    for kind in ("nll_loss", "cross_entropy"):
        smoothings = (0.0, 0.2) if kind == "cross_entropy" else (0.0,)
        for shape, dtype, reduction, weight, ignored, smoothing in itertools.product(
            shapes, FLOATS, ("none", "mean", "sum"), (False, True), ("default", "class"), smoothings
        ):
            target_dtype = next(index_dtypes)
            # -100 does not fit a uint8 target
            ignore = "uint8_255" if ignored == "default" and target_dtype == torch.uint8 else ignored
            cases.append(
                Case(
                    kind,
                    shape,
                    dtype,
                    reduction,
                    "index",
                    target_dtype,
                    weight=weight,
                    ignore=ignore,
                    label_smoothing=smoothing,
                )
            )
    prob_dtypes = itertools.cycle((None, torch.float32, torch.float64))
    for shape, dtype, reduction, weight, smoothing, target_grad in itertools.product(
        shapes, FLOATS, ("none", "mean", "sum"), (False, True), (0.0, 0.2), (False, True)
    ):
        target_dtype = next(prob_dtypes) or dtype
        cases.append(
            Case(
                "cross_entropy",
                shape,
                dtype,
                reduction,
                "prob",
                target_dtype,
                weight=weight,
                label_smoothing=smoothing,
                target_grad=target_grad,
            )
        )
    return cases


def _kl_cases() -> list[Case]:
    shapes: tuple[tuple[tuple[int, ...], tuple[int, ...] | None], ...] = (
        ((), None),
        ((6,), None),
        ((4, 6), None),
        ((2, 3, 6), None),
        ((4, 6), (6,)),  # target broadcast over the batch
        ((6,), (4, 6)),  # input broadcast
    )
    cases = []
    target_dtypes = itertools.cycle((None, None, torch.float32, torch.float64))
    for (shape, target_shape), dtype, reduction, mode in itertools.product(
        shapes, FLOATS, ("none", "mean", "sum", "batchmean"), ("prob", "log")
    ):
        target_dtype = next(target_dtypes) or dtype
        cases.append(
            Case(
                "kl_div",
                shape,
                dtype,
                reduction,
                mode,
                target_dtype,
                target_shape=target_shape,
                target_grad=True,
            )
        )
    return cases


def _gradient_option_cases() -> list[Case]:
    """Upstream gradients, gradient dtypes and the no-gradient path."""
    cases = []
    for kind, mode, target_dtype in (
        ("nll_loss", "index", torch.int64),
        ("cross_entropy", "index", torch.int64),
        ("cross_entropy", "prob", torch.float32),
        ("kl_div", "prob", torch.float32),
    ):
        target_grad = mode == "prob"
        for shape, reduction in itertools.product(((7, CLASSES), (3, CLASSES, 4)), ("none", "mean", "sum")):
            base = Case(kind, shape, torch.float32, reduction, mode, target_dtype, target_grad=target_grad)
            cases += [
                Case(**{**_fields(base), "grad_output": True}),
                Case(**{**_fields(base), "grad_dtype": torch.float64}),
                Case(**{**_fields(base), "grad_dtype": torch.bfloat16}),
                Case(**{**_fields(base), "input_grad": False, "target_grad": False}),
            ]
    return cases


def _edge_cases() -> list[Case]:
    f32 = torch.float32
    return [
        Case("cross_entropy", (6, CLASSES), f32, "mean", ignore="default", special="all_ignored"),
        Case("cross_entropy", (6, CLASSES), f32, "sum", ignore="default", special="all_ignored"),
        Case(
            "cross_entropy",
            (6, CLASSES),
            f32,
            "mean",
            ignore="default",
            label_smoothing=0.1,
            special="all_ignored",
        ),
        Case("nll_loss", (6, CLASSES), f32, "mean", ignore="default", special="all_ignored"),
        Case("nll_loss", (CLASSES,), f32, "mean", ignore="default", special="all_ignored"),
        Case("cross_entropy", (0, CLASSES), f32, "mean"),
        Case("cross_entropy", (0, CLASSES), f32, "sum"),
        Case("cross_entropy", (0, CLASSES), f32, "mean", "prob", f32),
        Case("nll_loss", (0, CLASSES, 3), f32, "none"),
        Case("cross_entropy", (4, 1), f32, "mean"),
        Case("cross_entropy", (4, CLASSES), f32, "mean", label_smoothing=1.0),
        Case("cross_entropy", (4, CLASSES), f32, "mean", "prob", f32, label_smoothing=1.0, target_grad=True),
        Case("cross_entropy", (4, CLASSES), f32, "none", special="huge_logits"),
        Case("cross_entropy", (4, CLASSES), torch.float16, "mean", special="huge_logits"),
        Case("kl_div", (4, 6), f32, "sum", "prob", f32, target_grad=True, special="zero_targets"),
        Case("kl_div", (4, 6), f32, "none", "log", f32, target_grad=True, special="zero_targets"),
    ]


def _fields(case: Case) -> dict[str, Any]:
    return {spec.name: getattr(case, spec.name) for spec in fields(Case)}


def all_cases() -> list[Case]:
    cases = _classification_cases() + _kl_cases() + _gradient_option_cases() + _edge_cases()
    return [Case(**{**_fields(case), "seed": i}) for i, case in enumerate(cases)]
