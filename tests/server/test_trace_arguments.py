"""Through the real server: a remote trace's generation arguments and prompts are checked
before any of its requests runs, so a bad one is a 400 naming the field (``param``), not a
500, and leaves no sibling invoke generating.
"""

from __future__ import annotations

from typing import Any

import pytest
from server_helpers import PROMPT6, layer3_trace, settled

PROMPT, _trace = PROMPT6, layer3_trace


def _error(r: Any) -> dict:
    return r.json()["error"]


@pytest.mark.parametrize(("generation", "per_invoke", "param", "says"), [
    ({"max_new_tokens": 3, "foo": 1}, [{}, {}], "graph.generation.foo",
     "unknown generation argument 'foo'"),
    ({"max_new_tokens": 3}, [{}, {"foo": 1}], "graph.invokes[1].generation.foo",
     "unknown generation argument 'foo'"),
    ({"max_new_tokens": 300, "ignore_eos": True}, [{}, {"temperature": -1}],
     "graph.invokes[1].generation.temperature", "temperature must be non-negative"),
    ({"max_new_tokens": 3, "top_p": 5}, [{}, {}], "graph.generation.top_p", "top_p"),
])
def test_a_traces_bad_generation_argument_is_a_400_naming_it(served, generation, per_invoke,
                                                               param, says):
    """Before: 500 "ValueError: unknown generation argument" (param null), or a 400 only
    after invoke 0 had started generating (and kept on)."""
    graph = _trace(2, "generate", generation, per_invoke)
    with served.client("alice") as c:
        r = c.post("/v1/traces", json={"graph": graph})
        assert r.status_code == 400, r.text
        assert _error(r)["param"] == param
        assert says in _error(r)["message"]
        # nothing ran: no request state in the worker, and the connection still serves
        assert settled(served, timeout=5)["states"] == 0
        assert c.get("/v1/models").status_code == 200


def test_a_traces_out_of_vocabulary_token_is_a_400_naming_the_prompt(served):
    graph = _trace(2)
    graph["invokes"][1]["prompts"] = [[1, 2, 99_999_999]]
    with served.client("alice") as c:
        r = c.post("/v1/traces", json={"graph": graph})
    assert r.status_code == 400, r.text
    assert _error(r)["param"] == "graph.invokes[1].prompts[0]"
    assert "99999999 is outside the model's vocabulary" in _error(r)["message"]


def test_a_sessions_bad_argument_names_its_graph(served):
    graphs = [_trace(1), _trace(1, "generate", {"max_new_tokens": 2, "foo": 1})]
    with served.client("alice") as c:
        r = c.post("/v1/traces", json={"session": graphs})
    assert r.status_code == 400, r.text
    assert _error(r)["param"] == "session[1].generation.foo"
