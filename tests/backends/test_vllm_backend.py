"""The vllm backend through LanguageModel on smollm2-135m: the seed workflows equal HF's."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vinterp import LanguageModel  # noqa: E402


@pytest.fixture(scope="module")
def models():
    hf = LanguageModel("smollm2-135m")
    vl = LanguageModel("smollm2-135m", backend="vllm", max_model_len=512)
    yield {"hf": hf, "vllm": vl}
    vl._backend.close()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _patch(model):
    with model.trace("The Eiffel Tower is in the city of"):
        clean = model.model.layers[8].output.save()
    with model.trace("The Colosseum is in the city of"):
        model.model.layers[8].output[:] = clean
        logits = model.output.logits.save()
    paris = model.tokenizer.encode(" Paris")[0]
    return clean, torch.softmax(logits[0, -1], dim=-1)[paris].item()


def test_patching_known_answer(models):
    clean_hf, p_hf = _patch(models["hf"])
    clean_vl, p_vl = _patch(models["vllm"])
    assert _rel(clean_vl, clean_hf) < 1e-4
    assert abs(p_vl - p_hf) < 1e-3
    assert 0.6 < p_vl < 0.7  # seed: P(" Paris") rises from ~1e-4 to ~0.66


def test_cross_prompt_and_greedy_known_answer(models):
    out = {}
    for name, model in models.items():
        with model.trace() as tracer:
            with tracer.invoke("The cat sat on the"):
                cat = model.model.layers[6].output.save()
            with tracer.invoke("The dog ran through the"):
                model.model.layers[6].output[:] = cat
                dog = model.output.logits.save()
        with model.generate("The capital of France is", max_new_tokens=3) as tracer:
            pass
        out[name] = (dog, model.tokenizer.decode(tracer.result[0]))
    assert _rel(out["vllm"][0], out["hf"][0]) < 1e-4
    assert out["vllm"][1] == out["hf"][1]
    assert out["vllm"][1].startswith("The capital of France is Paris")


def test_values_combined_outside_invokes_equal_hf(models):
    # nodes outside any invoke (a logit difference between two prompts) run on the client
    out = {}
    for name, model in models.items():
        with model.trace() as tracer:
            with tracer.invoke("The Eiffel Tower is in the city of"):
                a = model.logits[:, -1]
            with tracer.invoke("The Colosseum is in"):
                b = model.logits[:, -1]
            diff = (a - b).save()
            top = diff.topk(3).indices.save()
        out[name] = (diff, top)
    assert out["vllm"][0].shape == (1, 49152)
    assert _rel(out["vllm"][0], out["hf"][0]) < 1e-4
    assert torch.equal(out["vllm"][1], out["hf"][1])


def test_per_invoke_max_new_tokens_equal_hf(models):
    # requests of different lengths in one batch: each stops at its own budget
    vector = torch.randn(576, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, model in models.items():
        with model.generate(max_new_tokens=5, ignore_eos=True) as tracer:
            steps = []
            for prompt, budget in [("The capital of France is", 2), ("Once upon a time", 7)]:
                with tracer.invoke(prompt, max_new_tokens=budget):
                    logits = list().save()
                    with tracer.all():
                        model.layers[10].output.steer(vector, scale=2.0)
                        logits.append(model.logits)
                    steps.append(logits)
        out[name] = ([t.tolist() for t in tracer.result], steps)
    assert out["vllm"][0] == out["hf"][0]
    for vl, hf in zip(out["vllm"][1], out["hf"][1], strict=True):
        assert len(vl) == len(hf)
        assert all(_rel(a, b) < 1e-4 for a, b in zip(vl, hf, strict=True))
    assert [len(s) for s in out["vllm"][1]] == [2, 7]


def test_steered_generation_tokens_and_step_logits(models):
    """10 prompts x 3 vectors, 16 greedy tokens steered at every step, one batch: same tokens
    on both backends, and the same per-step logits."""
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(576, generator=g) * s for s in (2.0, 4.0, 8.0)]
    prompts = ["The capital of France is", "Once upon a time", "def fib(n):",
               "My favourite food is", "The weather today", "In 1492, Columbus",
               "Water boils at", "The best way to learn", "Dear Sir or Madam,", "Roses are red"]
    res = {}
    for name, model in models.items():
        saved = []
        with model.generate(max_new_tokens=16, ignore_eos=True) as tracer:
            for v in vectors:
                for p in prompts:
                    with tracer.invoke(p):
                        if p == prompts[0]:
                            logits = list().save()
                            with tracer.all():
                                model.model.layers[5].output.steer(v, scale=1.0)
                                logits.append(model.logits)
                            saved.append(logits)
                        else:
                            with tracer.all():   # edits only: recorded once for every step
                                model.model.layers[5].output.steer(v, scale=1.0)
        res[name] = ([t.tolist() for t in tracer.result], saved)
    (tok_hf, lg_hf), (tok_vl, lg_vl) = res["hf"], res["vllm"]
    assert len(tok_vl) == 30
    assert tok_vl == tok_hf
    for a, b in zip(lg_vl, lg_hf, strict=True):
        assert len(a) == len(b) == 16
        assert max(_rel(x, y) for x, y in zip(a, b, strict=True)) < 1e-4


NOT_HERE = "not available on the vllm backend; use backend='hf'"


def test_a_prompt_that_ends_early_keeps_its_row(models):
    """One invoke, two prompts; the first emits EOS after two tokens, the second goes on.
    vLLM computes nothing for a prompt that ended: its rows are NaN, so row 1 stays the
    second prompt at every step (a value holding the running prompt's row alone put it at
    row 0, and a save over all steps kept only the shorter prompt's steps)."""
    a, b = "The capital of France is", "Once upon a time there"
    with models["hf"].generate([a, b], max_new_tokens=8, ignore_eos=True) as tracer:
        pass
    n_a, n_b = (len(models["hf"].tokenizer(p)["input_ids"]) for p in (a, b))
    tokens_a, tokens_b = tracer.result[0].tolist()[n_a:], tracer.result[1].tolist()[n_b:]
    eos = next(t for t in tokens_a[1:] if t not in tokens_b)   # ends a at step 2, never b
    out = {}
    for name, model in models.items():
        with model.generate(max_new_tokens=8, eos_token_id=eos) as tracer:
            with tracer.invoke([a, b]):
                steps = list().save()
                with tracer.all():
                    steps.append(model.model.layers[3].output[:, -1].save())
        out[name] = list(steps)
    with models["vllm"].generate(max_new_tokens=8, eos_token_id=eos) as tracer:
        with tracer.invoke([b]):
            alone = list().save()
            with tracer.all():
                alone.append(models["vllm"].model.layers[3].output[:, -1].save())
    assert len(out["vllm"]) == len(out["hf"]) == len(alone) == 8
    ended = tokens_a.index(eos) + 1
    for k, (v, h, b_alone) in enumerate(zip(out["vllm"], out["hf"], alone, strict=True)):
        assert v.shape == h.shape == (2, 576)
        assert _rel(v[1], b_alone[0]) < 1e-4 and _rel(v[1], h[1]) < 1e-4
        assert bool(v[0].isnan().all()) == (k >= ended)


def test_refusals_with_their_messages(models):
    model = models["vllm"]
    with pytest.raises(Exception, match="q_proj.output is " + NOT_HERE + r" \(vLLM fuses"):
        with model.trace("hello"):
            model.model.layers[0].self_attn.q_proj.output.save()
    with pytest.raises(Exception, match=r"self_attn\.probs\.output is " + NOT_HERE):
        with model.trace("hello"):
            model.layers[0].attn.probs.save()
    with pytest.raises(Exception, match="gradients are " + NOT_HERE):
        with model.trace("hello"):
            h = model.model.layers[0].output.save()
            h.retain_grad()
            model.output.logits.sum().backward()
    # (a setitem on the logits used to run and be ignored: vLLM samples from its own logits)
    for write in (lambda: model.logits.__setitem__(slice(None), 0.0),
                  lambda: model.lm_head.output.__setitem__((0, -1, 5), 100.0),
                  lambda: model.output.logits[0].__setitem__(slice(None), 0.0),
                  lambda: model.logits.steer(torch.ones(49152)),
                  lambda: setattr(model.lm_head, "output", torch.zeros(1, 2, 49152))):
        with pytest.raises(Exception, match="writing logits is " + NOT_HERE):
            with model.trace("hello"):
                write()
    # several sequences per prompt came back as one, silently (a value has a row per prompt)
    for many in ({"num_return_sequences": 2}, {"n": 3}):
        with pytest.raises(Exception, match=f"{next(iter(many))}=.* is not supported on the "
                                            f"vllm backend.*repeat the prompt"):
            with model.generate("hello", max_new_tokens=2, do_sample=True, **many):
                model.model.layers[0].output.steer(torch.ones(576))
    # the engine still serves the next trace
    with model.trace("hello"):
        h = model.model.layers[0].output.save()
    assert h.shape == (1, len(model.tokenizer("hello")["input_ids"]), 576)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tensor_parallel_size": 2}, "supports tensor_parallel_size=1 and pipeline_parallel_size=1"),
    ({"pipeline_parallel_size": 2}, "supports tensor_parallel_size=1 and pipeline_parallel_size"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}},
     r"speculative decoding \(speculative_config\) is not supported"),
    ({"enable_prompt_embeds": True}, "enable_prompt_embeds=True is not supported"),
    ({"data_parallel_size": 2}, r"data_parallel_size > 1 is not supported"),
    ({"enable_dbo": True}, r"enable_dbo / ubatch_size > 1 \(micro-batching\) is not supported"),
    ({"ubatch_size": 2}, r"enable_dbo / ubatch_size > 1 \(micro-batching\) is not supported"),
])
def test_engine_settings_refused(kwargs, message):
    # refused before any engine starts (this takes no vLLM start-up time)
    with pytest.raises(ValueError, match=message):
        LanguageModel("tiny-llama", backend="vllm", **kwargs)


