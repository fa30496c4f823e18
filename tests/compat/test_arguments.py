"""nnsight's constructor and trace arguments, and the refusals that say what to do instead.

Sources (nnsight 0.8.1, https://github.com/ndif-team/nnsight/blob/main/src/nnsight/):
- modeling/language.py / README "Getting started": ``LanguageModel(..., device_map="auto",
  dispatch=True)``, ``torch_dtype=``;
- modeling/vllm/vllm.py and docs "vLLM": ``VLLM(..., dispatch=True)``, sampling arguments on
  ``trace``/``invoke`` (``temperature``, ``top_p``, ``max_tokens``), ``model.device`` in
  ``torch.randn(h, device=model.device)``;
- intervention/envoy.py ``.source`` (operation-level access), refused here by design.
References are plain HF forwards/generation (never vinterp's own values).
"""

from __future__ import annotations

import pytest
import torch

from vinterp.tracing.errors import TracingError

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def hf(hf_model):
    return hf_model("tiny-llama")


def _greedy(lm, prompt, n):
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    return lm._model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=lm._pad_id)[0]


# ---------------------------------------------------------------------------- hf arguments
def test_torch_dtype_and_dispatch_are_honoured_on_hf():
    from vinterp import LanguageModel

    lm = LanguageModel("tiny-llama", torch_dtype=torch.float64, dispatch=True,
                       device_map="auto")
    assert next(lm._model.parameters()).dtype == torch.float64
    assert lm.device == torch.device("cpu")
    with pytest.raises(ValueError, match="disagree"):
        LanguageModel("tiny-llama", dtype=torch.float32, torch_dtype=torch.float16)


def test_sampling_arguments_on_an_hf_trace_are_refused(hf):
    with pytest.raises(TypeError, match=r"model\.generate"):
        hf.trace(PROMPT, temperature=0.5)


# ---------------------------------------------------------------------------- vllm
def test_vllm_constructor_drops_hf_only_arguments(monkeypatch, recwarn):
    # dispatch=True and device_map= must not reach vLLM's EngineArgs
    import vinterp.backends.vllm as vb
    from vinterp import LanguageModel

    seen = {}

    class Fake:
        def __init__(self, path, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(vb, "VllmBackend", Fake)
    LanguageModel("tiny-llama", backend="vllm", dispatch=True, device_map="auto",
                  torch_dtype=torch.float32, max_model_len=64)
    assert seen == {"dtype": "float32", "max_model_len": 64}
    assert not recwarn.list
    LanguageModel("tiny-llama", backend="vllm", device_map="cuda:1")
    assert any("device_map" in str(w.message) for w in recwarn.list)


def test_vllm_model_device_names_the_engine_device(compat_vllm):
    # torch.randn(h, device=model.device) as nnsight's vLLM docs write it
    assert compat_vllm.device.type == "cpu"
    noise = torch.randn(4, device=compat_vllm.device)
    assert noise.device.type == "cpu"


def test_vllm_trace_takes_sampling_arguments(compat_vllm, hf):
    # nnsight vLLM docs: trace(prompt, temperature=0.0, top_p=1.0, max_tokens=3) + tracer.all()
    with compat_vllm.trace(PROMPT, temperature=0.0, top_p=1.0, max_tokens=3) as tracer:
        logits = list().save()
        with tracer.all():
            logits.append(compat_vllm.logits[0, -1].argmax())
    want = _greedy(hf, PROMPT, 3)
    assert tracer.result[0].tolist() == want.tolist()
    n = len(hf.tokenizer(PROMPT)["input_ids"])
    assert [int(t) for t in logits] == want[n:].tolist()   # nnsight: one item per step


def test_vllm_invoke_takes_sampling_arguments(compat_vllm, hf):
    with compat_vllm.trace() as tracer:
        with tracer.invoke(PROMPT, temperature=0.0, max_tokens=2):
            pass
        with tracer.invoke("Hello there", max_tokens=4, ignore_eos=True):
            pass
    assert tracer.result[0].tolist() == _greedy(hf, PROMPT, 2).tolist()
    assert tracer.result[1].tolist() == _greedy(hf, "Hello there", 4).tolist()


# ---------------------------------------------------------------------------- refusals
def test_if_on_a_traced_value_suggests_where_and_shapes(hf):
    with pytest.raises(TracingError) as info:
        with hf.trace(PROMPT):
            if hf.model.layers[0].output.sum() > 0:
                pass
    msg = str(info.value)
    assert "torch.where" in msg and "x.shape" in msg


def test_source_is_refused_with_what_to_do(hf, compat_vllm):
    for model, where in ((hf, "in vinterp"), (compat_vllm, "vllm backend")):
        with pytest.raises(TracingError) as info:
            with model.trace(PROMPT):
                model.model.layers[0].self_attn.source  # noqa: B018
        assert where in str(info.value) and ".output" in str(info.value)


def test_unsaved_value_after_the_trace_says_save_it(hf):
    with hf.trace(PROMPT):
        h = hf.model.layers[0].output
    for use in (lambda: torch.softmax(h, -1), lambda: h + 1, lambda: h.shape,
                lambda: h.value):
        with pytest.raises(TracingError, match=r"was not saved.*\.save\(\)"):
            use()


def test_model_tokenizer_pads_the_way_a_batch_runs(hf_model):
    # nnsight left-pads a decoder's tokenizer, so a position read off the caller's own
    # attention mask indexes the same token in the batch that runs. Reference: the HF forward
    # of that very encoding, with positions counted from each row's first token.
    lm = hf_model("tiny-gpt2")
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token is not None
    enc = lm.tokenizer([PROMPT, "Hi"], padding=True, return_tensors="pt")
    first = (enc["attention_mask"] == 0).sum(1)            # each row's first real token
    rows = torch.arange(2)
    with lm.trace(enc):
        at_first = lm.transformer.h[0].output[rows, first].save()
    got = {}
    hook = lm._model.transformer.h[0].register_forward_hook(
        lambda m, a, o: got.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            lm._model(**enc, position_ids=(enc["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    finally:
        hook.remove()
    assert torch.allclose(at_first, got["h"][rows, first], atol=1e-6, rtol=0)

    # an encoding padded on the right is re-laid out: the caller is told, not left to guess
    right = lm.tokenizer.__class__.from_pretrained(lm.path, padding_side="right")
    right.pad_token = right.eos_token
    with pytest.warns(UserWarning, match="padded on the right"):
        with lm.trace(right([PROMPT, "Hi"], padding=True, return_tensors="pt")):
            pass
