"""``SqliteStore``: what only the on-disk store does. Its objects outlive the store (a store
opened again on the file has them, with their TTLs), its counters do not (in-flight slots died
with the process), and a file it cannot trust is refused with a message, not misread. The
object behaviour it shares with ``MemoryStore`` is tested in ``test_store.py``."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
import torch
from test_store import Clock, run

from vinterp_server.schemas import TraceStatus
from vinterp_server.sqlite_store import SCHEMA_VERSION, SqliteStore, shard_files
from vinterp_server.store import StoreUnavailable


def test_objects_outlive_the_store_and_their_ttl_holds(tmp_path):
    """What the server keeps (vectors as tensors, stored captures as bytes, trace results as
    pydantic models) comes back equal from a store opened again on the file; an object whose
    TTL ran out while the store was closed does not."""
    path = tmp_path / "store.sqlite"
    clock = Clock()
    vectors = {3: torch.randn(576), None: torch.randn(576)}
    first = SqliteStore(path, clock)
    run(first.put("alice", "vector", "happy", vectors, ttl=None))
    run(first.put("alice", "capture", "cap-1", b"\x93NUMPY" + bytes(1000), ttl=60))
    run(first.put("alice", "trace", "tr-1", TraceStatus(id="tr-1", status="done"), ttl=10))
    run(first.incr("alice", "inflight", 2))
    run(first.add("alice", "tokens", 50, window=60))
    first.close()

    clock.now += 30                       # the trace's 10 s are over, the capture's 60 not
    again = SqliteStore(path, clock)
    got = run(again.get("alice", "vector", "happy"))
    assert set(got) == {3, None}
    assert torch.equal(got[3], vectors[3]) and torch.equal(got[None], vectors[None])
    assert run(again.get("alice", "capture", "cap-1")) == b"\x93NUMPY" + bytes(1000)
    assert run(again.get("alice", "trace", "tr-1")) is None
    assert run(again.names("alice", "trace")) == []
    assert run(again.get("bob", "vector", "happy")) is None
    # counters start at zero: the requests that held these slots died with the process
    assert run(again.incr("alice", "inflight", 0)) == 0
    assert run(again.add("alice", "tokens", 0, window=60)) == 0
    again.close()


def test_expired_objects_leave_the_file(tmp_path):
    """Expired objects are deleted from disk (when the file is opened and every so many puts),
    so a server storing captures with a TTL does not grow its file forever."""
    path = tmp_path / "store.sqlite"
    clock = Clock()
    store = SqliteStore(path, clock)
    for i in range(10):
        run(store.put("alice", "capture", f"c{i}", bytes(100), ttl=5))
    store.close()
    clock.now += 6
    SqliteStore(path, clock).close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM objects").fetchone()[0] == 0


def test_concurrent_calls_all_land_and_the_loop_keeps_running(tmp_path):
    """Many requests at once each get their own object back, and the event loop serves others
    while SQLite works in its thread (a blocking store would run no tick in between)."""
    store = SqliteStore(tmp_path / "store.sqlite")
    big = torch.randn(4, 2**20)            # a 16 MiB stored capture

    async def main() -> tuple[list, int]:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        await asyncio.gather(*(store.put(f"k{i}", "vector", "v", i, ttl=None)
                               for i in range(64)))
        await store.put("k0", "capture", "big", big, ttl=None)
        got = await asyncio.gather(*(store.get(f"k{i}", "vector", "v") for i in range(64)))
        done = True
        await t
        return got, ticks

    got, ticks = asyncio.run(main())
    assert got == list(range(64))
    assert torch.equal(run(store.get("k0", "capture", "big")), big)
    assert ticks > 64
    store.close()


def test_a_directory_split_another_way_is_refused(tmp_path):
    """A key's shard depends on the shard count: files written with 2 shards are not read as
    3, which would look keys up in the wrong file; the message says which count to pass."""
    assert shard_files(tmp_path, 2) == [tmp_path / "store-0-of-2.sqlite",
                                        tmp_path / "store-1-of-2.sqlite"]
    for f in shard_files(tmp_path, 2):
        SqliteStore(f).close()
    assert shard_files(tmp_path, 2)[1].exists()
    with pytest.raises(ValueError, match="split 2 way.*--store-shards 2"):
        shard_files(tmp_path, 3)


def test_a_file_it_cannot_trust_is_refused(tmp_path):
    """Another layout's file and a file that is not SQLite fail at open with a message, before
    any request could read them wrongly."""
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE objects (x)")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(ValueError, match="another store layout"):
        SqliteStore(other)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        SqliteStore(junk)


def test_an_unreadable_object_is_dropped_not_fatal(tmp_path, caplog):
    """An object pickled by code that no longer exists reads as missing (the caller answers 404
    as for any missing name) and is logged, instead of failing every later request for it."""
    store = SqliteStore(tmp_path / "store.sqlite")
    with sqlite3.connect(store.path) as db:
        db.execute("INSERT INTO objects VALUES ('alice', 'vector', 'old', ?, NULL)",
                   (b"\x80\x05cgone_module\nGone\n.",))
    assert run(store.get("alice", "vector", "old")) is None
    assert "cannot be read back" in caplog.text
    assert run(store.names("alice", "vector")) == []
    store.close()


def test_wall_clock_is_the_default_clock(tmp_path):
    """Expiry times are wall-clock seconds (a monotonic clock restarts with the machine, so a
    TTL written before a reboot would mean nothing after it)."""
    store = SqliteStore(tmp_path / "store.sqlite")
    run(store.put("alice", "capture", "c", b"x", ttl=100))
    store.close()
    with sqlite3.connect(tmp_path / "store.sqlite") as db:
        expires = db.execute("SELECT expires FROM objects").fetchone()[0]
    assert abs(expires - (time.time() + 100)) < 5


def test_a_file_locked_by_another_writer_is_unavailable_not_a_bug(tmp_path):
    """A file another process keeps locked past the busy timeout (or a full disk) is the store
    being unavailable (the server's 503, retry later), not an error of the request (500)."""
    store = SqliteStore(tmp_path / "store.sqlite")
    store._db.execute("PRAGMA busy_timeout=100")   # (10 s in use: too long for a test)
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="cannot be used now .*locked.*retry"):
            run(store.put("alice", "vector", "v", b"x", ttl=None))
    finally:
        other.execute("ROLLBACK")
        other.close()
    run(store.put("alice", "vector", "v", b"x", ttl=None))   # and it works again once free
    assert run(store.get("alice", "vector", "v")) == b"x"
    store.close()