def test_layer_and_mlp_inputs_equal_hf(models):
    """.input of a decoder layer (vLLM's hidden + residual pair) and of its MLP (after the
    post-attention norm), and the attention block's input, on vllm against hf."""
    prompts = ["The Eiffel Tower is in the city of", "def fib(n):"]
    out = {}
    for name, model in models.items():
        with model.trace() as tracer:
            got = []
            for p in prompts:
                with tracer.invoke(p):
                    got.append([model.layers[i].input.save() for i in (0, 7, 29)]
                               + [model.layers[i].mlp.input.save() for i in (0, 7, 29)]
                               + [model.layers[7].attn.input.save()])
        out[name] = got
    for vl, hf in zip(out["vllm"], out["hf"], strict=True):
        for a, b in zip(vl, hf, strict=True):
            assert a.shape == b.shape and a.shape[-1] == 576
            assert _rel(a, b) < 1e-4
    # the MLP's input is the normalized residual, not the layer's input
    assert _rel(out["hf"][0][4], out["hf"][0][1]) > 0.5


def test_final_norm_edits_reach_the_logits_read_after_them(models):
    """The final norm's output, the logits and the model output are one point in vLLM: an
    edit of the norm must be in the logits read after it (they were computed before the edit
    was written back: the unedited logits, in traces and in each step's saved logits)."""
    prompt = "The Eiffel Tower is in the city of"
    got = {}
    for name, model in models.items():
        with model.trace(prompt):
            model.model.norm.output[:, -1] *= 2
            model.model.norm.output[:, 3] = 0
            logits = model.logits.save()
        with model.generate(prompt, max_new_tokens=3) as tracer:
            steps = list().save()
            with tracer.all():
                model.model.norm.output[:] = model.model.norm.output * -1
                steps.append(model.logits[:, -1])
        got[name] = (logits, torch.cat(steps), torch.as_tensor(tracer.result[0]))
    (lv, sv, tv), (lh, sh, th) = got["vllm"], got["hf"]
    assert _rel(lv, lh) < 1e-4
    assert float(lv[0, 3].abs().max()) == 0.0
    assert _rel(sv, sh) < 1e-4
    assert torch.equal(sv.argmax(-1), tv[-3:]), "each step's logits are the sampled ones"
    assert torch.equal(tv, th)


