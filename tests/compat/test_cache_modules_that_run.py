"""``tracer.cache()`` on ``NNsight``: it caches the modules that run, as nnsight's cache does
(it keeps whatever its hooks see). Values are checked against raw forward hooks.

Found by an audit: every module of the wrapped net was read, so a net holding a module its
forward does not call (an unused head, a branch a flag picks) failed with "aux_head.output
was never reached", for a module the user never asked for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import vinterp


class _Net(nn.Module):
    """A ``ModuleDict`` branch picked by an argument, and a head ``forward`` never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.branch = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
        self.fc2 = nn.Linear(4, 2)
        self.aux_head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, which: str = "a") -> torch.Tensor:
        return self.fc2(torch.relu(self.branch[which](self.fc1(x))))


def _raw(net: nn.Module, *args: Any) -> dict[str, torch.Tensor]:
    """Every module's output, by ``"model." + path``, with raw forward hooks."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(
        lambda mod, a, out, p=p: seen.__setitem__(f"model.{p}" if p else "model", out.clone()))
        for p, m in net.named_modules()]
    try:
        with torch.no_grad():
            net(*args)
    finally:
        for h in handles:
            h.remove()
    return seen


def _check(cache: Any, want: dict[str, torch.Tensor]) -> None:
    assert set(cache) == set(want)
    for key, value in want.items():
        assert torch.equal(cache[key].output, value), key


def test_cache_keeps_the_modules_that_run() -> None:
    torch.manual_seed(0)
    net = _Net().eval()
    model = vinterp.NNsight(net)
    x = torch.randn(2, 4)
    with model.trace(x) as tracer:
        cache = tracer.cache()
    _check(cache, _raw(net, x))
    # another branch in the next trace: its own modules
    with model.trace(x, which="b") as tracer:
        cache = tracer.cache()
    assert "model.branch.b" in cache and "model.branch.a" not in cache
    _check(cache, _raw(net, x, "b"))


def test_cache_before_the_invokes() -> None:
    """nnsight users call ``tracer.cache()`` before their invokes: the modules are found once
    the inputs are known, and the cache holds the whole batch."""
    torch.manual_seed(0)
    net = _Net().eval()
    model = vinterp.NNsight(net)
    x1, x2 = torch.randn(2, 4), torch.randn(3, 4)
    with model.trace() as tracer:
        cache = tracer.cache(include_inputs=True)
        with tracer.invoke(x1):
            pass
        with tracer.invoke(x2):
            pass
    both = torch.cat([x1, x2])
    _check(cache, _raw(net, both))
    assert torch.equal(cache["model.fc1"].input, both)
