#!/usr/bin/env bash
# The GPU checks in one go, on a GPU node with torch and torchvision (the web stack is not needed):
# the pool's and the torchvision runtime's tests with their models on the GPU, then
# bench/gpu_inference.py on the torch and torchvision runtimes against the raw models.
# Usage: bench/gpu_run.sh [seconds per measurement, default 10] [models, comma-separated]
#        [batches in flight per worker, default 2: SIGHTLINE_VISION_BATCHES_IN_FLIGHT for GPUs]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export SIGHTLINE_TEST_INFERENCE_DEVICE="${SIGHTLINE_TEST_INFERENCE_DEVICE:-cuda}"
seconds="${1:-10}"
models="${2:-resnet50,tv-resnet50,tv-fasterrcnn_mobilenet_v3_large_fpn,tv-ssdlite320_mobilenet_v3_large}"
in_flight="${3:-2}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
# --confcutdir: tests/conftest.py (the web stack's fixtures) is not needed here. Deselected: the
# tests of our packaged models (their PyPI packages are not on a bare GPU image) and of a Caffe
# graph (OpenCV 5 removed the Caffe importer; the project pins OpenCV 4)
python3 -m pytest --confcutdir=tests/inference -p no:cacheprovider -q \
  -k "not packaged and not dnn_graph_that_is_no_ssd" \
  tests/inference/test_torchvision.py tests/inference/test_pool.py \
  tests/inference/test_transport.py tests/inference/test_pool_versions.py
tests=$?
python3 bench/gpu_inference.py --device "$SIGHTLINE_TEST_INFERENCE_DEVICE" --batch 32 \
  --seconds "$seconds" --in-flight "$in_flight" --model "$models"
bench=$?
exit $((tests || bench))
