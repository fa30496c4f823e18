"""Assigning one item of a structured module value: ``module.output["h"] = new`` on a dict or
an HF ``ModelOutput``, ``module.output[0] = new`` on a list or tuple, ``inputs[1]["k"] = v``.

In nnsight 0.8 (one invoke) the proxy is the module's own dict, so the assignment lands, as a
PyTorch forward hook doing ``out["h"] = new`` makes it. The references here are such raw hooks
(or the model run on the replaced value), never vinterp.

Found by an audit: each invoke reads its own copy of the structure, and the item was set on
that copy only, so the model's output was silently unchanged (max|got - clean| = 0).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import vinterp


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": self.lin(x), "g": torch.tanh(x)}


class _ListOut(nn.Module):
    def __init__(self, kind: type) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> Any:
        return self.kind([self.lin(x), torch.tanh(x)])


class _Net(nn.Module):
    def __init__(self, sub: nn.Module) -> None:
        super().__init__()
        self.d = sub
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.d(x)
        a, b = (o["h"], o["g"]) if isinstance(o, dict) else o
        return self.fc2(a * b)


def _net(sub: nn.Module) -> _Net:
    torch.manual_seed(0)
    return _Net(sub).eval()


def _hooked(net: _Net, x: torch.Tensor, key: Any, new: torch.Tensor) -> torch.Tensor:
    """The output with a raw hook setting ``out[key] = new`` (a tuple is rebuilt: it cannot
    change in place)."""
    def hook(mod: nn.Module, args: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            items = list(out)
            items[key] = new
            return tuple(items)
        out[key] = new
        return None

    handle = net.d.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return net(x)
    finally:
        handle.remove()


@pytest.mark.parametrize(("sub", "key"), [(_DictOut, "h"), (list, 0), (tuple, 0), (list, -2)])
def test_item_assignment_lands_like_a_hook(sub: Any, key: Any) -> None:
    net = _net(_DictOut() if sub is _DictOut else _ListOut(sub))
    x = torch.randn(2, 4)
    new = torch.full((2, 4), 0.5)
    model = vinterp.NNsight(net)
    with model.trace(x):
        model.d.output[key] = new
        after = model.d.output.save()
        got = model.output.save()
    want = _hooked(net, x, key, new)
    with torch.no_grad():
        clean = net(x)
    assert (want - clean).abs().max() > 0.1   # the edit matters
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(after[key], new)      # a later read sees it


def test_item_assignment_per_invoke() -> None:
    """Two invokes: each sets its own rows of the item; the other invoke is untouched."""
    net = _net(_DictOut())
    x1, x2 = torch.randn(2, 4), torch.randn(3, 4)
    model = vinterp.NNsight(net)
    with model.trace() as tracer:
        with tracer.invoke(x1):
            model.d.output["h"] = torch.zeros(2, 4)
            o1 = model.output.save()
        with tracer.invoke(x2):
            o2 = model.output.save()
    assert torch.allclose(o1, _hooked(net, x1, "h", torch.zeros(2, 4)), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(o2, net(x2), atol=1e-6)


def test_nested_item_and_keyword_input() -> None:
    """``inputs[1]["scale"] = v``: an item of the keyword arguments a module was called with."""
    class Scaled(nn.Module):
        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return x * scale

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = Scaled()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.s(x, scale=torch.ones_like(x))

    outer = Outer()
    x = torch.randn(2, 3)
    model = vinterp.NNsight(outer)
    with model.trace(x):
        model.s.inputs[1]["scale"] = torch.full((2, 3), 3.0)
        got = model.output.save()
    assert torch.allclose(got, 3 * x)


def test_model_output_item_on_language_model(hf_model: Any) -> None:
    """``lm.model.output["last_hidden_state"] = 0`` (an HF ``ModelOutput``): the logits are
    the LM head's of zeros, as with a hook setting that item."""
    lm = hf_model("tiny-llama")
    prompt = "Hello world, again"
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    zeros = torch.zeros(1, ids.shape[1], lm.config.hidden_size)
    with lm.trace(prompt):
        lm.model.output["last_hidden_state"] = zeros
        logits = lm.output.logits.save()
    with torch.no_grad():
        want = lm._model.lm_head(zeros)
        clean = lm._model(ids).logits
    assert (want - clean).abs().max() > 0.1
    assert torch.allclose(logits, want, atol=1e-5)


def test_item_set_to_none_is_refused() -> None:
    model = vinterp.NNsight(_net(_DictOut()))
    with pytest.raises(Exception, match="to None"):
        with model.trace(torch.randn(2, 4)):
            model.d.output["h"] = None
            model.output.save()
