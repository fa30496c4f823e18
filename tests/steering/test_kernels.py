"""Steering shortcuts: kernels against hand math, and as IR nodes of their own in traces."""

from __future__ import annotations

import pytest
import torch

from vinterp.steering.kernels import apply_steering, position_mask

H = 4


def _x():
    torch.manual_seed(0)
    return torch.randn(1, 6, H)


@pytest.mark.parametrize("spec,rows", [
    (None, [0, 1, 2, 3, 4, 5]), ("all", [0, 1, 2, 3, 4, 5]), (2, [2]), (-1, [5]),
    ([0, -2], [0, 4]), (slice(1, 4), [1, 2, 3]), (slice(-3, None), [3, 4, 5]),
    (slice(0, None, 2), [0, 2, 4]), ("prompt", [0, 1, 2, 3, 4, 5]), ("generated", []),
])
def test_steer_positions(spec, rows):
    x = _x()
    v = torch.arange(H, dtype=torch.float32)
    got = x.clone()
    apply_steering("steer", got, torch.arange(6), 6, vector=v, scale=0.5, positions=spec)
    ref = x.clone()
    for r in rows:
        ref[0, r] += 0.5 * v
    assert torch.equal(got, ref)


def test_generated_positions_after_the_prompt():
    mask = position_mask("generated", torch.tensor([3, 4, 5]), 4)
    assert mask.tolist() == [False, True, True]
    assert position_mask("prompt", torch.tensor([3, 4, 5]), 4).tolist() == [True, False, False]


def test_scale_replace_ablate_clamp_hand_math():
    x = _x()
    d = torch.tensor([3.0, 0.0, 4.0, 0.0])
    u = d / 5
    got = x.clone()
    apply_steering("scale", got, torch.arange(6), 6, factor=-2.0, positions=[1])
    ref = x.clone()
    ref[0, 1] *= -2.0
    assert torch.equal(got, ref)

    got = x.clone()
    vec = torch.full((H,), 7.0)
    apply_steering("replace", got, torch.arange(6), 6, vector=vec, positions=slice(2, 4))
    ref = x.clone()
    ref[0, 2:4] = 7.0
    assert torch.equal(got, ref)

    got = x.clone()
    apply_steering("ablate", got, torch.arange(6), 6, direction=d)
    ref = x - (x @ u).unsqueeze(-1) * u
    assert torch.allclose(got, ref, atol=1e-6)
    assert (got @ u).abs().max() < 1e-6

    got = x.clone()
    apply_steering("clamp", got, torch.arange(6), 6, direction=d, min=-0.1, max=0.2)
    proj = x @ u
    ref = x + (proj.clamp(-0.1, 0.2) - proj).unsqueeze(-1) * u
    assert torch.allclose(got, ref, atol=1e-6)
    assert float((got @ u).max()) <= 0.2 + 1e-6 and float((got @ u).min()) >= -0.1 - 1e-6


def test_bad_inputs_raise():
    x = _x()
    with pytest.raises(ValueError, match="hidden size"):
        apply_steering("steer", x, torch.arange(6), 6, vector=torch.ones(3))
    with pytest.raises(ValueError, match="zero norm"):
        apply_steering("ablate", x, torch.arange(6), 6, direction=torch.zeros(H))
    with pytest.raises(ValueError, match="positions must be"):
        apply_steering("steer", x, torch.arange(6), 6, vector=torch.ones(H), positions=1.5)


PROMPT = "The quick brown fox jumps"


@pytest.mark.parametrize("op", ["steer", "scale", "ablate", "clamp", "replace"])
def test_shortcuts_in_a_trace_are_their_own_nodes(hf_model, roundtrip, op):
    model = hf_model("tiny-gpt2")
    hidden = model.config.hidden_size
    torch.manual_seed(1)
    v = torch.randn(hidden)
    with model.trace(PROMPT):
        base = model.layers[0].output.save()
    with model.trace(PROMPT) as tracer:
        out = model.layers[0].output
        if op == "steer":
            out.steer(v, scale=3.0, positions=[0, -1])
        elif op == "scale":
            out.scale(0.5, positions=slice(1, 3))
        elif op == "ablate":
            out.ablate(v, positions="prompt")
        elif op == "clamp":
            out.clamp(v, min=-0.5, max=0.5, positions=-2)
        else:
            out.replace(v, positions=1)
        got = model.layers[0].output.save()
    ref = base.clone()
    u = v / v.norm()
    if op == "steer":
        ref[0, [0, -1]] += 3.0 * v
    elif op == "scale":
        ref[0, 1:3] *= 0.5
    elif op == "ablate":
        ref = ref - (ref @ u).unsqueeze(-1) * u
    elif op == "clamp":
        p = ref[0, -2] @ u
        ref[0, -2] += (p.clamp(-0.5, 0.5) - p) * u
    else:
        ref[0, 1] = v
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    assert [n.op for n in tracer.graph.nodes].count(op) == 1
    assert all(n.op != "method" for n in tracer.graph.nodes)
    roundtrip(model, tracer)


def test_steering_changes_downstream_like_a_raw_hook(hf_model):
    model = hf_model("tiny-gpt2")
    v = torch.ones(model.config.hidden_size)
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    with model.trace(PROMPT):
        model.layers[0].output.steer(v, scale=2.0, positions=-1)
        logits = model.logits.save()

    def hook(mod, args, out):
        out = out.clone()
        out[:, -1] += 2.0 * v
        return out

    h = model._model.transformer.h[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            ref = model._model(input_ids=ids).logits
    finally:
        h.remove()
    assert torch.allclose(logits, ref, atol=1e-5, rtol=0)
