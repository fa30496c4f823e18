"""Engine settings shared by plain vLLM and vinterp on vLLM, so both run the same engine."""

from __future__ import annotations

from typing import Any

from benchmarks.workloads import WorkloadConfig

# Longest many_users request: 200 prompt tokens + 128 new ones, with headroom.
MAX_MODEL_LEN = 512
# Largest batch (in tokens) captured as a CUDA graph, plain and vinterp alike.
CUDAGRAPH_MAX = 128


def engine_kwargs(cfg: WorkloadConfig, enforce_eager: bool) -> dict[str, Any]:
    """vLLM engine arguments for the benchmark model.

    The KV cache is sized explicitly: by default vLLM on CPU claims 90% of RAM, which fails
    when other workers already hold memory. ``dtype`` is explicit because ``"auto"`` loads a
    float32 checkpoint as bf16 on x86 CPUs. Several workers' engines may share one GPU.
    """
    from vinterp.backends.vllm.engine import allow_shared_gpu, on_cuda

    kwargs = {
        "model": cfg.model_path,
        "dtype": cfg.dtype,
        "enforce_eager": enforce_eager,
        "kv_cache_memory_bytes": cfg.kv_cache_bytes,
        "max_model_len": MAX_MODEL_LEN,
        "seed": cfg.seed,
    }
    if on_cuda():
        allow_shared_gpu(kwargs)
        # CUDA graphs for batches up to 128 tokens: the workloads decode at most 64 requests at
        # once, and vLLM's default (up to 512) would spend minutes capturing sizes never replayed
        kwargs["compilation_config"] = {"max_cudagraph_capture_size": CUDAGRAPH_MAX}
    return kwargs


def vllm_versions() -> dict[str, str]:
    import torch
    import transformers
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}
