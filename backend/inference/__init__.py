"""Model manifests, worker pool, batcher, runtimes (only torch/torchvision/numpy/onnxruntime), and
the LLM providers (`llm/`)."""
