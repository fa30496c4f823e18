"""The :class:`~vinterp_server.store.Store` that several Ray Serve ingress replicas share.

One ingress replica keeps per-key state (vectors, stored captures, trace results, the
limiter's counters) in its own :class:`~vinterp_server.store.MemoryStore`. With
``--ingress-replicas N`` Ray's proxy spreads one key's requests over N ingresses, so they must
see the same state: a key's limits hold across all of them, and a trace started through one
is polled through another. :class:`ActorStore` is that store: a named Ray actor holding one
``MemoryStore`` (a :class:`~vinterp_server.sqlite_store.SqliteStore` with ``--store-path``),
created by ``vinterp serve`` before the ingresses and killed after them.
Each call is one actor round trip (about a millisecond on one machine), awaited: the
ingress's event loop serves other requests meanwhile.

One actor answers its calls one at a time, and every ingress waits on it a few times per
request, so ``vinterp serve`` starts ``--store-shards`` of them (one per ingress replica by
default) and each key's state lives in one (:class:`~vinterp_server.store.ShardedStore`).
(On a 2-core machine one actor and two shards both took 1,400-1,650 calls a second from two
client processes: the clients' CPU was the limit there, so what shards gain is unmeasured.)

Example::

    start_store_actors("vinterp-store", shards=2)              # in the driver
    store = shared_store(["vinterp-store-0", "vinterp-store-1"])  # in each ingress replica
    await store.put("key-a", "vector", "happy", tensors, ttl=None)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from vinterp_server.store import MemoryStore, ShardedStore, Store, StoreUnavailable

NAMESPACE = "vinterp"
#: the longest one store call may take (a restarting actor answers within a few seconds)
CALL_TIMEOUT_S = 20.0


def start_store_actors(name: str, shards: int = 1,
                       files: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Create the shared store's actors, ``shards`` of them (``{name}-0``, ...), by name.

    Detached: they outlive the replicas that use them, and ``vinterp serve`` kills them at
    shutdown. If an actor's process dies, Ray starts it again. Without ``files`` it starts
    empty: the vectors, stored results and limit counters of the keys it held are lost, but
    the server keeps serving (the calls that were in flight are retried on the new one). With
    ``files`` (one per shard, :func:`~vinterp_server.sqlite_store.shard_files`) each actor keeps
    its objects in its file (:class:`~vinterp_server.sqlite_store.SqliteStore`), and a restarted
    one opens it again: only the counters start at zero. Those actors run on this node, where
    the files are, and Ray restarts them there."""
    names = [f"{name}-{i}" for i in range(shards)]
    cls: type = MemoryStore
    args: list[tuple[str, ...]] = [()] * shards
    placement: dict[str, Any] = {}
    if files is not None:
        if len(files) != shards:
            raise ValueError(f"{len(files)} store files for {shards} shards: give one per shard")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from vinterp_server.sqlite_store import SqliteStore

        cls, args = SqliteStore, [(str(f),) for f in files]
        placement = {"scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)}
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(cls)
    return {n: actor_cls.options(name=n, namespace=NAMESPACE, lifetime="detached",
                                 get_if_exists=True, **placement).remote(*a)
            for n, a in zip(names, args, strict=True)}


def shared_store(names: Sequence[str]) -> Store:
    """The store over the actors of :func:`start_store_actors` (sharded by key when there are
    several)."""
    stores = [ActorStore(n) for n in names]
    return stores[0] if len(stores) == 1 else ShardedStore(stores)


class ActorStore:
    """:class:`~vinterp_server.store.Store` over one named actor of
    :func:`start_store_actors`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._actor = ray.get_actor(name, namespace=NAMESPACE)

    async def _call(self, method: str, *args: Any) -> Any:
        # bounded: an actor that cannot come back must fail requests (503), not hang them
        try:
            return await asyncio.wait_for(getattr(self._actor, method).remote(*args),
                                          CALL_TIMEOUT_S)
        except TimeoutError as exc:
            raise StoreUnavailable(f"the shared store {self.name!r} did not answer "
                                   f"{method!r} within {CALL_TIMEOUT_S:g} s; retry "
                                   "shortly") from exc
        except ray.exceptions.RayActorError as exc:
            raise StoreUnavailable(f"the shared store {self.name!r} is unreachable "
                                   f"({type(exc).__name__}); retry shortly") from exc

    async def put(self, owner: str, kind: str, name: str, value: Any, ttl: float | None) -> None:
        await self._call("put", owner, kind, name, value, ttl)

    async def get(self, owner: str, kind: str, name: str) -> Any | None:
        return await self._call("get", owner, kind, name)

    async def delete(self, owner: str, kind: str, name: str) -> bool:
        return await self._call("delete", owner, kind, name)

    async def names(self, owner: str, kind: str) -> list[str]:
        return await self._call("names", owner, kind)

    async def add(self, owner: str, counter: str, amount: float, window: float) -> float:
        return await self._call("add", owner, counter, amount, window)

    async def incr(self, owner: str, counter: str, delta: int) -> int:
        return await self._call("incr", owner, counter, delta)

    async def oldest(self, owner: str, counter: str) -> float | None:
        return await self._call("oldest", owner, counter)
