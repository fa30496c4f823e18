"""Through the real server: a key's ``capture_bytes`` holds for the whole HTTP request
(README: "what one request may capture"): a list of prompts, ``n > 1`` samples, a trace's
invokes and a session's traces add up against it.

Key ``queued`` (capture_bytes=20000, one request at a time). smollm2-135m is float32 with
576-wide layers: a layer's output is 2304 bytes per token, so a 6-token prompt's 13824 bytes
fit the cap alone and two do not. The reference for values is the same request with key
``alice`` (the default cap).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from server_helpers import PROMPT6, fetch, layer3_trace, settled

PROMPT, _trace = PROMPT6, layer3_trace
ONE = 6 * 576 * 4   # one such prompt's layers.3 output: 13824 bytes


def _error(r: Any) -> dict:
    return r.json()["error"]


def test_a_traces_invokes_share_the_keys_capture_cap(served):
    """Before: each invoke's request had the whole cap (2 invokes: 27648 bytes, 4: 55296,
    with a cap of 20000)."""
    with served.client("alice") as c:
        ref = c.post("/v1/traces", json={"graph": _trace(1)})
    with served.client("queued") as c:
        one = c.post("/v1/traces", json={"graph": _trace(1)})
        two = c.post("/v1/traces", json={"graph": _trace(2)})
    assert ref.status_code == one.status_code == 200, (ref.text, one.text)
    assert one.json()["result"] == ref.json()["result"]
    assert two.status_code == 413, two.text
    assert "cap of 20000 bytes" in _error(two)["message"]
    assert "27648 bytes together" in _error(two)["message"]
    settled(served)


def test_a_sessions_traces_share_the_keys_capture_cap(served):
    """Before: each graph of a session ran with the whole cap."""
    with served.client("queued") as c:
        one = c.post("/v1/traces", json={"session": [_trace(1)]})
        two = c.post("/v1/traces", json={"session": [_trace(1), _trace(1)]})
    assert one.status_code == 200, one.text
    assert two.status_code == 413, two.text
    assert "session[1] could capture the 6176 bytes of the key's 20000" in \
        _error(two)["message"]


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": "smollm2-135m", "max_tokens": 1, "temperature": 0.0, **fields}


#: a graph saving layers.3's output at the prompt's forward (no estimate up front: checked as
#: the engine hands the saves back)
GRAPH = {"nodes": [{"id": 0, "op": "read", "kwargs": {"module": "model.layers.3",
                                                      "kind": "output"}},
                   {"id": 1, "op": "save", "args": [{"ref": 0}]}]}
CAPTURE = [{"point": "layers.3.output", "positions": "all"}]


def _captured(served, body: dict) -> int:
    """The bytes of a 200 response's captures (float32 arrays)."""
    return sum(fetch(served, item, "queued").numel() * 4
               for ch in body["choices"] for item in ch.get("captures") or ())


@pytest.mark.parametrize("fields", [{"capture": CAPTURE}, {"graph": GRAPH}],
                         ids=["capture", "graph"])
def test_a_list_of_prompts_shares_the_keys_capture_cap(served, fields):
    """Before: every prompt of the list had the whole cap (8 prompts: 65020 bytes)."""
    with served.client("queued") as c:
        one = c.post("/v1/completions", json=_completion(prompt=[PROMPT], **fields))
        two = c.post("/v1/completions", json=_completion(prompt=[PROMPT, PROMPT], **fields))
    assert one.status_code == 200, one.text
    assert _captured(served, one.json()) == ONE
    assert two.status_code == 413, two.text
    message = _error(two)["message"]
    if "capture" in fields:   # (estimated up front: before the engine runs)
        assert "can reach 27648 bytes for the request's first 2 prompts" in message
    else:
        assert "cap of 20000 bytes: its prompts captured 27648 bytes together" in message
    settled(served)


def test_samples_of_a_graph_save_share_the_keys_capture_cap(served):
    """``n=2`` with a graph save: each sample is an engine request of its own. Before: each
    had the whole cap (n=4: 55296 bytes)."""
    body = _completion(prompt=PROMPT, graph=GRAPH, temperature=1.0, seed=1)
    with served.client("alice") as c:
        ref = c.post("/v1/completions", json={**body, "n": 1})
    with served.client("queued") as c:
        one = c.post("/v1/completions", json={**body, "n": 1})
        two = c.post("/v1/completions", json={**body, "n": 2})
    assert one.status_code == 200, one.text
    got = fetch(served, one.json()["choices"][0]["captures"][0], "queued")
    want = fetch(served, ref.json()["choices"][0]["captures"][0], "alice")
    assert got.shape == (1, 6, 576) and bool((got == want).all())
    assert two.status_code == 413, two.text
    assert "27648 bytes together" in _error(two)["message"]
    settled(served)


def test_a_streamed_list_of_prompts_stops_at_the_keys_capture_cap(served):
    """Streamed, each step's save comes as the step completes: two 3-token prompts with 3
    tokens each save 3*2304 + 2*2304 = 11520 bytes alone, 23040 together. Before: both
    streamed whole; now the stream says 413 once they pass 20000."""
    steps = {"start": 0, "stop": None}
    graph = {"mode": "generate", "nodes": [
        {"id": 0, "op": "read", "kwargs": {"module": "model.layers.3", "kind": "output"},
         "steps": steps},
        {"id": 1, "op": "save", "args": [{"ref": 0}], "steps": steps}]}
    body = _completion(prompt=[PROMPT[:3], PROMPT[3:]], graph=graph, max_tokens=3,
                       ignore_eos=True, stream=True)
    errors, items = [], 0
    with served.client("queued") as c, c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:   # (both prompts' captures can pass it before any token)
            errors.append(json.loads(r.read())["error"])
        for line in r.iter_lines() if r.status_code == 200 else ():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[len("data: "):])
            if "error" in data:
                errors.append(data["error"])
            for ch in data.get("choices") or ():
                items += len(ch.get("captures") or ())
    # (one error per choice that finished past the cap)
    assert errors and all(e["code"] == 413 for e in errors), errors
    assert "cap of 20000 bytes" in errors[0]["message"]
    assert items < 6   # (3 steps of 2 prompts: not all of them came)
    settled(served)
