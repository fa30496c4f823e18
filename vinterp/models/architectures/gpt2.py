"""GPT-2: where the standard points live in its HF module tree."""

from vinterp.models.architectures.base import Architecture

ARCHITECTURE = Architecture(
    model_types=("gpt2",),
    layers="transformer.h",
    attn="attn",
    mlp="mlp",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    attn_dropout="attn_dropout",
)
