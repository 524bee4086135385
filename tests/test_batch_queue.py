"""The batch queue (`lossd.server.batcher`) on its own, with stand-in items and no losses: grouping,
limits, delay, queue bound, deadlines, cancellation, isolation, drain. What a merged batch computes
is `test_merged_compute.py`'s."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from lossd.client.errors import DeadlineExceededError, ResourceExhaustedError, UnavailableError
from lossd.server.batcher import Batcher, BatchLimits


@dataclass(frozen=True)
class Item:
    name: str
    key: str | None = "a"
    rows: int = 1
    nbytes: int = 10
    fail: bool = False


@dataclass
class Recorder:
    """A fake engine: records each batch; can hold the compute thread until released."""

    batches: list[list[str]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.gate.set()

    def run(self, items: list[Item]) -> Sequence[str | Exception]:
        self.gate.wait(10)
        self.batches.append([item.name for item in items])
        return [ValueError(f"bad {item.name}") if item.fail else f"done {item.name}" for item in items]


@dataclass
class Observer:
    depths: list[int] = field(default_factory=list)
    batches: list[tuple[int, int]] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def batch(
        self, requests: int, rows: int, compute_s: float, queue_waits_s: Sequence[tuple[str, float]]
    ) -> None:
        assert compute_s >= 0 and len(queue_waits_s) == requests
        self.batches.append((requests, rows))

    def dropped(self, reason: str) -> None:
        self.drops.append(reason)


def _key(item: Item) -> Hashable | None:
    return item.key


def _cost(item: Item) -> tuple[int, int]:
    return item.rows, item.nbytes


def make(recorder: Recorder, observer: Observer | None = None, **limits: object) -> Batcher[Item, str]:
    return Batcher(recorder.run, _key, _cost, BatchLimits(**limits), ThreadPoolExecutor(1), observer)  # type: ignore[arg-type]


async def _hold_then_submit(
    batcher: Batcher[Item, str], recorder: Recorder, items: list[Item]
) -> list[object]:
    """Occupies the compute thread with one item so that `items` queue up, then releases it."""
    recorder.gate.clear()
    first = asyncio.ensure_future(batcher.submit(Item("first", key="hold")))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(batcher.submit(item)) for item in items]
    await asyncio.sleep(0.05)
    recorder.gate.set()
    return list(await asyncio.gather(first, *rest, return_exceptions=True))


def test_compatible_items_merge_and_others_run_apart() -> None:
    async def main() -> None:
        recorder, observer = Recorder(), Observer()
        batcher = make(recorder, observer)
        batcher.start()
        items = [
            Item("a1"),
            Item("b1", key="b"),
            Item("a2"),
            Item("solo1", key=None),
            Item("solo2", key=None),
        ]
        results = await _hold_then_submit(batcher, recorder, items)
        assert results == ["done first", "done a1", "done b1", "done a2", "done solo1", "done solo2"]
        assert recorder.batches == [["first"], ["a1", "a2"], ["b1"], ["solo1"], ["solo2"]]
        assert observer.batches[1] == (2, 2)
        assert observer.depths[-1] == 0
        await batcher.close()

    asyncio.run(main())


def test_row_and_byte_limits_split_batches_and_big_items_still_run() -> None:
    async def main() -> None:
        recorder = Recorder()
        batcher = make(recorder, max_rows=10, max_bytes=1000)
        batcher.start()
        items = [
            Item("r1", rows=6),
            Item("r2", rows=6),
            Item("big", rows=50),
            Item("b1", nbytes=600),
            Item("b2", nbytes=600),
        ]
        await _hold_then_submit(batcher, recorder, items)
        assert recorder.batches[1:] == [["r1"], ["r2"], ["big"], ["b1"], ["b2"]]
        await batcher.close()

    asyncio.run(main())


def test_merge_off_computes_each_alone() -> None:
    async def main() -> None:
        recorder = Recorder()
        batcher = make(recorder, merge=False)
        batcher.start()
        await _hold_then_submit(batcher, recorder, [Item("a1"), Item("a2")])
        assert recorder.batches[1:] == [["a1"], ["a2"]]
        await batcher.close()

    asyncio.run(main())


def test_queue_delay_lets_a_batch_form() -> None:
    async def main() -> None:
        recorder = Recorder()
        batcher = make(recorder, max_queue_delay_s=0.5)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(Item("a1")))
        await asyncio.sleep(0.05)  # well inside the delay: the first item is still waiting
        assert recorder.batches == []
        second = asyncio.ensure_future(batcher.submit(Item("a2")))
        assert await asyncio.gather(first, second) == ["done a1", "done a2"]
        assert recorder.batches == [["a1", "a2"]]
        await batcher.close()

    asyncio.run(main())


def test_a_full_group_does_not_wait_out_the_delay() -> None:
    async def main() -> None:
        recorder = Recorder()
        batcher = make(recorder, max_queue_delay_s=30.0, max_rows=2)
        batcher.start()
        results = await asyncio.wait_for(
            asyncio.gather(batcher.submit(Item("a1")), batcher.submit(Item("a2"))), timeout=10
        )
        assert results == ["done a1", "done a2"]
        await batcher.close()

    asyncio.run(main())


def test_full_queue_is_refused_at_once() -> None:
    async def main() -> None:
        recorder, observer = Recorder(), Observer()
        batcher = make(recorder, observer, max_queue_size=2)
        batcher.start()
        results = await _hold_then_submit(batcher, recorder, [Item("a1"), Item("a2"), Item("a3")])
        assert results[:3] == ["done first", "done a1", "done a2"]
        assert isinstance(results[3], ResourceExhaustedError) and results[3].reason == "QUEUE_FULL"
        assert observer.drops == ["queue_full"]
        assert ["a3"] not in recorder.batches
        await batcher.close()

    asyncio.run(main())


def test_many_items_enter_at_once_each_refused_or_answered_alone() -> None:
    """A batch call's entries: queued together, the depth reported once, those past the queue's
    bound refused one by one while the others are answered; after close, every one is refused."""

    async def main() -> None:
        recorder, observer = Recorder(), Observer()
        batcher = make(recorder, observer, max_queue_size=3)
        batcher.start()
        recorder.gate.clear()
        first = asyncio.ensure_future(batcher.submit(Item("first", key="hold")))
        await asyncio.sleep(0.05)
        reported = len(observer.depths)
        entered = batcher.enqueue_many([Item("m1"), Item("m2", fail=True), Item("m3"), Item("m4")])
        assert len(observer.depths) == reported + 1 and observer.depths[-1] == 3
        assert isinstance(entered[3], ResourceExhaustedError) and entered[3].reason == "QUEUE_FULL"
        futures = [e for e in entered if isinstance(e, asyncio.Future)]
        assert len(futures) == 3
        recorder.gate.set()
        results = await asyncio.gather(first, *futures, return_exceptions=True)
        assert results[0] == "done first" and results[1] == "done m1" and results[3] == "done m3"
        assert isinstance(results[2], ValueError)
        assert ["m1", "m2", "m3"] in recorder.batches
        await batcher.close()
        refused = batcher.enqueue_many([Item("late")])
        assert isinstance(refused[0], UnavailableError) and refused[0].reason == "SHUTTING_DOWN"

    asyncio.run(main())


def test_expired_items_are_never_computed() -> None:
    async def main() -> None:
        recorder, observer = Recorder(), Observer()
        batcher = make(recorder, observer)
        batcher.start()
        recorder.gate.clear()
        first = asyncio.ensure_future(batcher.submit(Item("first", key="hold")))
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(batcher.submit(Item("late"), deadline=time.monotonic() + 0.05))
        ok = asyncio.ensure_future(batcher.submit(Item("ok")))
        await asyncio.sleep(0.2)  # 'late' expires while the compute thread is busy
        recorder.gate.set()
        assert await first == "done first" and await ok == "done ok"
        with pytest.raises(DeadlineExceededError):
            await late
        assert recorder.batches == [["first"], ["ok"]]
        assert observer.drops == ["deadline"]
        await batcher.close()

    asyncio.run(main())


def test_cancelled_items_are_never_computed_and_leave_the_count() -> None:
    async def main() -> None:
        recorder = Recorder()
        batcher = make(recorder)
        batcher.start()
        recorder.gate.clear()
        first = asyncio.ensure_future(batcher.submit(Item("first", key="hold")))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit(Item("gone")))
        await asyncio.sleep(0.01)
        assert batcher.depth == 1
        gone.cancel()
        await asyncio.sleep(0.01)
        assert batcher.depth == 0
        recorder.gate.set()
        await first
        await asyncio.sleep(0.05)
        assert recorder.batches == [["first"]]
        await batcher.close()

    asyncio.run(main())


def test_one_failing_item_fails_alone_and_a_failing_run_fails_its_batch_only() -> None:
    async def main() -> None:
        recorder = Recorder()
        batcher = make(recorder)
        batcher.start()
        results = await _hold_then_submit(batcher, recorder, [Item("a1"), Item("bad", fail=True), Item("a2")])
        assert results[1] == "done a1" and results[3] == "done a2"
        assert isinstance(results[2], ValueError)

        def explode(items: list[Item]) -> Sequence[str | Exception]:
            raise RuntimeError("executor trouble")

        broken = Batcher(explode, _key, _cost, BatchLimits(), ThreadPoolExecutor(1))
        broken.start()
        with pytest.raises(RuntimeError, match="executor trouble"):
            await broken.submit(Item("x"))
        with pytest.raises(RuntimeError):  # and it keeps dispatching
            await broken.submit(Item("y"))
        await batcher.close()
        await broken.close()

    asyncio.run(main())


def test_close_drains_the_queue_then_refuses() -> None:
    async def main() -> None:
        recorder = Recorder()
        batcher = make(recorder)
        batcher.start()
        recorder.gate.clear()
        pending = [asyncio.ensure_future(batcher.submit(Item(f"a{i}"))) for i in range(3)]
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        with pytest.raises(UnavailableError):
            await batcher.submit(Item("late"))
        recorder.gate.set()
        await closing
        assert [await p for p in pending] == ["done a0", "done a1", "done a2"]

    asyncio.run(main())


@pytest.mark.parametrize("slow", [False, True])
def test_tiny_batches_compute_on_the_loop_only_while_they_are_fast(slow: bool) -> None:
    """With `inline_bytes`, a tiny batch skips the hand-over to the compute thread once tiny batches
    have been measured fast there; a slow engine keeps them on the thread (the loop never blocks)."""
    threads: list[bool] = []

    def run(items: list[Item]) -> Sequence[str | Exception]:
        threads.append(threading.current_thread() is threading.main_thread())
        if slow:
            time.sleep(0.002)
        return [f"done {item.name}" for item in items]

    async def main() -> None:
        with ThreadPoolExecutor(1) as executor:
            limits = BatchLimits(inline_bytes=100)
            batcher: Batcher[Item, str] = Batcher(run, lambda item: item.key, _cost, limits, executor)
            batcher.start()
            for index in range(5):
                assert await batcher.submit(Item(f"x{index}")) == f"done x{index}"
            assert await batcher.submit(Item("large", nbytes=1000)) == "done large"
            await batcher.close()

    asyncio.run(main())
    assert threads[0] is False, "the first is measured on the thread"
    assert threads[1:5] == [not slow] * 4
    assert threads[5] is False, "a batch over inline_bytes goes to the thread"
