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
