"""The :class:`~vinterp_server.store.Store` that several Ray Serve ingress replicas share.

One ingress replica keeps per-key state (vectors, stored captures, trace results, the
limiter's counters) in its own :class:`~vinterp_server.store.MemoryStore`. With
``--ingress-replicas N`` Ray's proxy spreads one key's requests over N ingresses, so they must
see the same state: a key's limits hold across all of them, and a trace started through one
is polled through another. :class:`ActorStore` is that store: a named Ray actor holding one
``MemoryStore``, created by ``vinterp serve`` before the ingresses and killed after them.
Each call is one actor round trip (about a millisecond on one machine), awaited: the
ingress's event loop serves other requests meanwhile.

Example::

    actor = start_store_actor("vinterp-store")     # in the driver
    store = ActorStore("vinterp-store")            # in each ingress replica
    await store.put("key-a", "vector", "happy", tensors, ttl=None)
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from vinterp_server.store import MemoryStore

NAMESPACE = "vinterp"
#: the longest one store call may take (a restarting actor answers within a few seconds)
CALL_TIMEOUT_S = 20.0


def start_store_actor(name: str) -> Any:
    """Create the shared store's actor (detached: it outlives the replicas that use it, and
    ``vinterp serve`` kills it at shutdown). If its process dies, Ray starts it again, empty:
    vectors, stored results and limit counters are lost, but the server keeps serving (the
    calls that were in flight are retried on the new one)."""
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(MemoryStore)
    return actor_cls.options(name=name, namespace=NAMESPACE, lifetime="detached",
                             get_if_exists=True).remote()


class ActorStore:
    """:class:`~vinterp_server.store.Store` over the named actor of :func:`start_store_actor`."""

    def __init__(self, name: str) -> None:
        self._actor = ray.get_actor(name, namespace=NAMESPACE)

    async def _call(self, method: str, *args: Any) -> Any:
        # bounded: an actor that cannot come back must fail requests, not hang them
        return await asyncio.wait_for(getattr(self._actor, method).remote(*args),
                                      CALL_TIMEOUT_S)

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