CAT, DOG = "The cat sat on the mat", "A dog ran in the park"   # (6 tokens each)


@pytest.mark.parametrize("code", [
    lambda h, m: h.mean(0).save(),
    lambda h, m: h.norm().save(),
    lambda h, m: h[1].save(),
    lambda h, m: h.__setitem__(slice(None), h[:1]),
    lambda h, m: torch.cat([h, h]).save(),
    lambda h, m: torch.sum(h, 0).save(),
])
def test_code_mixing_an_invokes_prompts_is_refused(models, code):
    """Each prompt of an invoke is its own vLLM request: code that mixes an invoke's prompts
    would silently see one prompt at a time (h.mean(0) gave each prompt's own mean, h[:] =
    h[:1] did nothing). It is refused, saying what to write instead."""
    model = models["vllm"]
    with pytest.raises(ValueError, match="mixes the 2 prompts of invoke 0"):
        with model.trace([CAT, DOG]):
            code(model.model.layers[3].output, model)


def test_row_wise_code_in_an_invoke_of_several_prompts_equals_hf(models):
    got = {}
    for name, model in models.items():
        with model.trace([CAT, DOG]):
            h = model.model.layers[3].output
            a = h[:, -1].norm(dim=-1).save()
            b = model.model.layers[4].self_attn.output[0][:, 2].save()
            h[:, -1] += 1.0
            c = h.sum(1).save()
            d = model.logits[:, -1].save()
        got[name] = (a, b, c, d)
    for v, r in zip(got["vllm"], got["hf"], strict=True):
        assert v.shape == r.shape and _rel(v, r) < 1e-4


