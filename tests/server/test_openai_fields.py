"""The official ``openai`` client against the real server: steering, capture and graph fields
on completions and chat, streamed and not; values against the local vLLM backend."""

from __future__ import annotations

import json

import torch

from server_helpers import MODEL, fetch, npy, rel, values

PARIS_PROMPT = "The Eiffel Tower is in the city of"
ROME_PROMPT = "The Colosseum is in the city of"


def _capture(served, prompt: str, layer: int, positions: str = "last") -> torch.Tensor:
    resp = served.openai().completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
        extra_body={"capture": [{"point": f"layers.{layer}.output", "positions": positions}]})
    (cap,) = resp.choices[0].model_extra["captures"]
    assert cap["dtype"] == "float32" and cap["shape"][1] == 576
    assert cap["shape"][0] == (1 if positions == "last" else resp.usage.prompt_tokens)
    return npy(cap)


def test_capture_equals_local_vllm_backend(served, local_vllm):
    got = _capture(served, PARIS_PROMPT, 8)
    with local_vllm.trace(PARIS_PROMPT):
        ref = local_vllm.layers[8].output[:, -1].save()
    assert rel(got, ref) <= 1e-4


def test_attention_output_captures_equal_local_vllm_backend(served, local_vllm):
    """``layers.N.attn.output`` (the README's example point) captures the attention's hidden
    output, for each position selection: the module's value is HF's ``(hidden, weights)``
    tuple, which the capture used to index as a tensor (500)."""
    with local_vllm.trace(PARIS_PROMPT):
        ref = local_vllm.layers[5].attn.output[0][0].save()
    for positions, want in (("last", ref[-1:]), ("all", ref), ([1, -1], ref[[1, -1]])):
        resp = served.openai().completions.create(
            model=MODEL, prompt=PARIS_PROMPT, max_tokens=1, temperature=0,
            extra_body={"capture": [{"point": "layers.5.attn.output", "positions": positions,
                                     "steps": "prompt"}]})
        (cap,) = resp.choices[0].model_extra["captures"]
        got = fetch(served, cap)
        assert got.shape == want.shape, positions
        assert rel(got, want) <= 1e-4, positions


def test_contrastive_vector_raises_target_logprob(served, tokenizer):
    """A "Paris minus Rome" vector (mean difference of layer-4 activations, captured through
    the server) raises " Paris" on the Rome prompt."""
    vec = (_capture(served, PARIS_PROMPT, 4, "all").mean(0)
           - _capture(served, ROME_PROMPT, 4, "all").mean(0))
    paris = tokenizer.encode(" Paris")[0]
    client = served.openai()

    def logprob(extra: dict) -> float:
        resp = client.completions.create(
            model=MODEL, prompt=ROME_PROMPT, max_tokens=1, temperature=0, logprobs=1,
            extra_body={"logprob_token_ids": [paris], **extra})
        return resp.choices[0].logprobs.top_logprobs[0][" Paris"]

    plain = logprob({})
    steered = logprob({"interventions": [
        {"op": "steer", "layers": [4], "vector": values(vec), "scale": 2.0,
         "positions": "all"}]})
    assert steered > plain + 3.0, (plain, steered)


def test_steered_generation_captures_every_step_like_local(served, local_vllm, tokenizer):
    """Steering at every step plus capture of the last row at every step: same tokens and
    values as the library's local vLLM backend."""
    torch.manual_seed(0)
    vec = torch.randn(576) * 2
    resp = served.openai().completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
        extra_body={
            "interventions": [{"op": "steer", "layers": [4, 5], "vector": values(vec),
                               "scale": 2.0, "positions": "all"}],
            "capture": [{"point": "layers.10.output", "positions": "last", "steps": "all"}]})
    choice = resp.choices[0]
    rows = npy(choice.model_extra["captures"][0])
    with local_vllm.generate("The capital of France is", max_new_tokens=6) as tr:
        h = list().save()
        with tr.all():   # the body runs once per step: one item each
            local_vllm.layers[4].output.steer(vec, scale=2.0, positions="all")
            local_vllm.layers[5].output.steer(vec, scale=2.0, positions="all")
            h.append(local_vllm.layers[10].output[:, -1])
    prompt_len = len(tokenizer.encode("The capital of France is"))
    assert choice.text == tokenizer.decode(tr.result[0][prompt_len:])
    ref = torch.cat([x.reshape(-1, 576) for x in h])
    assert rows.shape == ref.shape == (6, 576)  # prompt's last row + 5 decode steps
    assert rel(rows, ref) <= 1e-4


