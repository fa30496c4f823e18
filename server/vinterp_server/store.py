"""Per-key server state behind one small interface: objects with an owner, a kind and a TTL.

Named vectors, stored captures, trace results and the limiter's usage counters all go
through :class:`Store`. The server ships :class:`MemoryStore` (one process) and
:class:`~vinterp_server.sqlite_store.SqliteStore` (objects on disk, ``--store-path``); a
replicated deployment swaps in a shared store (the Ray actors of
:mod:`vinterp_server.ray_store`; Redis would fit the same interface) without touching the app.
:class:`ShardedStore` spreads keys over several stores.

Every read names the owner: one key can never see another key's objects, whatever id it
guesses.

The interface is async: a shared store answers over the network (a Ray actor, Redis), and
its round trips must not block the event loop that serves every other request.

Example::

    store = MemoryStore()
    await store.put("key-a", "vector", "happy", tensors, ttl=None)
    await store.get("key-b", "vector", "happy")      # None: not this key's
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol


class StoreUnavailable(Exception):
    """A shared store could not answer (a timeout, an actor that cannot come back): the
    server answers 503 with ``Retry-After``, as for an engine that is down, since the same
    request may succeed once the store is back. A store raises it for failures of its own,
    never for a bad request.

    Example::

        raise StoreUnavailable("the shared store 'vinterp-store-0' did not answer 'add' "
                               "within 20 s", retry_after=5)
    """

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))

    def __reduce__(self) -> tuple[Any, ...]:   # (keeps its wait when pickled, as by Ray)
        return (type(self), (str(self), self.retry_after))


class Store(Protocol):
    """What the app needs of per-key state (every method a coroutine). A store that cannot
    answer raises :class:`StoreUnavailable`."""

    async def put(self, owner: str, kind: str, name: str, value: Any, ttl: float | None) -> None:
        """Keep ``value`` (``ttl`` seconds; ``None``: until deleted)."""

    async def get(self, owner: str, kind: str, name: str) -> Any | None:
        """The value, or ``None`` (missing, expired, or another owner's)."""

    async def delete(self, owner: str, kind: str, name: str) -> bool:
        """Forget it; whether it existed."""

    async def names(self, owner: str, kind: str) -> list[str]:
        """The owner's live names of a kind."""

    async def add(self, owner: str, counter: str, amount: float, window: float) -> float:
        """Record ``amount`` now; the counter's sum over the last ``window`` seconds (with
        ``amount=0`` this only reads). Used for tokens per minute."""

    async def incr(self, owner: str, counter: str, delta: int) -> int:
        """Add ``delta`` to a gauge, never below 0, and return its new value (requests in
        flight; a store restarted empty must not go negative when they finish)."""

    async def oldest(self, owner: str, counter: str) -> float | None:
        """Seconds since the oldest event :meth:`add` still counts (for ``Retry-After``)."""


class MemoryStore:
    """:class:`Store` in this process's memory (thread-safe; expired objects purged lazily).

    Its methods never wait: they are coroutines only to meet the interface, so its lock is
    never held across an ``await`` (Ray runs the shared store's actors, each a
    ``MemoryStore``, as async actors: one event loop, the lock uncontended)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._objects: dict[tuple[str, str, str], tuple[Any, float | None]] = {}
        self._events: dict[tuple[str, str], list[tuple[float, float]]] = {}
        self._gauges: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    async def put(self, owner: str, kind: str, name: str, value: Any, ttl: float | None) -> None:
        expires = None if ttl is None else self._clock() + ttl
        with self._lock:
            self._objects[(owner, kind, name)] = (value, expires)
            if len(self._objects) % 256 == 0:
                self._purge()

    async def get(self, owner: str, kind: str, name: str) -> Any | None:
        with self._lock:
            hit = self._objects.get((owner, kind, name))
            if hit is None:
                return None
            value, expires = hit
            if expires is not None and expires < self._clock():
                del self._objects[(owner, kind, name)]
                return None
            return value

    async def delete(self, owner: str, kind: str, name: str) -> bool:
        with self._lock:
            return self._objects.pop((owner, kind, name), None) is not None

    async def names(self, owner: str, kind: str) -> list[str]:
        now = self._clock()
        with self._lock:
            return sorted(n for (o, k, n), (_, exp) in self._objects.items()
                          if o == owner and k == kind and (exp is None or exp >= now))

    async def add(self, owner: str, counter: str, amount: float, window: float) -> float:
        now = self._clock()
        with self._lock:
            events = self._events.setdefault((owner, counter), [])
            if amount:
                events.append((now, amount))
            cut = 0
            while cut < len(events) and events[cut][0] < now - window:
                cut += 1
            del events[:cut]
            return sum(a for _, a in events)

    async def incr(self, owner: str, counter: str, delta: int) -> int:
        with self._lock:
            value = max(0, self._gauges.get((owner, counter), 0) + delta)
            self._gauges[(owner, counter)] = value
            return value

    async def oldest(self, owner: str, counter: str) -> float | None:
        """Seconds since the oldest event still counted (for ``Retry-After``)."""
        with self._lock:
            events = self._events.get((owner, counter))
            return None if not events else self._clock() - events[0][0]

    def _purge(self) -> None:
        now = self._clock()
        dead = [k for k, (_, exp) in self._objects.items() if exp is not None and exp < now]
        for k in dead:
            del self._objects[k]


class ShardedStore:
    """:class:`Store` over several stores, each key's objects and counters all in one of
    them (chosen by a hash of the owner). One shared store serves its calls one at a time;
    shards serve them side by side, and a key's limits still hold, since its counters live in
    one shard.

    Example::

        store = ShardedStore([MemoryStore(), MemoryStore()])
        await store.put("key-a", "vector", "happy", tensors, ttl=None)   # in one of them
    """

    def __init__(self, shards: Sequence[Store]) -> None:
        if not shards:
            raise ValueError("a sharded store needs at least one shard")
        self.shards = list(shards)

    def shard(self, owner: str) -> Store:
        """The store that holds ``owner``'s state: the same in every process (Python's own
        ``hash`` of a string differs between processes, so it cannot pick the shard)."""
        digest = hashlib.blake2b(owner.encode(), digest_size=8).digest()
        return self.shards[int.from_bytes(digest, "little") % len(self.shards)]

    async def put(self, owner: str, kind: str, name: str, value: Any, ttl: float | None) -> None:
        await self.shard(owner).put(owner, kind, name, value, ttl)

    async def get(self, owner: str, kind: str, name: str) -> Any | None:
        return await self.shard(owner).get(owner, kind, name)

    async def delete(self, owner: str, kind: str, name: str) -> bool:
        return await self.shard(owner).delete(owner, kind, name)

    async def names(self, owner: str, kind: str) -> list[str]:
        return await self.shard(owner).names(owner, kind)

    async def add(self, owner: str, counter: str, amount: float, window: float) -> float:
        return await self.shard(owner).add(owner, counter, amount, window)

    async def incr(self, owner: str, counter: str, delta: int) -> int:
        return await self.shard(owner).incr(owner, counter, delta)

    async def oldest(self, owner: str, counter: str) -> float | None:
        return await self.shard(owner).oldest(owner, counter)
