"""One vLLM engine per model for all plugin/backend tests (engine start is the slow part).

Engines that later tests may share live for the whole session and are never closed: each
start costs seconds. Closing one is safe for the others (the plugin keeps vLLM's shared
parallel groups while any in-process engine lives; test_lifecycle checks it), but a closed
engine cannot be shared.
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
