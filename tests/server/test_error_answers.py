"""Error answers through the real server: they keep the client's connection, name the field
(``param``) and say what to send instead; graph saves that are not one tensor; beam search
charged against its key's ``tokens_per_minute``; vector names."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save as st_save
from server_helpers import MODEL, npy

from vinterp.ir.results import decode_results


def test_an_error_answer_keeps_the_keep_alive_connection(served):
    """A 400 that no route answers itself (vLLM refuses an empty prompt in its request
    model's validator) came from a catch-all handler that Starlette re-raises after it
    answered: uvicorn closed the connection and the client's next request on it failed with
    "connection reset" (3 times in 5). Now the next request on the same client succeeds,
    every time, and the server logs no crash."""
    log = served.process.log
    crashes = log.read_text(errors="replace").count("Exception in ASGI application")
    with served.client("alice") as c:
        for _ in range(5):
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": "", "max_tokens": 1})
            assert r.status_code == 400 and "non-empty" in r.json()["error"]["message"], r.text
            assert r.json()["error"]["param"] == "prompt"
            assert c.get("/v1/models").status_code == 200
    assert log.read_text(errors="replace").count("Exception in ASGI application") == crashes


#: a prompt as token ids: the completion and the trace run the same tokens (no BOS added)
IDS = [504, 3458, 314, 4075, 282]
READ = {"id": 0, "op": "read", "kwargs": {"module": "model.layers.3", "kind": "output"}}


def _graph(op: dict, steps: dict | None = None) -> dict:
    """read(model.layers.3 output) -> ``op`` (node 1, on node 0) -> save (node 2)."""
    nodes = [READ, {"id": 1, "args": [{"ref": 0}], **op}, {"id": 2, "op": "save",
                                                           "args": [{"ref": 1}]}]
    if steps is not None:
        nodes = [{**n, "steps": steps} for n in nodes]
    return {"nodes": nodes}


TOPK = {"op": "method", "args": [{"ref": 0}, 2], "kwargs": {"name": "topk"}}
SPLIT = {"op": "method", "args": [{"ref": 0}, 200], "kwargs": {"name": "split", "dim": -1}}
DTYPE = {"op": "getattr", "kwargs": {"name": "dtype"}}


def _trace_save(served, op: dict) -> object:
    """Node 2's value from ``POST /v1/traces`` of the same graph on the same tokens."""
    body = {"graph": {"version": 1, "mode": "trace", "tensors": [],
                      "invokes": [{"prompts": [IDS]}], **_graph(op)}}
    with served.client("alice") as c:
        r = c.post("/v1/traces", json=body)
    assert r.status_code == 200, r.text
    saves, _ = decode_results(r.json()["result"])
    return saves[2]


def _rows(served, max_tokens: int = 1) -> torch.Tensor:
    """The layer's output over the prompt and the forwards after it (a plain capture)."""
    with served.client("alice") as c:
        r = c.post("/v1/completions", json={
            "model": MODEL, "prompt": IDS, "max_tokens": max_tokens, "temperature": 0,
            "capture": [{"point": "layers.3.output", "positions": "all", "steps": "all"}]})
    assert r.status_code == 200, r.text
    (cap,) = r.json()["choices"][0]["captures"]
    return npy(cap)


@pytest.mark.parametrize("op", [TOPK, SPLIT], ids=["topk", "split"])
def test_a_graph_save_of_a_tuple_of_tensors_comes_one_item_per_element(served, op):
    """``topk``'s (values, indices) and ``split``'s chunks, saved by a ``graph``: one item
    per element with its ``part``, equal to what ``/v1/traces`` returns for the same save
    (a tuple) and to raw PyTorch on a plain capture of the same rows. It was a 500
    ("only one element tensors can be converted to Python scalars") after the engine ran."""
    rows = _rows(served)[None, :len(IDS)]
    want = (rows.topk(2) if op is TOPK else rows.split(200, dim=-1))
    traced = _trace_save(served, op)
    assert isinstance(traced, tuple) and len(traced) == len(want)
    kw = {"model": MODEL, "prompt": IDS, "max_tokens": 1, "temperature": 0,
          "graph": _graph(op)}
    with served.client("alice") as c:
        r = c.post("/v1/completions", json=kw)
        assert r.status_code == 200, r.text
        caps = r.json()["choices"][0]["captures"]
        with c.stream("POST", "/v1/completions", json={**kw, "stream": True}) as s:
            assert s.status_code == 200
            streamed = [item for line in s.iter_lines() if line.startswith("data: {")
                        for choice in json.loads(line[6:]).get("choices") or []
                        for item in choice.get("captures") or []]
    assert [c["part"] for c in caps] == list(range(len(want)))
    assert {(c["point"], c["step"]) for c in caps} == {("graph.node2", 0)}
    for cap, ref, via_trace in zip(caps, want, traced, strict=True):
        got = npy(cap)
        assert got.shape == ref.shape == via_trace.shape
        assert torch.equal(got, via_trace.to(got.dtype))   # (one engine, one computation)
        if op is TOPK and got.dtype == torch.int64:       # the indices
            assert torch.equal(got, ref)
        else:
            assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert [(c["part"], c["shape"]) for c in streamed] == [(c["part"], c["shape"]) for c in caps]
    for piece, cap in zip(streamed, caps, strict=True):
        assert torch.equal(npy(piece), npy(cap))


def test_a_graph_save_of_a_tuple_at_every_step_keeps_its_steps(served):
    """A ``topk`` saved at every generation step: each step's (values, indices) as parts
    0 and 1 with that step; a list of tuples was read as a stream's (step, value) pairs."""
    rows = _rows(served, max_tokens=3)
    kw = {"model": MODEL, "prompt": IDS, "max_tokens": 3, "temperature": 0,
          "graph": _graph(TOPK, steps={"start": 0, "stop": None})}
    with served.client("alice") as c:
        r = c.post("/v1/completions", json=kw)
    assert r.status_code == 200, r.text
    caps = r.json()["choices"][0]["captures"]
    assert [(c["step"], c["part"]) for c in caps] == [(s, p) for s in range(3) for p in (0, 1)]
    # step 0 is the prompt's forward, step k the forward over generated token k
    for step, start, stop in ((0, 0, len(IDS)), (1, len(IDS), len(IDS) + 1),
                              (2, len(IDS) + 1, len(IDS) + 2)):
        values, indices = rows[None, start:stop].topk(2)
        got_v, got_i = (npy(c) for c in caps if c["step"] == step)
        assert torch.equal(got_i, indices)
        assert float((got_v - values).abs().max()) <= 1e-4 * float(values.abs().max())


def test_a_graph_save_no_response_can_carry_is_a_400_naming_the_node(served):
    """A save of a ``dtype`` (neither a tensor nor a number): a 400 naming the save node,
    streamed or not, instead of a 500 "Could not infer dtype of torch.dtype". ``/v1/traces``,
    whose results keep a save's structure, returns it as a local run does (it was a 500)."""
    kw = {"model": MODEL, "prompt": IDS, "max_tokens": 1, "graph": _graph(DTYPE)}
    with served.client("alice") as c:
        r = c.post("/v1/completions", json=kw)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "graph.nodes[2]"
        assert "save node 2 holds a torch.dtype" in err["message"]
        with c.stream("POST", "/v1/completions", json={**kw, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == 400
        assert events[-1]["error"]["param"] == "graph.nodes[2]"
        r = c.post("/v1/traces", json={"graph": {"version": 1, "mode": "trace",
                                                 "tensors": [], "invokes": [{"prompts": [IDS]}],
                                                 **_graph(DTYPE)}})
        assert r.status_code == 200, r.text
        saves, _ = decode_results(r.json()["result"])
        assert isinstance(saves[2], torch.dtype) and saves[2].is_floating_point


def test_beam_search_is_charged_against_tokens_per_minute(served):
    """Beam search (vLLM makes one engine request per beam and step, with sampling params of
    its own) was never charged: a key with 60 tokens a minute ran any number of them. Now
    its engine requests count (the prompt once, every token they generate), so the next
    request is refused, and the count is the request's usage but for the first step's
    single beam."""
    width, new = 2, 40
    with served.client("beams") as c:
        r = c.post("/v1/completions", json={
            "model": MODEL, "prompt": "The capital of France is", "max_tokens": new,
            "use_beam_search": True, "n": width, "ignore_eos": True, "temperature": 0})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["completion_tokens"] == width * new
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 429, r.text
    used = int(re.search(r"used (\d+) tokens", r.json()["error"]["message"]).group(1))
    # the first step runs the prompt alone (one beam), every later step one per beam
    assert used == usage["prompt_tokens"] + 1 + (new - 1) * width, (used, usage)


def test_a_vector_name_with_a_trailing_newline_is_refused(served):
    """``$`` matched before a final newline: ``bad\\n`` was stored and listed."""
    body = st_save({"vector": torch.zeros(576)})
    with served.client("alice") as c:
        r = c.put("/v1/vectors/nl-bad%0A", content=body)
        assert r.status_code == 400 and "vector name 'nl-bad\\n'" in r.json()["error"]["message"]
        assert "nl-bad\n" not in c.get("/v1/vectors").json()["vectors"]
        r = c.put("/v1/vectors/nl-ok.1_a-b", content=body)
        assert r.status_code == 201, r.text
        assert c.delete("/v1/vectors/nl-ok.1_a-b").status_code == 200


def test_a_field_refused_inside_the_engine_client_names_it_in_param(served):
    """The per-prompt checks (positions, the captures' bound) run where vLLM's serving layer
    answers them: they said "Bad Request" / "Request Entity Too Large" with ``param: null``,
    unlike every other 400 and 413."""
    with served.client("alice") as c:
        r = c.post("/v1/completions", json={
            "model": MODEL, "prompt": IDS, "max_tokens": 1,
            "capture": [{"point": "layers.3.output", "positions": [1000]}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "capture[0].positions" and err["type"] == "BadRequestError"
    assert err["message"].startswith("capture[0].positions: position 1000 is outside")
    with served.client("queued") as c:   # (captures up to 20000 bytes)
        r = c.post("/v1/completions", json={
            "model": MODEL, "prompt": IDS, "max_tokens": 10,
            "capture": [{"point": "layers.3.output", "positions": "all", "steps": "all"}]})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "RequestEntityTooLargeError"
