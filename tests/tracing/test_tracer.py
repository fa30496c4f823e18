"""Tracer API: generate and its scopes, result, cache, stop, scan, gradients, steering nodes."""

from __future__ import annotations

import pytest
import torch

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def model(hf_model):
    return hf_model("tiny-llama")


def _raw_generate(model, prompt, n, hook=None, module=None):
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
    h = module.register_forward_hook(hook) if hook else None
    try:
        out = model._model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=n, do_sample=False, eos_token_id=None,
                                    pad_token_id=model._pad_id)
    finally:
        if h:
            h.remove()
    return out[0]


def test_generate_result_matches_hf_generate(model, roundtrip):
    with model.generate(PROMPT, max_new_tokens=5, ignore_eos=True) as tracer:
        logits0 = model.logits.save()
    ref = _raw_generate(model, PROMPT, 5)
    assert isinstance(tracer.result, list) and len(tracer.result) == 1
    assert tracer.result[0].dim() == 1 and tracer.result[0].dtype == torch.long
    assert torch.equal(tracer.result[0].cpu(), ref.cpu())   # (token ids come back on the CPU)
    n = len(model.tokenizer(PROMPT)["input_ids"])
    assert logits0.shape[-2] == 1  # generate computes the last position only
    with model.trace(PROMPT):
        full = model.logits.save()
    assert full.shape[-2] == n
    assert (logits0[0, -1] - full[0, -1]).abs().max() <= 1e-5
    roundtrip(model, tracer)


def test_generate_invokes_of_different_lengths_equal_alone(model):
    prompts = ["Hi", "The Eiffel Tower is in the city of"]
    with model.generate(max_new_tokens=4, ignore_eos=True) as tracer:
        for p in prompts:
            with tracer.invoke(p):
                pass
    for p, got in zip(prompts, tracer.result, strict=True):
        assert torch.equal(got, _raw_generate(model, p, 4).cpu())  # no padding, same tokens


def test_scopes_all_iter_next(model, roundtrip):
    n_new = 4
    with model.generate(PROMPT, max_new_tokens=n_new, ignore_eos=True) as tracer:
        some = list().save()
        with tracer.iter[1:3]:
            some.append(model.layers[1].output)
        first = model.logits.save()
        every = list().save()
        with tracer.all():   # nnsight: the block runs once per step
            every.append(model.logits)
            last = model.logits.save()
        loop = []
        for _step in tracer.iter[2:4]:   # unrolled at trace time: one body per step
            loop.append(model.logits.argmax(-1).save())
        tracer.next()
        second = model.logits.save()
    res = tracer.result[0]
    n = len(model.tokenizer(PROMPT)["input_ids"])
    assert isinstance(every, list) and len(every) == n_new
    assert torch.equal(last, every[-1])          # a save in the block: the last step's
    assert all(e.shape == (1, 1, model.config.vocab_size) for e in every)
    assert torch.equal(every[0], first) and torch.equal(every[1], second)
    # the logits at step s choose token s (greedy)
    assert [int(e[0, -1].argmax()) for e in every] == res[n:].tolist()
    assert isinstance(some, list) and len(some) == 2
    assert all(s.shape == (1, 1, model.config.hidden_size) for s in some)
    assert [int(x[0, -1]) for x in loop] == res[n + 2:n + 4].tolist()
    scopes = [(n.steps.start, n.steps.stop) for n in tracer.graph.nodes if n.op == "save"]
    # the block forms ran once per step: one save per step (the kept lists' come last)
    assert scopes == [(0, 1), (0, 1), (1, 2), (2, 3), (3, 4), (2, 3), (3, 4), (1, 2),
                      (1, 2), (2, 3), (0, 1), (1, 2), (2, 3), (3, 4)]
    roundtrip(model, tracer)


def test_steering_in_generate_equals_raw_hook(model, roundtrip):
    torch.manual_seed(0)
    v = torch.randn(model.config.hidden_size) * 4
    with model.generate(PROMPT, max_new_tokens=6, ignore_eos=True) as tracer:
        logits = list().save()
        with tracer.all():
            model.layers[1].output.steer(v, scale=2.0)
            logits.append(model.logits)
    ref = _raw_generate(model, PROMPT, 6, lambda mod, a, o: o + 2.0 * v,
                        model._model.model.layers[1])
    plain = _raw_generate(model, PROMPT, 6)
    assert torch.equal(tracer.result[0].cpu(), ref.cpu())
    assert not torch.equal(ref, plain)  # the steering matters
    assert len(logits) == 6
    assert any(n.op == "steer" for n in tracer.graph.nodes)
    roundtrip(model, tracer)


def test_steering_positions_generated_only(model):
    v = torch.ones(model.config.hidden_size) * 3
    with model.generate(PROMPT, max_new_tokens=3, ignore_eos=True) as tracer:
        outs = list().save()
        with tracer.all():
            model.layers[0].output.steer(v, positions="generated")
            outs.append(model.layers[0].output)
    with model.generate(PROMPT, max_new_tokens=3, ignore_eos=True) as plain_tracer:
        plain = list().save()
        with plain_tracer.all():
            plain.append(model.layers[0].output)
    assert torch.equal(outs[0], plain[0])  # step 0 is the prompt: untouched
    n = len(model.tokenizer(PROMPT)["input_ids"])
    ids = tracer.result[0]
    # step 1's input is the first generated token (same in both runs: step 0 untouched)
    assert int(ids[n]) == int(plain_tracer.result[0][n])
    assert torch.allclose(outs[1], plain[1] + 3, atol=1e-6)


