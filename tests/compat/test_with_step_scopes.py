"""nnsight's block forms ``with tracer.all():`` / ``with tracer.iter[a:b]:`` on hf and vllm.

nnsight 0.8.1 (deprecated there, still run: ``Iterations.execute`` re-runs the block once per
step) gives one list item per step for an append inside, leaves a name bound to ``.save()``
inside holding the last step's value, and runs the block's Python once per step. Values are
nnsight's own (nnsight_reference.json, ``record_with_forms`` in record_nnsight.py). Sources:
- docs/usage/iter-all-next.md
  https://github.com/ndif-team/nnsight/blob/main/docs/usage/iter-all-next.md
- nnsight/intervention/iterator.py (``Iterations.execute``, the block form)
"""

from __future__ import annotations


import pytest
import torch
from nnsight_recorded import ATOL, REF
from compat_reference import raw_generate

from vinterp.tracing.errors import TracingError

PROMPT, N_NEW = REF["prompt"], REF["max_new_tokens"]


def _close(got, want, name):
    return torch.allclose(got.cpu(), torch.tensor(want), atol=ATOL[name], rtol=0)


def test_with_all_append_and_save_match_nnsight(backend):
    name, model = backend
    ref = REF["with_all"]
    with model.generate(PROMPT, max_new_tokens=4, ignore_eos=True) as tracer:
        hs = list().save()
        with tracer.all():
            last = model.model.layers[0].output.save()
            hs.append(model.model.layers[0].output)
    assert [list(h.shape) for h in hs] == ref["shapes"]          # one item per step
    assert all(_close(h[0, -1], w, name) for h, w in zip(hs, ref["hidden"], strict=True))
    assert isinstance(last, torch.Tensor) and list(last.shape) == ref["saved_shape"]
    assert ref["saved_is_last"] and torch.equal(last, hs[-1])    # the last step's value
    assert _close(last[0, -1], ref["saved"], name)


def test_with_all_runs_the_python_once_per_step(backend):
    _, model = backend
    with model.generate(PROMPT, max_new_tokens=4, ignore_eos=True) as tracer:
        count = [0]
        counts = list().save()
        with tracer.all():
            model.model.layers[0].output  # noqa: B018
            count[0] += 1
            counts.append(count[0])
    assert counts == REF["with_all_counter"] == [1, 2, 3, 4]


def test_with_all_edit_every_step_matches_nnsight(backend):
    _, model = backend
    with model.generate(PROMPT, max_new_tokens=3, ignore_eos=True) as tracer:
        preds = list().save()
        with tracer.all():
            model.model.layers[0].output[:] = 0
            preds.append(model.lm_head.output[0, -1].argmax(dim=-1))
    assert [int(p) for p in preds] == REF["with_all_zero"]


def test_with_iter_slice_matches_nnsight(backend):
    name, model = backend
    ref = REF["with_iter"]
    with model.generate(PROMPT, max_new_tokens=N_NEW, ignore_eos=True) as tracer:
        first3 = list().save()
        with tracer.iter[0:3]:
            first3.append(model.model.layers[0].output)
    assert [list(h.shape) for h in first3] == ref["shapes"]
    assert all(_close(h[0, -1], w, name) for h, w in zip(first3, ref["hidden"], strict=True))
    with model.generate(PROMPT, max_new_tokens=N_NEW, ignore_eos=True) as tracer:
        mid = list().save()
        with tracer.iter[1:3]:
            model.model.layers[0].output[:] = 0
            mid.append(model.lm_head.output[0, -1].argmax(dim=-1))
        ids = tracer.result.save()
    assert [int(p) for p in mid] == ref["edit_1_3_predictions"]
    assert ids.tolist() == [[int(t) for t in row] for row in ref["edit_1_3_ids"]]


def test_in_a_function_names_bound_per_step_reach_the_caller(backend):
    # the block's names are the enclosing function's locals (written back after the steps)
    name, model = backend

    def run():
        with model.generate(PROMPT, max_new_tokens=4, ignore_eos=True) as tracer:
            hs = list().save()
            n = 0
            with tracer.all():
                n += 1
                h = model.model.layers[0].output.save()
                hs.append(model.model.layers[0].output)
        return n, h, hs

    n, h, hs = run()
    assert n == 4 and len(hs) == 4 and torch.equal(h, hs[-1])
    assert _close(h[0, -1], REF["with_all"]["saved"], name)


