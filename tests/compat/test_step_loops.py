"""nnsight step loops on the HF backend: ``for step in tracer.iter[...]`` / ``tracer.all()``.

References are plain PyTorch forward hooks on the same HF model (compat_reference.py), never
vinterp itself. Idioms as nnsight documents them:
- docs/usage/iter-all-next.md
  https://github.com/ndif-team/nnsight/blob/main/docs/usage/iter-all-next.md
- tests/agent-evals/_audit.py (intermediate_04, _07, _08, _12)
  https://github.com/ndif-team/nnsight/blob/main/tests/agent-evals/_audit.py
"""

from __future__ import annotations

import pytest
import torch
from compat_reference import raw_generate

from vinterp.tracing.errors import TracingError

PROMPT = "The quick brown fox"
N_NEW = 5
EDIT_LAYER, READ_LAYER = 0, 1


@pytest.fixture(scope="module")
def model(hf_model):
    return hf_model("tiny-llama")


def _ids(model, prompt=PROMPT):
    return model.tokenizer(prompt)["input_ids"]


def _zero_at(steps):
    return lambda step, out: torch.zeros_like(out) if step in steps else None


def test_iter_conditional_edit_lands_on_step_2_only(model):
    # nnsight: _audit.py intermediate_07_conditional_generation; iter-all-next.md
    # "Per-step conditional" (`step` is the actual integer iteration number).
    with model.generate(PROMPT, max_new_tokens=N_NEW, ignore_eos=True) as tracer:
        step_predictions = list().save()
        hidden = list().save()
        seen = []
        for step_idx in tracer.iter[:]:
            seen.append(step_idx)
            if step_idx == 2:
                model.model.layers[EDIT_LAYER].output[:] = 0
            hidden.append(model.model.layers[READ_LAYER].output)
            step_predictions.append(model.lm_head.output[0, -1, :].argmax(dim=-1))
    assert seen == [0, 1, 2, 3, 4] and all(type(s) is int for s in seen)

    edit, read = f"model.layers.{EDIT_LAYER}", f"model.layers.{READ_LAYER}"
    ref = raw_generate(model._model, _ids(model), N_NEW, model._pad_id,
                       edits={edit: _zero_at({2})},
                       capture={read: lambda o: o, "lm_head": lambda o: o[0, -1].argmax(-1)})
    plain = raw_generate(model._model, _ids(model), N_NEW, model._pad_id,
                         capture={read: lambda o: o})
    assert isinstance(hidden, list) and len(hidden) == N_NEW == len(step_predictions)
    for got, want in zip(hidden, ref.captured[read], strict=True):
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert [int(t) for t in step_predictions] == [int(t) for t in ref.captured["lm_head"]]
    assert torch.equal(tracer.result[0], ref.ids)
    # the edit matters, and only from step 2 on: steps 0 and 1 are the unedited model's
    for s in (0, 1):
        assert torch.allclose(hidden[s], plain.captured[read][s], atol=1e-5, rtol=0)
    assert not torch.allclose(hidden[2], plain.captured[read][2], atol=1e-3)
    # the graph says so too: exactly one write of layer 0's output, scoped to step 2
    edits = [n for n in tracer.graph.nodes if n.op == "setitem"]
    assert [(n.steps.start, n.steps.stop) for n in edits] == [(2, 3)]