def test_cache_all_layers_and_positions(model, roundtrip):
    with model.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=list(model.layers))
    with model.trace(PROMPT):
        refs = [model.layers[i].output.save() for i in range(len(model.layers))]
    # keyed as nnsight's: "model." + the module path, values under .output
    assert list(cache) == [f"model.model.layers.{i}" for i in range(len(model.layers))]
    for ref, got in zip(refs, cache.values(), strict=True):
        assert torch.equal(got.output, ref)
    with model.trace(PROMPT) as tracer2:
        part = tracer2.cache(modules=[model.layers[1].mlp, model.layers[1]], positions=-1)
    assert set(part) == {"model.layers.1", "model.layers.1.mlp"}
    assert torch.equal(part["model.layers.1"], refs[1][:, [-1]])
    roundtrip(model, tracer)


def test_stop_ends_the_forward(model):
    calls = []
    h = model._model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with model.trace(PROMPT) as tracer:
            early = model.layers[0].output.save()
            tracer.stop()
    finally:
        h.remove()
    assert calls == []  # the LM head never ran
    with model.trace(PROMPT):
        ref = model.layers[0].output.save()
    assert torch.equal(early, ref)


def test_scan_gives_shapes_on_meta(model):
    n = len(model.tokenizer(PROMPT)["input_ids"])
    with model.scan(PROMPT):
        h = model.layers[1].output.save()
        logits = model.logits.save()
    assert h.device.type == "meta" and h.shape == (1, n, model.config.hidden_size)
    assert logits.shape == (1, n, model.config.vocab_size)


def test_gradients_match_torch_autograd(model, roundtrip):
    ids = model.tokenizer(PROMPT)["input_ids"]
    target = 42
    with model.trace(PROMPT) as tracer:
        hidden = model.layers[0].output.save()
        hidden.retain_grad()
        logits = model.logits
        loss = -logits[0, -1, target]
        loss.backward()
    store = {}

    def keep(mod, args, out):
        out.retain_grad()
        store["h"] = out

    hk = model._model.model.layers[0].register_forward_hook(keep)
    try:
        out = model._model(input_ids=torch.tensor([ids])).logits
        (-out[0, -1, target]).backward()
    finally:
        hk.remove()
        model._model.zero_grad(set_to_none=True)
    assert hidden.grad is not None
    assert torch.allclose(hidden.grad, store["h"].grad, atol=1e-6, rtol=0)
    assert torch.equal(hidden.detach(), store["h"].detach())
    roundtrip(model, tracer, compare=False)
    model._model.zero_grad(set_to_none=True)


def test_the_callers_own_tensors_and_modules_get_their_gradients(model):
    """A steering vector being trained and a user's probe (an nn.Linear called on a value):
    autograd reaches those very tensors, as raw hooks give. The graph holds copies of
    constants (data), and their .grad stayed None, so an optimiser silently did nothing."""
    target = 42
    torch.manual_seed(0)
    probe = torch.nn.Linear(64, 3)
    raw_vec, vec = torch.zeros(64, requires_grad=True), torch.zeros(64, requires_grad=True)

    def edit(mod, args, out):
        out = out.clone()
        out[:, -1] = out[:, -1] + raw_vec
        return out

    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    layers = model._model.model.layers
    kept = {}
    hooks = [layers[0].register_forward_hook(edit),
             layers[1].register_forward_hook(lambda m, a, o: kept.setdefault("h", o))]
    try:
        (-model._model(input_ids=ids).logits[0, -1, target]).backward()
        probe(kept["h"][:, -1].detach()).sum().backward()
        raw_probe_grad = probe.weight.grad.clone()
        probe.zero_grad()
    finally:
        for hk in hooks:
            hk.remove()
        model._model.zero_grad(set_to_none=True)
    with model.trace(PROMPT):
        model.layers[0].output[:, -1] += vec
        (-model.logits[0, -1, target]).backward()
    assert vec.grad is not None and torch.allclose(vec.grad, raw_vec.grad, atol=1e-6)
    with model.trace(PROMPT):
        probe(model.layers[1].output[:, -1]).sum().backward()
    model._model.zero_grad(set_to_none=True)
    assert probe.weight.grad is not None
    assert torch.allclose(probe.weight.grad, raw_probe_grad, atol=1e-6)


def test_requires_grad_and_grad_saved_inside(model):
    with model.trace(PROMPT):
        emb = model.embed.output
        emb.requires_grad_()
        hidden = model.layers[1].output.save()
        hidden.retain_grad()
        model.logits.sum().backward()
        g = hidden.grad.save()
    model._model.zero_grad(set_to_none=True)
    assert hidden.grad is not None and hidden.grad.shape == hidden.shape
    assert torch.equal(g, hidden.grad)
    assert float(hidden.grad.abs().sum()) > 0