def test_per_dimension_steering_factors_equal_hf(models):
    """A factor or bound given per hidden dimension is not the vectorized path's (it takes
    one number): it runs on the general path, with the same kernels as HF, instead of
    failing the request ("only one element tensors can be converted")."""
    f = torch.linspace(0.5, 1.5, 576)

    def run(model):
        with model.trace("The Eiffel Tower is in the city of"):
            model.model.layers[3].output.scale(f)
            model.model.layers[5].output.clamp(torch.ones(576), min=-f, max=f)
            h = model.model.layers[8].output.save()
        return h

    assert _rel(run(models["vllm"]), run(models["hf"])) < 1e-4


def test_prompts_of_different_lengths_in_one_invoke_are_laid_out_as_hf(models):
    """One invoke of prompts of different lengths gives one tensor in ``hf``'s layout (padded
    on the left), with NaN where ``hf`` has padding: vLLM runs none. It was a list."""
    long, short = "The quick brown fox jumps over the lazy dog", "Hi"
    got = {}
    for name, model in models.items():
        with model.trace([long, short]):
            h = model.model.layers[3].output.save()
            last = model.model.layers[3].output[:, -1].save()
            logits = model.logits.save()
        got[name] = (h, last, logits)
    n_short = len(models["hf"].tokenizer(short)["input_ids"])
    for v, r in zip(got["vllm"], got["hf"], strict=True):
        assert isinstance(v, torch.Tensor) and v.shape == r.shape
        assert _rel(v[0], r[0]) < 1e-4
        if v.dim() == 3:
            assert _rel(v[1, -n_short:], r[1, -n_short:]) < 1e-4
            assert bool(v[1, :-n_short].isnan().all())
        else:
            assert _rel(v[1], r[1]) < 1e-4
