"""The memory budget on its own: reservations, waiting, refusals, fair shares and eviction."""

from __future__ import annotations

import asyncio

import pytest

from lossd.client.errors import ResourceExhaustedError
from lossd.server.memory import MemoryBudget


def _run(coroutine: object) -> None:
    asyncio.run(coroutine)  # type: ignore[arg-type]


def test_what_fits_is_held_and_given_back() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100)
        one = budget.open("a", lambda _: None)
        await one.grow_to(30)
        await one.grow_to(20)  # never shrinks by growing
        assert (one.held, budget.held) == (30, 30)
        one.shrink_to(10)
        assert budget.held == 10
        one.close()
        one.close()
        assert budget.held == 0 and budget.peak == 30

    _run(scenario())


def test_more_than_a_client_may_hold_is_refused_at_once_without_retry() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100, admission_wait_s=5)
        with pytest.raises(ResourceExhaustedError) as refused:
            await budget.open("a", lambda _: None).grow_to(51)
        assert refused.value.reason == "MEMORY_EXHAUSTED" and refused.value.retry_after is None
        assert budget.held == 0

    _run(scenario())


def test_a_call_waits_for_memory_in_order_and_is_refused_with_retry_info_when_none_comes() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100, admission_wait_s=0.2)
        holders = [budget.open(peer, lambda _: None) for peer in "ab"]
        for holder in holders:
            await holder.grow_to(45)
        holders[0].receiving = holders[1].receiving = False  # computing: not evictable
        waiter = budget.open("c", lambda _: None)
        with pytest.raises(ResourceExhaustedError) as refused:
            await waiter.grow_to(20)
        assert refused.value.retry_after == 1.0
        granted = asyncio.ensure_future(waiter.grow_to(20))
        await asyncio.sleep(0.01)
        assert not granted.done()
        holders[0].close()
        await asyncio.wait_for(granted, 1)
        assert budget.held == 65

    _run(scenario())


def test_a_call_held_back_by_its_own_clients_share_does_not_hold_up_others() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100, admission_wait_s=1)
        mine = budget.open("a", lambda _: None)
        await mine.grow_to(40)
        mine.receiving = False
        second = budget.open("a", lambda _: None)
        blocked = asyncio.ensure_future(second.grow_to(20))  # a's share is 50
        await asyncio.sleep(0.01)
        other = budget.open("b", lambda _: None)
        await asyncio.wait_for(other.grow_to(30), 0.1)  # not queued behind a's call
        mine.close()
        await asyncio.wait_for(blocked, 1)

    _run(scenario())


def test_calls_still_arriving_from_a_client_over_its_fair_share_are_evicted_for_others() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100, admission_wait_s=1)
        evicted: list[str] = []
        stalled = [budget.open("hog", lambda _, i=i: evicted.append(f"hog{i}")) for i in range(2)]
        for reservation in stalled:
            await reservation.grow_to(25)
        computing = budget.open("fair", lambda _: evicted.append("fair"))
        await computing.grow_to(40)
        computing.receiving = False
        newcomer = budget.open("new", lambda _: evicted.append("new"))
        await asyncio.wait_for(newcomer.grow_to(30), 0.1)
        # hog held 50 > 100 / 3: its oldest arriving call went; the computing one never does.
        assert evicted == ["hog0"]
        assert stalled[0].evicted is not None and stalled[0].held == 0
        with pytest.raises(ResourceExhaustedError):
            await stalled[0].grow_to(30)
        assert budget.evictions == 1 and budget.held == 95

    _run(scenario())


def test_a_light_client_is_served_before_a_heavy_clients_waiting_calls() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100, peer_share=0.9, admission_wait_s=2)
        heavy = budget.open("heavy", lambda _: None)
        await heavy.grow_to(45)
        other = budget.open("other", lambda _: None)
        await other.grow_to(45)
        heavy.receiving = other.receiving = False  # nothing to evict
        queued = [budget.open("heavy", lambda _: None) for _ in range(3)]
        for reservation in queued:
            reservation.receiving = False  # ordering alone, no eviction
        waits = [asyncio.ensure_future(r.grow_to(5)) for r in queued]
        await asyncio.sleep(0.01)
        done, _ = await asyncio.wait(waits, timeout=0.01)
        assert len(done) == 2  # 45 + 45 + 2 x 5 fills the budget; the third waits
        light = budget.open("light", lambda _: None)
        served = asyncio.ensure_future(light.grow_to(5))
        await asyncio.sleep(0.01)
        other.shrink_to(40)  # 5 bytes come free: the light client's, though heavy waited longer
        await asyncio.wait_for(served, 1)
        assert not waits[2].done()
        other.close()
        await asyncio.wait_for(waits[2], 1)

    _run(scenario())
