"""A trace may not allocate more than the interpreter's limit (64Mi elements, or the size of
the op's largest argument) with ops that size their result from their arguments:
``h.repeat(...)``, ``h.expand(...).contiguous()``, ``torch.outer``, ``F.pad``, a broadcast
``a[:, None] * b``, a long index. The graph runs inside the serving process (the vLLM worker),
where one out-of-memory error stops the engine for every user; the HF backend runs the same
interpreter, so it is checked here end to end with the library, and the values of the same
ops below the limit against a raw forward hook.

Found by an audit: only constructors (``torch.zeros`` ...) were bounded, so
``h.repeat(1, 1, 20000)`` allocated what it asked for (80M elements) without a word.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from vinterp.ir.errors import InterventionError

PROMPT = "one two three four five six"
LIMIT = 64 * 2**20


def _above(h: Any) -> int:
    """A factor that makes ``h``'s elements just more than the limit (``h.shape`` is known
    when the trace is recorded)."""
    return LIMIT // math.prod(h.shape) + 1


CASES = {
    "method repeat": lambda h: h.repeat(1, 1, _above(h)),
    "method contiguous": lambda h: h.expand(_above(h), -1, -1).contiguous(),
    "torch.outer": lambda h: torch.outer(h.flatten(), torch.ones(_above(h))),
    "torch.nn.functional.pad": lambda h: F.pad(h, (0, _above(h) * h.shape[-1])),
    "mul": lambda h: h.reshape(-1, 1) * torch.ones(1, _above(h)),
    "indexing": lambda h: h[torch.zeros(_above(h), dtype=torch.long)],
}


@pytest.mark.parametrize("what", list(CASES))
def test_growing_ops_are_refused_with_the_op_and_size(hf_model: Any, what: str) -> None:
    lm = hf_model("tiny-llama")
    with pytest.raises(InterventionError, match=rf"{what} would make a tensor of \d+ "
                       rf"elements; the limit is {LIMIT}"):
        with lm.trace(PROMPT):
            CASES[what](lm.model.layers[0].output).sum().save()


def test_the_same_ops_within_the_limit_match_a_raw_hook(hf_model: Any) -> None:
    lm = hf_model("tiny-llama")
    with lm.trace(PROMPT):
        h = lm.model.layers[0].output
        rep = h.repeat(1, 1, 3).save()
        wide = h.expand(4, -1, -1).contiguous().save()
        outer = torch.outer(h[0, -1], torch.arange(3.0)).save()
        probs = lm.logits.softmax(-1).save()
    seen = {}
    layer = lm._model.model.layers[0]
    handle = layer.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out.clone()))
    try:
        with torch.no_grad():
            logits = lm._model(torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])).logits
    finally:
        handle.remove()
    ref = seen["h"]
    assert torch.allclose(rep, ref.repeat(1, 1, 3), atol=1e-6)
    assert torch.allclose(wide, ref.expand(4, -1, -1), atol=1e-6)
    assert torch.allclose(outer, torch.outer(ref[0, -1], torch.arange(3.0)), atol=1e-6)
    assert torch.allclose(probs, logits.softmax(-1), atol=1e-6)
