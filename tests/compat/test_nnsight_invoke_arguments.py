"""``NNsight`` invokes take nnsight's ``invoke(*args, **kwargs)``, the same arguments as
``trace(*args, **kwargs)``: a dict or a tuple is one argument in both. References: the wrapped
module called directly on each invoke's arguments.

Found by an audit: ``tracer.invoke(x, mask=m)`` failed with "generation settings only apply
inside model.generate", ``tracer.invoke(x, m)`` with a TypeError, and ``tracer.invoke(batch)``
unpacked a dict argument as keyword arguments (``trace(batch)`` did not).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vinterp


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.lin(x)
        return y if mask is None else y * mask


class _DictIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lin(batch["x"]) * batch["w"]


def _inputs() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return torch.randn(2, 4), torch.randn(3, 4), torch.rand(2, 2), torch.rand(3, 2)


@pytest.mark.parametrize("keyword", [True, False])
def test_invoke_takes_the_module_arguments(keyword: bool) -> None:
    x1, x2, m1, m2 = _inputs()
    net = _Masked().eval()
    model = vinterp.NNsight(net)
    with model.trace() as tracer:
        with tracer.invoke(x1, mask=m1) if keyword else tracer.invoke(x1, m1):
            o1 = model.output.save()
        with tracer.invoke(x2, mask=m2) if keyword else tracer.invoke(x2, m2):
            o2 = model.output.save()
    with torch.no_grad():
        assert torch.allclose(o1, net(x1, m1), atol=1e-6)
        assert torch.allclose(o2, net(x2, m2), atol=1e-6)
        assert (net(x1, m1) - net(x1)).abs().max() > 0.01   # the mask matters


def test_dict_argument_is_one_argument_in_trace_and_invoke() -> None:
    x1, x2, w1, w2 = _inputs()
    net = _DictIn().eval()
    model = vinterp.NNsight(net)
    b1, b2 = {"x": x1, "w": w1}, {"x": x2, "w": w2}
    with model.trace(b1):
        traced = model.output.save()
    with model.trace() as tracer:
        with tracer.invoke(b1):
            o1 = model.output.save()
        with tracer.invoke(b2):
            o2 = model.output.save()
    with torch.no_grad():
        assert torch.allclose(traced, net(b1), atol=1e-6)
        assert torch.allclose(o1, net(b1), atol=1e-6)
        assert torch.allclose(o2, net(b2), atol=1e-6)


def test_language_model_invoke_still_takes_one_input(hf_model) -> None:  # noqa: ANN001
    lm = hf_model("tiny-llama")
    with pytest.raises(TypeError, match="takes one input"):
        with lm.trace() as tracer:
            with tracer.invoke("Hello", "world"):
                pass
