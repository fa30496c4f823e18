"""``vinterp serve --store-path DIR``: what keys stored outlives a restart of the server.

A researcher uploads a steering vector, gets a large capture stored and a remote trace's result
kept, then the server restarts (a deploy, or a supervisor bringing it back after its engine
died). With the store on disk, the new server process has all three, for their owner only,
and the stored vector steers exactly as before. A remote trace still running when the server
is told to stop finishes first; one a server left behind when it died reads as failed, not
as running until its result would have expired."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from conftest import Served, start_server
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from server_helpers import KEYS, MODEL, fetch

import vinterp
from vinterp.backends.remote import RemoteBackend, RemoteError, RemoteTrace
from vinterp_server.schemas import TraceStatus
from vinterp_server.sqlite_store import SqliteStore


def _steered(served: Served) -> list[str]:
    body = {"model": MODEL, "prompt": ["The weather today is", "My favourite food"],
            "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "interventions": [{"op": "steer", "layers": 4, "vector": {"name": "kept"}}]}
    with served.client("alice") as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return [ch["text"] for ch in r.json()["choices"]]


def test_vectors_captures_and_trace_results_outlive_a_restart(tmp_path):
    state = tmp_path / "state"
    vec = torch.randn(576) * 8
    (tmp_path / "first").mkdir()
    (tmp_path / "again").mkdir()
    # (eager: what is tested here does not need compiling, and each start is faster; 120 s
    # to finish at the stop: the default 30 s is ~4x the 200-token trace on an idle machine)
    first = Served(start_server(tmp_path / "first", "--store-path", str(state),
                                "--enforce-eager", "--shutdown-timeout", "120"))
    try:
        with first.client("alice") as c:
            assert c.put("/v1/vectors/kept", content=st_save({"v": vec})).status_code == 201
            # a full-sequence capture larger than the inline budget is stored, not inlined
            r = c.post("/v1/completions", json={
                "model": MODEL, "prompt": "Hello " * 40, "max_tokens": 1,
                "capture": [{"point": "layers.2.output", "positions": "all"}]})
            assert r.status_code == 200, r.text
            item = r.json()["choices"][0]["captures"][0]
            assert "id" in item, "the capture was inlined: make it larger"
            captured = fetch(first, item)
        steered = _steered(first)
        model = vinterp.LanguageModel(MODEL)     # (HF; the trace itself runs on the server)
        with model.trace("The Eiffel Tower is in", remote=first.url, api_key=KEYS["alice"],
                         blocking=False) as tracer:
            h = model.layers[5].output.save()
        tracer.wait(timeout=120)
        trace_id = tracer.handle.id
        # a trace still running when the server is told to stop: it finishes first
        with model.generate("Once upon a time", max_new_tokens=200, ignore_eos=True,
                            remote=first.url, api_key=KEYS["alice"], blocking=False) as gen:
            model.layers[5].output.save()
        assert gen.handle.status()["status"] in ("queued", "running")
    finally:
        assert first.process.stop(timeout=180) == 0, first.process.log_tail()
    assert (state / "store-0-of-1.sqlite").exists()
    # what a server that died mid-trace leaves behind: a status no one refreshes any more
    stale = SqliteStore(state / "store-0-of-1.sqlite")
    asyncio.run(stale.put("alice", "trace", "trace-stale", TraceStatus(
        id="trace-stale", status="running", updated=time.time() - 100), ttl=600))
    stale.close()

    again = Served(start_server(tmp_path / "again", "--store-path", str(state),
                                "--enforce-eager"))
    try:
        with again.client("alice") as c:
            assert c.get("/v1/vectors").json()["vectors"] == ["kept"]
            assert torch.equal(st_load(c.get("/v1/vectors/kept").content)["vector"], vec)
            assert torch.equal(fetch(again, item), captured)
        # a handle kept by id across the restart still gives the trace's saves
        backend = RemoteBackend(again.url, KEYS["alice"])
        kept = RemoteTrace(backend, trace_id).wait(timeout=10)
        assert torch.equal(next(iter(kept.saves.values())), h)
        finished = RemoteTrace(backend, gen.handle.id).wait(timeout=10)
        assert finished.generated[0].shape[0] == 4 + 200   # its prompt and 200 new tokens
        with pytest.raises(RemoteError, match="stopped before it finished") as lost:
            RemoteTrace(backend, "trace-stale").wait(timeout=10)
        assert lost.value.status == 503
        with again.client("bob") as c:     # still only its owner's
            assert c.get("/v1/vectors/kept").status_code == 404
            assert c.get(f"/v1/captures/{item['id']}").status_code == 404
            assert c.get(f"/v1/traces/{trace_id}").status_code == 404
        assert _steered(again) == steered
    finally:
        assert again.process.stop(timeout=120) == 0, again.process.log_tail()
