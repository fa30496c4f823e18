"""``remote=True`` through the real server: the seed's patching example, generation, and
non-blocking handles give the local vLLM backend's values."""

from __future__ import annotations

import pytest
import torch
from server_helpers import KEYS, MODEL, running_stream, wait_until

from vinterp.backends.remote import RemoteError

EIFFEL = "The Eiffel Tower is in the city of"
COLOSSEUM = "The Colosseum is in the city of"


def _patch(model, **remote) -> float:
    with model.trace(EIFFEL, **remote):
        clean = model.layers[8].output.save()
    with model.trace(COLOSSEUM, **remote):
        model.layers[8].output[:] = clean
        logits = model.logits.save()
    paris = model.tokenizer.encode(" Paris")[0]
    return float(torch.softmax(logits[0, -1], -1)[paris])


def test_seed_patching_example_remote_equals_local(served, local_vllm, monkeypatch):
    monkeypatch.setenv("VINTERP_HOST", served.url)
    monkeypatch.setenv("VINTERP_API_KEY", KEYS["alice"])
    remote = _patch(local_vllm, remote=True)
    local = _patch(local_vllm)
    assert remote == pytest.approx(local, rel=1e-4)
    assert 0.6 < remote < 0.7            # ~0.66 (from ~1e-4 unpatched)


def test_remote_generate_and_non_blocking(served, local_vllm):
    opts = {"remote": served.url, "api_key": KEYS["bob"]}
    vec = torch.randn(576, generator=torch.Generator().manual_seed(3)) * 3
    outs = []
    for kw in (opts, {}):
        with local_vllm.generate("The capital of France is", max_new_tokens=5, **kw) as tr:
            with tr.invoke("The capital of France is"):
                h = list().save()
                with tr.all():   # the body runs once per step: one item each
                    local_vllm.layers[6].output.steer(vec, positions="generated")
                    h.append(local_vllm.layers[9].output[:, -1])
            with tr.invoke("Once upon a time"):
                g = local_vllm.layers[2].mlp.output.save()
        outs.append((tr.result, h, g))
    (r_ids, r_h, r_g), (l_ids, l_h, l_g) = outs
    assert [x.tolist() for x in r_ids] == [x.tolist() for x in l_ids]
    assert len(r_h) == len(l_h) == 5
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(r_h, l_h, strict=True))
    assert torch.allclose(r_g, l_g, rtol=1e-4, atol=1e-5)
    with local_vllm.trace(EIFFEL, blocking=False, **opts) as tracer:
        late = local_vllm.layers[4].output.save()
    assert tracer.handle is not None
    tracer.wait(timeout=120)
    with local_vllm.trace(EIFFEL):
        ref = local_vllm.layers[4].output.save()
    assert torch.allclose(late, ref, rtol=1e-4, atol=1e-5)


def test_remote_errors_are_clear(served, local_vllm, monkeypatch):
    monkeypatch.delenv("VINTERP_HOST", raising=False)
    with pytest.raises(ValueError, match="set VINTERP_HOST"):
        local_vllm.trace(EIFFEL, remote=True)
    with pytest.raises(RemoteError, match="401.*API key"):
        with local_vllm.trace(EIFFEL, remote=served.url, api_key="sk-nobody-12345678"):
            local_vllm.layers[1].output.save()
    with pytest.raises(RemoteError, match="cannot reach"):
        with local_vllm.trace(EIFFEL, remote="127.0.0.1:9", timeout=5):
            local_vllm.layers[1].output.save()


def test_named_vectors_in_remote_graphs(served, local_vllm):
    """``vinterp.named_vector`` in a remote trace uses the key's stored vector: the same
    result as sending the tensor itself; elsewhere it says it needs the server."""
    import vinterp
    from safetensors.torch import save

    vec = torch.randn(576, generator=torch.Generator().manual_seed(5)) * 3
    with served.client("alice") as c:
        assert c.put("/v1/vectors/push", content=save({"v": vec})).status_code == 201
        assert c.put("/v1/vectors/per", content=save({"8": vec, "9": -vec})).status_code == 201
    opts = {"remote": served.url, "api_key": KEYS["alice"]}

    def run(v, w, **kw):
        with local_vllm.trace(COLOSSEUM, **kw):
            local_vllm.layers[8].output.steer(v, scale=2.0)
            local_vllm.layers[9].output.steer(w)
            out = local_vllm.layers[12].output.save()
        return out

    by_name = run(vinterp.named_vector("push"), vinterp.named_vector("per", layer=9), **opts)
    by_value = run(vec, -vec, **opts)
    assert torch.equal(by_name, by_value)
    with pytest.raises(ValueError, match="lives on a vinterp server"):
        run(vinterp.named_vector("push"), vec)
    with pytest.raises(RemoteError, match="no vector named 'nope'"):
        run(vinterp.named_vector("nope"), vec, **opts)
    with pytest.raises(RemoteError, match="no entry for layer 3"):
        run(vinterp.named_vector("per", layer=3), vec, **opts)
    with pytest.raises(RemoteError, match="no vector named 'push'"):   # bob's view
        run(vinterp.named_vector("push"), vec, remote=served.url, api_key=KEYS["bob"])


