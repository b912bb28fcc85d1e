"""Guardrails: fast local rails on input, retrieved context, the output stream and images, under
per-tenant policies; NeMo Guardrails runs the configured flows (see `nemo.py`)."""
