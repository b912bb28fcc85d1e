"""OpenAI-compatible REST under /v1: chat completions, models and embeddings for OpenAI clients."""
