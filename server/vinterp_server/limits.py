"""Per-key admission: requests in flight, tokens per minute, graph size, capture bytes.

State lives in the :class:`~vinterp_server.store.Store`, so replicas sharing a store share
limits. Past a limit the app answers 429 with ``Retry-After``.

Example::

    limiter = Limiter(store)
    release = limiter.acquire(key)             # raises LimitExceeded past a limit
    try:
        ...
        limiter.record_tokens(key, 120)
    finally:
        release()
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vinterp_server.auth import KeyInfo
from vinterp_server.store import Store

_WINDOW = 60.0


class LimitExceeded(Exception):
    """A per-key limit was hit: 429, retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class Limiter:
    """Checks and counts each key's use of the server."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def acquire(self, key: KeyInfo) -> Callable[[], None]:
        """Take one of the key's concurrent slots; call the returned function to give it back
        (a streamed response keeps it until its last chunk). Refuses when the key's token
        budget for the last minute is spent."""
        used = self.store.add(key.id, "tokens", 0, _WINDOW)
        if used >= key.limits.tokens_per_minute:
            oldest = self.store.oldest(key.id, "tokens")
            wait = _WINDOW - oldest if oldest is not None else _WINDOW
            raise LimitExceeded(f"this key used {int(used)} tokens in the last minute "
                                f"(limit {key.limits.tokens_per_minute})", math.ceil(wait))
        if self.store.incr(key.id, "inflight", 1) > key.limits.concurrent:
            self.store.incr(key.id, "inflight", -1)
            raise LimitExceeded(f"this key already has {key.limits.concurrent} requests in "
                                f"flight (its limit); wait for one to finish", 1)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.store.incr(key.id, "inflight", -1)
        return release

    def record_tokens(self, key: KeyInfo, n: int) -> None:
        """Count ``n`` prompt + generated tokens against the key's per-minute budget."""
        if n > 0:
            self.store.add(key.id, "tokens", n, _WINDOW)

    @staticmethod
    def check_graph(key: KeyInfo, n_nodes: int) -> None:
        """Refuse graphs larger than the key may send."""
        if n_nodes > key.limits.graph_nodes:
            raise LimitExceeded(f"the graph has {n_nodes} nodes; this key may send at most "
                                f"{key.limits.graph_nodes}", 60)

    @staticmethod
    def check_capture(key: KeyInfo, n_bytes: int) -> None:
        """Refuse requests whose captures could exceed the key's per-request bytes."""
        if n_bytes > key.limits.capture_bytes:
            raise LimitExceeded(f"the requested captures can reach {n_bytes} bytes; this key "
                                f"may capture at most {key.limits.capture_bytes} bytes per "
                                f"request (capture fewer layers/positions or fewer tokens)", 60)
