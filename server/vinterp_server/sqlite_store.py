"""A :class:`~vinterp_server.store.Store` whose objects outlive the process: SQLite on disk.

:class:`~vinterp_server.store.MemoryStore` forgets every key's named vectors, stored captures
and trace results when the server restarts (a deploy, a crash, a supervisor bringing back a
server whose engine died) and a shared store's Ray actor forgets its keys when its process
dies. :class:`SqliteStore` keeps those objects in one SQLite file, so a store opened again on
the same file has them, TTLs included (expiry times are wall-clock, so they hold across
restarts).

The limiter's counters stay in memory on purpose: the requests in flight died with the
process, so a persisted in-flight gauge would hold their slots forever, and a token window is a
minute long. A restarted store starts them at zero, as a restarted ``MemoryStore`` does.

SQLite needs no server and ships with Python. One file belongs to one store: ``vinterp serve
--store-path DIR`` opens ``DIR/store-0-of-1.sqlite``, and under Ray each store actor opens its
own shard's file (see :func:`shard_files`). Calls run in a worker thread (a stored capture can
be tens of MB), so the event loop keeps serving while SQLite writes.

Values are pickled, as a Ray actor's arguments are: the file holds what this server wrote, for
this server (anyone who can write it can already run code as the server).

Example::

    store = SqliteStore("state/store-0-of-1.sqlite")
    await store.put("key-a", "vector", "happy", tensors, ttl=None)
    store.close()
    await SqliteStore("state/store-0-of-1.sqlite").get("key-a", "vector", "happy")  # tensors
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from vinterp_server.store import MemoryStore, StoreUnavailable

log = logging.getLogger("vinterp.server")

#: the layout of the file; a file written by another layout is refused, not misread
SCHEMA_VERSION = 1
#: expired objects are deleted every this many puts (and when the file is opened)
PURGE_EVERY = 256

_SHARD_FILE = re.compile(r"store-(\d+)-of-(\d+)\.sqlite$")


def shard_files(directory: str | Path, shards: int) -> list[Path]:
    """The files of a store kept in ``directory`` and split ``shards`` ways, one per shard.

    A key's shard depends on the shard count, so a directory written with another count would
    put keys in the wrong files: that is refused, naming the count to use.

    Example::

        shard_files("state", 2)   # [state/store-0-of-2.sqlite, state/store-1-of-2.sqlite]
    """
    directory = Path(directory)
    found = {int(m.group(2)) for p in directory.glob("store-*-of-*.sqlite")
             if (m := _SHARD_FILE.search(p.name))}
    other = found - {shards}
    if other:
        raise ValueError(
            f"{directory} holds a store split {sorted(other)[0]} way(s), not {shards}: keys "
            f"would be looked up in the wrong files. Pass --store-shards {sorted(other)[0]}, "
            f"or use another directory")
    return [directory / f"store-{i}-of-{shards}.sqlite" for i in range(shards)]


class SqliteStore:
    """:class:`~vinterp_server.store.Store` with its objects in an SQLite file (counters in
    memory, see the module docstring)."""

    def __init__(self, path: str | Path, clock: Any = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._counters = MemoryStore()
        self._lock = threading.Lock()   # one connection, used from worker threads in turn
        self._puts = 0
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables and version != SCHEMA_VERSION:
            raise ValueError(f"{self.path} was written by another store layout "
                             f"(version {version}, this is {SCHEMA_VERSION}): move it away")
        # WAL: a reader never waits for a writer; NORMAL: a crash of the process loses
        # nothing committed (only a power loss can lose the last transactions)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS objects (owner TEXT NOT NULL, kind TEXT NOT NULL, "
            "name TEXT NOT NULL, value BLOB NOT NULL, expires REAL, "
            "PRIMARY KEY (owner, kind, name))")
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._purge()

    def close(self) -> None:
        """Close the file (later calls fail)."""
        with self._lock:
            self._db.close()

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(self._locked, fn, *args)
        except sqlite3.OperationalError as exc:   # locked past busy_timeout, disk full, I/O
            raise StoreUnavailable(f"the store file {self.path} cannot be used now ({exc}); "
                                   "retry shortly") from exc

    def _locked(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            return fn(*args)

    # -- objects, on disk --------------------------------------------------------------------

    async def put(self, owner: str, kind: str, name: str, value: Any, ttl: float | None) -> None:
        data = await asyncio.to_thread(pickle.dumps, value, pickle.HIGHEST_PROTOCOL)
        expires = None if ttl is None else self._clock() + ttl
        await self._run(self._put, owner, kind, name, data, expires)

    def _put(self, owner: str, kind: str, name: str, data: bytes, expires: float | None) -> None:
        self._db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?)",
                         (owner, kind, name, data, expires))
        self._puts += 1
        if self._puts % PURGE_EVERY == 0:
            self._purge()

    async def get(self, owner: str, kind: str, name: str) -> Any | None:
        row = await self._run(self._get, owner, kind, name, self._clock())
        if row is None:
            return None
        try:
            return await asyncio.to_thread(pickle.loads, row)
        except Exception as exc:   # (a class renamed since it was written)
            log.warning("store %s: %s %r of one key cannot be read back (%s: %s); dropping it",
                        self.path, kind, name, type(exc).__name__, exc)
            await self.delete(owner, kind, name)
            return None

    def _get(self, owner: str, kind: str, name: str, now: float) -> bytes | None:
        row = self._db.execute(
            "SELECT value FROM objects WHERE owner=? AND kind=? AND name=? "
            "AND (expires IS NULL OR expires >= ?)", (owner, kind, name, now)).fetchone()
        return None if row is None else row[0]

    async def delete(self, owner: str, kind: str, name: str) -> bool:
        return await self._run(self._delete, owner, kind, name)

    def _delete(self, owner: str, kind: str, name: str) -> bool:
        cur = self._db.execute("DELETE FROM objects WHERE owner=? AND kind=? AND name=?",
                               (owner, kind, name))
        return cur.rowcount > 0

    async def names(self, owner: str, kind: str) -> list[str]:
        return await self._run(self._names, owner, kind, self._clock())

    def _names(self, owner: str, kind: str, now: float) -> list[str]:
        rows = self._db.execute(
            "SELECT name FROM objects WHERE owner=? AND kind=? "
            "AND (expires IS NULL OR expires >= ?) ORDER BY name", (owner, kind, now))
        return [r[0] for r in rows]

    def _purge(self) -> None:
        self._db.execute("DELETE FROM objects WHERE expires < ?", (self._clock(),))

    # -- counters, in memory -----------------------------------------------------------------

    async def add(self, owner: str, counter: str, amount: float, window: float) -> float:
        return await self._counters.add(owner, counter, amount, window)

    async def incr(self, owner: str, counter: str, delta: int) -> int:
        return await self._counters.incr(owner, counter, delta)

    async def oldest(self, owner: str, counter: str) -> float | None:
        return await self._counters.oldest(owner, counter)
