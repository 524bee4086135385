"""Dynamic batching: queue items, group those that can be computed together, compute off the loop.

In the manner of Triton's dynamic batcher. Items with equal keys form a group (None: an item that
must run alone). Whenever the compute thread is free, the group whose oldest item has waited
longest is taken, as much of it as the row and byte limits allow; with `max_queue_delay_s` > 0 a
group that is not yet full may wait that long past its oldest item's arrival for others to join.
While one batch computes, the next ones grow. Items whose deadline has passed or whose caller
cancelled are dropped before compute and never computed. Groups never wait behind each other's
heads: they only take turns for the compute thread.

Two lanes, each with its own queue and compute thread: items of at least `large_bytes` go to the
large lane, so that a long computation never makes small calls wait behind it.

Generic: it knows nothing of protobuf, gRPC or torch; the engine supplies `run`, `key` and `cost`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from lossd.wire.errors import DeadlineExceededError, LossdError, ResourceExhaustedError, UnavailableError

__all__ = ["BatchLimits", "BatchObserver", "Batcher"]

T = TypeVar("T")
R = TypeVar("R")

INLINE_SECONDS = 300e-6
"""The longest a tiny batch may take to stay on the event loop: a slower one (a busy or slow
engine) sends the next ones to the compute thread again, where they are measured until fast."""


@dataclass(frozen=True)
class BatchLimits:
    """Triton-like knobs. `merge=False` computes every item alone (batching off)."""

    merge: bool = True
    max_rows: int = 16384
    max_bytes: int = 64 * 2**20
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 4096
    large_bytes: int = 1 << 20
    inline_bytes: int = 0
    """A batch of at most this many bytes is computed on the event loop itself, not handed to the
    compute thread, while such batches have been computing in under `INLINE_SECONDS` (0: never).
    The hand-over (a thread switch each way, about 200 us here) costs a tiny call more than its
    computation."""


class BatchObserver(Protocol):
    """What the batcher reports (the server's metrics implement it)."""

    def queue_depth(self, depth: int) -> None: ...

    def batch(self, requests: int, rows: int, compute_s: float, queue_waits_s: Sequence[float]) -> None: ...

    def dropped(self, reason: str) -> None: ...


class _Lane(Generic[T, R]):
    """One queue of groups and the thread that computes them."""

    def __init__(self, name: str, executor: Executor) -> None:
        self.name = name
        self.executor = executor
        self.groups: dict[Hashable, collections.deque[_Item[T, R]]] = {}
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Item(Generic[T, R]):
    value: T
    key: Hashable
    rows: int
    nbytes: int
    arrived: float
    deadline: float | None
    future: asyncio.Future[R] = field(repr=False)
    queued: bool = True  # counted in the queue depth
    waits: bool = True  # its wait is its call's queue wait (a streamed call's later blocks: no)


class Batcher(Generic[T, R]):
    """Batches `submit`ted items onto `run`, which computes a list of items on `executor`.

    `run(items)` returns one result or exception per item, in order; `key(item)` says which items
    may be computed together (None: alone); `cost(item)` is (rows, bytes). If `run` raises
    instead, the whole batch fails with that error and `on_failure(error)` is told. Items of at
    least `limits.large_bytes` run on `large_executor` (default: `executor`), in a lane of their own.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R | Exception]],
        key: Callable[[T], Hashable | None],
        cost: Callable[[T], tuple[int, int]],
        limits: BatchLimits,
        executor: Executor,
        observer: BatchObserver | None = None,
        on_failure: Callable[[Exception], None] | None = None,
        large_executor: Executor | None = None,
    ) -> None:
        self._run = run
        self._key = key
        self._cost = cost
        self.limits = limits
        self._small: _Lane[T, R] = _Lane("small", executor)
        self._large: _Lane[T, R] = _Lane("large", large_executor or executor)
        self._lanes = (self._small, self._large)
        self._observer = observer
        self._on_failure = on_failure
        self._refusal: Exception | None = None
        self._item_seconds = 0.0  # moving average of compute time per item, for retry hints
        self._tiny_seconds = float("inf")  # moving average of a tiny batch's compute time
        self._depth = 0
        self._alone = itertools.count()
        self._closing = False

    @property
    def depth(self) -> int:
        """Items waiting for compute."""
        return self._depth

    def start(self) -> None:
        """Starts dispatching; call from the event loop that will submit."""
        for lane in self._lanes:
            if lane.task is None:
                lane.task = asyncio.get_running_loop().create_task(
                    self._dispatch(lane), name=f"lossd-batcher-{lane.name}"
                )

    async def close(self) -> None:
        """Stops taking items, computes everything already queued, then stops."""
        self._closing = True
        for lane in self._lanes:
            lane.wake.set()
            if lane.task is not None:
                await lane.task

    def abort(self, error: Exception) -> None:
        """Stops at once: every queued item fails with `error`, and so does every later submit.

        For a device that can no longer compute; the batch being computed ends as it ends.
        """
        self._refusal = error
        self._closing = True
        for lane in self._lanes:
            for group in lane.groups.values():
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(error)
            lane.groups.clear()
            lane.wake.set()

    async def submit(self, value: T, deadline: float | None = None, *, waits: bool = True) -> R:
        """Queues `value` and waits for its result. `deadline` is a `time.monotonic()` instant;
        `waits=False` leaves its time in the queue out of the reported waits (a part of a call
        whose first part reported the call's).

        Raises `ResourceExhaustedError` at once when the queue is full, `UnavailableError` once
        the batcher is closing, and `DeadlineExceededError` if the deadline passes in the queue.
        """
        return await self.enqueue(value, deadline, waits=waits)

    def enqueue(self, value: T, deadline: float | None = None, *, waits: bool = True) -> asyncio.Future[R]:
        """Queues `value`; the future of its result (cancelling it takes the value out of the
        queue). Raises as `submit` does."""
        future = self._add(value, deadline, waits)
        self._report_depth()
        return future

    def enqueue_many(
        self, values: Sequence[T], deadline: float | None = None
    ) -> list[asyncio.Future[R] | Exception]:
        """`enqueue` of each value (a batch call's entries) without a task each, the queue depth
        reported once: each value's future, or the error that refused it (as `submit` raises)."""
        queued: list[asyncio.Future[R] | Exception] = []
        for value in values:
            try:
                queued.append(self._add(value, deadline))
            except LossdError as refused:  # the queue is full, or the batcher closing or aborted
                queued.append(refused)
        self._report_depth()
        return queued

    def _add(self, value: T, deadline: float | None, waits: bool = True) -> asyncio.Future[R]:
        if self._refusal is not None:
            raise self._refusal
        if self._closing:
            raise UnavailableError("the server is shutting down", reason="SHUTTING_DOWN")
        if self._depth >= self.limits.max_queue_size:
            if self._observer:
                self._observer.dropped("queue_full")
            # About the time the queue ahead takes to compute, within reason.
            wait = min(max(self._item_seconds * self._depth, 0.01), 5.0)
            raise ResourceExhaustedError(
                f"the compute queue is full ({self._depth} requests waiting, max_queue_size "
                f"{self.limits.max_queue_size}); retry later or elsewhere",
                reason="QUEUE_FULL",
                metadata={"queued": str(self._depth), "maxQueueSize": str(self.limits.max_queue_size)},
                retry_after=round(wait, 3),
            )
        key = self._key(value) if self.limits.merge else None
        rows, nbytes = self._cost(value)
        item: _Item[T, R] = _Item(
            value,
            key if key is not None else ("alone", next(self._alone)),
            rows,
            nbytes,
            time.monotonic(),
            deadline,
            asyncio.get_running_loop().create_future(),
            waits=waits,
        )
        lane = self._large if nbytes >= self.limits.large_bytes else self._small
        lane.groups.setdefault(item.key, collections.deque()).append(item)
        self._depth += 1
        item.future.add_done_callback(lambda _: self._dequeue(item))
        lane.wake.set()
        return item.future

    def _dequeue(self, item: _Item[T, R], report: bool = True) -> None:
        """Takes an item out of the depth count once (a cancelled item's deque slot is skipped later)."""
        if item.queued:
            item.queued = False
            self._depth -= 1
            if report:
                self._report_depth()

    def _report_depth(self) -> None:
        if self._observer:
            self._observer.queue_depth(self._depth)

    @staticmethod
    def _oldest_group(lane: _Lane[T, R]) -> collections.deque[_Item[T, R]] | None:
        oldest: collections.deque[_Item[T, R]] | None = None
        for key in list(lane.groups):
            group = lane.groups[key]
            while group and group[0].future.done():  # cancelled while queued
                group.popleft()
            if not group:
                del lane.groups[key]
            elif oldest is None or group[0].arrived < oldest[0].arrived:
                oldest = group
        return oldest

    def _full(self, group: collections.deque[_Item[T, R]]) -> bool:
        rows = nbytes = 0
        for item in group:
            rows, nbytes = rows + item.rows, nbytes + item.nbytes
            if rows >= self.limits.max_rows or nbytes >= self.limits.max_bytes:
                return True
        return False

    def _take(self, group: collections.deque[_Item[T, R]]) -> list[_Item[T, R]]:
        taken: list[_Item[T, R]] = []
        rows = nbytes = 0
        while group:
            item = group[0]
            if item.future.done():
                group.popleft()
                continue
            over = rows + item.rows > self.limits.max_rows or nbytes + item.nbytes > self.limits.max_bytes
            if taken and (over or not self.limits.merge):
                break
            taken.append(group.popleft())
            self._dequeue(item, report=False)
            rows, nbytes = rows + item.rows, nbytes + item.nbytes
        self._report_depth()
        return taken

    async def _dispatch(self, lane: _Lane[T, R]) -> None:
        while True:
            group = self._oldest_group(lane)
            if group is None:
                if self._closing:
                    return
                lane.wake.clear()
                await lane.wake.wait()
                continue
            delay = self.limits.max_queue_delay_s
            if delay > 0 and self.limits.merge and not self._closing and not self._full(group):
                remaining = group[0].arrived + delay - time.monotonic()
                if remaining > 0:
                    lane.wake.clear()
                    try:
                        await asyncio.wait_for(lane.wake.wait(), remaining)
                    except TimeoutError:
                        pass
                    else:
                        continue  # something arrived: look again (this group may be full now)
            items = self._live(self._take(group))
            if not items:
                continue
            started = time.monotonic()
            results = await self._compute(lane, items)
            elapsed = time.monotonic() - started
            self._item_seconds += 0.2 * (elapsed / len(items) - self._item_seconds)
            if self._observer:
                self._observer.batch(
                    len(items),
                    sum(i.rows for i in items),
                    elapsed,
                    [started - i.arrived for i in items if i.waits],
                )
            for item, result in zip(items, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, Exception):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    async def _compute(self, lane: _Lane[T, R], items: list[_Item[T, R]]) -> Sequence[R | Exception]:
        """One batch's results, or the error that failed it as a whole for each of its items.

        A coroutine of its own, which ends with the batch: an error's traceback then holds no frame
        of the dispatch loop, which lives on (a caller that clears its error's frames must not end
        the loop)."""
        tiny = sum(item.nbytes for item in items) <= self.limits.inline_bytes
        values = [item.value for item in items]
        try:
            if tiny and self._tiny_seconds < INLINE_SECONDS:
                results, computing = self._timed_run(values)
            else:
                loop = asyncio.get_running_loop()
                results, computing = await loop.run_in_executor(lane.executor, self._timed_run, values)
        except Exception as error:  # run (or the executor) failed as a whole: fail this batch
            if self._on_failure is not None:
                self._on_failure(error)
            return [error] * len(items)
        if tiny:
            last = self._tiny_seconds
            self._tiny_seconds = computing if last == float("inf") else last + 0.2 * (computing - last)
        return results

    def _timed_run(self, values: list[T]) -> tuple[Sequence[R | Exception], float]:
        """`run(values)` and the seconds it took, without the hand-over to or from its thread."""
        started = time.perf_counter()
        results = self._run(values)
        return results, time.perf_counter() - started

    def _live(self, items: list[_Item[T, R]]) -> list[_Item[T, R]]:
        """Drops items whose caller is gone or whose deadline has passed, before any compute."""
        now = time.monotonic()
        live = []
        for item in items:
            if item.future.done():
                continue
            if item.deadline is not None and item.deadline <= now:
                if self._observer:
                    self._observer.dropped("deadline")
                item.future.set_exception(
                    DeadlineExceededError(
                        "the deadline passed while the request was queued", reason="DEADLINE_QUEUED"
                    )
                )
                continue
            live.append(item)
        return live
