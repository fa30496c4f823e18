"""Idiomatic nnsight writes take the vectorized path, as the steering shortcuts do.

``x[:] += v``, ``x[:, -1] += v``, ``x[:, idx] += v``, ``x[:] = x + v``, ``x += v``,
``x[:] *= s`` and ``x[:] = x - (x @ d)[..., None] * d`` must (a) be planned as vectorized
steering actions (``plan_for`` returns a plan), (b) give on vLLM the HF backend's values and
tokens and the matching shortcut's (``.steer`` / ``.scale`` / ``.ablate``), at one layer,
every layer and every generation step (``tracer.all()`` and unrolled ``tracer.iter[:]``
loops). (c) Near misses stay on the general path and are still right.

Tolerances: steer and scale idioms run the shortcut's exact float ops, so on vLLM they equal
the shortcut bit for bit. The ablation's projection is ``(x * d).sum(-1)`` on the fast path
where the idiom writes ``x @ d`` (another summation order: ~1e-7 relative). Against HF
every value is within the backends' usual 1e-4 (vLLM's own kernels already differ from HF's
at that level); generated tokens are identical.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import on_engine, rel_err

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vinterp import LanguageModel  # noqa: E402
from vinterp_vllm.fastpath import _merge_steps, plan_for  # noqa: E402
from vinterp_vllm.points import resolve_point  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "The quick brown fox jumps over the lazy dog. " * 6,   # 61 tokens: two prefill chunks
    "Hi",
]
NEW = 5
TOL = 1e-4


@pytest.fixture(scope="session")
def models(tiny_path, tiny_vllm):
    """HF and vLLM LanguageModels; the vLLM one wraps conftest's engine (no second engine)."""
    hf = LanguageModel(tiny_path)
    return {"hf": hf, "vllm": on_engine(hf, tiny_vllm)}


@pytest.fixture(scope="session")
def vecs():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, generator=g)
    d = torch.randn(64, generator=g)
    return {"v": v, "d": d / d.norm(), "w": torch.randn(64, generator=g)}


def _plans(model, tracer):
    graph = tracer.graph
    arch = model._backend.arch
    kinds = {(n.kwargs["module"], n.kwargs["kind"]): None for n in graph.nodes
             if n.op in ("read", "write")}
    kinds = {p: resolve_point(arch, *p).value for p in kinds}
    return [plan_for(graph, i, kinds, torch.float32) for i in range(len(graph.invokes))]


# ------------------------------------------------------------------ the idioms
# each: (idiom(layer, vecs), shortcut(layer, vecs), exact on vLLM, ops it plans)
def _add_all(m, t):
    m.output[:] += t["v"]


def _add_last(m, t):
    m.output[:, -1] += t["v"]


def _add_idx(m, t):
    m.output[:, [0, 1]] += t["v"]


def _add_int(m, t):
    m.output[:, 1] += t["v"]


def _assign_sum(m, t):
    x = m.output
    m.output[:] = x + t["v"]


def _iadd_write(m, t):
    m.output += t["v"]


def _iadd_local(m, t):
    x = m.output
    x += t["v"]


def _sub_last(m, t):
    m.output[:, -1] -= t["v"]


def _scale(m, t):
    m.output[:] *= 1.5


def _assign_scale(m, t):
    x = m.output
    m.output[:] = x * 1.5


def _ablate(m, t):
    x = m.output
    m.output[:] = x - (x @ t["d"])[..., None] * t["d"]


def _ablate_unsqueeze(m, t):
    x = m.output
    m.output[:] -= (x @ t["d"]).unsqueeze(-1) * t["d"]


IDIOMS = {
    "x[:] += v": (_add_all, lambda m, t: m.output.steer(t["v"]), True, "steer"),
    "x[:, -1] += v": (_add_last, lambda m, t: m.output.steer(t["v"], positions=-1), True,
                      "steer"),
    "x[:, [0, 1]] += v": (_add_idx, lambda m, t: m.output.steer(t["v"], positions=[0, 1]),
                          True, "steer"),
    "x[:, 1] += v": (_add_int, lambda m, t: m.output.steer(t["v"], positions=1), True, "steer"),
    "x[:] = x + v": (_assign_sum, lambda m, t: m.output.steer(t["v"]), True, "steer"),
    "x += v (written back)": (_iadd_write, lambda m, t: m.output.steer(t["v"]), True, "steer"),
    "x += v (in place)": (_iadd_local, lambda m, t: m.output.steer(t["v"]), True, "steer"),
    "x[:, -1] -= v": (_sub_last, lambda m, t: m.output.steer(-t["v"], positions=-1), True,
                      "steer"),
    "x[:] *= s": (_scale, lambda m, t: m.output.scale(1.5), True, "scale"),
    "x[:] = x * s": (_assign_scale, lambda m, t: m.output.scale(1.5), True, "scale"),
    "x[:] = x - (x @ d)[..., None] * d": (_ablate, lambda m, t: m.output.ablate(t["d"]), False,
                                          "ablate"),
    "x[:] -= (x @ d).unsqueeze(-1) * d": (_ablate_unsqueeze,
                                          lambda m, t: m.output.ablate(t["d"]), False, "ablate"),
}