def test_iter_slice_int_and_list_select_those_steps(model):
    # nnsight: iter-all-next.md "Slice", "Int", "List"; _audit.py intermediate_12.
    read = f"model.layers.{READ_LAYER}"
    with model.generate(PROMPT, max_new_tokens=N_NEW, ignore_eos=True) as tracer:
        mid = list().save()
        for step in tracer.iter[1:3]:
            mid.append(model.model.layers[READ_LAYER].output)
        picked = [].save()
        steps_seen = [].save()
        for step in tracer.iter[[0, 2, 4]]:
            steps_seen.append(step)
            picked.append(model.model.layers[READ_LAYER].output)
        for step in tracer.iter[3]:
            third = model.model.layers[READ_LAYER].output.save()
    ref = raw_generate(model._model, _ids(model), N_NEW, model._pad_id,
                       capture={read: lambda o: o}).captured[read]
    assert len(mid) == 2 and len(picked) == 3 and steps_seen == [0, 2, 4]
    for got, want in zip(mid + picked + [third], [ref[1], ref[2], ref[0], ref[2], ref[4],
                                                  ref[3]], strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_next_moves_its_own_invoke_only(model):
    """nnsight keeps a step counter per invoke: after ``tracer.next()`` in one invoke, the
    next invoke's first read is its prompt's forward (step 0). vinterp used to carry the step
    over, so the second invoke silently read (and would have edited) step 1."""
    read = f"model.layers.{READ_LAYER}"
    other = "Hi there"
    with model.generate(max_new_tokens=3, ignore_eos=True) as tracer:
        with tracer.invoke(PROMPT):
            a0 = model.model.layers[READ_LAYER].output.save()
            tracer.next()
            a1 = model.model.layers[READ_LAYER].output.save()
        with tracer.invoke(other):
            b0 = model.model.layers[READ_LAYER].output.save()
            model.model.layers[EDIT_LAYER].output[:] = 0     # at B's step 0, not step 1
    ref_a = raw_generate(model._model, _ids(model), 3, model._pad_id,
                         capture={read: lambda o: o}).captured[read]
    ref_b = raw_generate(model._model, _ids(model, other), 3, model._pad_id,
                         edits={f"model.layers.{EDIT_LAYER}": _zero_at({0})},
                         capture={read: lambda o: o}).captured[read]
    for got, want in ((a0, ref_a[0]), (a1, ref_a[1]), (b0, ref_b[0])):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=0)


def test_step_lists_run_in_step_order_and_open_starts_follow_next(model):
    """nnsight sorts ``tracer.iter[[2, 0]]`` (the model reaches step 0 first) and starts an
    open ``iter[:]`` / ``all()`` at the invoke's current step (after ``tracer.next()``)."""
    read = f"model.layers.{READ_LAYER}"
    with model.generate(PROMPT, max_new_tokens=4, ignore_eos=True) as tracer:
        listed, listed_steps = [].save(), [].save()
        for step in tracer.iter[[2, 0]]:
            listed_steps.append(step)
            listed.append(model.model.layers[READ_LAYER].output)
        tracer.next()
        rest, rest_steps = [].save(), [].save()
        for step in tracer.all():
            rest_steps.append(step)
            rest.append(model.model.layers[READ_LAYER].output)
    ref = raw_generate(model._model, _ids(model), 4, model._pad_id,
                       capture={read: lambda o: o}).captured[read]
    assert listed_steps == [0, 2] and rest_steps == [1, 2, 3]
    for got, want in zip(listed + rest, [ref[0], ref[2], ref[1], ref[2], ref[3]], strict=True):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=0)


