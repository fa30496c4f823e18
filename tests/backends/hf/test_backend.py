"""HF backend: values equal raw PyTorch forward hooks exactly (fp32), aliases, attention points,
invokes of different lengths, cross-invoke flow (including backwards dependencies)."""

from __future__ import annotations

import pytest
import torch

from vinterp.ir.errors import InterventionError
from vinterp.tracing.errors import TracingError

TINY = ["tiny-gpt2", "tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gptneox"]
PROMPT = "The quick brown fox jumps over"


def _paths(model):
    arch = model.architecture
    return {
        "layer0": arch.layer(0), "layer1": arch.layer(1),
        "attn1": f"{arch.layer(1)}.{arch.attn}", "mlp1": f"{arch.layer(1)}.{arch.mlp}",
        "embed": arch.embed, "norm": arch.final_norm, "head": arch.lm_head,
    }


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_values_equal_raw_forward_hooks(hf_model, raw_run, roundtrip, name):
    model = hf_model(name)
    p = _paths(model)
    ids = model.tokenizer(PROMPT)["input_ids"]
    raw = raw_run(model, ids, list(p.values()))
    root = model._root
    with model.trace(PROMPT) as tracer:
        embed = root._descend(p["embed"]).output.save()
        attn_in = root._descend(p["attn1"]).input.save()
        attn_inputs = root._descend(p["attn1"]).inputs.save()
        attn = root._descend(p["attn1"]).output.save()
        mlp = root._descend(p["mlp1"]).output.save()
        layer1 = root._descend(p["layer1"]).output.save()
        norm = root._descend(p["norm"]).output.save()
        head = root._descend(p["head"]).output.save()
        logits_alias = model.logits.save()
        logits = model.output.logits.save()
    assert layer1.shape == (1, len(ids), model.config.hidden_size)
    assert torch.equal(layer1, raw.outputs[p["layer1"]])
    # attention keeps HF's (out, weights) structure
    assert isinstance(attn, tuple) and len(attn) == len(raw.outputs[p["attn1"]])
    assert torch.equal(attn[0], raw.outputs[p["attn1"]][0])
    assert torch.equal(mlp, raw.outputs[p["mlp1"]])
    assert torch.equal(embed, raw.outputs[p["embed"]])
    assert torch.equal(norm, raw.outputs[p["norm"]])
    assert torch.equal(head, raw.logits)
    assert torch.equal(logits, raw.logits)
    assert torch.equal(logits_alias, raw.logits)
    # HF calls the attention module with keywords only: .input is still the first parameter
    raw_args, raw_kwargs = raw.args[p["attn1"]], raw.kwargs[p["attn1"]]
    if name == "tiny-llama":
        assert raw_args == ()  # keywords only
        first = raw_kwargs["hidden_states"]
    else:
        first = raw_args[0]
    assert torch.equal(attn_in, first)
    args, kwargs = attn_inputs
    assert len(args) == len(raw_args) and set(kwargs) == set(raw_kwargs)
    assert torch.equal(args[0] if args else kwargs["hidden_states"], first)
    roundtrip(model, tracer)


@pytest.mark.parametrize("name", TINY)
def test_aliases_resolve_to_real_hf_paths(hf_model, raw_run, name):
    model = hf_model(name)
    p = _paths(model)
    ids = model.tokenizer(PROMPT)["input_ids"]
    raw = raw_run(model, ids, list(p.values()))
    with model.trace(PROMPT) as tracer:
        embed = model.embed.output.save()
        attn = model.layers[1].attn.output.save()
        mlp = model.layers[1].mlp.output.save()
        layer = model.layers[1].output.save()
        norm = model.final_norm.output.save()
        head = model.lm_head.output.save()
        logits = model.logits.save()
    reads = {n.kwargs["module"] for n in tracer.graph.nodes if n.op == "read"}
    assert reads == {p["layer1"], p["attn1"], p["mlp1"], p["embed"], p["norm"], p["head"]}
    assert len(model.layers) == model.config.num_hidden_layers
    assert torch.equal(layer, raw.outputs[p["layer1"]])
    assert torch.equal(attn[0], raw.outputs[p["attn1"]][0])
    assert torch.equal(mlp, raw.outputs[p["mlp1"]])
    assert torch.equal(embed, raw.outputs[p["embed"]])
    assert torch.equal(norm, raw.outputs[p["norm"]])
    assert torch.equal(head, raw.logits)
    assert torch.equal(logits, raw.logits)


