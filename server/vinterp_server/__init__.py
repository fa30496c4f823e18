"""vinterp's OpenAI-compatible FastAPI server."""
