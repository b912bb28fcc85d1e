"""Model registry, worker pool, batcher, runtimes: only torch/torchvision/numpy/onnxruntime."""