def test_pure_edits_are_recorded_once_for_every_step(backend):
    # nothing observable differs between once and once per step: one node per edit (the vLLM
    # fast path's vectorized steering), the same tokens as the unrolled loop
    _, model = backend
    v = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4
    with model.generate(PROMPT, max_new_tokens=4, ignore_eos=True) as tracer:
        with tracer.all():
            model.model.layers[0].output.steer(v)
            for i in (0, 1):
                model.model.layers[i].output[:] += v
    assert {(n.steps.start, n.steps.stop) for n in tracer.graph.nodes} == {(0, None)}
    assert sum(n.op == "steer" for n in tracer.graph.nodes) == 1
    with model.generate(PROMPT, max_new_tokens=4, ignore_eos=True) as unrolled:
        for _ in unrolled.iter[:]:
            model.model.layers[0].output.steer(v)
            for i in (0, 1):
                model.model.layers[i].output[:] += v
    assert tracer.result[0].tolist() == unrolled.result[0].tolist()


def test_a_body_drawing_random_numbers_draws_fresh_ones_each_step(hf_model):
    """``torch.randn`` in a body that only edits looked pure, so it was recorded once and the
    same noise went in at every step; nnsight runs the body per step, drawing anew. The
    reference adds fresh noise per step with a raw hook, drawn from the same seed."""
    model = hf_model("tiny-llama")
    torch.manual_seed(1)
    with model.generate(PROMPT, max_new_tokens=3, ignore_eos=True) as tracer:
        with tracer.all():
            model.model.layers[0].output[:, -1] += torch.randn(64) * 5
    torch.manual_seed(1)
    noise = [torch.randn(64) * 5 for _ in range(3)]

    def add(step, out):
        out = out.clone()
        out[:, -1] += noise[step]
        return out

    ref = raw_generate(model._model, model.tokenizer(PROMPT)["input_ids"], 3, model._pad_id,
                       edits={"model.layers.0": add})
    assert len(tracer.graph.tensors) == 3                     # one draw per step
    assert tracer.result[0].tolist() == ref.ids.tolist()


def test_saved_name_holds_the_last_step_its_invoke_ran(hf_model):
    # nnsight's loop ends with the generation: the name keeps the last step that ran. Here the
    # invoke's own budget (2) ends it while the batch runs 4 steps.
    model = hf_model("tiny-llama")
    with model.generate(max_new_tokens=4, ignore_eos=True) as tracer:
        with tracer.invoke(PROMPT, max_new_tokens=2):
            hs = list().save()
            with tracer.all():
                h = model.model.layers[1].output.save()
                hs.append(model.model.layers[1].output)
        with tracer.invoke("Hello world"):
            pass
    ids = model.tokenizer(PROMPT)["input_ids"]
    ref = raw_generate(model._model, ids, 2, model._pad_id,
                       capture={"model.layers.1": lambda o: o}).captured["model.layers.1"]
    assert len(hs) == 2 and torch.allclose(h, ref[1], atol=1e-5, rtol=0)


def test_block_forms_refuse_what_cannot_run_per_step(hf_model):
    model = hf_model("tiny-llama")
    with pytest.raises(TracingError, match="last in the `with`"):
        with model.generate(max_new_tokens=2) as tracer:
            with tracer.all(), tracer.invoke(PROMPT):
                model.model.layers[0].output.save()
    with pytest.raises(TracingError, match="step 5, but this generation has max_new_tokens=3"):
        with model.generate(PROMPT, max_new_tokens=3) as tracer:
            with tracer.iter[2:6]:
                model.model.layers[0].output.save()
    # source not readable (exec of a string): it cannot run per step; refused if it saves
    code = ("with model.generate(PROMPT, max_new_tokens=2) as tracer:\n"
            "    hs = list().save()\n"
            "    with tracer.all():\n"
            "        hs.append(model.model.layers[0].output)\n")
    with pytest.raises(TracingError, match="source cannot be read"):
        exec(code, {"model": model, "PROMPT": PROMPT})  # noqa: S102