#: keys that select nothing in a one-token prompt ("Hi"): HF raises, so not planned
ONE_TOKEN_MISSES = {"x[:, [0, 1]] += v", "x[:, 1] += v"}


def _trace(model, edit, layers, vecs, prompts=PROMPTS):
    """One invoke per prompt, ``edit`` at ``layers``; saves both layers' outputs."""
    saves = []
    with model.trace() as tracer:
        for p in prompts:
            with tracer.invoke(p):
                for i in layers:
                    edit(model.model.layers[i], vecs)
                saves.append([model.model.layers[i].output.save() for i in (0, 1)])
    return tracer, saves


def _close(a, b, exact):
    assert a.shape == b.shape
    if exact:
        assert torch.equal(a, b)
    else:
        assert rel_err(a, b) < TOL


@pytest.mark.parametrize("layers", [(1,), (0, 1)], ids=["one layer", "every layer"])
@pytest.mark.parametrize("name", list(IDIOMS))
def test_idiom_trace(models, vecs, name, layers):
    idiom, shortcut, exact, op = IDIOMS[name]
    prompts = PROMPTS[:2] if name in ONE_TOKEN_MISSES else PROMPTS
    tracer, got = _trace(models["vllm"], idiom, layers, vecs, prompts)
    plans = _plans(models["vllm"], tracer)
    assert all(p is not None for p in plans), name
    assert {a.op for p in plans for acts in p.values() for a in acts} == {op, "capture"}
    _, ref = _trace(models["hf"], idiom, layers, vecs, prompts)
    _, short = _trace(models["vllm"], shortcut, layers, vecs, prompts)
    for g, r, s in zip(got, ref, short, strict=True):
        for x, y, z in zip(g, r, s, strict=True):
            assert rel_err(x, y) < TOL, name
            _close(x, z, exact)


def _generate(model, edit, vecs, form, layers=(0, 1)):
    """Greedy generation with ``edit`` at ``layers`` at every step; tokens and per-step saves."""
    with model.generate(max_new_tokens=NEW) as tracer:
        with tracer.invoke(PROMPTS[0]):
            if form == "all":
                h = list().save()
                with tracer.all():          # nnsight's block form: its body runs per step
                    for i in layers:
                        edit(model.model.layers[i], vecs)
                    h.append(model.model.layers[1].output)
            else:
                h = list().save()
                for step in tracer.iter[:]:
                    for i in layers:
                        edit(model.model.layers[i], vecs)
                    h.append(model.model.layers[1].output)
        with tracer.invoke(PROMPTS[1]):     # a second request in the batch, edited too
            with tracer.all():
                model.model.layers[0].output[:] += vecs["w"]
        ids = tracer.result.save()
    return tracer, ids, list(h)


GEN_IDIOMS = ["x[:] += v", "x[:, -1] += v", "x[:] = x + v", "x += v (written back)",
              "x[:] *= s", "x[:] = x - (x @ d)[..., None] * d"]


@pytest.mark.parametrize("form", ["all", "iter"])
@pytest.mark.parametrize("name", GEN_IDIOMS)
def test_idiom_every_step(models, vecs, name, form):
    idiom, _, exact, op = IDIOMS[name]
    tracer, ids, hs = _generate(models["vllm"], idiom, vecs, form)
    plans = _plans(models["vllm"], tracer)
    assert all(p is not None for p in plans), name
    for acts in plans[0].values():      # per-step copies merged: one slot per edit kind
        assert len([a for a in acts if a.op != "capture"]) <= 2
    _, ref_ids, ref_hs = _generate(models["hf"], idiom, vecs, form)
    assert torch.equal(ids, ref_ids)
    assert len(hs) == len(ref_hs) == NEW
    for x, y in zip(hs, ref_hs, strict=True):
        assert x.shape == y.shape and rel_err(x, y) < TOL


def test_last_position_every_step_is_the_shortcut_pair(models, vecs):
    """``x[:, -1] += v`` at every step = ``.steer(positions=-1)`` at step 0, then ``.steer``."""
    model = models["vllm"]

    def run(idiom):
        with model.generate(PROMPTS[0], max_new_tokens=NEW) as tracer:
            h = list().save()
            for step in tracer.iter[:]:
                out = model.model.layers[1].output
                if idiom:
                    out[:, -1] += vecs["v"]
                else:
                    out.steer(vecs["v"], positions=-1 if step == 0 else None)
                h.append(model.model.layers[1].output)
            ids = tracer.result.save()
        return ids, list(h)

    ids, hs = run(True)
    ids2, hs2 = run(False)
    assert torch.equal(ids, ids2)
    for x, y in zip(hs, hs2, strict=True):
        assert torch.equal(x, y)


