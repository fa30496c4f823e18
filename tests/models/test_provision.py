"""Provisioned models: bit-exact SmolLM2 dequantization, known answer, tiny models in HF + vLLM."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vinterp.models.provision import smollm2_gguf_path

TINY = ["tiny-gpt2", "tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gptneox"]


def test_smollm2_equals_transformers_gguf_loader_bit_for_bit(smollm2_path):
    gguf = smollm2_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                               dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert ref_sd.keys() == our_sd.keys()
    for name, tensor in ref_sd.items():
        assert our_sd[name].dtype == torch.float32, name
        assert torch.equal(our_sd[name], tensor), name
    # Tied embeddings survive the save/load round trip.
    assert ours.config.tie_word_embeddings
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


def test_smollm2_tokenizer_and_chat_template(smollm2_path):
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    assert len(tok) == 49152
    assert tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user" in text
    assert (smollm2_path / "generation_config.json").is_file()


def test_smollm2_known_answer_paris(smollm2_path):
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    completion = tok.decode(out[0, inputs["input_ids"].shape[1]:])
    assert completion.startswith(" Paris"), completion


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_loads_in_transformers(tiny_model_path, name):
    path = tiny_model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(["Hello world, this is a test"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", TINY)
def test_tiny_model_loads_in_vllm(tiny_model_path, name, monkeypatch):
    # In-process engine core: starts in seconds and needs no __main__ guard.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from vinterp.backends.vllm.engine import hf_classes_untouched

    path = tiny_model_path(name)
    # (vLLM's Transformers backend edits HF's GPT-NeoX classes in place; later tests in this
    # process build HF GPT-NeoX models)
    with hf_classes_untouched(path):
        llm = LLM(model=str(path), dtype="float32", enforce_eager=True,
                  kv_cache_memory_bytes=256 * 1024**2, max_model_len=512, seed=0)
    try:
        (out,) = llm.generate(["Hello world"], SamplingParams(max_tokens=4, temperature=0.0,
                                                              ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 4
    finally:
        del llm
        import gc

        gc.collect()
