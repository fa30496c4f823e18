"""Step loops and generation output on the vllm backend, against raw HF hooks.

Each vLLM request counts its own steps; the loop's budget is its invoke's max_new_tokens
(nnsight: docs/usage/iter-all-next.md, tests/agent-evals/_audit.py intermediate_11,
https://github.com/ndif-team/nnsight/blob/main/tests/agent-evals/_audit.py).
"""

from __future__ import annotations

import torch
from compat_reference import raw_generate

PROMPTS = {"Hi": 3, "The quick brown fox": 2}   # prompt -> its own max_new_tokens


def test_per_invoke_loops_and_results_equal_raw_hooks(compat_vllm, hf_model):
    model, hf = compat_vllm, hf_model("tiny-llama")
    with model.generate(max_new_tokens=3, ignore_eos=True) as tracer:
        loops, results = [], []
        for prompt, n in PROMPTS.items():
            with tracer.invoke(prompt, max_new_tokens=n):
                hs = list().save()
                for step in tracer.iter[:]:
                    if step == 1:
                        model.model.layers[0].output[:] = 0
                    hs.append(model.model.layers[1].output[:, -1])
                loops.append(hs)
                results.append(tracer.result.save())
    for (prompt, n), hs, result in zip(PROMPTS.items(), loops, results, strict=True):
        ref = raw_generate(hf._model, hf.tokenizer(prompt)["input_ids"], n, hf._pad_id,
                           edits={"model.layers.0": lambda s, o: torch.zeros_like(o)
                                  if s == 1 else None},
                           capture={"model.layers.1": lambda o: o[:, -1]})
        assert len(hs) == n
        for got, want in zip(hs, ref.captured["model.layers.1"], strict=True):
            assert torch.allclose(got.cpu(), want, atol=1e-3, rtol=0)
        assert torch.equal(result[0], ref.ids)