def test_hf_module_paths_mirror_the_tree(hf_model):
    model = hf_model("tiny-gpt2")
    assert model.transformer.h[1]._module is model._model.transformer.h[1]
    assert model.layers[-1]._module is model._model.transformer.h[-1]
    assert "GPT2LMHeadModel" in repr(model)
    with pytest.raises(IndexError, match="model.transformer.h has 2 modules; index 99 is out"):
        model.layers[99]


@pytest.mark.parametrize("name", TINY)
def test_invokes_of_different_lengths_equal_each_alone(hf_model, roundtrip, name):
    model = hf_model(name)
    prompts = ["Hello", "The Eiffel Tower is in the city of", "One two three"]
    with model.trace() as tracer:
        together = []
        for prompt in prompts:
            with tracer.invoke(prompt):
                together.append((model.layers[-1].output.save(), model.logits.save()))
    roundtrip(model, tracer)
    for prompt, (hid, logit) in zip(prompts, together, strict=True):
        n = len(model.tokenizer(prompt)["input_ids"])
        with model.trace(prompt):
            h_alone = model.layers[-1].output.save()
            l_alone = model.logits.save()
        assert hid.shape == (1, n, model.config.hidden_size) == h_alone.shape
        assert (hid - h_alone).abs().max() <= 1e-5
        assert (logit - l_alone).abs().max() <= 1e-5


def test_prompt_list_in_one_invoke(hf_model):
    model = hf_model("tiny-llama")
    prompts = ["Hi", "A much longer prompt than the first"]
    with model.trace(prompts):
        logits = model.logits.save()
    assert logits.shape[0] == 2
    for b, prompt in enumerate(prompts):
        n = len(model.tokenizer(prompt)["input_ids"])
        with model.trace(prompt):
            alone = model.logits.save()
        assert (logits[b, -n:] - alone[0]).abs().max() <= 1e-5


def test_token_ids_and_tensor_inputs(hf_model):
    model = hf_model("tiny-llama")
    ids = model.tokenizer(PROMPT)["input_ids"]
    with model.trace(PROMPT):
        a = model.logits.save()
    with model.trace(ids):
        b = model.logits.save()
    with model.trace(torch.tensor([ids])):
        c = model.logits.save()
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_attention_probs_point(hf_model, roundtrip, name):
    model = hf_model(name)
    n = len(model.tokenizer(PROMPT)["input_ids"])
    with model.trace(PROMPT) as tracer:
        probs = model.layers[0].attn.probs.save()
        out = model.logits.save()
    heads = model.config.num_attention_heads
    assert probs.shape == (1, heads, n, n)
    assert torch.allclose(probs.sum(-1), torch.ones(1, heads, n), atol=1e-5)
    assert torch.all(probs.triu(1) == 0)  # causal
    with model.trace(PROMPT):
        plain = model.logits.save()
    assert (out - plain).abs().max() <= 1e-5  # the eager path gives the same logits
    roundtrip(model, tracer)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "smollm2-135m"])
def test_attention_probs_equal_transformers_output_attentions(hf_model, name):
    """Every layer's ``attn.probs`` against transformers' own ``output_attentions=True`` on a
    separately loaded eager-attention copy of the checkpoint (no vinterp code in it)."""
    from transformers import AutoModelForCausalLM

    model = hf_model(name)
    ref_model = AutoModelForCausalLM.from_pretrained(
        model.path, attn_implementation="eager", dtype=torch.float32).eval()
    ids = model.tokenizer("The Eiffel Tower is in the city of")["input_ids"]
    with torch.no_grad():
        want = ref_model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    n_layers = len(model.layers)
    with model.trace(ids):
        got = [model.layers[i].attn.probs.save() for i in range(n_layers)]
    assert len(want) == n_layers
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape == (1, model.config.num_attention_heads, len(ids), len(ids))
        assert torch.allclose(g.cpu(), w, atol=1e-6, rtol=0), i


