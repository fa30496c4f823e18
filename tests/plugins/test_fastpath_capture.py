"""Position-selected captures (``x[:, -1]``, ``tracer.cache(positions=...)``) on the fast path.

They must be planned as vectorized captures (no per-request graph runner) and save exactly
what the HF backend saves for the same trace, including prompts that chunked prefill splits
(tiny-llama, ``max_num_batched_tokens=32``) and decode steps in ``tracer.all()``.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import rel_err

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vinterp import LanguageModel  # noqa: E402
from vinterp_vllm.fastpath import plan_for  # noqa: E402

PROMPTS = [
    "Hi",  # one token: -1 and [0, -1] resolve against a length of 1
    "The quick brown fox jumps over the lazy dog. " * 6,   # 61 tokens: two prefill chunks
    "One two three four five six seven eight nine ten eleven twelve thirteen",
]
LAYERS = (0, 1)


@pytest.fixture(scope="session")
def models(tiny_path):
    hf = LanguageModel(tiny_path)
    vl = LanguageModel(tiny_path, backend="vllm", max_num_batched_tokens=32, max_model_len=256,
                       max_num_seqs=32)
    # session-scoped and never closed: tearing an in-process engine down (closing it, or its
    # garbage collection) resets vLLM's distributed state, which conftest's tiny_vllm still uses
    return {"hf": hf, "vllm": vl}


def _plan(tracer, invoke: int = 0):
    g = tracer.graph
    points = {(n.kwargs["module"], n.kwargs["kind"]): "residual"
              for n in g.nodes if n.op == "read"}
    return plan_for(g, invoke, points, torch.float32)


def _last_and_positions(model):
    """Per prompt: x[:, -1], x[:, -1, :], x[0, -2] and cache(positions=[0, -1]) per layer."""
    saves, plans = [], []
    with model.trace() as tracer:
        for p in PROMPTS:
            with tracer.invoke(p):
                layers = [model.model.layers[i] for i in LAYERS]
                saves.append({
                    "last": [m.output[:, -1].save() for m in layers],
                    "last3": [m.output[:, -1, :].save() for m in layers],
                    "d0": layers[0].output[0, -2].save() if len(p) > 2 else None,
                    "cache": tracer.cache(layers, positions=[0, -1]),
                    "slice": layers[1].output[:, 1:4].save() if len(p) > 2 else None,
                })
    plans = [_plan(tracer, i) for i in range(len(PROMPTS))]
    return saves, plans


def test_last_token_and_positions_equal_hf(models):
    got = {name: _last_and_positions(m) for name, m in models.items()}
    (hf, _), (vl, plans) = got["hf"], got["vllm"]
    assert all(p is not None for p in plans)  # every invoke takes the vectorized path
    for i in range(len(PROMPTS)):
        for key in ("last", "last3", "d0", "slice"):
            a, b = vl[i][key], hf[i][key]
            for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b],
                            strict=True):
                if y is None:
                    continue
                assert x.shape == y.shape, (i, key)
                assert rel_err(x, y) < 1e-4, (i, key)
        for path, y in hf[i]["cache"].items():
            x = vl[i]["cache"][path]
            assert x.shape == y.shape == (1, 2, y.shape[-1])
            assert rel_err(x, y) < 1e-4, (i, path)


def test_generate_last_token_every_step_equals_hf(models):
    out = {}
    for name, model in models.items():
        with model.generate(max_new_tokens=4) as tracer:
            saved = []
            for p in PROMPTS[1:]:
                steps = list().save()
                with tracer.invoke(p), tracer.all():   # the body runs once per step
                    steps.append(model.model.layers[1].output[:, -1].save())
                saved.append(steps)
        out[name] = (saved, [_plan(tracer, i) for i in range(2)])
    (hf, _), (vl, plans) = out["hf"], out["vllm"]
    assert all(p is not None for p in plans)
    for x_steps, y_steps in zip(vl, hf, strict=True):
        assert len(x_steps) == len(y_steps) == 4
        for x, y in zip(x_steps, y_steps, strict=True):
            assert x.shape == y.shape
            assert rel_err(x, y) < 1e-4


def test_unsupported_keys_keep_the_general_path(models):
    model = models["vllm"]
    with model.trace() as tracer:
        with tracer.invoke(PROMPTS[2]):
            x = model.model.layers[0].output
            x[:, -1, 3].save()          # selects within the hidden dim
    assert _plan(tracer) is None
    with pytest.raises(Exception, match="out of bounds"):  # the general path raises as HF
        with model.trace() as tracer:
            with tracer.invoke(PROMPTS[2]):
                model.model.layers[0].output[:, [0, 99]].save()
    assert _plan(tracer) is None


def test_equal_keys_share_a_selection_but_bools_and_floats_never_pass_as_ints():
    from vinterp.ir.schema import SliceV, TupleV
    from vinterp_vllm.actions import NotFast, selection

    full = SliceV(slice=(None, None, None))
    one = selection(TupleV(tuple=(full, 1)), 5, True, False)
    assert one is selection(TupleV(tuple=(full, 1)), 5, True, False)   # resolved once
    assert one.prompt_index == (1,)
    assert selection(TupleV(tuple=(full, -1)), 5, True, False).prompt_index == (4,)
    for odd in (True, 1.0):   # equal to 1 in Python, but HF indexes differently
        with pytest.raises(NotFast):
            selection(TupleV(tuple=(full, odd)), 5, True, False)


SAME_LENGTH = ["red apple pie", "blue sky now", "old stone wall", "big dog runs"]


def test_invokes_doing_the_same_share_one_parsed_graph(models):
    """A loop of invokes over prompts of one length sends one request graph text; the worker
    parses it once, and each request still gets its own values (the HF backend's)."""
    llm = models["vllm"]._backend.llm
    before = llm.collective_rpc("vinterp_stats")[0]["parsed_graphs"]
    got = {}
    for name in ("hf", "vllm"):
        model = models[name]
        with model.trace() as tracer:
            got[name] = []
            for p in SAME_LENGTH:
                with tracer.invoke(p):
                    got[name].append([model.model.layers[j].output[:, -1].save()
                                      for j in LAYERS])
    after = llm.collective_rpc("vinterp_stats")[0]["parsed_graphs"]
    assert after - before <= 1   # one text for the four invokes (or already cached)
    for hf_vals, vl_vals in zip(got["hf"], got["vllm"], strict=True):
        for a, b in zip(hf_vals, vl_vals, strict=True):
            assert a.shape == b.shape and rel_err(b, a) < 1e-4
