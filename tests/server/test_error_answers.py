"""Error answers through the real server: they keep the client's connection, name the field
(``param``) and say what to send instead; graph saves that are not one tensor; beam search
charged against its key's ``tokens_per_minute``; vector names."""

from __future__ import annotations

from server_helpers import MODEL


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