def test_gpt2_attn_dropout_input_is_the_attention_pattern(hf_model):
    model = hf_model("tiny-gpt2")
    n = len(model.tokenizer(PROMPT)["input_ids"])
    with model.trace(PROMPT):
        pattern = model.transformer.h[1].attn.attn_dropout.input.save()
        probs = model.layers[1].attn.probs.save()
    assert pattern.shape == (1, model.config.n_head, n, n)
    assert torch.equal(pattern, probs)
    assert torch.allclose(pattern.sum(-1), torch.ones(1, model.config.n_head, n), atol=1e-5)


def test_writing_attention_probs_changes_the_output(hf_model):
    model = hf_model("tiny-llama")
    n = len(model.tokenizer(PROMPT)["input_ids"])
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1).unsqueeze(1)
    with model.trace(PROMPT):
        model.layers[0].attn.probs = uniform.expand(1, model.config.num_attention_heads, n, n)
        got = model.layers[0].attn.probs.save()
        logits = model.logits.save()
    with model.trace(PROMPT):
        plain = model.logits.save()
    assert torch.allclose(got[0, 0], uniform)
    assert not torch.allclose(logits, plain)


def test_cross_invoke_value_flow_in_written_order(hf_model, roundtrip):
    model = hf_model("tiny-gpt2")
    a, b = "The cat sat on the", "The dog ran through the long"
    with model.trace() as tracer:
        with tracer.invoke(a):
            cat = model.transformer.h[0].output.save()
        with tracer.invoke(b):
            model.transformer.h[0].output[:, -1] = cat[:, -1]
            patched = model.logits.save()
    roundtrip(model, tracer)
    with model.trace(b):
        model.transformer.h[0].output[:, -1] = cat[:, -1]
        ref = model.logits.save()
    assert (patched - ref).abs().max() <= 1e-5


def test_backwards_cross_invoke_dependency_runs_by_phases(hf_model, roundtrip):
    """Invoke 1 at layer 0 needs invoke 0's layer-1 value, which comes later in the forward."""
    model = hf_model("tiny-llama")
    a, b = "The cat sat on the", "A dog"
    with model.trace() as tracer:
        with tracer.invoke(a):
            late = model.layers[1].output.save()
        with tracer.invoke(b):
            model.layers[0].output[:, -1] = late[:, -1]
            out = model.logits.save()
    roundtrip(model, tracer)
    with model.trace(a):
        late_ref = model.layers[1].output.save()
    with model.trace(b):
        model.layers[0].output[:, -1] = late_ref[:, -1]
        ref = model.logits.save()
    assert (late - late_ref).abs().max() <= 1e-5
    assert (out - ref).abs().max() <= 1e-5


def test_output_replacement_and_input_replacement(hf_model, roundtrip):
    model = hf_model("tiny-llama")
    with model.trace(PROMPT):
        h0 = model.layers[0].output.save()
    with model.trace(PROMPT) as tracer:
        model.layers[1].input = torch.zeros_like(h0)
        seen = model.layers[1].input.save()
        model.layers[1].output = model.layers[1].output * 2
        l1 = model.layers[1].output.save()
    assert torch.equal(seen, torch.zeros_like(h0))
    # reference: raw hooks that do the same
    m = model._model
    hs = [
        m.model.layers[1].register_forward_pre_hook(
            lambda mod, args, kw: ((torch.zeros_like(args[0]),) + args[1:], kw)
            if args else (args, {**kw, "hidden_states": torch.zeros_like(kw["hidden_states"])}),
            with_kwargs=True),
        m.model.layers[1].register_forward_hook(lambda mod, args, out: out * 2),
    ]
    try:
        got = {}
        hs.append(m.model.layers[1].register_forward_hook(
            lambda mod, args, out: got.__setitem__("l1", out)))
        with torch.no_grad():
            m(input_ids=torch.tensor([model.tokenizer(PROMPT)["input_ids"]]))
    finally:
        for h in hs:
            h.remove()
    assert torch.equal(l1, got["l1"])
    roundtrip(model, tracer)


