"""Qwen2: where the standard points live in its HF module tree."""

from vinterp.models.architectures.base import Architecture, VllmMapping

ARCHITECTURE = Architecture(
    model_types=("qwen2",),
    layers="model.layers",
    attn="self_attn",
    mlp="mlp",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    vllm=VllmMapping(),
)
