"""Dynamic batching: queue items, group those that can be computed together, compute off the loop.

In the manner of Triton's dynamic batcher. Items with equal keys form a group (None: an item that
must run alone). With `max_queue_delay_s` > 0 a group that is not yet full may wait that long past
its oldest item's arrival for others to join. While one batch computes, the next ones grow. Items
whose deadline has passed or whose caller cancelled are dropped before compute and never computed.

Fair by tenant (start-time fair queueing, as in Kubernetes' API Priority and Fairness): each item
carries its tenant, its tenant's weight and its work (the loss's estimate, see `Loss.flops`; a
batch call's entries each bring their own, so 1024 entries weigh 1024). An item's tag is where its
tenant's previous item ends in virtual time, or now if that is past; tags advance by work over
weight. Whenever the compute thread is free, the item with the lowest tag goes next, with the items
of its group (whoever's) in tag order, as many as fit in one slice (`slice_s` of estimated compute)
and the row and byte limits: a small call waits for at most one slice of another tenant's flood,
however much is queued (a lane only one tenant has used takes whole groups, as they fit). Each
tenant may also hold at most its weight's share of the queue.

Two lanes, each with its own queue and compute thread: items of at least `large_bytes`, or whose
work is estimated at `LARGE_S` of compute or more, go to the large lane, so that a long computation
never makes small calls wait behind it.

Generic: it knows nothing of protobuf, gRPC or torch; the engine supplies `run`, `key`, `cost` and
`work`.
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


SLICE_S = 0.0005
"""The compute one batch takes at most, estimated, while tenants share a lane (one item always
goes): what a small call of one tenant waits for, at most, behind another's flood. Smaller slices
cost the flood throughput (each computation has its own overhead)."""
LARGE_S = 0.02
"""An item estimated to compute this long or longer goes to the large lane."""
MIN_WORK = 65536.0
"""The least work an item counts for in the fair queue: a call's own cost besides its arithmetic."""


@dataclass(frozen=True)
class BatchLimits:
    """Triton-like knobs. `merge=False` computes every item alone (batching off)."""

    merge: bool = True
    max_rows: int = 16384
    max_bytes: int = 64 * 2**20
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 4096
    large_bytes: int = 1 << 20
    slice_s: float = SLICE_S
    inline_bytes: int = 0
    """A batch of at most this many bytes is computed on the event loop itself, not handed to the
    compute thread, while such batches have been computing in under `INLINE_SECONDS` (0: never).
    The hand-over (a thread switch each way, about 200 us here) costs a tiny call more than its
    computation."""


class BatchObserver(Protocol):
    """What the batcher reports (the server's metrics implement it)."""

    def queue_depth(self, depth: int) -> None: ...

    def batch(
        self, requests: int, rows: int, compute_s: float, queue_waits_s: Sequence[tuple[str, float]]
    ) -> None:
        """One computation: its items, rows and time, and each waiting item's (tenant, wait)."""

    def dropped(self, reason: str) -> None: ...


class _Group(Generic[T, R]):
    """Items that may compute together: a queue per tenant, each in tag order."""

    def __init__(self) -> None:
        self.queues: dict[str, collections.deque[_Item[T, R]]] = {}

    def add(self, item: _Item[T, R]) -> None:
        self.queues.setdefault(item.tenant, collections.deque()).append(item)

    def head(self) -> _Item[T, R] | None:
        """The live item with the lowest tag (cancelled ones are dropped on the way)."""
        best: _Item[T, R] | None = None
        for tenant in list(self.queues):
            queue = self.queues[tenant]
            while queue and queue[0].future.done():
                queue.popleft()
            if not queue:
                del self.queues[tenant]
            elif best is None or queue[0].tag < best.tag:
                best = queue[0]
        return best

    def items(self) -> list[_Item[T, R]]:
        return [item for queue in self.queues.values() for item in queue]


class _Lane(Generic[T, R]):
    """One queue of groups and the thread that computes them, with its virtual time."""

    def __init__(self, name: str, executor: Executor) -> None:
        self.name = name
        self.executor = executor
        self.groups: dict[Hashable, _Group[T, R]] = {}
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.virtual = 0.0
        self.finish: dict[str, float] = {}  # each tenant's last tag's end
        self.seconds_per_work = 0.0  # moving average, 0 until measured

    def tag(self, tenant: str, work: float, weight: float) -> float:
        start = max(self.virtual, self.finish.get(tenant, 0.0))
        self.finish[tenant] = start + max(work, MIN_WORK) / weight
        return start


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
    tenant: str = ""
    work: float = 0.0
    tag: float = 0.0


