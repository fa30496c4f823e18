"""GPT-2: where the standard points live in its HF module tree and in vLLM's."""

from vinterp.models.architectures.base import Architecture, VllmMapping

ARCHITECTURE = Architecture(
    model_types=("gpt2",),
    layers="transformer.h",
    attn="attn",
    mlp="mlp",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    attn_dropout="attn_dropout",
    # vLLM's native GPT2LMHeadModel keeps HF's names; its blocks add their own residuals and
    # return the stream, and ``ln_f`` returns a plain tensor.
    vllm=VllmMapping(layers="transformer.h", attn="attn", mlp="mlp", embed="transformer.wte",
                     final_norm="transformer.ln_f", residual_pair=False,
                     norm_returns_pair=False),
)
