"""``n > 1`` with vinterp's fields: each sample is its own engine request (its own worker
state), merged into vLLM's parallel-sampling outputs. Sample ``j`` has seed ``seed + j`` as in
vLLM, so its text equals vLLM's own ``n > 1`` and its captures equal a one-sample request with
that seed."""

from __future__ import annotations

import torch

from server_helpers import MODEL, fetch, rel

PROMPT = "Once upon a time"
CAPTURE = {"capture": [{"point": "layers.6.output", "positions": "last", "steps": "all"}]}
SAMPLED = {"model": MODEL, "max_tokens": 8, "temperature": 1.0, "seed": 7}


def _captures(served, choice) -> torch.Tensor:
    (cap,) = choice.model_extra["captures"]
    return fetch(served, cap)


def test_samples_equal_vllm_parallel_sampling_and_one_sample_requests(served):
    client = served.openai()
    plain = client.completions.create(prompt=PROMPT, n=3, **SAMPLED)
    got = client.completions.create(prompt=PROMPT, n=3, extra_body=CAPTURE, **SAMPLED)
    texts = [c.text for c in got.choices]
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert texts == [c.text for c in plain.choices]
    assert len(set(texts)) > 1, "seeded samples differ"
    assert got.usage.prompt_tokens == plain.usage.prompt_tokens      # counted once
    assert got.usage.completion_tokens == plain.usage.completion_tokens
    for j, choice in enumerate(got.choices):
        one = client.completions.create(prompt=PROMPT, n=1, extra_body=CAPTURE,
                                        **{**SAMPLED, "seed": 7 + j})
        assert one.choices[0].text == choice.text, j
        mine, ref = _captures(served, choice), _captures(served, one.choices[0])
        assert mine.shape == (one.usage.completion_tokens, 576)
        assert rel(mine, ref) <= 1e-4, j


def test_streamed_samples_carry_their_own_captures(served):
    client = served.openai()
    whole = client.completions.create(prompt=PROMPT, n=2, extra_body=CAPTURE, **SAMPLED)
    chunks = list(client.completions.create(prompt=PROMPT, n=2, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body=CAPTURE, **SAMPLED))
    text: dict[int, str] = {0: "", 1: ""}
    rows: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for c in chunks:
        for choice in c.choices:
            text[choice.index] += choice.text
            rows[choice.index] += [fetch(served, item) for item in
                                   choice.model_extra.get("captures") or []]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    for j in (0, 1):
        assert text[j] == whole.choices[j].text, j
        # (rel, not equal: the two samples share steps, in batches that can differ)
        assert rel(torch.cat(rows[j]), _captures(served, whole.choices[j])) <= 1e-4, j


def test_samples_of_several_prompts_and_chat_are_steered(served):
    """Choices are numbered ``prompt * n + sample``; a steer applies to every sample."""
    client = served.openai()
    # (vLLM refuses n > 1 with temperature 0; top_k=1 samples the greedy token)
    steer = {"interventions": [{"op": "scale", "layers": [2, 3, 4], "factor": 2.0}], "top_k": 1}
    greedy = {"model": MODEL, "max_tokens": 6, "temperature": 1.0}
    prompts = [PROMPT, "The capital of France is"]
    got = client.completions.create(prompt=prompts, n=2, extra_body=steer, **greedy)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        one = client.completions.create(prompt=p, extra_body=steer, **greedy).choices[0].text
        free = client.completions.create(prompt=p, extra_body={"top_k": 1},
                                         **greedy).choices[0].text
        assert one != free, "the steer changes the text"
        assert [got.choices[2 * i + j].text for j in (0, 1)] == [one, one], p
    messages = [{"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(messages=messages, n=2, extra_body=steer, **greedy)
    one = client.chat.completions.create(messages=messages, extra_body=steer, **greedy)
    assert [c.message.content for c in chat.choices] == [one.choices[0].message.content] * 2
    assert [c.index for c in chat.choices] == [0, 1]