def test_chat_stream_carries_captures_chunk_by_chunk(served):
    """Each streamed chunk carries the rows of the steps completed since the last one;
    concatenated they equal the non-streamed capture."""
    client = served.openai()
    body = {"capture": [{"point": "layers.3.mlp.output", "positions": "all", "steps": "all"},
                        {"point": "layers.7.output", "positions": "last", "steps": "prompt"}],
            "interventions": [{"op": "scale", "layers": [4], "factor": 1.5}],
            "ignore_eos": True}
    messages = [{"role": "user", "content": "Say hello."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                          temperature=0, extra_body=body)
    whole = [fetch(served, c) for c in full.choices[0].model_extra["captures"]]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=body))
    pieces: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    carrying = []   # the chunks with rows
    for at, c in enumerate(chunks):
        for item in (c.choices[0].model_extra.get("captures") or []) if c.choices else []:
            pieces[item["index"]].append(fetch(served, item))
            carrying.append(at)
    # (a server behind by a few steps merges their rows into one chunk: several, not each)
    finishing = max(at for at, c in enumerate(chunks) if c.choices)
    assert len({at for at in carrying if at < finishing}) >= 2, \
        "rows arrive in several chunks, not only the last"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        full.choices[0].message.content
    n_prompt = full.usage.prompt_tokens
    assert whole[0].shape == (n_prompt + full.usage.completion_tokens - 1, 576)
    assert whole[1].shape == (1, 576)
    for k in (0, 1):
        assert torch.equal(torch.cat(pieces[k]), whole[k]), k
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stop_string_captures_one_row_per_forward_that_counts(served):
    """A stop string ends the request in vLLM's front end, after the engine may already have
    run the forward over the token that completed it: that forward's row used to come back
    (one row past ``completion_tokens - 1``, streamed and not differently). Both now hold
    exactly the prompt's rows and one per generated token but the last, equal to the same
    rows of the unstopped run."""
    client = served.openai()
    body = {"capture": [{"point": "layers.5.output", "positions": "all", "steps": "all"}]}
    kw = {"model": MODEL, "prompt": PARIS_PROMPT, "temperature": 0, "extra_body": body}
    free = client.completions.create(max_tokens=24, **kw)
    words = free.choices[0].text.split()
    assert len(words) >= 6, free.choices[0].text
    stop = " " + words[4]
    ref = fetch(served, free.choices[0].model_extra["captures"][0])
    n_prompt = free.usage.prompt_tokens
    for attempt in range(3):   # the extra forward depends on timing: give it chances
        cut = client.completions.create(max_tokens=24, stop=[stop], **kw)
        n = cut.usage.completion_tokens
        assert cut.choices[0].finish_reason == "stop" and n < 24
        got = fetch(served, cut.choices[0].model_extra["captures"][0])
        assert got.shape == (n_prompt + n - 1, 576), (attempt, got.shape, n)
        assert rel(got, ref[:n_prompt + n - 1]) <= 1e-4
        chunks = list(client.completions.create(max_tokens=24, stop=[stop], stream=True,
                                                stream_options={"include_usage": True}, **kw))
        pieces = [fetch(served, item) for c in chunks if c.choices
                  for item in c.choices[0].model_extra.get("captures") or []]
        assert chunks[-1].usage.completion_tokens == n
        assert torch.equal(torch.cat(pieces), got), attempt


def test_scale_by_zero_at_every_layer_changes_the_text(served):
    client = served.openai()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                           temperature=0)
    ablated = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0,
        extra_body={"interventions": [{"op": "scale", "layers": [20, 21], "factor": 0.0,
                                       "positions": "generated"}]})
    assert plain.choices[0].message.content[:1] == ablated.choices[0].message.content[:1]
    assert plain.choices[0].message.content != ablated.choices[0].message.content


def test_graph_field_runs_the_library_ir(served, local_vllm):
    """A graph from the library (``tracer.to_json()``) as the ``graph`` field: its saves come
    back in ``captures``."""
    with local_vllm.trace(PARIS_PROMPT) as tr:
        h = local_vllm.layers[6].output[:, -2:].norm(dim=-1).save()
    graph = json.loads(tr.to_json())
    graph["invokes"] = []   # the request's own prompt is used
    for n in graph["nodes"]:
        n["steps"] = {"start": 0, "stop": 1}
    resp = served.openai().completions.create(model=MODEL, prompt=PARIS_PROMPT, max_tokens=1,
                                              temperature=0, extra_body={"graph": graph})
    (cap,) = resp.choices[0].model_extra["captures"]
    assert cap["point"].startswith("graph.node")
    assert rel(npy(cap).reshape(-1), h.reshape(-1)) <= 1e-4


