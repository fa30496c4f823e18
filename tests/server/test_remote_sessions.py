"""``model.session(remote=True)`` through the real server: several traces sharing values are
one ``POST /v1/traces`` request (nnsight: intervention/envoy.py ``session``, "one request when
remote"), and give the local vLLM backend's values."""

from __future__ import annotations

import httpx
import pytest
import torch
from server_helpers import KEYS

from vinterp.backends.remote import RemoteBackend, RemoteError
from vinterp.tracing.errors import TracingError

EIFFEL = "The Eiffel Tower is in the city of"
COLOSSEUM = "The Colosseum is in the city of"


def _session_patch(model, **remote) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's patching example as a session: whole layer, then the last position only
    (an operation on the earlier trace's saved value inside the later trace)."""
    with model.session(**remote):
        with model.trace(EIFFEL):
            clean = model.layers[8].output.save()
        with model.trace(COLOSSEUM):
            model.layers[8].output[:] = clean
            whole = model.logits[0, -1].softmax(-1).save()
        with model.trace(COLOSSEUM):
            model.layers[8].output[:, -1, :] = clean[:, -1, :]
            last = model.logits[0, -1].softmax(-1).save()
    return whole, last


def test_remote_session_is_one_request_with_local_values(served, local_vllm, monkeypatch):
    posts: list[str] = []
    real = RemoteBackend._post

    def counted(self, graph, blocking):
        posts.append("session" if isinstance(graph, list) else "graph")
        return real(self, graph, blocking)

    monkeypatch.setattr(RemoteBackend, "_post", counted)
    r_whole, r_last = _session_patch(local_vllm, remote=served.url, api_key=KEYS["alice"])
    assert posts == ["session"]
    l_whole, l_last = _session_patch(local_vllm)
    paris = local_vllm.tokenizer.encode(" Paris")[0]
    assert torch.allclose(r_whole, l_whole, rtol=1e-4, atol=1e-6)
    assert torch.allclose(r_last, l_last, rtol=1e-4, atol=1e-6)
    assert 0.6 < float(r_whole[paris]) < 0.7      # ~0.66, as the seed's example


def test_remote_session_needs_saved_values(served, local_vllm):
    with pytest.raises(TracingError, match="without .save()"):
        with local_vllm.session(remote=served.url, api_key=KEYS["alice"]):
            with local_vllm.trace(EIFFEL):
                clean = local_vllm.layers[8].output
            with local_vllm.trace(COLOSSEUM):
                local_vllm.layers[8].output[:] = clean


def test_session_value_outside_a_session_request_is_400(served, local_vllm):
    with local_vllm.session(remote="http://127.0.0.1:9"):   # recorded only: never sent
        with local_vllm.trace(EIFFEL):
            clean = local_vllm.layers[8].output.save()
        with local_vllm.trace(COLOSSEUM) as second:
            local_vllm.layers[8].output[:] = clean
        local_vllm._session.tracers.clear()               # nothing to send at the end
    with httpx.Client(base_url=served.url, timeout=60,
                      headers={"Authorization": f"Bearer {KEYS['alice']}"}) as c:
        alone = c.post("/v1/traces", json={"graph": second._graph.model_dump(mode="json")})
        assert alone.status_code == 400 and "needs a session request" in alone.text
        ahead = c.post("/v1/traces", json={"session": [second._graph.model_dump(mode="json")]})
        assert ahead.status_code == 400 and "does not run before this one" in ahead.text


def test_a_session_is_admitted_and_charged_once(served, local_vllm):
    """A session is one request: one slot and one budget check, and all its tokens charged
    when it ends. It was admitted per trace: with a budget its first trace spends (9 tokens),
    the second trace got a 429 and the first one's result was thrown away, so a retry paid
    for it again."""
    remote = {"remote": served.url, "api_key": KEYS["sessions"]}
    r_whole, r_last = _session_patch(local_vllm, **remote)
    l_whole, l_last = _session_patch(local_vllm)
    assert torch.allclose(r_whole, l_whole, rtol=1e-4, atol=1e-6)
    assert torch.allclose(r_last, l_last, rtol=1e-4, atol=1e-6)
    with pytest.raises(RemoteError) as spent:      # its three 9-token prompts were charged
        with local_vllm.trace(EIFFEL, **remote):
            local_vllm.layers[1].output.save()
    assert spent.value.status == 429 and "used 27 tokens" in str(spent.value)
