"""The shared store's Ray actors (``ray_store``) on a real local Ray: a store actor whose
process dies is started again by Ray, empty when it was in memory and with its objects when
it keeps them in its file (``--store-path``). The Ray Serve tests (``test_ray_serve.py``) run
the in-memory actors behind two ingresses; this runs both kinds on their own, cheaper than a
second Serve deployment."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import psutil
import pytest
import torch

from vinterp_server.sqlite_store import shard_files

ray = pytest.importorskip("ray")

from vinterp_server.ray_store import shared_store, start_store_actors  # noqa: E402


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _kill(actor_cls: str, count: int) -> None:
    procs = [p for p in psutil.process_iter(["cmdline"])
             if f"ray::{actor_cls}" in " ".join(p.info["cmdline"] or ())]
    assert len(procs) == count, f"{len(procs)} {actor_cls} actor processes, not {count}"
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=10)


def _roundtrip(names: list[str], filed: bool) -> tuple[object, object, int]:
    """Store a vector and take a slot, kill the actors, then read both back."""
    store = shared_store(names)
    vec = torch.randn(576)

    async def before() -> None:
        await store.put("alice", "vector", "kept", {None: vec}, ttl=None)
        await store.incr("alice", "inflight", 1)

    asyncio.run(before())
    _kill("SqliteStore" if filed else "MemoryStore", len(names))
    deadline = time.monotonic() + 60

    async def after() -> tuple[object, int]:
        return (await store.get("alice", "vector", "kept"),
                await store.incr("alice", "inflight", 0))

    while True:   # the calls in flight are retried on the restarted actor
        try:
            got, inflight = asyncio.run(after())
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return vec, got, inflight


def test_a_filed_store_actor_comes_back_with_its_objects(local_ray, tmp_path):
    files = shard_files(tmp_path, 2)
    actors = start_store_actors("test-filed", 2, files)
    try:
        vec, got, inflight = _roundtrip(list(actors), filed=True)
        assert got is not None and torch.equal(got[None], vec)
        assert inflight == 0        # counters start at zero: their requests died with it
    finally:
        for a in actors.values():
            ray.kill(a)


def test_an_in_memory_store_actor_comes_back_empty(local_ray):
    actors = start_store_actors("test-memory", 1)
    try:
        _, got, inflight = _roundtrip(list(actors), filed=False)
        assert got is None and inflight == 0
    finally:
        for a in actors.values():
            ray.kill(a)


def test_files_must_match_the_shards(local_ray, tmp_path):
    with pytest.raises(ValueError, match="1 store files for 2 shards"):
        start_store_actors("test-bad", 2, shard_files(tmp_path, 1))