def test_for_step_in_all_edits_every_step(model):
    # nnsight: iter-all-next.md "`tracer.all()` — every step" (for step in tracer.all()).
    n_new = 3
    with model.generate(PROMPT, max_new_tokens=n_new, ignore_eos=True) as tracer:
        hidden_states = list().save()
        for step in tracer.all():
            model.model.layers[EDIT_LAYER].output[:] = 0
            hidden_states.append(model.model.layers[-1].output)
    last = f"model.layers.{model.config.num_hidden_layers - 1}"
    ref = raw_generate(model._model, _ids(model), n_new, model._pad_id,
                       edits={f"model.layers.{EDIT_LAYER}": _zero_at({0, 1, 2})},
                       capture={last: lambda o: o})
    assert len(hidden_states) == n_new
    for got, want in zip(hidden_states, ref.captured[last], strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.equal(tracer.result[0], ref.ids)


def test_per_invoke_budget_bounds_the_loop(model):
    # nnsight: _audit.py intermediate_11 (the iter loop inside an invoke); the budget of an
    # open slice is that invoke's max_new_tokens (nnsight's default_all).
    read = f"model.layers.{READ_LAYER}"
    with model.generate(max_new_tokens=4, ignore_eos=True) as tracer:
        with tracer.invoke(PROMPT, max_new_tokens=2):
            short = list().save()
            for _ in tracer.iter[:]:
                short.append(model.model.layers[READ_LAYER].output)
        with tracer.invoke("Hello world"):
            long = list().save()
            for _ in tracer.iter[:]:
                long.append(model.model.layers[READ_LAYER].output)
    assert len(short) == 2 and len(long) == 4
    for got_list, prompt in ((short, PROMPT), (long, "Hello world")):
        ref = raw_generate(model._model, _ids(model, prompt), len(got_list), model._pad_id,
                           capture={read: lambda o: o}).captured[read]
        for got, want in zip(got_list, ref, strict=True):
            assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_saved_list_and_dict_hold_tensors_after_the_block(model):
    # nnsight: docs/usage/save.md (`list().save()` / pymount: .save() on any object).
    with model.trace(PROMPT):
        layers = list().save()
        norms = dict().save()
        for i in range(2):
            h = model.model.layers[i].output
            layers.append(h)                       # unsaved proxy: saved with the list
            norms[f"layer{i}"] = h.norm().save()   # already saved: kept as is
    ref = raw_generate(model._model, _ids(model), 1, model._pad_id,
                       capture={f"model.layers.{i}": lambda o: o for i in range(2)})
    assert type(layers) is list and type(norms) is dict
    for i in range(2):
        want = ref.captured[f"model.layers.{i}"][0]
        assert torch.allclose(layers[i], want, atol=1e-5, rtol=0)
        assert torch.allclose(norms[f"layer{i}"], want.norm(), atol=1e-4, rtol=0)
    assert not hasattr([], "save")  # .save() on plain objects exists only inside a trace


def test_with_all_scope_runs_its_body_once_per_step(model):
    # nnsight's deprecated `with tracer.all():` form runs the block once per step
    # (iterator.py Iterations.execute): an append gives one item per step, and a name bound to
    # a save inside holds the last step's value (test_with_step_scopes.py: nnsight's numbers).
    read = f"model.layers.{READ_LAYER}"
    with model.generate(PROMPT, max_new_tokens=3, ignore_eos=True) as tracer:
        every = list().save()
        with tracer.all():
            every.append(model.model.layers[READ_LAYER].output)
            last = model.model.layers[READ_LAYER].output.save()
    ref = raw_generate(model._model, _ids(model), 3, model._pad_id,
                       capture={read: lambda o: o}).captured[read]
    assert len(every) == 3
    for got, want in zip(every, ref, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert isinstance(last, torch.Tensor) and torch.allclose(last, ref[2], atol=1e-5, rtol=0)
    saves = [(n.steps.start, n.steps.stop) for n in tracer.graph.nodes if n.op == "save"]
    assert sorted(saves) == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3)]


