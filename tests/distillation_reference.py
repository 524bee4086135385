"""The distillation loss as the reference document writes it, composed of torch operations here,
independently of the server's engine: what the engine must equal bit for bit when it computes a
call in one piece on the CPU, and within `CHUNKED_RTOL` when it computes in chunks or merged."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

CHUNKED_RTOL = 1e-6
"""A chunked or merged float32 loss sums its chunks in float64: it may differ from the one-piece sum
by a few float32 roundings of the total."""

DEFAULTS: dict[str, Any] = {
    "beta": 0.0,
    "temperature": 1.0,
    "temperature_squared": False,
    "weight_hard": 0.0,
    "weight_soft": 1.0,
    "ignore_index": -100,
    "label_smoothing": 0.0,
    "top_k_renormalize": False,
    "truncate_teacher": False,
    "normalizer": None,
}


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, 0 log 0 = 0 (both logs read as 0 where p = 0)."""
    zero = torch.isneginf(lp)
    return (torch.exp(lp) * (torch.where(zero, 0.0, lp) - torch.where(zero, 0.0, lq))).sum(-1)


def _tail(lp: torch.Tensor) -> torch.Tensor:
    """TRL's loss_add_tail: a (k+1)-th bucket holding 1 - sum(p), the log-sum clamped below 0."""
    log_mass = torch.clamp(torch.logsumexp(lp, dim=-1, keepdim=True), max=-1e-7)
    return torch.cat([lp, torch.log(-torch.expm1(log_mass))], dim=-1)


def _renormalize(lp: torch.Tensor) -> torch.Tensor:
    log_mass = torch.logsumexp(lp, dim=-1, keepdim=True)
    return lp - torch.where(torch.isneginf(log_mass), 0.0, log_mass)


def reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    teacher_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, hard part, soft part), differentiable with respect to `student`."""
    o = {**DEFAULTS, **options}
    vocabulary = student.shape[-1]
    lead = student.shape[:-1]
    dtype = torch.float32 if student.dtype in (torch.float16, torch.bfloat16) else student.dtype
    s = student.reshape(-1, vocabulary).to(dtype)
    temperature = o["temperature"]
    ls = F.log_softmax(s / temperature, dim=-1)
    if teacher_ids is None:
        t = teacher.reshape(-1, teacher.shape[-1])
        if o["truncate_teacher"]:
            t = t[:, :vocabulary]
        lt = F.log_softmax(t.to(dtype) / temperature, dim=-1)
    else:
        k = teacher.shape[-1]
        lt = teacher.reshape(-1, k).to(dtype)
        padding = torch.isneginf(lt)
        ids = torch.where(padding, 0, teacher_ids.reshape(-1, k).long())
        ls = torch.where(padding, -math.inf, torch.gather(ls, -1, ids))
        if o["top_k_renormalize"]:
            ls, lt = _renormalize(ls), _renormalize(lt)
        else:
            ls, lt = _tail(ls), _tail(lt)
    beta = o["beta"]
    if beta == 0:
        divergence = _kl(lt, ls)
    elif beta == 1:
        divergence = _kl(ls, lt)
    else:
        # m = 0 where both are 0 (padding): there its log is set, not derived (d logsumexp(-inf) is NaN)
        absent = torch.isneginf(ls) & torch.isneginf(lt)
        mixture = torch.logsumexp(
            torch.stack(
                [
                    torch.where(absent, 0.0, ls) + math.log1p(-beta),
                    torch.where(absent, 0.0, lt) + math.log(beta),
                ]
            ),
            dim=0,
        )
        mixture = torch.where(absent, -math.inf, mixture)
        divergence = beta * _kl(lt, mixture) + (1 - beta) * _kl(ls, mixture)
    soft = o["weight_soft"] * divergence
    if o["temperature_squared"]:
        soft = soft * (temperature * temperature)
    if labels is None:
        hard = torch.zeros_like(soft)
        counted = None
    else:
        flat = labels.reshape(-1).long()
        counted = flat != o["ignore_index"]
        soft = torch.where(counted, soft, 0.0)
        hard = o["weight_hard"] * F.cross_entropy(
            s, flat, ignore_index=o["ignore_index"], label_smoothing=o["label_smoothing"], reduction="none"
        )
    total = hard + soft
    if reduction == "none":
        return total.reshape(lead), hard.reshape(lead), soft.reshape(lead)
    total, hard, soft = total.sum(), hard.sum(), soft.sum()
    if reduction == "sum":
        return total, hard, soft
    if o["normalizer"] is not None:
        divisor: Any = o["normalizer"]
    elif counted is None:
        divisor = float(max(s.shape[0], 1))
    else:
        divisor = counted.sum().clamp(min=1)
    return total / divisor, hard / divisor, soft / divisor


def reference_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    grad_output: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, hard, soft, d(loss)/d(student)) by torch autograd."""
    leaf = student.detach().clone().requires_grad_(True)
    total, hard, soft = reference(leaf, teacher, **kwargs)
    upstream = torch.ones_like(total) if grad_output is None else grad_output.to(total.dtype)
    (grad,) = torch.autograd.grad(total, leaf, upstream)
    return total.detach(), hard.detach(), soft.detach(), grad
