"""Tiny random models for fast tests, built locally from configs with fixed seeds.

All use SmolLM2's tokenizer (vocab 49152): no GPT-2 tokenizer is available offline. Sizes are
chosen to load in both transformers and vLLM on CPU: 2 heads of head_dim 32 (vLLM's CPU
attention needs a head size of at least 32), hidden 64, intermediate 128, float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vinterp.models.registry import model_dir

VOCAB_SIZE = 49152
HIDDEN = 64
HEADS = 2  # head_dim = 32
INTERMEDIATE = 128
LAYERS = 2
MAX_POSITIONS = 512
SEED = 0


def _special_ids(tokenizer: Any) -> dict[str, int]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad,
    }


def _build(out_dir: Path, model_cls: Any, config: Any, tokenizer: Any) -> None:
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(SEED)
    model = model_cls(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(**_special_ids(tokenizer))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir("smollm2-135m"))


def build_tiny_gpt2(out_dir: Path) -> None:
    """GPT2LMHeadModel, tied embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer()
    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=MAX_POSITIONS, n_embd=HIDDEN, n_layer=LAYERS,
        n_head=HEADS, n_inner=INTERMEDIATE, tie_word_embeddings=True, **_special_ids(tok),
    )
    _build(out_dir, GPT2LMHeadModel, config, tok)


def build_tiny_llama(out_dir: Path) -> None:
    """LlamaForCausalLM, untied embeddings (exercises a separate lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False, **_special_ids(tok),
    )
    _build(out_dir, LlamaForCausalLM, config, tok)


def build_tiny_mistral(out_dir: Path) -> None:
    """MistralForCausalLM with grouped-query attention (1 KV head), untied embeddings."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = _tokenizer()
    config = MistralConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=1,
        head_dim=HIDDEN // HEADS, max_position_embeddings=MAX_POSITIONS,
        sliding_window=None, tie_word_embeddings=False, **_special_ids(tok),
    )
    _build(out_dir, MistralForCausalLM, config, tok)


def build_tiny_qwen2(out_dir: Path) -> None:
    """Qwen2ForCausalLM with grouped-query attention (1 KV head) and tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _tokenizer()
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=1,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True, **_special_ids(tok),
    )
    _build(out_dir, Qwen2ForCausalLM, config, tok)


def build_tiny_gptneox(out_dir: Path) -> None:
    """GPTNeoXForCausalLM (parallel residual, partial rotary), untied embeddings."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = _tokenizer()
    config = GPTNeoXConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, **_special_ids(tok),
    )
    _build(out_dir, GPTNeoXForCausalLM, config, tok)