def test_shapes_unpack_at_every_step(model):
    # nnsight users write `B, S, H = x.shape` in step loops. At step 0 the sizes are ints;
    # later steps have a different sequence length, so each size is a value of the graph
    # (the rank is the same at every step), and a tuple output unpacks at every step too.
    attn = f"model.layers.{READ_LAYER}.self_attn"
    with model.generate(PROMPT, max_new_tokens=N_NEW, ignore_eos=True) as tracer:
        heads, sizes = list().save(), list().save()
        for _ in tracer.iter[:]:
            h = model.model.layers[EDIT_LAYER].output
            B, S, H = h.shape
            h[:, S - 1] = h[:, S - 1] * 0.5
            out, _weights = model.model.layers[READ_LAYER].self_attn.output
            B2, S2, H2 = out.shape
            heads.append(out.view(B2, S2, 4, H2 // 4)[:, -1])
            sizes.append(h.dim())

    def halve_last(step, o):
        o = o.clone()
        o[:, -1] *= 0.5
        return o

    ref = raw_generate(model._model, _ids(model), N_NEW, model._pad_id,
                       edits={f"model.layers.{EDIT_LAYER}": halve_last},
                       capture={attn: lambda o: o[0][:, -1].view(1, 4, -1)})
    assert sizes == [3] * N_NEW and len(heads) == N_NEW
    for got, want in zip(heads, ref.captured[attn], strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.equal(tracer.result[0], ref.ids)
    with pytest.raises(TracingError, match=r"len\(\)"):
        with model.generate(PROMPT, max_new_tokens=N_NEW) as tracer:
            for _ in tracer.iter[1:]:
                len(model.model.layers[0].output)


def test_step_loop_misuse_is_refused_clearly(model):
    # nnsight raises ValueError for negative steps (iter-all-next.md "Gotchas"); vinterp also
    # refuses steps past the budget instead of silently never running them.
    cases = {
        "step 7, but this generation has max_new_tokens=5": lambda t: list(t.iter[2:8]),
        "no negative step": lambda t: t.iter[-1],
        "list of steps must hold": lambda t: t.iter[[0, -2]],
        "max_new_tokens=5": lambda t: list(t.iter[[1, 5]]),
    }
    for message, use in cases.items():
        with pytest.raises(TracingError, match=message):
            with model.generate(PROMPT, max_new_tokens=N_NEW) as tracer:
                use(tracer)
    with pytest.raises(TracingError, match="inside another step loop"):
        with model.generate(PROMPT, max_new_tokens=N_NEW) as tracer:
            for _ in tracer.iter[:2]:
                for _ in tracer.iter[:2]:
                    pass
    with pytest.raises(TracingError, match="tracer.next\\(\\) inside"):
        with model.generate(PROMPT, max_new_tokens=N_NEW) as tracer:
            for _ in tracer.iter[:2]:
                tracer.next()
    with pytest.raises(TracingError, match="would widen the loop"):
        with model.generate(PROMPT, max_new_tokens=N_NEW) as tracer:
            for _ in tracer.iter[:2]:
                with tracer.all():
                    pass
    with pytest.raises(TracingError, match="model.trace runs one forward"):
        with model.trace(PROMPT) as tracer:
            for _ in tracer.iter[:3]:
                pass
    with pytest.raises(TracingError, match="the bounds must be ints"):
        with model.generate(PROMPT, max_new_tokens=N_NEW) as tracer:
            tracer.iter[: model.model.layers[0].output.argmax()]


def test_steps_an_invoke_never_ran_give_no_items(model):
    # nnsight (docs/gotchas/iteration.md): iterations that did not happen append nothing and
    # their values were "not provided". Here the invoke's own budget (2) ends it before step 3
    # while the batch goes on to 5 steps for the other invoke.
    read = f"model.layers.{READ_LAYER}"
    with model.generate(max_new_tokens=5, ignore_eos=True) as tracer:
        with tracer.invoke("Hi", max_new_tokens=2):
            hs = list().save()
            hs.append(model.model.layers[READ_LAYER].output)   # step 0
            tracer.next(3)
            hs.append(model.model.layers[READ_LAYER].output)   # step 3: never runs here
            late = model.model.layers[READ_LAYER].output.save()
        with tracer.invoke(PROMPT):
            pass
    ref = raw_generate(model._model, _ids(model, "Hi"), 1, model._pad_id,
                       capture={read: lambda o: o}).captured[read]
    assert len(hs) == 1 and torch.allclose(hs[0], ref[0], atol=1e-5, rtol=0)
    with pytest.raises(TracingError, match="step 3, which never ran"):
        late.shape  # noqa: B018



def test_saved_name_holds_the_last_step_when_generation_stops_early(backend, hf_model):
    # nnsight's loop ends with the generation: `h = ....save()` rebound each step keeps the
    # last step that ran, and appends stop there. Here the token greedy decoding makes at step
    # 1 is named the EOS (HF's eos_token_id), so a 4-step loop stops after step 1.
    _, model = backend
    hf = hf_model("tiny-llama")
    read = f"model.layers.{READ_LAYER}"
    ids = _ids(hf)
    ref = raw_generate(hf._model, ids, 4, hf._pad_id, capture={read: lambda o: o})
    eos = int(ref.ids[len(ids) + 1])
    with model.generate(PROMPT, max_new_tokens=4, eos_token_id=eos) as tracer:
        hs = list().save()
        for _step in tracer.iter[:]:
            h = model.model.layers[READ_LAYER].output.save()
            hs.append(model.model.layers[READ_LAYER].output)
    assert tracer.result[0].tolist() == ref.ids[: len(ids) + 2].tolist()
    assert len(hs) == 2
    assert torch.allclose(torch.as_tensor(h), ref.captured[read][1], atol=1e-4, rtol=0)
    # the name rebound each step and saved only after the loop: the same last step (it used
    # to fail, "a value it needs was never computed", for the steps that never ran)
    with model.generate(PROMPT, max_new_tokens=4, eos_token_id=eos) as tracer:
        for _step in tracer.iter[:]:
            last = model.model.layers[READ_LAYER].output[:, -1]
        last = last.save()
    assert torch.allclose(torch.as_tensor(last), ref.captured[read][1][:, -1], atol=1e-4,
                          rtol=0)
