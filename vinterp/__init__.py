"""vinterp: an intervention engine for language models (Hugging Face and vLLM backends)."""

__version__ = "0.1.0"