def test_a_graph_save_over_every_step_comes_one_item_per_step(served, local_vllm):
    """A graph save whose steps span the generation (``.output[0]``, the pasted-nnsight idiom:
    ``[prompt, hidden]`` at the prompt's forward, ``[1, hidden]`` after): one item per step,
    with its ``step`` and the library's value, the same streamed. It answered a 500 after the
    engine ran (the steps could not be stacked), and where they could, the array's layout
    depended on the prompt's length and streamed pieces could not be joined."""
    with local_vllm.generate(PARIS_PROMPT, max_new_tokens=3, temperature=0) as tr:
        hs = list().save()
        for _ in tr.iter[:]:
            hs.append(local_vllm.layers[6].output[0])
    with local_vllm.trace(PARIS_PROMPT) as one:
        local_vllm.layers[6].output[0].save()
    graph = json.loads(one.to_json())
    graph["invokes"] = []
    for n in graph["nodes"]:
        n["steps"] = {"start": 0, "stop": None}
    kw = {"model": MODEL, "prompt": PARIS_PROMPT, "temperature": 0, "max_tokens": 3,
          "extra_body": {"graph": graph}}
    caps = served.openai().completions.create(**kw).choices[0].model_extra["captures"]
    assert [c["step"] for c in caps] == [0, 1, 2] and len({c["index"] for c in caps}) == 1
    for cap, ref in zip(caps, hs, strict=True):
        assert cap["shape"] == list(ref.shape) and rel(npy(cap), ref) <= 1e-4
    chunks = list(served.openai().completions.create(stream=True, **kw))
    streamed = [item for c in chunks if c.choices
                for item in c.choices[0].model_extra.get("captures") or []]
    assert [c["step"] for c in streamed] == [0, 1, 2]
    for piece, cap in zip(streamed, caps, strict=True):
        assert piece["shape"] == cap["shape"] and rel(npy(piece), npy(cap)) <= 1e-5


def test_large_captures_are_stored_and_fetched_by_their_owner_only(served):
    client = served.openai()
    resp = client.completions.create(
        model=MODEL, prompt="word " * 60, max_tokens=1, temperature=0,
        extra_body={"capture": [{"point": f"layers.{i}.output", "positions": "all"}
                                for i in range(3)]})
    caps = resp.choices[0].model_extra["captures"]
    stored = [c for c in caps if c.get("id")]
    assert stored, "past the inline budget (64 KiB in the test server) captures are stored"
    with served.client("alice") as c:
        r = c.get(f"/v1/captures/{stored[0]['id']}")
        assert r.status_code == 200
        import io

        import numpy as np
        assert list(np.load(io.BytesIO(r.content)).shape) == stored[0]["shape"]
    with served.client("bob") as c:
        assert c.get(f"/v1/captures/{stored[0]['id']}").status_code == 404


def test_graph_saves_of_steps_that_never_ran_are_left_out(served, local_vllm):
    """A graph saving at every step of ``max_new_tokens=6``, on a request that stops after 2
    tokens: the saves of the steps that ran come back (equal to the library's), the others
    are left out. It used to fail with a 500 ("produced no value"), and a stream lost its
    connection mid-body."""
    with local_vllm.generate(PARIS_PROMPT, max_new_tokens=6, temperature=0) as tr:
        hs = [None] * 6
        for step in tr.iter[:]:
            hs[step] = local_vllm.layers[10].output[:, -1].save()
    graph = json.loads(tr.to_json())
    graph["invokes"] = []
    kw = {"model": MODEL, "prompt": PARIS_PROMPT, "temperature": 0, "max_tokens": 2,
          "extra_body": {"graph": graph}}
    whole = served.openai().completions.create(**kw)
    caps = whole.choices[0].model_extra["captures"]
    assert len(caps) == 2 and whole.usage.completion_tokens == 2
    for cap, ref in zip(caps, hs[:2], strict=True):
        assert rel(npy(cap).reshape(-1), ref.reshape(-1)) <= 1e-4
    chunks = list(served.openai().completions.create(stream=True, **kw))
    streamed = [item for c in chunks if c.choices
                for item in c.choices[0].model_extra.get("captures") or []]
    assert [c["point"] for c in streamed] == [c["point"] for c in caps]
    for piece, cap in zip(streamed, caps, strict=True):
        assert piece["shape"] == cap["shape"] and rel(npy(piece), npy(cap)) <= 1e-5
