"""Shared fixtures: offline models, provisioned once per session (cached in $VINTERP_HOME)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vinterp.models import resolve_model


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
