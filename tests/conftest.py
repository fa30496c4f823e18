"""Shared fixtures: offline models, provisioned once per session (cached in $VINTERP_HOME)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vinterp.models import resolve_model


def pytest_configure(config: pytest.Config) -> None:
    """``VINTERP_TEST_DEVICE=cuda``: the HF suite's models and the tensors tests make go to the
    GPU (tests/backends/hf/test_cuda.py checks CPU inputs reaching a GPU model separately)."""
    import os

    device = os.environ.get("VINTERP_TEST_DEVICE")
    if device:
        import torch

        torch.set_default_device(device)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when no CUDA device is present (the only allowed skips)."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Directory of the float32 SmolLM2-135M-Instruct model."""
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_path() -> Callable[[str], Path]:
    """Factory: ``tiny_model_path("tiny-llama")`` → directory of that tiny random model."""
    return resolve_model


# ---------------------------------------------------------------- core test helpers (issue 3)
_LOADED_MODELS: dict[str, object] = {}


@pytest.fixture(scope="session")
def hf_model() -> Callable[[str], object]:
    """Factory: ``hf_model("tiny-gpt2")`` → a ``LanguageModel`` (hf backend, fp32), loaded once.

    ``VINTERP_TEST_DEVICE=cuda`` loads them on a GPU instead (the whole HF suite then runs
    there; see scripts/gpu_check.sh).
    """
    import os

    import torch

    from vinterp import LanguageModel

    device = os.environ.get("VINTERP_TEST_DEVICE", "cpu")

    def get(name: str) -> object:
        if name not in _LOADED_MODELS:
            _LOADED_MODELS[name] = LanguageModel(name, device_map=device, dtype=torch.float32)
        return _LOADED_MODELS[name]

    return get


def assert_same_values(a: object, b: object, exact: bool = True, atol: float = 0.0) -> None:
    """Recursive equality of tensors / tuples / lists / dicts (``torch.equal`` when exact)."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{type(b)} is not a tensor"
        assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
        if exact:
            assert torch.equal(a, b), f"max abs diff {(a.double() - b.double()).abs().max()}"
        else:
            assert torch.allclose(a, b, atol=atol, rtol=0), \
                f"max abs diff {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same_values(a[k], b[k], exact, atol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_values(x, y, exact, atol)
    elif a is None or isinstance(a, (bool, int, float, str)):
        assert a == b
    else:  # opaque objects (an HF cache passed as a kwarg): same kind is all we can ask
        assert type(a) is type(b)


def _check_roundtrip(model: object, tracer: object, compare: bool = True) -> object:
    """Re-run ``tracer``'s graph from its JSON on the model's backend; the graph must be
    identical after the round trip and, with ``compare``, give the same saved values."""
    from vinterp import ir

    graph = tracer.graph
    loaded = ir.load(tracer.to_json())
    assert loaded == graph
    assert ir.dumps(loaded) == tracer.to_json()
    result = model._backend.run(loaded)
    if compare:
        # the graph's ids (renumbered when some nodes run on the client, from generated ids)
        device_ids = getattr(tracer, "_device_ids", None) or {}
        on_client = getattr(tracer, "_post", set())
        checked = 0
        for proxy in tracer.saved:
            if not proxy._has_value or proxy._id in on_client:
                continue  # a step that never ran / after tracer.stop(); computed on the client
            key = device_ids.get(proxy._id, proxy._id)
            assert key in result.saves, \
                f"save {proxy._id} disappeared in the JSON round trip"
            assert_same_values(proxy._value, result.saves[key])
            checked += 1
        assert checked or not tracer.saved, "no save of this trace was compared"
        if tracer.result is not None:
            assert_same_values(list(tracer.result), list(result.generated))
    return result


@pytest.fixture
def roundtrip() -> Callable[..., object]:
    """``roundtrip(model, tracer)``: JSON round trip of the graph + identical results."""
    return _check_roundtrip


class RawCapture:
    """Plain PyTorch forward hooks on ``model._model`` recording outputs / inputs by path."""

    def __init__(self, module: object, paths: list[str]) -> None:
        self.module = module
        self.paths = paths
        self.outputs: dict[str, object] = {}
        self.args: dict[str, tuple] = {}
        self.kwargs: dict[str, dict] = {}
        self.handles: list[object] = []

    def __enter__(self) -> RawCapture:
        mods = dict(self.module.named_modules())
        for p in self.paths:
            def hook(mod, args, kwargs, out, p=p):  # noqa: ANN001, ANN202
                self.outputs[p] = out
                self.args[p] = args
                self.kwargs[p] = kwargs
            self.handles.append(mods[p].register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


@pytest.fixture
def raw_run() -> Callable[..., RawCapture]:
    """``raw_run(model, ids, paths)``: plain forward of the HF model with hooks on ``paths``;
    returns the :class:`RawCapture` (plus ``.logits``)."""
    import torch

    def run(model: object, ids: list[int] | torch.Tensor, paths: list[str]) -> RawCapture:
        ids = torch.as_tensor(ids).reshape(1, -1).to(model._model.device)
        with RawCapture(model._model, paths) as cap, torch.no_grad():
            cap.logits = model._model(input_ids=ids).logits
        return cap

    return run
