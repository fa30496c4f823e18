"""The shared store's Ray actors (``ray_store``) on a real local Ray: a store actor whose
process dies is started again by Ray, empty when it was in memory and with its objects when
it keeps them in its file (``--store-path``). The Ray Serve tests (``test_ray_serve.py``) run
the in-memory actors behind two ingresses; this runs both kinds on their own, cheaper than a
second Serve deployment. A request that Ray cancels (a client hung up) gives its slot back
through these actors all the same."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator

import psutil
import pytest
import torch
from server_helpers import wait_until

from vinterp_server.auth import KeyInfo, Limits
from vinterp_server.limits import Limiter
from vinterp_server.sqlite_store import shard_files
from vinterp_server.store import MemoryStore

ray = pytest.importorskip("ray")

from vinterp_server.ray_store import (  # noqa: E402
    NAMESPACE,
    ActorStore,
    shared_store,
    start_store_actors,
)

# (the actor classes below travel by value: Ray's workers cannot import this test module)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


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


class _SlowStore(MemoryStore):
    """A store actor whose token counts take a second: a give-back is in flight long enough
    for a cancel to find it."""

    async def add(self, owner: str, counter: str, amount: float, window: float) -> float:
        if amount:
            await asyncio.sleep(1.0)
        return await super().add(owner, counter, amount, window)


class _Request:
    """An ingress replica's request on Ray Serve: it takes a slot, gives it back when its
    client hangs up (as Starlette does on the disconnect), and is then cancelled by Ray (as
    Serve's proxy does on the same hang-up)."""

    def __init__(self, store: str) -> None:
        self.limiter = Limiter(ActorStore(store))
        self.hung_up = asyncio.Event()

    async def run(self) -> None:
        slot = await self.limiter.acquire(KeyInfo(id="alice", limits=Limits(concurrent=1)))
        try:
            await self.hung_up.wait()
        finally:
            await slot.release(tokens=5)

    def hang_up(self) -> None:
        self.hung_up.set()


def test_a_request_ray_cancels_while_giving_back_its_slot_still_gives_it_back(local_ray):
    """Ray cancels a cancelled task's calls with it, found through the context they were
    made in: the store call giving back the slot was cancelled, so the key's slot stayed
    taken (a Ray Serve key with ``concurrent=1`` was refused for good after one hang-up)."""
    slow = ray.remote(_SlowStore).options(name="test-slow", namespace=NAMESPACE).remote()
    ray.get(slow.__ray_ready__.remote())
    store = shared_store(["test-slow"])

    def counts() -> tuple[int, float]:
        async def read() -> tuple[int, float]:
            return (await store.incr("alice", "inflight", 0),
                    await store.add("alice", "tokens", 0, 60))
        return asyncio.run(read())

    request = ray.remote(_Request).remote("test-slow")
    running = request.run.remote()
    wait_until(lambda: counts()[0] == 1, "the request taking its slot", timeout=30, every=0.1)
    ray.get(request.hang_up.remote())
    time.sleep(0.3)                # the give-back's store call is in flight (it takes 1 s)
    ray.cancel(running)            # recursive, as Serve's proxy cancels a hung-up request
    with contextlib.suppress(ray.exceptions.TaskCancelledError):
        ray.get(running, timeout=30)
    wait_until(lambda: counts() == (0, 5), "(slots taken, tokens) = (0, 5)", timeout=10,
               every=0.1)


class _Stuck(MemoryStore):
    """A store actor that never answers a listing (a wedged or overloaded process)."""

    async def names(self, owner: str, kind: str) -> list[str]:
        await asyncio.sleep(3600)
        return []


def test_a_store_that_cannot_answer_makes_the_server_answer_503(local_ray, monkeypatch):
    """A store call that times out, or finds its actor gone for good, is the store being
    unavailable: the request answers 503 with ``Retry-After`` (it was a 500 that blamed
    nobody), naming the store and the call."""
    import httpx

    from vinterp_server import ray_store
    from vinterp_server.app import build_app
    from vinterp_server.store import StoreUnavailable

    monkeypatch.setattr(ray_store, "CALL_TIMEOUT_S", 0.5)
    stuck = ray.remote(_Stuck).options(name="test-stuck", namespace=NAMESPACE).remote()
    gone = ray.remote(MemoryStore).options(name="test-gone", namespace=NAMESPACE).remote()
    ray.get([stuck.__ray_ready__.remote(), gone.__ray_ready__.remote()])
    try:
        store, dead = shared_store(["test-stuck"]), shared_store(["test-gone"])
        ray.kill(gone, no_restart=True)

        async def main() -> list[httpx.Response]:
            with pytest.raises(StoreUnavailable, match=(
                    "'test-stuck' did not answer 'names' within 0.5 s")):
                await store.names("alice", "vector")
            with pytest.raises(StoreUnavailable, match="'test-gone' is unreachable"):
                await dead.names("alice", "vector")
            out = []
            for s in (store, dead):
                app = build_app(host=None, store=s)   # (the route never reaches the engine)
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                             base_url="http://test") as client:
                    out.append(await client.get("/v1/vectors"))
            return out

        for response in asyncio.run(main()):
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "5"
            assert "retry shortly" in response.json()["error"]["message"]
    finally:
        ray.kill(stuck)