def test_appended_last_positions_in_all_steps_are_planned(models, vecs):
    """``steps.append(x[:, -1])`` in ``tracer.all()`` (no ``.save()``: the list is saved)
    records every step's read before the saves; those saves are captures, not edits, so the
    vectorized path serves it as it serves ``x[:, -1].save()`` (it used to fall back to the
    general path, which refuses prompts longer than one forward's chunk). Values equal HF."""
    got = {}
    for name, model in models.items():
        with model.generate(PROMPTS[0], max_new_tokens=NEW) as tracer:
            steps = list().save()
            with tracer.all():
                model.model.layers[1].output.steer(vecs["v"])
                steps.append(model.model.layers[1].output[:, -1])
        if name == "vllm":
            assert all(p is not None for p in _plans(model, tracer))
        got[name] = list(steps)
    assert len(got["vllm"]) == len(got["hf"]) == NEW
    for x, y in zip(got["vllm"], got["hf"], strict=True):
        assert rel_err(x, y) < 1e-4


# ------------------------------------------------------------------ near misses
# each edits layer 1 of ``model`` (``L`` = model.model.layers)
def _times_two_plus(L, t):
    x = L[1].output
    L[1].output[:] = x * 2 + t["v"]


def _other_layer(L, t):
    L[1].output[:] = L[0].output + t["v"]


def _add_other_layer(L, t):
    L[1].output[:] += L[0].output[:, -1]


def _per_row(L, t):
    L[1].output[:, [0, 1]] += torch.stack([t["v"], t["w"]])


def _div(L, t):
    L[1].output[:] /= 2.0


def _stale(L, t):
    """``y = x + v``, another edit of x, then ``x[:] = y``: y predates the edit."""
    x = L[1].output
    y = x + t["v"]
    L[1].output.steer(t["w"])
    L[1].output[:] = y


NEAR = {
    "x[:] = x * 2 + v": _times_two_plus,
    "x[:] = other layer + v": _other_layer,
    "x[:] += other layer[:, -1]": _add_other_layer,
    "x[:, [0, 1]] += per-row vectors": _per_row,
    "x[:] /= 2": _div,
    "edit between value and write": _stale,
}


@pytest.mark.parametrize("name", list(NEAR))
def test_near_miss_general_path(models, vecs, name):
    edit = NEAR[name]
    out = {}
    # the general path needs whole prompts in one forward (<= max_num_batched_tokens = 32)
    prompts = [PROMPTS[0], "One two three four five six seven eight nine ten"]
    for backend, model in models.items():
        with model.trace() as tracer:
            for p in prompts:
                with tracer.invoke(p):
                    edit(model.model.layers, vecs)
                    out.setdefault(backend, []).append(model.model.layers[1].output.save())
        if backend == "vllm":
            assert all(p is None for p in _plans(model, tracer)), name
    for x, y in zip(out["vllm"], out["hf"], strict=True):
        assert x.shape == y.shape and rel_err(x, y) < TOL, name


def _non_unit_ablate(m, t):
    x = m.output
    m.output[:] = x - (x @ t["w"])[..., None] * t["w"]


def test_raw_direction_projection(models, vecs):
    """``x - (x @ w)[..., None] * w`` with a non-unit ``w``: the same formula, planned as is."""
    tracer, got = _trace(models["vllm"], _non_unit_ablate, (1,), vecs, PROMPTS[:1])
    assert _plans(models["vllm"], tracer)[0] is not None
    _, ref = _trace(models["hf"], _non_unit_ablate, (1,), vecs, PROMPTS[:1])
    for x, y in zip(got[0], ref[0], strict=True):
        assert rel_err(x, y) < TOL


def test_position_key_out_of_range_at_decode_steps(models, vecs):
    """``x[:, [0, 1]] += v`` at decode steps raises IndexError in HF: general path, error too."""
    for model in (models["hf"], models["vllm"]):
        with pytest.raises(Exception, match="out of bounds|IndexError|index"):
            with model.generate(PROMPTS[0], max_new_tokens=2) as tracer:
                with tracer.all():
                    _add_idx(model.model.layers[1], vecs)
        if model is models["vllm"]:
            assert _plans(model, tracer)[0] is None


def test_merge_keeps_step_order():
    """Per-step blocks merge only when equal; a step with an extra edit stays its own block."""
    from vinterp.ir.schema import Node
    from vinterp_vllm.actions import Action

    node = Node(id=0, op="steer")

    def act(op, s, key="v"):
        a = Action(op, node, s, s + 1, vec_key=key)
        a.spec_key = "None"
        return a

    acts = [act("steer", 0), act("steer", 1), act("steer", 2), act("scale", 2, 1.5),
            act("steer", 3), act("steer", 4)]
    merged = _merge_steps(acts)
    assert [(a.op, a.start, a.stop) for a in merged] == [
        ("steer", 0, 2), ("steer", 2, 3), ("scale", 2, 3), ("steer", 3, 5)]
    other = [act("steer", 0), act("steer", 1, key="w")]
    assert [(a.start, a.stop) for a in _merge_steps(other)] == [(0, 1), (1, 2)]
