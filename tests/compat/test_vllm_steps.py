"""Step loops and generation output on the vllm backend, against raw HF hooks.

Each vLLM request counts its own steps; the loop's budget is its invoke's max_new_tokens
(nnsight: docs/usage/iter-all-next.md, tests/agent-evals/_audit.py intermediate_11,
https://github.com/ndif-team/nnsight/blob/main/tests/agent-evals/_audit.py).
"""

from __future__ import annotations

import pytest
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


def test_shapes_unpack_at_later_steps(compat_vllm, hf_model):
    # `B, S, H = x.shape` at a later step: sizes are values of the graph (see
    # tests/compat/test_step_loops.py), and on vLLM they are the request's own rows
    model, hf = compat_vllm, hf_model("tiny-llama")
    prompt = "The quick brown fox"
    with model.generate(prompt, max_tokens=3, ignore_eos=True) as tracer:
        seen = list().save()
        for _ in tracer.iter[:]:
            h = model.model.layers[0].output
            B, S, H = h.shape
            h[:, S - 1] = h[:, S - 1] * 0.5
            seen.append(model.model.layers[1].output[:, -1])

    def halve_last(step, o):
        o = o.clone()
        o[:, -1] *= 0.5
        return o

    ref = raw_generate(hf._model, hf.tokenizer(prompt)["input_ids"], 3, hf._pad_id,
                       edits={"model.layers.0": halve_last},
                       capture={"model.layers.1": lambda o: o[:, -1]})
    assert len(seen) == 3
    for got, want in zip(seen, ref.captured["model.layers.1"], strict=True):
        assert torch.allclose(got.cpu(), want, atol=1e-3, rtol=0)
    assert torch.equal(tracer.result[0], ref.ids)


# nnsight's vLLM docs (docs/usage/vllm.md; nnsight 0.8.1 src/nnsight/modeling/vllm/vllm.py,
# https://github.com/ndif-team/nnsight/blob/main/src/nnsight/modeling/vllm/vllm.py):
#   with model.trace(prompt, max_tokens=3) as tracer:
#       logits = list().save()
#       for step in tracer.iter[:]:
#           logits.append(model.logits.output)        # nnsight <= 0.7; 0.8: model.logits
#   samples.append(model.samples.output.item())        # the sampled token ids of the step
def test_logits_and_samples_per_step_equal_raw_hooks(compat_vllm, hf_model):
    model, hf = compat_vllm, hf_model("tiny-llama")
    prompt = "The quick brown fox"
    with model.trace(prompt, max_tokens=3, temperature=0.0) as tracer:
        logits, samples, samples_08 = list().save(), list().save(), list().save()
        for _ in tracer.iter[:]:
            logits.append(model.logits.output)
            samples.append(model.samples.output.item())
            samples_08.append(model.samples)
    ids = hf.tokenizer(prompt)["input_ids"]
    ref = raw_generate(hf._model, ids, 3, hf._pad_id, capture={"lm_head": lambda o: o[:, -1]})
    assert samples == ref.ids[len(ids):].tolist()
    assert [s.tolist() for s in samples_08] == [[t] for t in samples]
    assert len(logits) == 3
    for got, want in zip(logits, ref.captured["lm_head"], strict=True):
        assert torch.allclose(got[:, -1].cpu(), want, atol=1e-3, rtol=0)


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_samples_in_all_steps_per_invoke(backend, compat_vllm, hf_model):
    # nnsight vLLM docs, "batching pattern": one invoke per prompt, tracer.all(), samples per
    # request; each invoke's own max_tokens bounds its steps
    model = compat_vllm if backend == "vllm" else hf_model("tiny-llama")
    with model.generate(max_new_tokens=3, ignore_eos=True) as tracer:
        out_ids = [list() for _ in PROMPTS].save()
        for i, (prompt, n) in enumerate(PROMPTS.items()):
            with tracer.invoke(prompt, max_new_tokens=n):
                with tracer.all():
                    out_ids[i].append(model.samples.output.item())
    for (prompt, n), ids, row in zip(PROMPTS.items(), out_ids, tracer.result, strict=True):
        p = len(model.tokenizer(prompt)["input_ids"])
        assert ids == row[p:].tolist()   # tracer.all() runs its body per step: one id each
        assert len(ids) == n


def test_samples_refuse_writes_and_plain_traces(compat_vllm):
    from vinterp.tracing.errors import TracingError

    with pytest.raises(TracingError, match="forcing the sampled tokens"):
        with compat_vllm.generate("Hi", max_new_tokens=2):
            compat_vllm.samples = torch.zeros(1, dtype=torch.long)
    # in place too (it changed only the ids read back, silently: found by an audit)
    for edit in (lambda s: s.__setitem__(slice(None), 5), lambda s: s[0].add_(1)):
        with pytest.raises(TracingError, match="forcing the sampled tokens"):
            with compat_vllm.generate("Hi", max_new_tokens=2) as tracer:
                with tracer.all():
                    edit(compat_vllm.samples)
    with compat_vllm.generate("Hi", max_new_tokens=2) as tracer:   # a copy is the user's
        ids = list().save()
        with tracer.all():
            s = compat_vllm.samples.clone()
            s[:] = 5
            ids.append(s)
    assert [int(v) for v in ids] == [5, 5]
    with pytest.raises(TracingError, match="only in a generation"):
        with compat_vllm.trace("Hi"):
            compat_vllm.samples.save()
    with pytest.raises(TracingError, match="cannot feed an edit"):
        with compat_vllm.generate("Hi", max_new_tokens=2):
            compat_vllm.model.layers[0].output[:] += compat_vllm.samples.float().mean()
