"""GPT-NeoX: where the standard points live in its HF module tree and in vLLM's."""

from vinterp.models.architectures.base import Architecture, VllmMapping

ARCHITECTURE = Architecture(
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    attn="attention",
    mlp="mlp",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="lm_head",  # transformers 5 renamed embed_out
    # vLLM 0.26 (the CUDA build used on GPUs) has a native GPT-NeoX: HF's names under
    # ``gpt_neox``, layers that take ``(positions, hidden)`` and return the residual stream.
    vllm=VllmMapping(layers="gpt_neox.layers", attn="attention", mlp="mlp",
                     embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
                     residual_pair=False, norm_returns_pair=False),
    # vLLM 0.32 dropped it: its Transformers backend wraps HF's GPTNeoXModel as ``model`` (HF
    # modules, plain-tensor layers, [1, tokens, hidden] values).
    vllm_alternatives=(
        VllmMapping(layers="model.layers", attn="attention", mlp="mlp",
                    embed="model.embed_in", final_norm="model.final_layer_norm",
                    residual_pair=False, norm_returns_pair=False, batch_dim=True),
    ),
)
