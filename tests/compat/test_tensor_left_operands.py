"""A plain tensor on the left of an operator with a traced value (``v + x``, ``v - x``,
``w * x``, ``torch.add(v, x)``): nnsight code writes both orders. Python asks the tensor
first and torch hands its operator to the proxy, which used to refuse it ("torch function
'add' is not in vinterp's allowlist"). Checked against a raw forward hook doing the same
arithmetic."""

from __future__ import annotations

import pytest
import torch

PROMPT = "The quick brown fox"


def _raw_hook_logits(hf, ids: torch.Tensor, layer: int, fn) -> torch.Tensor:
    handle = hf.model.layers[layer].register_forward_hook(lambda mod, args, out: fn(out))
    try:
        with torch.no_grad():
            return hf(input_ids=ids).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["add", "sub", "mul", "torch_add"])
def test_tensor_on_the_left(hf_model, name):
    model = hf_model("tiny-llama")
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    fn = {"add": lambda x: v + x, "sub": lambda x: v - x, "mul": lambda x: v * x,
          "torch_add": lambda x: torch.add(v, x)}[name]
    with model.trace(PROMPT):
        model.layers[0].output[:] = fn(model.layers[0].output)
        logits = model.logits.save()
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    torch.testing.assert_close(logits, _raw_hook_logits(model._model, ids, 0, fn))


@pytest.mark.parametrize("name", ["pow", "floordiv", "mod", "and", "or", "xor"])
def test_more_operators_with_a_tensor_on_the_left(hf_model, name):
    """``v ** x``, ``v // x``, ``mask & (x > 0)``: torch hands these over as the tensor's own
    dunder (``Tensor.__pow__``, ``TensorBase.__and__``), which was refused as not allowlisted
    while ``x ** v`` and ``x & m`` worked. Values against the same arithmetic on a raw hook's
    output."""
    model = hf_model("tiny-llama")
    v = torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) + 1
    mask = v > 1.5
    fn = {"pow": lambda x: v ** x, "floordiv": lambda x: v // x, "mod": lambda x: v % x,
          "and": lambda x: mask & (x > 0), "or": lambda x: mask | (x > 0),
          "xor": lambda x: mask ^ (x > 0)}[name]
    with model.trace(PROMPT):
        got = fn(model.layers[0].output).save()
    seen = {}
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    _raw_hook_logits(model._model, ids, 0, lambda out: seen.update(out=out))
    torch.testing.assert_close(got, fn(seen["out"]), equal_nan=True)
