"""``MemoryStore``, the per-key state behind keys, limits, vectors and stored results (also
what the shared Ray store actor holds); the object tests also run on ``SqliteStore``
(``test_sqlite_store.py`` has what only it does)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from vinterp_server.store import MemoryStore, ShardedStore


def run(call: Coroutine[Any, Any, Any]) -> Any:
    """The store's answer (its methods are coroutines)."""
    return asyncio.run(call)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Clock], Any]:
    """Each store that keeps objects (the in-memory one, and SQLite on disk)."""
    from vinterp_server.sqlite_store import SqliteStore

    if request.param == "memory":
        return MemoryStore
    return lambda clock: SqliteStore(tmp_path / "store.sqlite", clock)


def test_objects_expire_and_are_per_owner(make_store):
    clock = Clock()
    store = make_store(clock)
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


def test_a_sharded_store_keeps_each_key_whole_in_one_shard():
    """Every object and counter of a key lands in the same shard, the same one in any process
    (so every ingress finds it there), and keys spread over all the shards."""
    shards = [MemoryStore(), MemoryStore(), MemoryStore()]
    store = ShardedStore(shards)
    owners = [f"key-{i}" for i in range(60)]
    for owner in owners:
        run(store.put(owner, "vector", "v", owner, ttl=None))
        run(store.incr(owner, "inflight", 1))
        run(store.add(owner, "tokens", 5, window=60))
    for owner in owners:
        holders = [s for s in shards if run(s.get(owner, "vector", "v")) == owner]
        assert len(holders) == 1
        assert run(holders[0].incr(owner, "inflight", 0)) == 1
        assert run(holders[0].add(owner, "tokens", 0, window=60)) == 5
        assert run(store.names(owner, "vector")) == ["v"]
    assert all(any(run(s.get(o, "vector", "v")) for o in owners) for s in shards)
    # another process (another string hash seed) picks the same shard for every key
    code = ("from vinterp_server.store import ShardedStore, MemoryStore\n"
            "s = ShardedStore([MemoryStore() for _ in range(3)])\n"
            f"print([s.shards.index(s.shard(o)) for o in {owners!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True).stdout
    assert json.loads(out) == [shards.index(store.shard(o)) for o in owners]
