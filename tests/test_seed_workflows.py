"""The seed's nnsight workflows, adapted only in import, model name and paths (issue 3):
GPT-2 paths on tiny-gpt2, Llama paths on smollm2-135m; ``.output[0]`` → ``.output`` (decoder
layers return a tensor in transformers 5) and ``model.output`` → ``model.output.logits``."""

from __future__ import annotations

import pytest
import torch

from vinterp import LanguageModel  # noqa: F401 - the seed's import, adapted


@pytest.fixture(scope="module")
def gpt2(hf_model):
    return hf_model("tiny-gpt2")


@pytest.fixture(scope="module")
def gpt2_eager(gpt2):
    """The same checkpoint loaded by transformers alone, eager attention: the reference for
    attention probabilities (``output_attentions=True``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gpt2.path, attn_implementation="eager",
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm(hf_model):
    return hf_model("smollm2-135m")


def test_first_trace_extraction(gpt2, raw_run, roundtrip):
    model = gpt2
    with model.trace("The capital of France is") as tracer:
        hidden = model.transformer.h[1].output.save()
        logits = model.output.logits.save()
    ids = model.tokenizer("The capital of France is")["input_ids"]
    raw = raw_run(model, ids, ["transformer.h.1"])
    assert hidden.shape == (1, len(ids), model.config.n_embd)
    assert torch.equal(hidden, raw.outputs["transformer.h.1"])
    assert torch.equal(logits, raw.logits)
    roundtrip(model, tracer)


def test_proxy_ops_with_inplace_zeroing(gpt2, roundtrip):
    model = gpt2
    with model.trace("The Eiffel Tower is in"):
        ref_h0 = model.transformer.h[0].output.save()
    with model.trace("The Eiffel Tower is in") as tracer:
        h5_out = model.transformer.h[0].output
        h5_mean = h5_out.mean(dim=-1)
        h5_saved = h5_mean.save()
        model.transformer.h[1].output[:] = 0
        after = model.transformer.h[1].output.save()
        logits = model.output.logits.save()
    assert torch.equal(h5_saved, ref_h0.mean(dim=-1))
    assert torch.equal(after, torch.zeros_like(after))
    # zeroed last layer: logits are the LM head of ln_f(0) = ln_f's bias, the same everywhere
    ln_f = model._model.transformer.ln_f
    expected = model._model.lm_head(ln_f(torch.zeros(1, 1, model.config.n_embd)))
    assert torch.allclose(logits, expected.expand_as(logits), atol=1e-5)
    roundtrip(model, tracer)


def _seed_order(model, prompt, n_layers):
    # verbatim seed order: all layer outputs, then all attention patterns (earlier in the
    # forward than the later layers' outputs)
    with model.trace(prompt):
        layer_outputs = []
        for i in range(n_layers):
            layer_out = model.transformer.h[i].output.save()
            layer_outputs.append(layer_out)
        attn_patterns = []
        for i in range(n_layers):
            attn = model.transformer.h[i].attn.attn_dropout.input[0][0].save()
            attn_patterns.append(attn)
        logits = model.output.logits.save()
    return layer_outputs, attn_patterns, logits


def _forward_order(model, prompt, n_layers):
    with model.trace(prompt):
        layer_outputs, attn_patterns = [], []
        for i in range(n_layers):
            attn_patterns.append(model.transformer.h[i].attn.attn_dropout.input[0][0].save())
            layer_outputs.append(model.transformer.h[i].output.save())
        logits = model.output.logits.save()
    return layer_outputs, attn_patterns, logits


@pytest.mark.parametrize("order", [
    pytest.param(_seed_order, id="seed-order"),
    pytest.param(_forward_order, id="forward-order"),
])
def test_multi_layer_norms_and_top5(gpt2, gpt2_eager, raw_run, order):
    model = gpt2
    prompt = "The capital of France is"
    n_layers = model.config.n_layer
    layer_outputs, attn_patterns, logits = order(model, prompt, n_layers)
    ids = model.tokenizer(prompt)["input_ids"]
    n = len(ids)
    blocks = [f"transformer.h.{i}" for i in range(n_layers)]
    raw = raw_run(model, ids, blocks)       # plain forward hooks on every block (sdpa)
    assert len(layer_outputs) == n_layers
    for layer_out, block in zip(layer_outputs, blocks, strict=True):
        # reading attn_dropout's input runs eager attention: equal up to rounding
        assert torch.allclose(layer_out, raw.outputs[block], atol=1e-5, rtol=0)
    # attention probabilities: transformers' own output_attentions (eager attention)
    with torch.no_grad():
        ref = gpt2_eager(input_ids=torch.tensor([ids]), output_attentions=True)
    assert len(attn_patterns) == len(ref.attentions) == n_layers
    for attn, want in zip(attn_patterns, ref.attentions, strict=True):
        assert attn.shape == (n, n)
        assert torch.allclose(attn, want[0, 0], atol=1e-6, rtol=0)
    top_tokens = torch.softmax(logits[0, -1], dim=-1).topk(5)
    want_top = torch.softmax(raw.logits[0, -1], -1).topk(5)
    assert torch.equal(top_tokens.indices, want_top.indices)
    assert torch.allclose(top_tokens.values, want_top.values)


def test_activation_patching_paris(smollm, roundtrip):
    model = smollm
    clean_prompt = "The Eiffel Tower is in the city of"
    corrupted_prompt = "The Colosseum is in the city of"
    paris_token = model.tokenizer.encode(" Paris")[0]
    with model.trace(clean_prompt):
        clean_hidden = model.model.layers[8].output.save()
    with model.trace(corrupted_prompt):
        base_logits = model.output.logits.save()
    with model.trace(corrupted_prompt) as tracer:
        model.model.layers[8].output[:] = clean_hidden
        patched_logits = model.output.logits.save()
    before = torch.softmax(base_logits[0, -1], dim=-1)[paris_token].item()
    after = torch.softmax(patched_logits[0, -1], dim=-1)[paris_token].item()
    assert before < 1e-3
    assert 0.6 <= after <= 0.72
    roundtrip(model, tracer)


def _patch_sweep(model, clean_prompt, corrupted_prompt, target_token, n_layers):
    # the seed's function, verbatim but for `.output[0]` -> `.output`, `model.output.logits`
    with model.trace(clean_prompt) as tracer:
        clean_cache = {}
        for i in range(n_layers):
            clean_cache[i] = model.transformer.h[i].output.save()
        clean_logits = model.output.logits.save()  # noqa: F841
    seq_len = clean_cache[0].shape[1]
    results = torch.zeros(n_layers, seq_len)
    for layer in range(n_layers):
        for pos in range(seq_len):
            with model.trace(corrupted_prompt) as tracer:  # noqa: F841
                current = model.transformer.h[layer].output
                current[:, pos, :] = clean_cache[layer][:, pos, :]
                logits = model.output.logits.save()
            probs = torch.softmax(logits[0, -1], dim=-1)
            results[layer, pos] = probs[target_token].item()
    return results, clean_cache


def test_patch_sweep(gpt2):
    model = gpt2
    clean, corrupt = "The cat sat on the", "A dog ran in the"
    assert len(model.tokenizer(clean)["input_ids"]) == len(model.tokenizer(corrupt)["input_ids"])
    target = 42
    results, cache = _patch_sweep(model, clean, corrupt, target, n_layers=model.config.n_layer)
    seq_len = results.shape[1]
    # the same sweep as one batched trace with one invoke per (layer, pos)
    with model.trace() as tracer:
        batched = {}
        for layer in range(model.config.n_layer):
            for pos in range(seq_len):
                with tracer.invoke(corrupt):
                    model.transformer.h[layer].output[:, pos, :] = cache[layer][:, pos, :]
                    batched[layer, pos] = model.output.logits[0, -1].softmax(-1)[target].save()
    for (layer, pos), p in batched.items():
        assert abs(float(p) - float(results[layer, pos])) <= 1e-5
    # patching the last position of the last layer gives the clean prediction exactly
    with model.trace(clean):
        clean_p = model.output.logits[0, -1].softmax(-1)[target].save()
    assert abs(float(results[-1, -1]) - float(clean_p)) <= 1e-6
    assert results.min() >= 0 and results.max() <= 1


def test_cross_prompt_sharing(gpt2, roundtrip):
    model = gpt2
    with model.trace() as tracer:
        with tracer.invoke("The cat sat on the"):
            cat_hidden = model.transformer.h[1].output.save()
        with tracer.invoke("The dog ran through the"):
            model.transformer.h[1].output[:] = cat_hidden
            dog_with_cat = model.output.logits.save()
    with model.trace("The cat sat on the"):
        cat_logits = model.output.logits.save()
    # the dog prompt with the cat's last-layer output predicts exactly what the cat does
    assert (dog_with_cat - cat_logits).abs().max() <= 1e-5
    roundtrip(model, tracer)


def test_gradient_analysis(gpt2):
    model = gpt2
    with model.trace("The quick brown fox"):
        hidden = model.transformer.h[0].output.save()
        hidden.retain_grad()
        logits = model.output.logits
        target_token = model.tokenizer.encode(" jumps")[0]
        loss = -logits[0, -1, target_token]
        loss.backward()
    grad = hidden.grad
    model._model.zero_grad(set_to_none=True)
    # reference: torch.autograd on the raw HF model
    ids = torch.tensor([model.tokenizer("The quick brown fox")["input_ids"]])
    store = {}
    h = model._model.transformer.h[0].register_forward_hook(
        lambda mod, a, out: store.__setitem__("h", out))
    try:
        out = model._model(input_ids=ids).logits
        (ref_grad,) = torch.autograd.grad(-out[0, -1, target_token], store["h"])
    finally:
        h.remove()
    assert ref_grad.abs().max() > 1e-3      # a real gradient, so the comparison means something
    assert torch.allclose(grad, ref_grad, atol=1e-6, rtol=0)


def test_steered_generation(gpt2, roundtrip):
    model = gpt2
    torch.manual_seed(3)
    v = torch.randn(model.config.n_embd) * 5
    prompt = "Once upon a time"
    with model.generate(prompt, max_new_tokens=8, ignore_eos=True) as tracer:
        with tracer.all():
            model.transformer.h[0].output.steer(v, scale=1.0)
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
    hk = model._model.transformer.h[0].register_forward_hook(lambda m, a, o: o + v)
    try:
        ref = model._model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=8, do_sample=False, eos_token_id=None,
                                    pad_token_id=model._pad_id)[0]
    finally:
        hk.remove()
    assert torch.equal(tracer.result[0].cpu(), ref.cpu())
    roundtrip(model, tracer)