class Batcher(Generic[T, R]):
    """Batches `submit`ted items onto `run`, which computes a list of items on `executor`.

    `run(items)` returns one result or exception per item, in order; `key(item)` says which items
    may be computed together (None: alone); `cost(item)` is (rows, bytes); `work(item)` its
    estimated work (the fair queue's measure; default: its rows). If `run` raises instead, the
    whole batch fails with that error and `on_failure(error)` is told. Items of at least
    `limits.large_bytes`, or of `LARGE_S` estimated, run on `large_executor` (default:
    `executor`), in a lane of their own.
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
        work: Callable[[T], float] | None = None,
    ) -> None:
        self._run = run
        self._key = key
        self._cost = cost
        self._work = work
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
        self._by_tenant: collections.Counter[str] = collections.Counter()
        self._weights: dict[str, float] = {}
        self._alone = itertools.count()
        self._closing = False

    @property
    def depth(self) -> int:
        """Items waiting for compute."""
        return self._depth

    def tenant_depth(self, tenant: str) -> int:
        """Items of `tenant` waiting for compute."""
        return self._by_tenant[tenant]

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
                for item in group.items():
                    if not item.future.done():
                        item.future.set_exception(error)
            lane.groups.clear()
            lane.wake.set()

    async def submit(
        self,
        value: T,
        deadline: float | None = None,
        *,
        waits: bool = True,
        tenant: str = "",
        weight: float = 1.0,
        work: float | None = None,
    ) -> R:
        """Queues `value` for `tenant` (of fair-queue `weight`) and waits for its result.
        `deadline` is a `time.monotonic()` instant; `waits=False` leaves its time in the queue out
        of the reported waits (a part of a call whose first part reported the call's).

        Raises `ResourceExhaustedError` at once when the queue (or the tenant's share of it) is
        full, `UnavailableError` once the batcher is closing, and `DeadlineExceededError` if the
        deadline passes in the queue.
        """
        return await self.enqueue(value, deadline, waits=waits, tenant=tenant, weight=weight, work=work)

    def enqueue(
        self,
        value: T,
        deadline: float | None = None,
        *,
        waits: bool = True,
        tenant: str = "",
        weight: float = 1.0,
        work: float | None = None,
    ) -> asyncio.Future[R]:
        """Queues `value`; the future of its result (cancelling it takes the value out of the
        queue). `work`: its estimated work, when the caller has it (else `work(value)`). Raises as
        `submit` does."""
        future = self._add(value, deadline, waits, tenant, weight, work)
        self._report_depth()
        return future

    def enqueue_many(
        self,
        values: Sequence[T],
        deadline: float | None = None,
        *,
        tenant: str = "",
        weight: float = 1.0,
        works: Sequence[float] | None = None,
    ) -> list[asyncio.Future[R] | Exception]:
        """`enqueue` of each value (a batch call's entries) without a task each, the queue depth
        reported once: each value's future, or the error that refused it (as `submit` raises)."""
        queued: list[asyncio.Future[R] | Exception] = []
        for index, value in enumerate(values):
            try:
                queued.append(
                    self._add(value, deadline, True, tenant, weight, works[index] if works else None)
                )
            except LossdError as refused:  # the queue is full, or the batcher closing or aborted
                queued.append(refused)
        self._report_depth()
        return queued

    def _share(self, tenant: str, weight: float) -> float:
        """The queue slots `tenant` may hold: all of them alone, its weight's share among the
        tenants with items queued."""
        others = sum(w for name, w in self._weights.items() if name != tenant and self._by_tenant[name])
        return self.limits.max_queue_size * weight / (weight + others)

    def _add(
        self, value: T, deadline: float | None, waits: bool, tenant: str, weight: float, given: float | None
    ) -> asyncio.Future[R]:
        if self._refusal is not None:
            raise self._refusal
        if self._closing:
            raise UnavailableError("the server is shutting down", reason="SHUTTING_DOWN")
        self._weights[tenant] = weight
        mine = self._by_tenant[tenant]
        if self._depth >= 2 * self.limits.max_queue_size or (
            self._depth >= self.limits.max_queue_size and mine >= self._share(tenant, weight)
        ):
            if self._observer:
                self._observer.dropped("queue_full")
            # About the time the queue ahead takes to compute, within reason.
            wait = min(max(self._item_seconds * self._depth, 0.01), 5.0)
            raise ResourceExhaustedError(
                f"the compute queue is full ({self._depth} requests waiting, {mine} of them this "
                f"tenant's; max_queue_size {self.limits.max_queue_size}); retry later or elsewhere",
                reason="QUEUE_FULL",
                metadata={
                    "queued": str(self._depth),
                    "tenantQueued": str(mine),
                    "maxQueueSize": str(self.limits.max_queue_size),
                },
                retry_after=round(wait, 3),
            )
        key = self._key(value) if self.limits.merge else None
        rows, nbytes = self._cost(value)
        if given is not None:
            work = given
        else:
            work = float(self._work(value)) if self._work is not None else float(rows)
        large = nbytes >= self.limits.large_bytes or (
            self._small.seconds_per_work and work * self._small.seconds_per_work >= LARGE_S
        )
        lane = self._large if large else self._small
        item: _Item[T, R] = _Item(
            value,
            key if key is not None else ("alone", next(self._alone)),
            rows,
            nbytes,
            time.monotonic(),
            deadline,
            asyncio.get_running_loop().create_future(),
            waits=waits,
            tenant=tenant,
            work=work,
            tag=lane.tag(tenant, work, weight),
        )
        group = lane.groups.get(item.key)
        if group is None:
            group = lane.groups[item.key] = _Group()
        group.add(item)
        self._depth += 1
        self._by_tenant[tenant] += 1
        item.future.add_done_callback(lambda _: self._dequeue(item))
        lane.wake.set()
        return item.future

    def _dequeue(self, item: _Item[T, R], report: bool = True) -> None:
        """Takes an item out of the depth count once (a cancelled item's slot is skipped later)."""
        if item.queued:
            item.queued = False
            self._depth -= 1
            self._by_tenant[item.tenant] -= 1
            if self._by_tenant[item.tenant] <= 0:
                del self._by_tenant[item.tenant]
            if report:
                self._report_depth()

    def _report_depth(self) -> None:
        if self._observer:
            self._observer.queue_depth(self._depth)

    @staticmethod
    def _first_group(lane: _Lane[T, R]) -> _Group[T, R] | None:
        """The group holding the live item with the lowest tag (ties: the oldest)."""
        first: _Group[T, R] | None = None
        first_head: _Item[T, R] | None = None
        for key in list(lane.groups):
            group = lane.groups[key]
            head = group.head()
            if head is None:
                del lane.groups[key]
            elif first_head is None or (head.tag, head.arrived) < (first_head.tag, first_head.arrived):
                first, first_head = group, head
        return first

    def _full(self, group: _Group[T, R]) -> bool:
        rows = nbytes = 0
        for item in group.items():
            rows, nbytes = rows + item.rows, nbytes + item.nbytes
            if rows >= self.limits.max_rows or nbytes >= self.limits.max_bytes:
                return True
        return False

    def _take(self, lane: _Lane[T, R], group: _Group[T, R]) -> list[_Item[T, R]]:
        """The group's items in tag order, as many as one slice, the limits and `merge` allow."""
        taken: list[_Item[T, R]] = []
        rows = nbytes = 0
        work = 0.0
        # Slices where tenants share the lane: one tenant's calls only ever wait for its own.
        sliced = len(lane.finish) > 1 and lane.seconds_per_work
        slice_work = self.limits.slice_s / lane.seconds_per_work if sliced else float("inf")
        while True:
            item = group.head()
            if item is None:
                break
            over = rows + item.rows > self.limits.max_rows or nbytes + item.nbytes > self.limits.max_bytes
            if taken and (over or not self.limits.merge or work + item.work > slice_work):
                break
            group.queues[item.tenant].popleft()
            taken.append(item)
            self._dequeue(item, report=False)
            rows, nbytes, work = rows + item.rows, nbytes + item.nbytes, work + max(item.work, MIN_WORK)
        if taken:
            lane.virtual = max(lane.virtual, taken[0].tag)
        self._report_depth()
        return taken

    async def _dispatch(self, lane: _Lane[T, R]) -> None:
        while True:
            group = self._first_group(lane)
            if group is None:
                if self._closing:
                    return
                lane.wake.clear()
                await lane.wake.wait()
                continue
            delay = self.limits.max_queue_delay_s
            if delay > 0 and self.limits.merge and not self._closing and not self._full(group):
                head = group.head()
                assert head is not None, "the first group has a live item"
                oldest = min(item.arrived for item in group.items())
                remaining = oldest + delay - time.monotonic()
                if remaining > 0:
                    lane.wake.clear()
                    try:
                        await asyncio.wait_for(lane.wake.wait(), remaining)
                    except TimeoutError:
                        pass
                    else:
                        continue  # something arrived: look again (this group may be full now)
            items = self._live(self._take(lane, group))
            if not items:
                continue
            started = time.monotonic()
            results = await self._compute(lane, items)
            elapsed = time.monotonic() - started
            self._item_seconds += 0.2 * (elapsed / len(items) - self._item_seconds)
            work = sum(max(item.work, MIN_WORK) for item in items)
            measured = elapsed / work
            last = lane.seconds_per_work
            lane.seconds_per_work = measured if not last else last + 0.2 * (measured - last)
            if self._observer:
                self._observer.batch(
                    len(items),
                    sum(i.rows for i in items),
                    elapsed,
                    [(i.tenant, started - i.arrived) for i in items if i.waits],
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
