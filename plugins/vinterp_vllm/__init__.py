"""vinterp's vLLM plugin, loaded by vLLM through the ``vllm.general_plugins`` entry point."""


def register() -> None:
    """Called by vLLM in every process at start-up; nothing to register yet."""