def test_remote_true_needs_a_server(hf_model, monkeypatch):
    monkeypatch.delenv("VINTERP_HOST", raising=False)
    model = hf_model("tiny-gpt2")
    with pytest.raises(ValueError, match="remote=True needs a server"):
        model.trace(PROMPT, remote=True)
    with pytest.raises(ValueError, match="remote=True needs a server"):
        model.generate(PROMPT, remote=True, max_new_tokens=2)


def _per_invoke_budget_run(model, specs, vector):
    with model.generate(max_new_tokens=4, ignore_eos=True) as tracer:
        outs = []
        for prompt, budget in specs:
            extra = {"max_new_tokens": budget} if budget else {}
            with tracer.invoke(prompt, **extra):
                steps = list().save()
                with tracer.all():
                    model.layers[0].output.steer(vector)
                    steps.append(model.layers[1].output[:, -1])
                outs.append(steps)
    return [t.tolist() for t in tracer.result], outs


def test_per_invoke_max_new_tokens_equal_each_alone(hf_model):
    model = hf_model("tiny-llama")
    vector = torch.randn(64, generator=torch.Generator("cpu").manual_seed(0), device="cpu")
    specs = [("The cat sat on", 3), ("A dog ran quickly to the", 6), ("Hi", None)]
    tokens, outs = _per_invoke_budget_run(model, specs, vector)
    for k, spec in enumerate(specs):
        alone_tokens, alone_outs = _per_invoke_budget_run(model, [spec], vector)
        assert tokens[k] == alone_tokens[0]
        assert len(tokens[k]) - len(model.tokenizer(spec[0])["input_ids"]) == (spec[1] or 4)
        # per-step saves stop where the invoke's own generation stops
        assert len(outs[k]) == len(alone_outs[0]) == (spec[1] or 4)
        for a, b in zip(outs[k], alone_outs[0], strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_per_invoke_settings_other_than_budget_need_vllm(hf_model):
    model = hf_model("tiny-llama")
    with pytest.raises(ValueError, match="need backend='vllm'"):
        with model.generate(max_new_tokens=2) as tracer:
            with tracer.invoke("Hi", temperature=0.5):
                pass
    with pytest.raises(TracingError, match="only apply inside model.generate"):
        with model.trace() as tracer:
            with tracer.invoke("Hi", max_new_tokens=3):
                pass


def test_inputs_assignment_replaces_keyword_arguments_of_any_structure(hf_model):
    """``.inputs = (args, kwargs)`` with a new ``position_embeddings`` (a tuple of tensors)
    equals a raw pre-hook's edit. Only keys holding a tensor used to be written: the tuple
    was ignored, silently (the logits equalled the unedited model's). The keyword arguments
    answer ``in``, ``len``, ``keys()`` and ``dict(...)`` (they raised allowlist errors)."""
    model = hf_model("tiny-llama")
    attn = model._model.model.layers[0].self_attn
    ids = torch.tensor([model.tokenizer("A dog ran fast")["input_ids"]])

    def no_rotation(mod, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        return args, {**kwargs, "position_embeddings": (torch.ones_like(cos),
                                                         torch.zeros_like(sin))}

    hook = attn.register_forward_pre_hook(no_rotation, with_kwargs=True)
    try:
        with torch.no_grad():
            want = model._model(input_ids=ids).logits
    finally:
        hook.remove()
    with model.trace("A dog ran fast"):
        args, kwargs = model.model.layers[0].self_attn.inputs
        cos, sin = kwargs["position_embeddings"]
        model.model.layers[0].self_attn.inputs = (
            args, {"position_embeddings": (torch.ones_like(cos), torch.zeros_like(sin))})
        got = model.logits.save()
    assert torch.allclose(got, want, atol=1e-6)
    # the keyword arguments as a mapping, as nnsight users handle them
    with model.trace("A dog ran fast"):
        args, kwargs = model.model.layers[0].self_attn.inputs
        assert "position_embeddings" in kwargs and "no such" not in kwargs
        new = dict(kwargs)
        assert set(new) == set(kwargs.keys()) and len(new) == len(kwargs)
        cos, sin = new["position_embeddings"]
        new["position_embeddings"] = (cos * 0 + 1, sin * 0)
        model.model.layers[0].self_attn.inputs = (args, new)
        got = model.logits.save()
    assert torch.allclose(got, want, atol=1e-6)


def test_a_dependency_the_phase_planner_missed_is_a_clear_error(hf_model, monkeypatch):
    """If the phase planner puts an invoke in the same forward as one whose later-layer value
    it needs (a dependency it did not see), the internal NeedsPhases must not reach the user
    empty: a ValueError says which edit cannot run and how to rewrite it. (A planner that
    groups every invoke into one phase stands in for such a gap.)"""
    from vinterp.backends.hf import backend as hf_backend

    monkeypatch.setattr(hf_backend, "invoke_phases",
                        lambda graph, needs=None: [list(range(len(graph.invokes)))])
    model = hf_model("tiny-llama")
    with pytest.raises(ValueError) as caught:
        with model.trace() as tracer:
            with tracer.invoke("The cat sat on the"):
                late = model.layers[1].output[:, -1]
            with tracer.invoke("A dog"):
                model.layers[0].output[:, -1] += late
                model.logits.save()
    message = str(caught.value)
    assert "the edit of model.layers.0.output" in message
    assert "later in the same forward" in message
    assert "inside the invoke that uses it" in message


def test_assigning_a_tuple_to_a_tensor_point_says_to_assign_the_tensor(hf_model):
    """The transformers 4 idiom ``layer.output = (new,)``: in transformers 5 a decoder layer
    returns a tensor, and the error says so (it used to be torch's 'only one element tensors
    can be converted to Python scalars')."""
    model = hf_model("tiny-llama")
    with pytest.raises(InterventionError) as caught:
        with model.trace(PROMPT):
            new = model.model.layers[0].output * 2
            model.model.layers[0].output = (new,)
    message = str(caught.value)
    assert "model.layers.0.output" in message
    assert "holds a tensor" in message and "assign a tensor" in message
    assert "Python scalars" not in message


def test_beam_search_invokes_each_get_their_own_beams(hf_model):
    """``generate(num_beams=2)`` runs each prompt as two rows. Every invoke read all four rows
    and an edit in one landed in the other (its tokens turned to those of the edit); each
    invoke now reads and edits its own beams: tokens, reads and a steer at a position equal
    raw HF generate of the prompt alone with hooks doing the same."""
    model = hf_model("tiny-llama")
    net = model._model
    a, b = "The Eiffel Tower is in the city of", "Hello there my friend, how"
    vector = torch.randn(64, generator=torch.Generator("cpu").manual_seed(0), device="cpu")
    n = 4
    with model.generate(max_new_tokens=n, num_beams=2, ignore_eos=True) as tracer:
        with tracer.invoke(a):
            model.layers[0].output[:] = 0
            ha = model.layers[1].output.save()
        with tracer.invoke(b):
            model.layers[0].output.steer(vector, positions=-1)   # the prompt's last token
            hb = model.layers[1].output.save()
    tokens = tracer.result

    def alone(prompt, edit):
        """Tokens and the first step's layer-1 output, ``edit`` made at the first step."""
        ids = model.tokenizer(prompt, return_tensors="pt").input_ids
        seen = []
        handles = [net.model.layers[0].register_forward_hook(
                       lambda m, i, o: None if seen else edit(o)),
                   net.model.layers[1].register_forward_hook(
                       lambda m, i, o: seen.append(o.clone()))]
        try:
            with torch.no_grad():
                out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=n, num_beams=2, do_sample=False,
                                   eos_token_id=None, pad_token_id=model._pad_id)
        finally:
            for h in handles:
                h.remove()
        return out[0].tolist(), seen[0]

    def steer(o):
        o = o.clone()
        o[:, -1] += vector
        return o

    for prompt, edit, got_tokens, got_h in ((a, torch.zeros_like, tokens[0], ha),
                                            (b, steer, tokens[1], hb)):
        ref_tokens, ref_h = alone(prompt, edit)
        assert got_tokens.tolist() == ref_tokens
        assert got_h.shape == ref_h.shape   # [beams, the prompt's tokens, hidden]
        torch.testing.assert_close(got_h, ref_h, rtol=0, atol=1e-5)
