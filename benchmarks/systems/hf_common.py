"""Loading the benchmark model with plain transformers (used by hf_hooks and for checks)."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.workloads import WorkloadConfig


def load_hf(cfg: WorkloadConfig) -> tuple[Any, Any, float]:
    """Return ``(model, tokenizer, load_seconds)``: eval mode, ``cfg.dtype``, left padding.

    Left padding keeps every prompt's last token at index -1 and is what batched ``generate``
    needs for decoder-only models.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(cfg.model_path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=getattr(torch, cfg.dtype))
    model.to(cfg.device).eval()
    return model, tok, time.perf_counter() - t0


def hf_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def residual(output: Any) -> Any:
    """A decoder layer's hidden states (transformers 5 returns a tensor; 4.x a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_residual(output: Any, value: Any) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value
