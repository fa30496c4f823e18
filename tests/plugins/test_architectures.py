"""Every architecture with a vLLM mapping gives the HF backend's values and tokens.

GPT-2 (native vLLM module, plain-tensor blocks and final norm), GPT-NeoX (vLLM's Transformers
backend: HF's own modules with a batch dimension), Mistral and Qwen2 (fused residual pairs):
the differences live in ``VllmMapping`` and these tests check each one end to end through
``LanguageModel``. One engine per model, closed before the next one starts.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import rel_err

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vinterp import LanguageModel  # noqa: E402

MODELS = ["tiny-gpt2", "tiny-gptneox", "tiny-mistral", "tiny-qwen2"]
PROMPTS = ["The cat sat on the mat and looked", "Hello", "One two three four five six seven"]


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    """(HF model, vLLM model) for one architecture; the engine is closed afterwards."""
    name = request.param
    hf = LanguageModel(name, backend="hf")
    vl = LanguageModel(name, backend="vllm", max_model_len=256, max_num_seqs=16)
    yield name, hf, vl
    vl._backend.close()


def _trace(model, prompt: str) -> dict[str, torch.Tensor]:
    with model.trace(prompt):
        saved = {
            "embed": model.embed.output.save(),
            "layer0": model.layers[0].output.save(),
            "attn1": model.layers[1].attn.output[0].save(),
            "mlp1": model.layers[1].mlp.output.save(),
            "layer1": model.layers[1].output.save(),
            "final_norm": model.final_norm.output.save(),
            "logits": model.logits.save(),
            # the logit lens: the final norm and LM head called on a traced value
            "lens": model.lm_head(model.final_norm(model.layers[0].output)).save(),
        }
    return {k: v for k, v in saved.items()}


def test_trace_points_equal_hf(pair):
    name, hf, vl = pair
    for prompt in PROMPTS:
        want, got = _trace(hf, prompt), _trace(vl, prompt)
        for point, ref in want.items():
            assert got[point].shape == ref.shape, (name, point)
            assert rel_err(got[point], ref) < 1e-4, (name, prompt, point)


def _steered(model, vectors: list[torch.Tensor]) -> list[list[int]]:
    with model.generate(max_new_tokens=12) as tracer:
        for v in vectors:
            for p in PROMPTS:
                with tracer.invoke(p):
                    with tracer.all():
                        model.layers[1].output.steer(v, scale=1.0)
    return [t.tolist() for t in tracer.result]


def test_steered_greedy_tokens_equal_hf(pair):
    name, hf, vl = pair
    g = torch.Generator().manual_seed(0)
    hidden = hf.config.hidden_size
    vectors = [torch.randn(hidden, generator=g) * s for s in (0.0, 4.0, 16.0)]
    want, got = _steered(hf, vectors), _steered(vl, vectors)
    assert got == want, name
    assert want[0] != want[2 * len(PROMPTS)], "the vector should change the tokens"
