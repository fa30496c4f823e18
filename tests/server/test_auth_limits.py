"""API keys, per-key limits, isolation between keys, and bad input: each case gets its own
4xx naming what was wrong, and nothing reaches the engine."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from safetensors.torch import save as st_save
from server_helpers import (MAX_BODY, MAX_MODEL_LEN, MODEL, running_stream, scrape,
                            settled, wait_until)

ROUTES = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
          ("POST", "/v1/traces"), ("GET", "/v1/traces/trace-x"), ("PUT", "/v1/vectors/v"),
          ("GET", "/v1/vectors/v"), ("DELETE", "/v1/vectors/v"), ("GET", "/v1/vectors"),
          ("GET", "/v1/captures/cap-x"), ("GET", "/v1/stats")]


@pytest.mark.parametrize("who", [None, "wrong"])
def test_every_route_but_health_and_metrics_needs_a_key(served, who):
    headers = {"Authorization": "Bearer sk-wrong-0123456789"} if who else {}
    for method, path in ROUTES:
        r = httpx.request(method, served.url + path, headers=headers, json={}, timeout=30)
        assert r.status_code == 401, (method, path, r.status_code)
        assert "API key" in r.json()["error"]["message"]
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
    metrics = scrape(served.url)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vinterp_interventions_total",
                 "vinterp_capture_bytes_total", "vinterp_traces_total"):
        assert name in metrics, name


def _st(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()})


def test_named_vectors_are_per_key(served):
    v = torch.randn(576)
    with served.client("alice") as a, served.client("bob") as b:
        assert a.put("/v1/vectors/mine", content=_st({"v": v})).status_code == 201
        assert a.get("/v1/vectors").json() == {"vectors": ["mine"]} or \
            "mine" in a.get("/v1/vectors").json()["vectors"]
        assert "mine" not in b.get("/v1/vectors").json()["vectors"]
        assert b.get("/v1/vectors/mine").status_code == 404
        assert b.delete("/v1/vectors/mine").status_code == 404
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1,
                "interventions": [{"op": "steer", "layers": 3, "vector": {"name": "mine"}}]}
        assert a.post("/v1/completions", json=body).status_code == 200
        r = b.post("/v1/completions", json=body)
        assert r.status_code == 400 and "no vector named 'mine'" in r.json()["error"]["message"]
        from safetensors.torch import load as st_load
        assert torch.equal(st_load(a.get("/v1/vectors/mine").content)["vector"], v)
        assert a.delete("/v1/vectors/mine").status_code == 200
        assert a.get("/v1/vectors/mine").status_code == 404


def test_per_layer_named_vector_applies_per_layer(served):
    """One tensor per layer index: layer 3 gets zeros (no change), layer 5 the real vector."""
    v = torch.randn(576) * 4
    body = {"model": MODEL, "prompt": "The weather today is", "max_tokens": 5,
            "temperature": 0}
    with served.client("alice") as a:
        assert a.put("/v1/vectors/per", content=_st({"3": torch.zeros(576), "5": v})
                     ).status_code == 201
        assert a.put("/v1/vectors/whole", content=_st({"x": v})).status_code == 201
        by_name = a.post("/v1/completions", json={**body, "interventions": [
            {"op": "steer", "layers": [3, 5], "vector": {"name": "per"}}]}).json()
        inline = a.post("/v1/completions", json={**body, "interventions": [
            {"op": "steer", "layers": [5], "vector": {"values": v.tolist()}}]}).json()
        assert by_name["choices"][0]["text"] == inline["choices"][0]["text"]
        r = a.post("/v1/completions", json={**body, "interventions": [
            {"op": "steer", "layers": [4], "vector": {"name": "per"}}]})
        assert r.status_code == 400 and "no entry for layer 4" in r.json()["error"]["message"]


def test_traces_and_captures_are_per_key(served):
    graph = {"mode": "trace", "invokes": [{"prompts": [[1, 2, 3]]}], "nodes": [
        {"id": 0, "op": "read", "kwargs": {"module": "model.layers.2", "kind": "output"}},
        {"id": 1, "op": "save", "args": [{"ref": 0}]}]}
    with served.client("alice") as a, served.client("bob") as b:
        r = a.post("/v1/traces", json={"graph": graph, "blocking": False})
        assert r.status_code == 202
        tid = r.json()["id"]
        wait_until(lambda: a.get(f"/v1/traces/{tid}").json()["status"] == "done",
                   "the trace done")
        assert b.get(f"/v1/traces/{tid}").status_code == 404


def _bad(served, path: str, body, expect: str, who: str = "alice", status: int = 400,
         **kw) -> None:
    # (json.dumps, unlike httpx, writes NaN/Infinity: the server must refuse them itself)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with served.client(who) as c:
        r = c.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, (r.status_code, r.text)
    assert expect in r.json()["error"]["message"], r.json()


BASE = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}


#: bad vinterp fields and what the 400 must say
BAD_FIELDS = [
    ({"interventions": [{"op": "explode", "layers": 1, "vector": {"values": [1.0]}}]},
     "interventions[0].op"),
    ({"interventions": [{"op": "steer", "layers": 30, "vector": {"values": [0.0] * 576}}]},
     "layer 30 is out of range: the model has 30 layers"),
    ({"interventions": [{"op": "steer", "layers": 3, "vector": {"values": [0.0] * 575}}]},
     "hidden size 576; got shape [575]"),
    ({"interventions": [{"op": "steer", "layers": 3,
                         "vector": {"values": [math.nan] + [0.0] * 575}}]},
     "finite"),
    ({"interventions": [{"op": "steer", "layers": 3, "scale": math.inf,
                         "vector": {"values": [0.0] * 576}}]},
     "finite"),
    ({"interventions": [{"op": "steer", "layers": 3, "vector": {"name": "nope"}}]},
     "no vector named 'nope'"),
    ({"interventions": [{"op": "steer", "layers": 3}]}, "needs a vector"),
    ({"capture": [{"point": "layers.3.banana.output"}]},
     "capture[0]: point 'layers.3.banana.output': the model has no module "
     "'model.layers.3.banana': it has 30 layers"),
    # vLLM computes logits where it samples: a capture cannot label them as other positions
    ({"capture": [{"point": "lm_head.output", "positions": "all"}]},
     "at the prompt's last position only"),
    ({"capture": [{"point": "lm_head.output", "positions": [0]}]},
     "at the prompt's last position only"),
    # a hand-written graph's unknown module (was a 500 "internal error" at run time)
    ({"graph": {"nodes": [
        {"id": 0, "op": "read", "kwargs": {"module": "model.layers.99", "kind": "output"}},
        {"id": 1, "op": "save", "args": [{"ref": 0}]}]}},
     "node 0 (read): the model has no module 'model.layers.99'"),
    ({"capture": [{"point": "layers.99.output"}]}, "layer 99 is out of range"),
    ({"capture": [{"point": "layers.3"}]}, "must end in .output or .input"),
    ({"capture": [{"point": "layers.3.output", "positions": [1], "steps": "all"}]},
     "use steps='prompt'"),
    ({"graph": {"nodes": [{"id": 0, "op": "os.system", "args": ["ls"]}]}}, "graph"),
    ({"graph": {"nodes": [{"id": 0, "op": "save", "args": [{"ref": 5}]}]}}, "graph"),
    # found by an audit: these ran, doing nothing or something else, or failed as a 500
    ({"interventions": [{"op": "steer", "layers": True, "vector": {"values": [0.0] * 576}}]},
     "interventions[0].layers"),
    ({"interventions": [{"op": "clamp", "layers": 1, "min": 2, "max": 1,
                         "vector": {"values": [1.0] * 576}}]}, "min 2.0 is above max 1.0"),
    ({"interventions": [{"op": "steer", "layers": 1, "positions": [],
                         "vector": {"values": [1.0] * 576}}]}, "at least one position"),
    ({"interventions": [{"op": "ablate", "layers": 1, "vector": {"values": [0.0] * 576}}]},
     "ablate projects onto the vector's direction, and this vector (layer 1) is all zeros"),
    ({"interventions": [{"op": "steer", "layers": 1, "positions": [100000],
                         "vector": {"values": [1.0] * 576}}]},
     "interventions[0].positions: position 100000 is outside this request's tokens"),
    ({"interventions": [{"op": "steer", "layers": 1, "positions": [-50],
                         "vector": {"values": [1.0] * 576}}]},
     "position -50 is outside this request's tokens"),
    ({"capture": [{"point": "layers.3.output", "positions": [1000]}]},
     "capture[0].positions: position 1000 is outside this request's prompt"),
    # (vLLM refuses it in its request model's validator, before any route runs)
    ({"prompt": "", "capture": [{"point": "layers.3.output"}]}, "non-empty"),
]


@pytest.mark.parametrize("fields,expect", BAD_FIELDS)
def test_bad_fields_get_400_naming_the_field(served, fields, expect):
    settled(served)
    _bad(served, "/v1/completions", {**BASE, **fields}, expect)
    settled(served)   # (a refused request leaves no state behind)


def test_bad_bodies(served):
    _bad(served, "/v1/completions", b"{not json", "not valid JSON")
    _bad(served, "/v1/completions", {**BASE, "prompt": "word " * (MAX_MODEL_LEN + 10)},
         "context", status=400)
    _bad(served, "/v1/traces", {"graph": {"nodes": [], "invokes": []}, "ir_version": 99},
         "IR version 1 and the client sent version 99")
    _bad(served, "/v1/traces", {"graph": {"invokes": [{"prompts": [[1] * MAX_MODEL_LEN]}],
                                          "nodes": []}}, "model's context")
    with served.client("alice") as c:
        r = c.post("/v1/completions", content=b"x" * (MAX_BODY + 1),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

        def chunked():   # no Content-Length: counted as it arrives (was a 400 "parsing")
            yield b'{"model": "x", "prompt": "'
            for _ in range(MAX_BODY // 2**16 + 2):
                yield b"a" * 2**16
            yield b'"}'

        r = c.post("/v1/completions", content=chunked(),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"], r.text
        r = c.put("/v1/vectors/bad", content=b"not safetensors")
        assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]
        r = c.put("/v1/vectors/bad", content=_st({"7": torch.zeros(12)}))
        assert r.status_code == 400 and "hidden size 576" in r.json()["error"]["message"]
        r = c.put("/v1/vectors/bad", content=_st({"31": torch.zeros(576),
                                                  "2": torch.zeros(576)}))
        assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]


def test_limits_answer_413_for_size_and_429_with_retry_after_for_rate(served):
    """A request larger than its key allows is a 413 without ``Retry-After`` (it can never
    pass; clients retry a 429); concurrency and tokens per minute are 429s."""
    with served.client("tight") as c:
        too_large = [
            # up front: the captures' bound, and the graph's size
            ({"max_tokens": 10, "capture": [
                {"point": f"layers.{i}.output", "positions": "all", "steps": "all"}
                for i in range(2)]}, "capture"),
            ({"interventions": [{"op": "scale", "layers": "all", "factor": 1.0}]}, "nodes"),
            # logits rows are vocabulary-wide (49152), not hidden-wide (they passed the
            # bound, then failed at run time with a 500)
            ({"capture": [{"point": "lm_head.output", "positions": "last"}]}, "capture"),
            # at run time: a graph's save past the cap (its size is known only there)
            ({"prompt": "word " * 40, "graph": {"nodes": [
                {"id": 0, "op": "read", "kwargs": {"module": "model.layers.3",
                                                   "kind": "output"}},
                {"id": 1, "op": "save", "args": [{"ref": 0}]}]}},
             "captures exceeded this request's cap of 20000 bytes"),
        ]
        for fields, expect in too_large:
            r = c.post("/v1/completions", json={**BASE, **fields})
            assert r.status_code == 413 and expect in r.json()["error"]["message"], r.text
            assert "Retry-After" not in r.headers
        # one request in flight at a time: a second, concurrent one is refused. (The stream
        # is as long as the key's budget allows, ~10 s here: on a loaded machine a 200-token
        # stream ended before the client, which had its first token, sent the second request)
        with running_stream(c, {**BASE, "max_tokens": 390, "ignore_eos": True,
                                "stream_options": {"include_usage": True}}) as rest:
            r = c.post("/v1/completions", json=BASE)
            assert r.status_code == 429 and "in flight" in r.json()["error"]["message"]
            chunks = [line for line in rest if line.startswith("data: {")]
        assert json.loads(chunks[-1][len("data: "):])["usage"]["completion_tokens"] == 390
        # the 390-token request spent most of the 400 tokens/minute budget: keep asking
        for _ in range(20):
            r = c.post("/v1/completions", json={**BASE, "max_tokens": 40, "ignore_eos": True})
            if r.status_code == 429:
                break
        assert r.status_code == 429 and "tokens in the last minute" in r.text
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    with served.client("alice") as c:   # others are not affected
        assert c.post("/v1/completions", json=BASE).status_code == 200


def test_streamed_tokens_count_against_the_budget(served):
    """A stream's outputs carry only their new tokens: all of them count, so streaming does
    not get around tokens_per_minute (200 for this key)."""
    with served.client("streamer") as c:
        with c.stream("POST", "/v1/completions", json={
                **BASE, "max_tokens": 250, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            chunks = [json.loads(line[len("data: "):]) for line in r.iter_lines()
                      if line.startswith("data: {")]
        # (counted from the usage, not the chunks: vLLM merges tokens into one chunk when its
        # reader lags, and a loaded machine sent 249 chunks for 250 tokens)
        assert chunks[-1]["usage"]["completion_tokens"] == 250
        r = c.post("/v1/completions", json={**BASE, "stream": True})
        assert r.status_code == 429 and "tokens in the last minute" in r.text, r.text


def test_openapi_documents_the_fields(served):
    spec = httpx.get(served.url + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"Intervention", "Capture", "VectorSpec", "TraceRequest"} <= set(schemas)
    assert "interventions" in schemas["VinterpCompletionRequest"]["properties"]


def test_a_bad_key_file_entry_is_named_by_file_and_line(tmp_path, monkeypatch):
    """`vinterp serve` reports these as one line: the message alone must say where the bad
    entry is (a short key gave no line at all) and must not repeat the key."""
    from vinterp_server.auth import ApiKeys

    monkeypatch.delenv("VINTERP_API_KEYS", raising=False)
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-alice-0123456789 alice\n# a comment\n\nshort bob\n")
    with pytest.raises(ValueError) as err:
        ApiKeys.load(keys)
    assert str(err.value) == (f"key file {keys}, line 4: an API key must be at least 8 "
                              f"characters (this one has 5)")
    keys.write_text("sk-alice-0123456789 alice\nsk-bob-0123456789 bob concurrent=two\n")
    with pytest.raises(ValueError, match=rf"^key file {keys}, line 2: bad limit "
                                         r"'concurrent=two'; use .*concurrent"):
        ApiKeys.load(keys)
    # the environment's keys are numbered by their place in the variable, not appended to
    # the file's lines
    keys.write_text("sk-alice-0123456789 alice\n")
    monkeypatch.setenv("VINTERP_API_KEYS", "sk-carol-0123456789, sk-d")
    with pytest.raises(ValueError, match=r"^VINTERP_API_KEYS, key 2: an API key must be at "
                                         r"least 8 characters \(this one has 4\)$"):
        ApiKeys.load(keys)
    monkeypatch.setenv("VINTERP_API_KEYS", "sk-carol-0123456789")
    loaded = ApiKeys.load(keys)
    assert len(loaded) == 2 and loaded.lookup("sk-carol-0123456789") is not None
    assert loaded.lookup("sk-alice-0123456789").id == "alice"


@pytest.mark.parametrize("point", ["model.layers.x.output", "model.layers..output",
                                   "layers.x.output"])
def test_a_layer_point_without_a_layer_number_says_what_a_point_looks_like(point):
    """``model.layers.x.output`` was Python's own "invalid literal for int()" message;
    checked without a server, on compile's point parser."""
    from vinterp_server.compile import ModelInfo, parse_point

    from vinterp.models.architectures import for_model_type

    m = ModelInfo(for_model_type("llama"), 30, 576, torch.float32)
    with pytest.raises(ValueError) as e:
        parse_point(point, m)
    msg = str(e.value)
    assert msg.startswith(f"point {point!r}: expected ") and "layers.<index>" in msg, msg
    assert "invalid literal" not in msg
    assert parse_point("model.layers.8.output", m) == ("model.layers.8", "output")