def test_remote_backend_loads_no_weights(served, local_vllm):
    """``backend="remote"``: the module tree on the meta device, every trace on the server."""
    from vinterp import LanguageModel

    lm = LanguageModel(MODEL, backend="remote", host=served.url, api_key=KEYS["bob"])
    assert all(p.device.type == "meta" for p in lm._model.parameters())
    assert _patch(lm) == pytest.approx(_patch(local_vllm), rel=1e-4)


def test_a_trace_failing_at_run_time_says_why(served, local_vllm):
    """A trace that fails in the worker (an index past its 5-token prompt) is a 500 naming
    the cause, and nothing of how it was hosted (no Ray traceback)."""
    lm = local_vllm
    with pytest.raises(RemoteError) as err:
        with lm.trace("Hello there", remote=served.url, api_key=KEYS["bob"]):
            lm.layers[2].output[:, 500].save()
    assert err.value.status == 500
    message = str(err.value)
    assert "intervention failed" in message and "index 500 is out of bounds" in message
    assert "ray::" not in message and "Traceback" not in message, message


def test_a_non_blocking_trace_is_admitted_before_its_202(served, local_vllm):
    """``blocking=False`` gets the key's limits at submission, as a blocking trace does: a
    429 while the key's one slot is taken (it was accepted, then failed as a 500), and a
    trace that fails at run time reports its own status (413: it captured past the key's
    cap) when it is waited on."""
    opts = {"remote": served.url, "api_key": KEYS["queued"], "blocking": False}
    # the slot held by a stream that has sent a token (480 of them take many seconds)
    with served.client("queued") as c, running_stream(c, {
            "model": MODEL, "prompt": "Count:", "max_tokens": 480,
            "ignore_eos": True}):
        with pytest.raises(RemoteError) as refused:
            with local_vllm.trace(EIFFEL, **opts):
                local_vllm.layers[1].output.save()
    assert refused.value.status == 429 and "in flight" in str(refused.value)

    def submitted():
        """A trace capturing 41 rows x 576 floats > 20000 B, once the hung-up stream's slot
        is given back (the server notices the hang-up within a step or two)."""
        try:
            with local_vllm.trace("word " * 40, **opts) as tracer:
                local_vllm.layers[3].output.save()
        except RemoteError as err:
            if err.status != 429:
                raise
            return None
        return tracer

    tracer = wait_until(submitted, "the stream's slot given back", every=0.5)
    with pytest.raises(RemoteError, match="exceeded this request's cap") as failed:
        tracer.wait(timeout=120)
    assert failed.value.status == 413


def test_a_trace_that_fails_is_charged_its_prompts(served, local_vllm):
    """A trace that fails on the engine used it: its prompts count against the key's budget,
    as a failed OpenAI request's tokens do (it was charged nothing)."""
    opts = {"remote": served.url, "api_key": KEYS["charged"]}
    n = len(local_vllm.tokenizer("word " * 40)["input_ids"])
    with pytest.raises(RemoteError, match="exceeded this request's cap") as failed:
        with local_vllm.trace("word " * 40, **opts):   # 41 rows x 576 floats > 20000 B
            local_vllm.layers[3].output.save()
    assert failed.value.status == 413
    with pytest.raises(RemoteError) as spent:
        with local_vllm.trace(EIFFEL, **opts):
            local_vllm.layers[1].output.save()
    assert spent.value.status == 429 and f"used {n} tokens" in str(spent.value)


def test_a_remote_sampled_generation_draws_as_hf_would(served, local_vllm):
    """``do_sample=True`` remotely samples from the top 50, as HF ``generate`` and the local
    backends do (vLLM's own default, the whole vocabulary, is what the server used to send).
    At temperature 2 smollm2's distribution is flat enough that the whole vocabulary gives
    tokens outside the top 50 at most steps."""
    with local_vllm.generate([EIFFEL] * 3, max_new_tokens=6, do_sample=True, temperature=2.0,
                             ignore_eos=True, remote=served.url, api_key=KEYS["bob"]) as tr:
        logits = [local_vllm.lm_head.output[:, -1].save() for _ in tr.iter[:]]
        ids = tr.result.save()
    logits = torch.stack(logits, 1)
    rank = (logits > logits.gather(-1, ids[:, -6:, None])).sum(-1)
    assert 0 < int(rank.max()) < 50, rank
