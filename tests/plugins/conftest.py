"""One vLLM engine per model for all plugin/backend tests (engine start is the slow part).

Engines that later tests may share live for the whole session and are never closed: closing
an in-process engine tears down vLLM's process groups, which every other in-process engine
uses (the next forward of a surviving engine fails with "pipeline model parallel group is not
initialized"). A new engine sets them up again, so a module may close its own engines only
while no session engine is alive (test_architectures runs before the first is built).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def tiny_path():
    from vinterp.models.registry import resolve_model

    return resolve_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_vllm(tiny_path):
    """tiny-llama in vLLM, chunked prefill forced small and prefix caching on."""
    from vinterp.backends.vllm import VllmBackend

    return VllmBackend(tiny_path, max_num_batched_tokens=32, enable_prefix_caching=True,
                       max_num_seqs=32, max_model_len=256)


@pytest.fixture(scope="session")
def tiny_hf(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
