"""Gradients of tensors inside structured points (an attention module's ``(out, weights)``
tuple, a decoder layer's ``(args, kwargs)``) with several invokes of different lengths equal
raw PyTorch: forward hooks that call ``retain_grad`` on the same element, each prompt run
alone, with the same loss.

Found by an audit: with two or more invokes these gradients were ``None`` with no error (each
invoke got a view of the batch tensor, a side branch of the graph the model never used); a
plain-tensor point, or a single invoke, was right. A later audit: a module input that its
caller also uses elsewhere (a residual) lacked that use's share of the gradient.
"""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["The quick brown fox jumps over", "Hi there"]   # two lengths: padding, windows
TOKEN = 7


def _raw_grad(lm, prompt: str, path: str, pick, edit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the gradient of ``logits[:, -1, TOKEN].sum()`` with respect to ``pick(args, kwargs,
    output)`` at module ``path``, the logits) for ``prompt`` alone; ``edit(output)``: an
    in-place edit made in the hook before the element is picked."""
    mod = dict(lm._model.named_modules())[path]
    seen = {}

    def hook(module, args, kwargs, out):
        if edit is not None:
            out = (out[0].clone(), *out[1:])
            edit(out)
        x = pick(args, kwargs, out)
        x.retain_grad()
        seen["x"] = x
        return out
    h = mod.register_forward_hook(hook, with_kwargs=True)
    try:
        ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
        logits = lm._model(input_ids=ids).logits
    finally:
        h.remove()
    logits[:, -1, TOKEN].sum().backward()
    return seen["x"].grad, logits.detach()


def _attn_out(args, kwargs, out):
    return out[0]


def _layer_in(args, kwargs, out):
    return args[0] if args else kwargs["hidden_states"]


POINTS = {
    "self_attn.output[0]": ("model.layers.0.self_attn", _attn_out,
                            lambda lm: lm.model.layers[0].self_attn.output[0]),
    "layer.inputs[0][0]": ("model.layers.1", _layer_in,
                           lambda lm: lm.model.layers[1].inputs[0][0]),
    # the layer also adds this tensor as its residual: that share of the gradient reaches
    # the batch tensor, not the invoke's copy (audit: off by ~1.2 of a max |grad| of 1.3)
    "post_attention_layernorm.input": (
        "model.layers.0.post_attention_layernorm", _layer_in,
        lambda lm: lm.model.layers[0].post_attention_layernorm.input),
}


@pytest.mark.parametrize("how", ["retain_grad", "backward_block"])
@pytest.mark.parametrize("point", list(POINTS))
def test_gradients_with_two_invokes_equal_raw_hooks(hf_model, point, how):
    """``x.retain_grad()`` then ``loss.backward()``, and ``with loss.backward(): x.grad.save()``
    (nnsight >= 0.5): each invoke's gradient is its prompt's alone."""
    lm = hf_model("tiny-llama")
    path, pick, read = POINTS[point]
    xs, losses = [], []
    with lm.trace() as tracer:
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                x = read(lm)
                if how == "retain_grad":
                    x = x.save()
                    x.retain_grad()
                xs.append(x)
                losses.append(lm.lm_head.output[:, -1, TOKEN].sum())
        loss = losses[0] + losses[1]
        if how == "retain_grad":
            loss.backward()
        else:
            with loss.backward():
                grads = [x.grad.save() for x in xs]
    if how == "retain_grad":
        grads = [x.grad for x in xs]
    for prompt, g in zip(PROMPTS, grads, strict=True):
        ref, _ = _raw_grad(lm, prompt, path, pick)
        assert g is not None, f"{point}: no gradient for {prompt!r}"
        assert g.shape == ref.shape
        assert torch.allclose(g, ref, atol=1e-5)


def test_input_and_inputs_read_the_same_copy(hf_model):
    """``.input`` and ``.inputs[0][0]`` are one tensor of one invoke: an edit through
    ``.inputs`` shows in ``.input`` and lands in the model, and the gradient is raw PyTorch's
    (a pre-hook making the same edit)."""
    lm = hf_model("tiny-llama")
    layer = lm.model.layers[1]
    with lm.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            layer.inputs[0][0][:, -1] += 1.0
            a = layer.input.save()
            a.retain_grad()
            logits = lm.lm_head.output.save()
            la = lm.lm_head.output[:, -1, TOKEN].sum()
        with tracer.invoke(PROMPTS[1]):
            lb = lm.lm_head.output[:, -1, TOKEN].sum()
        (la + lb).backward()
    seen = {}

    def pre_hook(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, -1] += 1.0
        h.retain_grad()
        seen["h"] = h
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}
    handle = lm._model.model.layers[1].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        ref_logits = lm._model(
            input_ids=torch.tensor([lm.tokenizer(PROMPTS[0])["input_ids"]])).logits
    finally:
        handle.remove()
    ref_logits[:, -1, TOKEN].sum().backward()
    assert torch.allclose(a, seen["h"].detach(), atol=1e-5)
    assert torch.allclose(logits, ref_logits.detach(), atol=1e-4)
    assert a.grad is not None and torch.allclose(a.grad, seen["h"].grad, atol=1e-5)


def test_an_in_place_edit_of_a_tuple_element_lands_and_keeps_gradients(hf_model):
    """An in-place edit of ``self_attn.output[0]`` in one invoke changes that invoke's logits
    (only) as a hook's edit does, and both invokes' gradients stay those of raw PyTorch."""
    lm = hf_model("tiny-llama")
    attn = lm.model.layers[0].self_attn

    def edit(out):
        out[0][:, -1] *= 3

    xs, logits, losses = [], [], []
    with lm.trace() as tracer:
        for k, prompt in enumerate(PROMPTS):
            with tracer.invoke(prompt):
                if k == 0:
                    attn.output[0][:, -1] *= 3
                x = attn.output[0].save()
                x.retain_grad()
                xs.append(x)
                logits.append(lm.lm_head.output.save())
                losses.append(lm.lm_head.output[:, -1, TOKEN].sum())
        (losses[0] + losses[1]).backward()
    for k, prompt in enumerate(PROMPTS):
        ref, ref_logits = _raw_grad(lm, prompt, "model.layers.0.self_attn", _attn_out,
                                    edit if k == 0 else None)
        assert torch.allclose(logits[k], ref_logits, atol=1e-4)
        assert xs[k].grad is not None and torch.allclose(xs[k].grad, ref, atol=1e-5)


@pytest.mark.parametrize("order", ["before", "after"])
def test_a_prompt_less_invoke_edits_a_tuple_element_with_autograd(hf_model, order):
    """A prompt-less invoke (the whole batch) doubling ``self_attn.output[0][:, -1]``, written
    before or after two invokes that read it with ``retain_grad``: every invoke's logits are
    those of a hook making the edit, and the gradients follow the chain rule (read after the
    edit: the hook's; read before it: the hook's, doubled at the last position)."""
    lm = hf_model("tiny-llama")
    attn = lm.model.layers[0].self_attn

    def edit(out):
        out[0][:, -1] *= 2

    xs, logits, losses = [], [], []
    with lm.trace() as tracer:
        if order == "before":
            with tracer.invoke():
                attn.output[0][:, -1] *= 2
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                x = attn.output[0].save()
                x.retain_grad()
                xs.append(x)
                logits.append(lm.lm_head.output.save())
                losses.append(lm.lm_head.output[:, -1, TOKEN].sum())
        if order == "after":
            with tracer.invoke():
                attn.output[0][:, -1] *= 2
        (losses[0] + losses[1]).backward()
    for k, prompt in enumerate(PROMPTS):
        ref, ref_logits = _raw_grad(lm, prompt, "model.layers.0.self_attn", _attn_out, edit)
        if order == "after":
            ref = ref.clone()
            ref[:, -1] *= 2
        assert torch.allclose(logits[k], ref_logits, atol=1e-4)
        assert xs[k].grad is not None and torch.allclose(xs[k].grad, ref, atol=1e-5)
