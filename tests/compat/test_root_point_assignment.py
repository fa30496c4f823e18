"""Assigning the root model's points: ``model.output = v``, ``model.input = v``,
``model.inputs = v`` (nnsight's root envoy has setters for all three), on ``NNsight`` and on
``LanguageModel``. References: raw PyTorch hooks on the root module, or the model run alone.

Found by an audit: ``model.input = v`` / ``model.inputs = v`` became plain Python attributes of
the model object (no edit, and every later trace's ``model.input`` read the stale tensor), and
``model.output = v`` raised an unrelated "property has no setter" AttributeError.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import vinterp
from vinterp.tracing.errors import TracingError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()


def test_nnsight_root_input_inputs_output_assignments() -> None:
    net = _net()
    model = vinterp.NNsight(net)
    x, z = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        want_in, clean = net(z), net(x)
    with model.trace(x):
        model.input = z
        got_in = model.output.save()
    with model.trace(x):
        model.inputs = ((z,), {})
        got_inputs = model.output.save()
    with model.trace(x):
        model.output = torch.ones(2, 2)
        got_out = model.output.save()
    assert (want_in - clean).abs().max() > 0.1
    assert torch.allclose(got_in, want_in, atol=1e-6)
    assert torch.allclose(got_inputs, want_in, atol=1e-6)
    assert torch.equal(got_out, torch.ones(2, 2))
    # no attribute was left on the model: a later trace reads its real input
    assert not {"input", "inputs", "output"} & set(model.__dict__)
    with model.trace(x):
        seen = model.input.save()
    assert torch.equal(seen, x)


def test_nnsight_root_output_matches_a_raw_hook() -> None:
    """``model.output = model.output * 3`` as a forward hook on the root returning that."""
    net = _net()
    model = vinterp.NNsight(net)
    x = torch.randn(3, 4)
    handle = net.register_forward_hook(lambda m, a, out: out * 3)
    try:
        with torch.no_grad():
            want = net(x)
    finally:
        handle.remove()
    with model.trace(x):
        model.output = model.output * 3
        got = model.output.save()
    assert torch.allclose(got, want, atol=1e-6)


def test_language_model_root_input(hf_model: Any) -> None:
    """``lm.input = other_ids`` (the root's first input is ``input_ids``): the logits are the
    model's on the other ids."""
    lm = hf_model("tiny-llama")
    prompt = "The quick brown fox"
    ids = lm.tokenizer(prompt)["input_ids"]
    other = torch.tensor([[(t * 7 + 3) % lm.config.vocab_size for t in ids]])
    with lm.trace(prompt):
        lm.input = other
        logits = lm.logits.save()
    with torch.no_grad():
        want = lm._model(other).logits
        clean = lm._model(torch.tensor([ids])).logits
    assert (want - clean).abs().max() > 0.1
    assert torch.allclose(logits, want, atol=1e-5)
    assert "input" not in lm.__dict__


def test_module_names_cannot_be_shadowed(hf_model: Any) -> None:
    model = vinterp.NNsight(_net())
    with pytest.raises(TracingError, match=r"cannot set model\.0:.*\.output = "):
        setattr(model, "0", torch.zeros(1))
    lm = hf_model("tiny-llama")
    for name in ("model", "lm_head", "layers"):
        with pytest.raises(TracingError, match=f"cannot set model.{name}"):
            setattr(lm, name, torch.zeros(1))
    with pytest.raises(TracingError, match="read-only"):
        lm.logits = torch.zeros(1)     # its own message, as before
    lm.my_note = "kept"                # other attributes are the user's own
    assert lm.my_note == "kept"
    del lm.my_note
