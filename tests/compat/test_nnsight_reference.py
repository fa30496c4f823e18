"""vinterp against nnsight 0.8.1's own numbers (nnsight_reference.json, recorded by
record_nnsight.py from the same idioms on the same tiny-llama checkpoint).

Sources of the idioms: https://github.com/ndif-team/nnsight/blob/main/docs/usage/iter-all-next.md
and https://github.com/ndif-team/nnsight/blob/main/tests/agent-evals/_audit.py
(intermediate_03, _07, _09, _12). Both backends; the vllm engine is the shared
``compat_vllm`` fixture (conftest.py).
"""

from __future__ import annotations


import torch
from nnsight_recorded import ATOL, REF

PROMPT, N_NEW = REF["prompt"], REF["max_new_tokens"]


def test_iter_conditional_matches_nnsight(backend):
    name, model = backend
    ref = REF["iter_conditional"]
    # (nnsight's generation here never meets EOS in 5 tokens: ignore_eos changes nothing)
    with model.generate(PROMPT, max_new_tokens=N_NEW, ignore_eos=True) as tracer:
        preds = list().save()
        hidden = list().save()
        steps = list().save()
        for step in tracer.iter[:]:
            steps.append(step)
            if step == 2:
                model.model.layers[0].output[:] = 0
            hidden.append(model.model.layers[1].output[0, -1])
            preds.append(model.lm_head.output[0, -1, :].argmax(dim=-1))
    # nnsight's list gets a 6th step number: its loop body starts a 6th iteration, whose
    # Python runs until its first module access finds generation over. 5 steps, 5 items.
    assert steps == ref["steps"][:N_NEW] == [0, 1, 2, 3, 4]
    assert [int(p) for p in preds] == ref["predictions"]
    assert len(hidden) == N_NEW
    for got, want in zip(hidden, ref["last_hidden"], strict=True):
        assert torch.allclose(got.cpu(), torch.tensor(want), atol=ATOL[name], rtol=0)


def test_iter_slice_and_list_match_nnsight(backend):
    _, model = backend
    with model.generate(PROMPT, max_new_tokens=N_NEW, ignore_eos=True) as tracer:
        mid = list().save()
        for _ in tracer.iter[1:3]:
            mid.append(model.lm_head.output[0, -1, :].argmax(dim=-1))
    with model.generate(PROMPT, max_new_tokens=N_NEW, ignore_eos=True) as tracer:
        picked = list().save()
        for _ in tracer.iter[[0, 2, 4]]:
            picked.append(model.lm_head.output[0, -1, :].argmax(dim=-1))
    assert [int(p) for p in mid] == REF["iter_slice"]
    assert [int(p) for p in picked] == REF["iter_list"]


def test_all_loop_matches_nnsight(backend):
    name, model = backend
    with model.generate(PROMPT, max_new_tokens=3, ignore_eos=True) as tracer:
        hidden_states = list().save()
        for _ in tracer.all():
            model.model.layers[0].output[:] = 0
            hidden_states.append(model.model.layers[-1].output[0, -1])
    assert len(hidden_states) == len(REF["all_zero_every_step"]) == 3
    for got, want in zip(hidden_states, REF["all_zero_every_step"], strict=True):
        assert torch.allclose(got.cpu(), torch.tensor(want), atol=ATOL[name], rtol=0)


def test_generation_output_matches_nnsight(backend):
    _, model = backend
    with model.generate(PROMPT, max_new_tokens=N_NEW, ignore_eos=True) as tracer:
        output = tracer.result.save()
    with model.generate(PROMPT, max_new_tokens=N_NEW, ignore_eos=True):
        generated_tokens = model.generator.output.save()
    assert output.tolist() == [[int(t) for t in row] for row in REF["tracer_result"]]
    assert generated_tokens.tolist() == [[int(t) for t in row]
                                         for row in REF["generator_output"]]
    assert tracer.result[0].tolist() == output[0].tolist()


def test_trace_result_matches_nnsight(backend):
    _, model = backend
    with model.trace(PROMPT) as tracer:
        trace_result = tracer.result.save()
    assert int(trace_result.logits[0, -1].argmax()) == REF["trace_result_last_logits_argmax"]
