"""What one invoke may do with another's values on the vllm backend, where each invoke runs as
its own requests and a value another invoke uses is handed over as a copy once the invoke
computing it has finished; and how sampled runs are seeded there. What cannot run as written
is refused naming what to do, never run differently from the HF backend in silence."""

from __future__ import annotations

import pytest
import torch

from vinterp import ir
from vinterp.ir.errors import InterventionError

PROMPT, OTHER = "The quick brown fox", "Hi there"


def _last_logits(model):
    with model.trace(PROMPT):
        logits = model.lm_head.output[:, -1].save()
    return logits


def test_an_edit_of_another_invokes_value_is_refused(compat_vllm, hf_model):
    """``h0[:] = 0`` written in invoke 1 on invoke 0's layer output: the HF backend edits
    invoke 0's forward; vLLM edited only the copy invoke 1 received, silently."""
    def run(model):
        with model.trace() as tracer:
            with tracer.invoke(PROMPT):
                h0 = model.model.layers[0].output
                logits = model.lm_head.output[:, -1].save()
            with tracer.invoke(PROMPT):
                h0[:, -1] = 0
        return logits

    hf = run(hf_model("tiny-llama"))
    assert not torch.allclose(hf, _last_logits(hf_model("tiny-llama")))   # it lands on HF
    with pytest.raises(ValueError, match=r"invoke 1 edits a value of invoke 0 .*make the "
                                         r"edit inside invoke 0"):
        run(compat_vllm)


def test_a_value_of_every_step_used_by_another_invoke_is_refused(compat_vllm):
    """Invoke 0's value at every generation step, used by invoke 1: only invoke 0's last
    step would reach invoke 1 (at every step), where the HF backend hands over each step's."""
    read = {"op": "read", "kwargs": {"module": "model.layers.0", "kind": "output"}}
    every = {"start": 0, "stop": None}
    prompt = compat_vllm.tokenizer(PROMPT)["input_ids"]
    graph = ir.load({
        "mode": "generate", "generation": {"max_new_tokens": 3},
        "invokes": [{"prompts": [prompt]}, {"prompts": [prompt]}],
        "nodes": [
            {"id": 0, **read, "invoke": 0, "steps": every},
            {"id": 1, **read, "invoke": 1, "steps": every},
            {"id": 2, "op": "add", "args": [{"ref": 1}, {"ref": 0}], "invoke": 1,
             "steps": every},
            {"id": 3, "op": "save", "args": [{"ref": 2}], "invoke": 1, "steps": every},
        ]})
    with pytest.raises(ValueError, match="invoke 1 uses a value invoke 0 computes at every "
                                         "generation step"):
        compat_vllm._backend.check(graph)


def test_a_failing_invoke_another_uses_reports_its_own_error(compat_vllm):
    """Invoke 0 fails in the engine (a view its rows cannot take) and invoke 1 needs its
    value: the run raised a bare KeyError (the missing export) instead of invoke 0's error."""
    with pytest.raises(InterventionError, match=r"invoke 0, prompt 0: .*shape"):
        with compat_vllm.trace() as tracer:
            with tracer.invoke(PROMPT):
                late = compat_vllm.model.layers[1].output.view(7, -1, 5)
            with tracer.invoke(OTHER):
                compat_vllm.model.layers[0].output[:, -1] = late.reshape(1, -1)[:, :64]


def test_seeded_samples_of_one_prompt_differ_and_repeat(compat_vllm):
    """``seed=`` with a prompt given twice: vLLM seeded every request alike, so the copies
    sampled the same tokens (HF seeds the batch once and they differ). Row k now gets seed + k:
    the copies differ, and the run repeats."""
    def sample():
        with compat_vllm.generate([PROMPT, PROMPT], max_new_tokens=6, do_sample=True,
                                  seed=0, ignore_eos=True) as tracer:
            ids = tracer.result.save()
        return [row.tolist() for row in ids]

    first = sample()
    assert first[0] != first[1]
    assert sample() == first


def test_temperature_without_do_sample_warns_on_hf(hf_model):
    """HF generate is greedy without ``do_sample=True`` whatever the temperature, where vLLM
    samples at it: the same trace gave other tokens on the two backends, in silence."""
    model = hf_model("tiny-llama")
    with pytest.warns(UserWarning, match="without do_sample=True is greedy on the hf backend"):
        with model.generate(PROMPT, max_new_tokens=2, temperature=0.7):
            pass


def test_sampling_draws_from_what_hf_generate_would(compat_vllm, hf_model):
    """``do_sample=True`` samples as HF ``generate``: from the top 50 (HF's default ``top_k``),
    on both backends. vLLM's own default is the whole vocabulary: tiny-llama's near-flat
    49152 logits gave tokens outside the top 50 almost every step, in silence."""
    def draws(model):
        with model.generate([PROMPT] * 4, max_new_tokens=8, do_sample=True, seed=1,
                            ignore_eos=True) as tracer:
            logits = [model.lm_head.output[:, -1].save() for _ in tracer.iter[:]]
            ids = tracer.result.save()
        return torch.stack(logits, 1), ids[:, -8:]

    for model in (hf_model("tiny-llama"), compat_vllm):
        logits, ids = draws(model)
        rank = (logits > logits.gather(-1, ids[..., None])).sum(-1)   # 0: the top token
        assert int(rank.max()) < 50, rank
        assert int(rank.max()) > 0    # sampled, not greedy


def test_sampling_defaults_are_the_models_generation_config(tmp_path):
    """The model's ``generation_config.json`` over HF's global defaults, as HF merges them."""
    from vinterp.backends.vllm.sampling import hf_sampling_defaults, sampling_params

    assert hf_sampling_defaults(tmp_path) == {"temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                              "repetition_penalty": 1.0}
    (tmp_path / "generation_config.json").write_text(
        '{"top_k": 7, "top_p": 0.9, "repetition_penalty": 1.3, "temperature": 0.6}')
    defaults = hf_sampling_defaults(tmp_path)
    sampled = sampling_params({"do_sample": True, "top_p": 0.5}, defaults=defaults)
    assert (sampled.top_k, sampled.top_p, sampled.temperature, sampled.repetition_penalty) \
        == (7, 0.5, 0.6, 1.3)
    greedy = sampling_params({"max_new_tokens": 2}, defaults=defaults)
    # HF applies repetition_penalty to greedy decoding too; the sampling fields it ignores
    assert (greedy.temperature, greedy.top_k, greedy.repetition_penalty) == (0.0, 0, 1.3)
