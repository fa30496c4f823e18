"""vinterp's vLLM plugin, loaded by vLLM through the ``vllm.general_plugins`` entry point."""


def register() -> None:
    """Called by vLLM in every process at start-up: patch the worker so engines built for
    vinterp get their point hooks when the model loads (see ``vllm_patches``)."""
    from vinterp_vllm.vllm_patches import apply

    apply()
