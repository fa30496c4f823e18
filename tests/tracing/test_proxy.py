"""Proxy operations against hand-written torch math on the saved values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vinterp
from vinterp.tracing.errors import TracingError

PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def model(hf_model):
    return hf_model("tiny-llama")


@pytest.fixture(scope="module")
def base(model):
    with model.trace(PROMPT):
        h0 = model.layers[0].output.save()
        h1 = model.layers[1].output.save()
        logits = model.logits.save()
    return h0, h1, logits


def test_indexing_methods_and_arithmetic(model, base, roundtrip):
    h0, h1, logits = base
    with model.trace(PROMPT) as tracer:
        h = model.layers[0].output
        last = h[:, -1, :].save()
        mean = h.mean(dim=-1).save()
        norm = h.norm().save()
        sm = h.softmax(-1).save()
        arith = ((h + 1) * 2 - h / 4).save()
        rarith = (1 - h).save()
        neg = (-h).save()
        powed = (h ** 2).save()
        cmp = (h > 0).save()
        eq = ((h * 100).round() == 1).save()
        cloned = h.clone().to(torch.float64).save()
        shp = h.shape
        top = model.logits[0, -1].topk(5)
        vals, idx = top.values.save(), top.indices.save()
        ell = h[..., :3].save()
    assert torch.equal(last, h0[:, -1, :])
    assert torch.equal(mean, h0.mean(dim=-1))
    assert torch.equal(norm, h0.norm())
    assert torch.equal(sm, h0.softmax(-1))
    assert torch.equal(arith, (h0 + 1) * 2 - h0 / 4)
    assert torch.equal(rarith, 1 - h0)
    assert torch.equal(neg, -h0)
    assert torch.equal(powed, h0 ** 2)
    assert torch.equal(cmp, h0 > 0) and cmp.dtype == torch.bool
    assert torch.equal(eq, (h0 * 100).round() == 1) and 0 < int(eq.sum()) < eq.numel()
    assert cloned.dtype == torch.float64 and torch.equal(cloned, h0.double())
    ref = logits[0, -1].topk(5)
    assert torch.equal(vals, ref.values) and torch.equal(idx, ref.indices)
    assert torch.equal(ell, h0[..., :3])
    assert shp == h0.shape  # known at trace time (a meta pass), a real torch.Size
    roundtrip(model, tracer)


def test_allowlisted_torch_functions(model, base, roundtrip):
    h0, h1, logits = base
    with model.trace(PROMPT) as tracer:
        a = model.layers[0].output
        b = model.layers[1].output
        sm = torch.softmax(a, dim=-1).save()
        cat = torch.cat([a, b], dim=1).save()
        st = torch.stack([a, b]).save()
        wh = torch.where(a > 0, a, b).save()
        ein = torch.einsum("bsh,bth->bst", a, b).save()
        gelu = F.gelu(a).save()
        lsm = F.log_softmax(b, dim=-1).save()
        cos = F.cosine_similarity(a, b, dim=-1).save()
        zeros = torch.zeros_like(a).save()
    assert torch.equal(sm, torch.softmax(h0, dim=-1))
    assert torch.equal(cat, torch.cat([h0, h1], dim=1))
    assert torch.equal(st, torch.stack([h0, h1]))
    assert torch.equal(wh, torch.where(h0 > 0, h0, h1))
    assert torch.equal(ein, torch.einsum("bsh,bth->bst", h0, h1))
    assert torch.equal(gelu, F.gelu(h0))
    assert torch.equal(lsm, F.log_softmax(h1, dim=-1))
    assert torch.equal(cos, F.cosine_similarity(h0, h1, dim=-1))
    assert torch.equal(zeros, torch.zeros_like(h0))
    ops = {n.kwargs.get("fn") for n in tracer.graph.nodes if n.op == "call"}
    assert {"torch.softmax", "torch.cat", "torch.stack", "torch.where", "torch.einsum",
            "torch.nn.functional.gelu"} <= ops
    roundtrip(model, tracer)


def test_non_allowlisted_function_raises(model):
    with pytest.raises(TracingError, match="not in vinterp's allowlist"):
        with model.trace(PROMPT):
            torch.fft.fft(model.layers[0].output)
    with pytest.raises(AttributeError, match="not available on a vinterp proxy"):
        with model.trace(PROMPT):
            model.layers[0].output.register_hook(print)


def test_setitem_inplace_and_replacement(model, base, roundtrip):
    h0, h1, logits = base
    with model.trace(PROMPT) as tracer:
        model.layers[0].output[:, 1, :] = 0
        zeroed = model.layers[0].output.save()
        out1 = model.layers[1].output
        out1 += 1.5
        plus = model.layers[1].output.save()
        final = model.logits.save()
    ref0 = h0.clone()
    ref0[:, 1, :] = 0
    assert torch.equal(zeroed, ref0)
    # reference with raw hooks doing the same
    m = model._model
    hs = [m.model.layers[0].register_forward_hook(
              lambda mod, a, o: torch.cat([o[:, :1], torch.zeros_like(o[:, 1:2]), o[:, 2:]], 1)),
          m.model.layers[1].register_forward_hook(lambda mod, a, o: o + 1.5)]
    try:
        with torch.no_grad():
            raw = m(input_ids=torch.tensor([model.tokenizer(PROMPT)["input_ids"]])).logits
    finally:
        for h in hs:
            h.remove()
    assert torch.equal(final, raw)
    assert not torch.equal(final, logits)
    assert plus.shape == h0.shape
    roundtrip(model, tracer)


def test_saves_are_snapshots(model, base):
    h0, _, _ = base
    with model.trace(PROMPT):
        before = model.layers[0].output.save()
        model.layers[0].output[:] = 0
        after = model.layers[0].output.save()
    assert torch.equal(before, h0)
    assert torch.equal(after, torch.zeros_like(h0))


def test_names_lists_and_dicts_hold_tensors_after(model, base):
    h0, h1, _ = base
    with model.trace(PROMPT):
        outs = []
        by_layer = {}
        for i in range(2):
            outs.append(model.layers[i].output.save())
            by_layer[i] = model.layers[i].output.mean(-1).save()
        nested = {"pair": (model.layers[1].output[0, 0].save(), 3)}
        single = model.layers[1].output.save()
    with model.trace(PROMPT):
        many = vinterp.save([model.layers[0].output, model.layers[1].output])
    assert all(isinstance(o, torch.Tensor) for o in outs)
    assert torch.equal(outs[0], h0) and torch.equal(outs[1], h1)
    assert torch.equal(by_layer[1], h1.mean(-1))
    assert isinstance(nested["pair"][0], torch.Tensor) and torch.equal(nested["pair"][0], h1[0, 0])
    assert torch.equal(many[0], h0) and torch.equal(many[1], h1)
    assert torch.equal(single, h1)


def test_vinterp_save_dict(model, base):
    h0, h1, _ = base
    with model.trace(PROMPT):
        d = vinterp.save({"a": model.layers[0].output, "b": model.layers[1].output})
    assert torch.equal(d["a"], h0) and torch.equal(d["b"], h1)


def test_proxy_clamp_is_elementwise_with_numbers(model, base):
    h0, _, _ = base
    with model.trace(PROMPT) as tracer:
        c = model.layers[0].output.clamp(-0.5, 0.5).save()
    assert torch.equal(c, h0.clamp(-0.5, 0.5))
    assert any(n.op == "method" and n.kwargs.get("name") == "clamp" for n in tracer.graph.nodes)


def test_index_keys_that_compare_equal_stay_distinct(model, base):
    # converted index keys are shared between nodes; True == 1 and 1.0 == 1 in Python, but
    # h[:, True] adds a dimension and h[:, 1] picks a position
    h0 = base[0]
    with model.trace(PROMPT):
        h = model.layers[0].output
        pos = h[:, 1].save()
        new_dim = h[:, True].save()
        pos_again = h[:, 1].save()
        sliced = h[:, 1:3].save()
        stepped = h[:, 1:3:1].save()
    assert torch.equal(pos, h0[:, 1]) and torch.equal(pos_again, h0[:, 1])
    assert torch.equal(new_dim, h0[:, True]) and new_dim.shape != pos.shape
    assert torch.equal(sliced, h0[:, 1:3]) and torch.equal(stepped, h0[:, 1:3:1])
