"""nnsight's generation-output idioms on the HF backend: ``tracer.result.save()`` and
``model.generator.output.save()`` inside ``model.generate``, ``tracer.result`` in a trace.

References: HF ``generate`` / forward run directly (compat_reference.py). Idioms from
- docs/usage/generate.md "Accessing the result"
  https://github.com/ndif-team/nnsight/blob/main/docs/usage/generate.md
- tests/agent-evals/_audit.py intermediate_03, _09, _11 and advanced_11
  https://github.com/ndif-team/nnsight/blob/main/tests/agent-evals/_audit.py
"""

from __future__ import annotations

import pytest
import torch
from compat_reference import raw_generate

from vinterp.tracing.errors import TracingError

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def model(hf_model):
    return hf_model("tiny-llama")


def _ids(model, prompt=PROMPT):
    return model.tokenizer(prompt)["input_ids"]


def test_tracer_result_save_inside_generate(model):
    # generate.md: `output = tracer.result.save()` -> the final generation tensor
    with model.generate(PROMPT, max_new_tokens=5, ignore_eos=True) as tracer:
        output = tracer.result.save()
    ref = raw_generate(model._model, _ids(model), 5, model._pad_id).ids
    assert isinstance(output, torch.Tensor) and output.dtype == torch.long
    assert output.shape == (1, len(ref))
    assert torch.equal(output[0], ref)
    assert torch.equal(tracer.result[0], ref)   # and after the block, as before


def test_generator_output_save_inside_generate(model):
    # _audit.py intermediate_03: `generated_tokens = model.generator.output.save()`
    with model.generate(PROMPT, max_new_tokens=4, ignore_eos=True):
        generated_tokens = model.generator.output.save()
        last = model.generator.output[0, -1].save()   # computed on the ids, after generation
    ref = raw_generate(model._model, _ids(model), 4, model._pad_id).ids
    assert torch.equal(generated_tokens, ref[None])
    assert int(last) == int(ref[-1])


def test_result_per_invoke_and_whole_batch(model):
    # _audit.py intermediate_11: `tracer.result.save()` inside an invoke; outside the invokes
    # it is the whole batch as HF generate returns it (prompts left-padded).
    prompts = ["Hi", PROMPT]
    with model.generate(max_new_tokens=3, ignore_eos=True) as tracer:
        per_invoke = []
        for p in prompts:
            with tracer.invoke(p):
                per_invoke.append(tracer.result.save())
        batch = tracer.result.save()
    refs = [raw_generate(model._model, _ids(model, p), 3, model._pad_id).ids for p in prompts]
    for got, ref in zip(per_invoke, refs, strict=True):
        assert torch.equal(got, ref[None])
    width = max(len(r) for r in refs)
    want = torch.stack([torch.cat([torch.full((width - len(r),), model._pad_id), r])
                        for r in refs])
    assert torch.equal(batch, want)


def test_tracer_result_in_trace_is_the_model_output(model):
    # _audit.py intermediate_09: `trace_result = tracer.result.save()` in model.trace
    with model.trace(PROMPT) as tracer:
        trace_result = tracer.result.save()
    ids = torch.tensor([_ids(model)])
    with torch.no_grad():
        ref = model._model(input_ids=ids).logits
    assert torch.allclose(trace_result.logits, ref, atol=1e-5, rtol=0)
    assert tracer.result is None   # after a trace, as before: no generated ids


def test_generated_ids_cannot_feed_an_edit(model):
    with pytest.raises(TracingError, match="exist only once generation has ended"):
        with model.generate(PROMPT, max_new_tokens=2) as tracer:
            model.model.layers[0].output[:] = tracer.result.float().mean()
    with pytest.raises(TracingError, match="only in model.generate"):
        with model.trace(PROMPT):
            model.generator.output.save()
