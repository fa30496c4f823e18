"""Assigning a module's value (``.output = new``, ``.input = new``) as PyTorch and nnsight do it:
the module's value becomes ``new`` and the old value stays as it was. A read taken before the
assignment keeps showing the old value, and an in-place edit of it no longer reaches the model.
In nnsight a hook hands out the real tensor and swaps in the new one, so the old tensor is
untouched.

The references are plain PyTorch forward hooks on the HF model (a hook that returns a new
tensor), never vinterp. Both backends: vLLM keeps a module's rows in its own tensors, so it must
not write the assignment into the rows an earlier read holds. The layer output (the residual
stream) and the MLP output take different paths in the plugin, so both are checked.

Found by an audit: before this, the HF backend wrote the assignment into the old tensor
(``diff`` below was all zeros), and so did the vLLM backend outside the residual stream.
"""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["The quick brown fox jumps over", "Hi there"]   # two lengths: padding, offsets
DELTA = torch.linspace(-1, 1, 64)


def _raw(lm, prompt: str, path: str, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(the module's original value, the logits) with ``fn(old) -> new`` hooked at ``path``
    (``lm``: the HF-backend model, whose ``_model`` is the real HF model)."""
    mod = dict(lm._model.named_modules())[path]
    seen = {}

    def hook(m, args, out):
        seen["old"] = out.clone()
        return fn(out)
    h = mod.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = lm._model(input_ids=torch.tensor([lm.tokenizer(prompt)["input_ids"]])).logits
    finally:
        h.remove()
    return seen["old"], logits


@pytest.mark.parametrize("module", ["layers.0", "layers.0.mlp"])
def test_an_earlier_read_keeps_the_old_value(backend, hf, module):
    """``orig = m.output; m.output = orig + d``: afterwards ``m.output - orig`` is ``d`` and
    ``orig`` is still the module's original value, in every invoke of a padded batch."""
    _, lm = backend
    envoy = lm.model.layers[0] if module == "layers.0" else lm.model.layers[0].mlp
    got = []
    with lm.trace() as tracer:
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                orig = envoy.output
                envoy.output = orig + DELTA
                got.append(((envoy.output - orig).save(), orig.save(), lm.logits.save()))
    for prompt, (diff, orig, logits) in zip(PROMPTS, got, strict=True):
        ref_old, ref_logits = _raw(hf, prompt, f"model.{module}", lambda o: o + DELTA)
        assert torch.allclose(diff, DELTA.expand_as(diff), atol=1e-5)
        assert torch.allclose(orig, ref_old, atol=1e-4)
        assert torch.allclose(logits, ref_logits, atol=1e-4)


@pytest.mark.parametrize("module", ["layers.0", "layers.0.mlp"])
def test_editing_the_old_value_after_an_assignment_does_not_reach_the_model(backend, hf,
                                                                          module):
    """``x = m.output; m.output = x * 2; x[:, -1] = 0``: the model runs on ``x * 2`` (in
    PyTorch the zeros land in a tensor the model no longer uses)."""
    _, lm = backend
    envoy = lm.model.layers[0] if module == "layers.0" else lm.model.layers[0].mlp
    with lm.trace(PROMPTS[0]):
        x = envoy.output
        envoy.output = x * 2
        x[:, -1] = 0
        logits = lm.logits.save()
    _, ref = _raw(hf, PROMPTS[0], f"model.{module}", lambda o: o * 2)
    assert torch.allclose(logits, ref, atol=1e-4)


def test_an_input_assignment_leaves_the_previous_output_alone(backend, hf):
    """A layer's input is the previous layer's output tensor (HF passes it on): assigning
    ``layers[1].input`` must not change what a read of ``layers[0].output`` holds."""
    _, lm = backend
    with lm.trace(PROMPTS[0]):
        before = lm.model.layers[0].output
        lm.model.layers[1].input = lm.model.layers[1].input * 0.5
        kept = before.save()
        logits = lm.logits.save()
    mods = dict(hf._model.named_modules())
    h = mods["model.layers.1"].register_forward_pre_hook(
        lambda m, args, kwargs: ((args[0] * 0.5, *args[1:]), kwargs) if args else
        (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 0.5}), with_kwargs=True)
    try:
        old, ref = _raw(hf, PROMPTS[0], "model.layers.0", lambda o: o)
    finally:
        h.remove()
    assert torch.allclose(kept, old, atol=1e-4)
    assert torch.allclose(logits, ref, atol=1e-4)


def test_an_in_place_op_on_a_saved_value_keeps_it_saved(backend, hf):
    """``h = m.output.save(); h += 1``: Python rebinds ``h`` to the in-place result, which
    stays saved and holds the edited value (nnsight: ``h`` is the tensor, edited in place),
    and the model runs on the edit."""
    _, lm = backend
    with lm.trace(PROMPTS[0]):
        h = lm.model.layers[0].output.save()
        h += 1
        logits = lm.logits.save()
    old, ref = _raw(hf, PROMPTS[0], "model.layers.0", lambda o: o + 1)
    assert torch.allclose(h, old + 1, atol=1e-4)
    assert torch.allclose(logits, ref, atol=1e-4)


def test_a_gradient_reaches_a_value_patched_into_another_invoke(hf):
    """Invoke 1's layer output is replaced by twice invoke 0's: ``d loss / d hb`` is the
    gradient through both rows, as in PyTorch on the same batch (it was zero: an in-place edit
    of one invoke's view of the batch rebuilt the other invoke's view's autograd history)."""
    prompt = "Hi there"
    for write in ("setitem", "assign"):
        with hf.trace() as tracer:
            with tracer.invoke(prompt):
                hb = hf.model.layers[0].output.save()
                hb.retain_grad()
            with tracer.invoke(prompt):
                if write == "setitem":
                    hf.model.layers[0].output[:] = hb * 2
                else:
                    hf.model.layers[0].output = hb * 2
                hf.logits[0, -1, 123].backward()
        ids = hf.tokenizer([prompt, prompt], return_tensors="pt")["input_ids"]
        seen = {}

        def hook(m, args, out):
            out.retain_grad()
            seen["o"] = out
            new = out.clone()
            new[1:2] = out[0:1] * 2
            return new
        h = hf._model.model.layers[0].register_forward_hook(hook)
        try:
            hf._model(input_ids=ids).logits[1, -1, 123].backward()
        finally:
            h.remove()
        assert hb.grad is not None, write
        assert torch.allclose(hb.grad, seen["o"].grad[0:1], atol=1e-6), write
        assert hb.grad.norm() > 0, write


def test_an_in_place_edit_reaches_every_reference_with_or_without_autograd():
    """``m.drop.output[:] = 0`` where the module returns its input and the caller keeps that
    tensor for a residual: as a PyTorch hook's in-place edit, the residual is zeroed too,
    whether or not the trace calls ``.backward()`` and however many invokes it has. With a
    backward and two invokes the edit used to land on a copy only (the residual kept h)."""
    import vinterp
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.drop, self.fc2 = nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(self.drop(h)) + h   # eval: drop(h) is h itself

    torch.manual_seed(0)
    net = Net().eval()
    m = vinterp.NNsight(net)
    x, y = torch.randn(2, 4), torch.randn(1, 4)
    handle = net.drop.register_forward_hook(lambda mod, args, out: out.zero_())
    try:
        with torch.no_grad():
            want = net(x)
    finally:
        handle.remove()
    assert not torch.allclose(want, net(x).detach())   # (the edit matters)
    for backward in (False, True):
        for second in (False, True):
            with m.trace() as tracer:
                with tracer.invoke(x):
                    m.drop.output[:] = 0
                    out = m.output.save()
                    if backward:
                        m.output.sum().backward()
                if second:
                    with tracer.invoke(y):
                        pass
            assert torch.allclose(out, want, atol=1e-6), (backward, second)


@pytest.fixture(scope="module")
def hf(hf_model):
    return hf_model("tiny-llama")


def test_a_prompt_less_invoke_edits_after_the_invokes_before_it_with_autograd(hf):
    """Invokes run in order over one batch: a prompt-less invoke (all rows) sees invoke 0's
    in-place edit and its own edit stands on invoke 0's rows, whether or not the trace records
    gradients. With ``.backward()`` the batch was rebuilt from invoke 0's copy afterwards: the
    prompt-less edit was undone on its rows and it read the unedited value. Reference: one
    PyTorch hook doing the same edits in the same order, and its gradients."""
    prompts = ("The quick brown fox", "Hi")
    got = {}
    for backward in (False, True):
        with hf.trace() as tracer:
            with tracer.invoke(prompts[0]):
                h0 = hf.model.layers[0].output.save()
                if backward:
                    h0.retain_grad()
                hf.model.layers[0].output[:, 0] = 1.0
            with tracer.invoke(prompts[1]):
                pass
            with tracer.invoke():
                seen = hf.model.layers[0].output.clone().save()
                hf.model.layers[0].output[:, -1] = 2.0
                after = hf.model.layers[1].output.save()
                if backward:
                    hf.model.layers[1].output.sum().backward()
        got[backward] = (seen.detach(), after.detach(), h0.grad if backward else None)

    rows = [hf.tokenizer(p)["input_ids"] for p in prompts]
    ids = torch.tensor([rows[0], [hf._pad_id] * (len(rows[0]) - len(rows[1])) + rows[1]])
    mask = (torch.arange(ids.shape[1]) >= ids.shape[1] - torch.tensor([[len(r)] for r in rows]))
    ref = {}

    def hook(m, args, out):
        first = out[0:1].clone()
        first.retain_grad()
        ref["h0"] = first
        first[:, 0] = 1.0
        new = out.clone()
        new[0:1] = first
        ref["seen"] = new.detach().clone()
        new[:, -1] = 2.0
        return new
    handles = [hf._model.model.layers[0].register_forward_hook(hook),
               hf._model.model.layers[1].register_forward_hook(
                   lambda m, a, o: ref.__setitem__("after", o))]
    try:
        hf._model(input_ids=ids, attention_mask=mask.long(),
                  position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0))
        ref["after"].sum().backward()
    finally:
        for h in handles:
            h.remove()
    for backward in (False, True):
        seen, after, grad = got[backward]
        assert torch.allclose(seen, ref["seen"], atol=1e-6, rtol=0), backward
        assert torch.allclose(after, ref["after"].detach(), atol=1e-5, rtol=0), backward
    assert torch.allclose(got[True][2], ref["h0"].grad, atol=1e-6, rtol=0)
    assert got[True][2].norm() > 0
