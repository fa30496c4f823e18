"""Per-key admission: requests in flight, tokens per minute, graph size, capture bytes.

State lives in the :class:`~vinterp_server.store.Store`, so replicas sharing a store share
limits. Past a rate (requests in flight, tokens per minute) the app answers 429 with
``Retry-After``; a request larger than the key allows (graph size, capture bytes) gets 413.

Example::

    limiter = Limiter(store)
    slot = await limiter.acquire(key)          # raises LimitExceeded past a limit
    try:
        ...
    finally:
        await slot.release(tokens=120)         # the slot back, the tokens counted
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
from collections.abc import Coroutine
from typing import Any

from vinterp_server.auth import KeyInfo
from vinterp_server.store import Store

_WINDOW = 60.0
log = logging.getLogger(__name__)


class LimitExceeded(Exception):
    """A per-key limit was hit: 429, retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class TooLarge(LimitExceeded):
    """A request larger than its key may send (graph nodes, capture bytes): 413, without
    ``Retry-After``: as it stands it can never pass (a 429 would have clients retry it)."""


class Slot:
    """One of a key's concurrent slots, held from :meth:`Limiter.acquire` to :meth:`release`
    (a streamed response holds it until its last chunk)."""

    def __init__(self, limiter: Limiter, key: KeyInfo) -> None:
        self._limiter = limiter
        self._key = key
        self._released = False

    async def release(self, tokens: int = 0) -> None:
        """Give the slot back and count the request's ``tokens`` (prompt + generated)
        against the key's per-minute budget; later calls do nothing."""
        if self._released:
            return
        self._released = True
        limiter = self._limiter
        await asyncio.shield(limiter._spawn(limiter._give_back(self._key, tokens)))


class Limiter:
    """Checks and counts each key's use of the server.

    Taking and giving back a slot run as tasks of their own, shielded from the request: a
    request cancelled while it waits on a shared store (a client that hung up) must neither
    keep a slot taken for good nor lose the tokens it used.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._updates: set[asyncio.Task[Any]] = set()

    async def acquire(self, key: KeyInfo) -> Slot:
        """Take one of the key's concurrent slots. Refuses when the key's token budget for the
        last minute is spent, or all its slots are taken."""
        used = await self.store.add(key.id, "tokens", 0, _WINDOW)
        if used >= key.limits.tokens_per_minute:
            oldest = await self.store.oldest(key.id, "tokens")
            wait = _WINDOW - oldest if oldest is not None else _WINDOW
            raise LimitExceeded(f"this key used {int(used)} tokens in the last minute "
                                f"(limit {key.limits.tokens_per_minute})", math.ceil(wait))
        taking = self._spawn(self._take(key))
        try:
            took = await asyncio.shield(taking)
        except asyncio.CancelledError:
            taking.add_done_callback(lambda task: self._undo(task, key))
            raise
        if not took:
            raise LimitExceeded(f"this key already has {key.limits.concurrent} requests in "
                                f"flight (its limit); wait for one to finish", 1)
        return Slot(self, key)

    async def _take(self, key: KeyInfo) -> bool:
        if await self.store.incr(key.id, "inflight", 1) <= key.limits.concurrent:
            return True
        await self.store.incr(key.id, "inflight", -1)
        return False

    def _undo(self, taking: asyncio.Task[bool], key: KeyInfo) -> None:
        """Give back the slot a cancelled :meth:`acquire` took but its caller never got."""
        if not taking.cancelled() and taking.exception() is None and taking.result():
            self._spawn(self._give_back(key, 0))

    async def _give_back(self, key: KeyInfo, tokens: int) -> None:
        """One of ``key``'s slots back; ``tokens`` counted against its per-minute budget first
        (the request that gets the slot must see them)."""
        # (the request is done: its answer stands, a store's fault is logged; the slot is
        # given back even when the charge failed, else the key would lose it for good)
        if tokens > 0:
            try:
                await self.store.add(key.id, "tokens", tokens, _WINDOW)
            except Exception:
                log.exception("could not charge key %r %d tokens in the store", key.id, tokens)
        try:
            await self.store.incr(key.id, "inflight", -1)
        except Exception:
            log.exception("could not give back a slot of key %r to the store", key.id)

    def _spawn(self, update: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """``update`` as a task the limiter keeps (the loop holds only a weak reference), in a
        context of its own: not the request's. On Ray Serve a hung-up request's task is
        cancelled with the calls it made, found through its context, so a shared store's
        actor call made in that context was cancelled too and the slot stayed taken."""
        task = asyncio.get_running_loop().create_task(update, context=contextvars.Context())
        self._updates.add(task)
        task.add_done_callback(self._updates.discard)
        return task

    @staticmethod
    def check_graph(key: KeyInfo, n_nodes: int) -> None:
        """Refuse graphs larger than the key may send."""
        if n_nodes > key.limits.graph_nodes:
            raise TooLarge(f"the graph has {n_nodes} nodes; this key may send at most "
                           f"{key.limits.graph_nodes}")

    @staticmethod
    def check_capture(cap: int, n_bytes: int, what: str = "") -> None:
        """Refuse requests whose captures could exceed the key's per-request bytes ``cap``
        (``what``: which part of the request, for the message)."""
        if n_bytes > cap:
            raise TooLarge(f"the requested captures can reach {n_bytes} bytes{what}; this key "
                           f"may capture at most {cap} bytes per request (capture fewer "
                           f"layers, positions or tokens)")
