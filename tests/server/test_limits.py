"""The per-key limiter over the async store: slots, token budgets, and slots given back by
requests cancelled while they wait on a slow shared store (a client that hung up)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from vinterp_server.auth import KeyInfo, Limits
from vinterp_server.limits import LimitExceeded, Limiter
from vinterp_server.store import MemoryStore

KEY = KeyInfo(id="alice", limits=Limits(concurrent=2, tokens_per_minute=100))


class SlowStore(MemoryStore):
    """A shared store's round trip: every gauge update waits ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def incr(self, owner: str, counter: str, delta: int) -> int:
        await asyncio.sleep(self.delay)
        return await super().incr(owner, counter, delta)


def test_slots_are_limited_and_given_back_once():
    async def main() -> None:
        limiter = Limiter(MemoryStore())
        a = await limiter.acquire(KEY)
        await limiter.acquire(KEY)
        with pytest.raises(LimitExceeded, match="already has 2 requests in flight"):
            await limiter.acquire(KEY)
        await a.release()
        await a.release()                 # twice: still one slot back, not two
        await limiter.acquire(KEY)
        with pytest.raises(LimitExceeded):
            await limiter.acquire(KEY)
    asyncio.run(main())


def test_tokens_count_against_the_minute_on_release():
    async def main() -> None:
        limiter = Limiter(MemoryStore())
        slot = await limiter.acquire(KEY)
        await slot.release(tokens=120)
        with pytest.raises(LimitExceeded, match="used 120 tokens") as err:
            await limiter.acquire(KEY)
        assert 1 <= err.value.retry_after <= 60
    asyncio.run(main())


async def _cancel_after(coro: Any, delay: float) -> None:
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(delay)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_request_cancelled_while_taking_a_slot_does_not_keep_it():
    async def main() -> None:
        store = SlowStore(0.05)
        limiter = Limiter(store)
        await _cancel_after(limiter.acquire(KEY), 0.01)   # cancelled mid-increment
        await asyncio.sleep(0.2)                          # the increment lands, then the undo
        assert await MemoryStore.incr(store, "alice", "inflight", 0) == 0
    asyncio.run(main())


def test_a_request_cancelled_while_giving_back_its_slot_still_gives_it_back():
    async def main() -> None:
        store = SlowStore(0.05)
        limiter = Limiter(store)
        slot = await limiter.acquire(KEY)
        await _cancel_after(slot.release(tokens=7), 0.01)
        await asyncio.sleep(0.2)
        assert await MemoryStore.incr(store, "alice", "inflight", 0) == 0
        assert await store.add("alice", "tokens", 0, 60) == 7
    asyncio.run(main())


class FailingStore(MemoryStore):
    """A shared store that stops answering after the slot was taken."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.down = False

    async def add(self, owner: str, counter: str, amount: float, window: float) -> float:
        self.calls.append(f"add {amount}")
        if self.down:
            raise TimeoutError("store actor unreachable")
        return await super().add(owner, counter, amount, window)

    async def incr(self, owner: str, counter: str, delta: int) -> int:
        self.calls.append(f"incr {delta}")
        if self.down:
            raise TimeoutError("store actor unreachable")
        return await super().incr(owner, counter, delta)


def test_tokens_are_counted_before_the_slot_is_freed_and_a_failing_store_is_logged(caplog):
    """The request that gets the freed slot sees the tokens; a store failing at release does
    not fail the request that already has its answer (it is logged)."""
    async def main() -> None:
        store = FailingStore()
        limiter = Limiter(store)
        slot = await limiter.acquire(KEY)
        store.calls.clear()
        await slot.release(tokens=5)
        assert store.calls == ["add 5", "incr -1"]
        slot = await limiter.acquire(KEY)
        store.down = True
        await slot.release(tokens=5)
    asyncio.run(main())
    assert "could not charge key 'alice' 5 tokens" in caplog.text
    assert "could not give back a slot of key 'alice'" in caplog.text


def test_a_charge_that_fails_still_gives_the_slot_back(caplog):
    """A store that cannot take the charge (an actor restarting, a timeout) must not keep the
    slot: the key would lose it for good (a ``concurrent=1`` key refused from then on)."""
    class ChargeFails(MemoryStore):
        async def add(self, owner: str, counter: str, amount: float, window: float) -> float:
            if amount:
                raise TimeoutError("store actor unreachable")
            return await super().add(owner, counter, amount, window)

    async def main() -> None:
        store = ChargeFails()
        limiter = Limiter(store)
        await (await limiter.acquire(KEY)).release(tokens=5)
        assert await store.incr("alice", "inflight", 0) == 0
    asyncio.run(main())
    assert "could not charge key 'alice' 5 tokens" in caplog.text
