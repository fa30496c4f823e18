"""GPT-NeoX: where the standard points live in its HF module tree."""

from vinterp.models.architectures.base import Architecture

ARCHITECTURE = Architecture(
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    attn="attention",
    mlp="mlp",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="lm_head",  # transformers 5 renamed embed_out
)
