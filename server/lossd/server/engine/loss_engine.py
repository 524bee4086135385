"""The loss engine: validated `LossCall`s computed by their losses with torch, on one device.

Pure torch; nothing of gRPC or metrics. The numbers are the losses' own: alone, a call is its loss's
computation (for torch's losses, the very torch call and `torch.autograd.grad` of it) on the
engine's device; merged with others (see `lossd.server.engine.merging`), it is the same per-row
computation with its own reduction taken in float64.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lossd.server.engine.faults import (
    DeviceFailure,
    device_works,
    is_device_error,
    is_out_of_memory,
    out_of_memory_error,
)
from lossd.server.engine.finite import nonfinite_error, nonfinite_many
from lossd.server.engine.merging import MergeKey, compute_merged, merge_key
from lossd.server.engine.staging import Staging
from lossd.server.losses import LOSSES, LossCall, LossOutput, loss_shape, validate
from lossd.server.losses.implementations import Choice, choose

if TYPE_CHECKING:  # the codec imports protobuf, which the engine must not need
    from lossd.wire.codec import TensorLimits

__all__ = ["LossEngine", "resolve_device"]

_LOGGER = logging.getLogger(__name__)


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'; a ValueError otherwise."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"device {spec!r} is not a torch device ('auto', 'cpu', 'cuda', 'cuda:N')") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: CUDA is not available on this machine")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"device {spec!r}: lossd runs on 'cpu' or 'cuda' devices")
    return device


MERGE_COPY_BYTES = 64 << 20
"""The most request bytes one merged computation copies together (`--max-batch-bytes`' default)."""

SMALL_ELEMENTS = 1 << 18
"""Computations on fewer input elements run on one torch thread: torch's parallel regions cost them
more than they save, and idle intra-op threads spin, taking the CPU the event loop needs."""


class LossEngine:
    """Computes loss calls on one device. It holds no per-call state.

    `threads`: torch intra-op threads for large computations (small ones use one); None leaves
    torch's setting alone. `reject_nonfinite`: refuse calls with NaN or infinite values instead of
    computing them (and flagging them in `LossOutput.nonfinite`).

    Device faults are contained here (see `lossd.server.engine.faults`): a merged computation that runs
    out of memory is split in two and each half retried, down to single calls; a single call that
    runs out of memory fails alone with `RESOURCE_EXHAUSTED`; an error that leaves the device
    unusable raises `DeviceFailure` out of `compute_batch`, failing the whole batch.
    """

    def __init__(
        self,
        device: torch.device | str = "auto",
        threads: int | None = None,
        *,
        reject_nonfinite: bool = False,
    ) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.staging = Staging(self.device, pinned=self.device.type == "cuda")
        self.threads = threads
        self.reject_nonfinite = reject_nonfinite
        self.choices: dict[str, Choice] = {}
        """The implementation of each loss that has several, chosen by `warm_up` on the device;
        until then (and for an engine that is never warmed up) the loss's own."""

    def _use_threads(self, calls: Sequence[LossCall[Any]]) -> None:
        if self.threads is None:
            return
        wanted = 1 if sum(call.input.numel() for call in calls) < SMALL_ELEMENTS else self.threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def compute(self, call: LossCall[Any]) -> LossOutput:
        """Validates, then computes the loss and the requested gradients alone; results on the CPU."""
        result = self.compute_batch([validate(call)], merge=False)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def prepare(self, call: LossCall[Any], limits: TensorLimits | None = None) -> LossCall[Any]:
        """Validates a call (on the host, before anything reaches the device) for `compute_batch`;
        `limits` also bound what its tensors broadcast to."""
        return validate(call, limits)

    @staticmethod
    def merge_key(call: LossCall[Any]) -> MergeKey | None:
        """Prepared calls with equal keys can be computed together; None: only alone."""
        return merge_key(call)

    @staticmethod
    def rows(call: LossCall[Any]) -> int:
        """The per-row losses a prepared call has unreduced (samples x positions, tokens, elements)."""
        return math.prod(loss_shape(call, "none"))

    @classmethod
    def cost(cls, call: LossCall[Any]) -> tuple[int, int]:
        """(rows, bytes) a prepared call adds to a merged computation."""
        return cls.rows(call), call.input.nbytes + call.target.nbytes

    @staticmethod
    def work(call: LossCall[Any]) -> float:
        """A prepared call's estimated FLOPs (its loss's `flops`): its weight in the fair queue."""
        return call.loss.flops(call)

    @staticmethod
    def answer_bytes(call: LossCall[Any]) -> int:
        """Bytes of a prepared call's answer tensors: the loss, the outputs and gradients asked for."""
        loss = call.loss
        itemsize = loss.loss_dtype(call).itemsize
        nbytes = math.prod(loss_shape(call)) * itemsize
        nbytes += sum(math.prod(loss.output_shape(call, name)) * itemsize for name in call.outputs)
        for name in call.grads:
            tensor = call.tensor(name)
            if tensor is not None:
                nbytes += tensor.numel() * (call.grad_dtype or tensor.dtype).itemsize
        return nbytes

    @classmethod
    def footprint(cls, call: LossCall[Any]) -> int:
        """Host memory a prepared call's computation may take besides its request and answer,
        estimated from the shapes: the loss's own temporaries (`Loss.scratch_bytes`), a merged
        computation's concatenated rows (a merge is at most `MERGE_COPY_BYTES`), and its per-row
        float64 sums."""
        temporaries = call.loss.scratch_bytes(call)
        merged = min(call.input.nbytes + call.target.nbytes, MERGE_COPY_BYTES) + 16 * cls.rows(call)
        return temporaries + merged + 4096

    @classmethod
    def footprints(cls, calls: Sequence[LossCall[Any]]) -> int:
        """`footprint` of calls that compute one after another (a batch call's entries): what each
        copies of a resident tensor (`Loss.shared_scratch_bytes`) is counted once, not per call."""
        total = shared = 0
        for call in calls:
            mine = call.loss.shared_scratch_bytes(call)
            total += cls.footprint(call) - mine
            shared = max(shared, mine)
        return total + shared

    def compute_batch(
        self, calls: Sequence[LossCall[Any]], merge: bool = True
    ) -> list[LossOutput | Exception]:
        """Prepared calls that share one merge key, computed together; each result or error in order.

        A single call, and every call with `merge=False`, is computed alone, exactly as torch would.
        If a merged computation fails, each call is retried alone, so that one bad call fails no
        other. Raises `DeviceFailure` when the device is no longer usable.
        """
        self._use_threads(calls)
        flags = nonfinite_many(calls)
        results: list[LossOutput | Exception | None] = [None] * len(calls)
        todo = list(range(len(calls)))
        if any(flags):
            refused = [i for i in todo if flags[i] and self._refuses(calls[i])]
            for i in refused:
                results[i] = nonfinite_error(flags[i], calls[i])
            todo = [i for i in todo if i not in refused]
        computed = self._compute([calls[i] for i in todo], merge)
        for i, result in zip(todo, computed, strict=True):
            if flags[i] and isinstance(result, LossOutput):
                results[i] = dataclasses.replace(result, nonfinite=flags[i])
            else:
                results[i] = result
        return [result for result in results if result is not None]

    def _refuses(self, call: LossCall[Any]) -> bool:
        """Whether a call with NaN or infinity is refused: its own choice, else the server's."""
        return call.nonfinite == "refuse" or (call.nonfinite is None and self.reject_nonfinite)

    def _compute(self, calls: Sequence[LossCall[Any]], merge: bool) -> list[LossOutput | Exception]:
        key = merge_key(calls[0]) if merge and len(calls) > 1 else None
        if key is None:  # alone: torch's own call, bit for bit
            return [self._alone(call) for call in calls]
        try:
            return [*self._merged(calls, key)]
        except Exception as error:
            self._contain(error)
            if is_out_of_memory(error):
                half = len(calls) // 2
                _LOGGER.warning(
                    "a merged computation of %d calls ran out of memory; retrying it as %d + %d",
                    len(calls),
                    half,
                    len(calls) - half,
                )
                return self._compute(calls[:half], merge) + self._compute(calls[half:], merge)
            _LOGGER.warning(
                "a merged computation of %d calls failed (%s); retrying each alone", len(calls), error
            )
            return [self._alone(call) for call in calls]

    def _alone(self, call: LossCall[Any]) -> LossOutput | Exception:
        try:
            return self._run(call)
        except Exception as error:
            self._contain(error)
            if is_out_of_memory(error):
                return out_of_memory_error(self.device, call.input.nbytes + call.target.nbytes, error)
            return error

    def _contain(self, error: Exception) -> None:
        """After a failed computation: frees what it held; raises `DeviceFailure` if the device is
        no longer usable."""
        # The traceback's frames hold the failed computation's tensors; a retry needs that memory.
        traceback.clear_frames(error.__traceback__)
        if is_out_of_memory(error):
            self.release_memory()
        elif is_device_error(error) and not self.device_works():
            raise DeviceFailure(self.device, error) from error

    def warm_up(self) -> None:
        """Computes each loss once, with gradients, on the device (CUDA context, kernels, allocator
        pools), and checks that the device works: before a server reports SERVING, not during its
        first call. Raises `DeviceFailure` if the device does not compute."""
        calls = [loss.example() for loss in LOSSES.values()]
        for call in calls:
            result = self._alone(validate(call))
            if isinstance(result, Exception):
                raise DeviceFailure(self.device, result) from result
        if not self.device_works():
            raise DeviceFailure(self.device, RuntimeError("the device check failed after warm-up"))
        for loss in LOSSES.values():
            candidates = loss.implementations()
            if candidates:
                self.choices[loss.name] = choose(
                    candidates, loss.probes(self.device), self.device, self.staging.upload, self._synchronize
                )

    def keep_resident(self, tensor: torch.Tensor) -> torch.Tensor:
        """A resident tensor (a classifier) kept on the device too while it is held (CUDA): the
        calls that name it copy nothing up. The host tensor stays what requests see and validation
        reads; returns it."""
        return self.staging.mirror(tensor)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _choice(self, call: LossCall[Any]) -> Choice | None:
        choice = self.choices.get(call.loss.name)
        if choice is None:
            candidates = call.loss.implementations()
            if not candidates:
                return None
            choice = self.choices[call.loss.name] = Choice(candidates[0], candidates[0])
        return choice

    def limit_memory(self, share: float) -> None:
        """Caps what this process allocates on a CUDA device at `share` of its memory (0: no cap),
        so that processes sharing the device each get theirs; nothing elsewhere."""
        if self.device.type == "cuda" and 0.0 < share < 1.0:
            torch.cuda.set_per_process_memory_fraction(share, self.device)

    def device_works(self) -> bool:
        """Whether the device still computes (see `lossd.server.engine.faults.device_works`)."""
        return device_works(self.device)

    def release_memory(self) -> None:
        """Returns cached device memory to the driver after an out-of-memory error."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _merged(self, calls: Sequence[LossCall[Any]], key: MergeKey) -> list[LossOutput]:
        """Calls that share `key` as rows of one computation (see `lossd.server.engine.merging`)."""
        return compute_merged(calls, key, self.staging)

    def _run(self, call: LossCall[Any]) -> LossOutput:
        """One call alone: its loss's computation on the device. Its tensors go up through the staging
        (page-locked memory and asynchronous copies on CUDA) and its results come down with one
        synchronisation; on the CPU nothing moves. Each gradient comes back in the dtype asked for,
        else its tensor's (a head's, computed in float32, returns to bfloat16)."""
        choice = self._choice(call)
        implementation = None if choice is None else choice.for_call(call)
        compute = call.loss.compute if implementation is None else implementation.compute
        computed = compute(call, self.staging.upload)
        grads = {}
        for name, grad in computed.grads.items():
            tensor = call.tensor(name)
            assert tensor is not None, f"a gradient of {name} was computed, so the call has it"
            grads[name] = grad.to(call.grad_dtype or tensor.dtype)
        outputs = computed.outputs
        results = self.staging.download([computed.loss, *outputs.values(), *grads.values()])
        loss = results[0]
        return LossOutput(
            loss=loss,
            outputs=dict(zip(outputs, results[1 : 1 + len(outputs)], strict=True)),
            grads=dict(zip(grads, results[1 + len(outputs) :], strict=True)),
            implementation="" if implementation is None else implementation.name,
        )
