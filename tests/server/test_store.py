"""``MemoryStore``, the per-key state behind keys, limits, vectors and stored results (also
what the shared Ray store actor holds)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from vinterp_server.store import MemoryStore


def run(call: Coroutine[Any, Any, Any]) -> Any:
    """The store's answer (its methods are coroutines)."""
    return asyncio.run(call)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_objects_expire_and_are_per_owner():
    clock = Clock()
    store = MemoryStore(clock)
    run(store.put("alice", "trace", "t1", {"done": True}, ttl=10))
    run(store.put("alice", "vector", "v", [1.0], ttl=None))
    assert run(store.get("alice", "trace", "t1")) == {"done": True}
    assert run(store.get("bob", "trace", "t1")) is None
    assert run(store.names("alice", "vector")) == ["v"]
    clock.now += 11
    assert run(store.get("alice", "trace", "t1")) is None
    assert run(store.get("alice", "vector", "v")) == [1.0]
    assert run(store.delete("alice", "vector", "v"))
    assert not run(store.delete("alice", "vector", "v"))


def test_windowed_counts_and_the_oldest_event():
    clock = Clock()
    store = MemoryStore(clock)
    run(store.add("alice", "tokens", 30, window=60))
    clock.now += 40
    assert run(store.add("alice", "tokens", 20, window=60)) == 50
    assert run(store.oldest("alice", "tokens")) == 40
    clock.now += 30                      # the first event left the window
    assert run(store.add("alice", "tokens", 0, window=60)) == 20


def test_a_gauge_never_goes_below_zero():
    """Requests that were in flight when a shared store restarted empty release their slot on
    the new one: the count stays at 0, so the key's concurrency limit still holds."""
    store = MemoryStore()
    assert run(store.incr("alice", "inflight", -1)) == 0
    assert run(store.incr("alice", "inflight", 1)) == 1
    assert run(store.incr("alice", "inflight", 1)) == 2
    assert run(store.incr("alice", "inflight", -3)) == 0
