"""One vLLM engine (tiny-llama, float32) for every vllm compatibility test in this folder."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def compat_vllm():
    """tiny-llama on the vllm backend, session-scoped (each engine start costs seconds)."""
    from vinterp import LanguageModel

    return LanguageModel("tiny-llama", backend="vllm", max_model_len=256, max_num_seqs=8)


@pytest.fixture(scope="module", params=["hf", "vllm"])
def backend(request, hf_model):
    """``(name, model)`` for each backend a test compares with nnsight's recorded values."""
    if request.param == "hf":
        return "hf", hf_model("tiny-llama")
    return "vllm", request.getfixturevalue("compat_vllm")
