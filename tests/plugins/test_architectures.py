"""Every architecture with a vLLM mapping gives the HF backend's values and tokens.

GPT-2 (native vLLM module, plain-tensor blocks and final norm), GPT-NeoX (vLLM 0.32's
Transformers backend: HF's own modules with a batch dimension; vLLM 0.26's native module on a
GPU, whose layers take positions first), Mistral and Qwen2 (fused residual pairs):
the differences live in ``VllmMapping`` and these tests check each one end to end through
``LanguageModel``. One engine per model, closed before the next one starts.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import VS_HF, rel_err

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
            # inputs: the hidden states, not the positions some layers take first
            "layer1_in": model.layers[1].input.save(),
            "mlp1_in": model.layers[1].mlp.input.save(),
            "attn1": model.layers[1].attn.output[0].save(),
            "mlp1": model.layers[1].mlp.output.save(),
            "layer1": model.layers[1].output.save(),
            "final_norm": model.final_norm.output.save(),
            "logits": model.logits.save(),
            # the logit lens: the final norm and LM head called on a traced value
            "lens": model.lm_head(model.final_norm(model.layers[0].output)).save(),
        }
    return {k: v for k, v in saved.items()}


def test_vllm_mapping_follows_the_loaded_model():
    """A table may carry mappings for several vLLM versions; the loaded model's modules pick
    one, and a model matching none is refused with the fix."""
    from vinterp.models.architectures import for_model_type

    neox = for_model_type("gpt_neox")
    native = {"gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm"}
    wrapped = {"model.layers", "model.embed_in", "model.final_layer_norm"}
    assert neox.in_vllm(native).vllm.batch_dim is False
    assert neox.in_vllm(wrapped).vllm.batch_dim is True
    assert for_model_type("llama").in_vllm({"model.layers", "model.embed_tokens",
                                            "model.norm"}).vllm.layers == "model.layers"
    with pytest.raises(ValueError, match="add a VllmMapping"):
        neox.in_vllm({"transformer.h"})


def test_trace_points_equal_hf(pair):
    name, hf, vl = pair
    for prompt in PROMPTS:
        want, got = _trace(hf, prompt), _trace(vl, prompt)
        for point, ref in want.items():
            assert got[point].shape == ref.shape, (name, point)
            assert rel_err(got[point], ref) < VS_HF, (name, prompt, point)


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
