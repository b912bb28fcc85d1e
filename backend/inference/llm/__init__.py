"""LLM providers behind one streaming interface: OpenAI-compatible endpoints, a local model."""
