# syntax=docker/dockerfile:1
# Build: a virtualenv with Sightline installed (editable, so migrations/ stays beside backend/).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"
# llama-cpp-python (the packaged chat model) compiles from source.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md alembic.ini schema.graphql ./
COPY backend ./backend
COPY migrations ./migrations
RUN /opt/venv/bin/pip install -e .

# The inference service's build (`--target inference`): PyTriton on top of the project, and the
# Triton stub's numpy-1 environment made here, so that no pod installs anything when it starts
# (backend/inference/serve.py; requirements-serve.txt says why PyTriton comes with --no-deps).
# INFERENCE_DEVICE=cuda (GPU nodes) swaps the CPU torch for requirements-gpu.txt's CUDA build
# (about 5.5 GB); `cpu` keeps the project's CPU wheel (docker-compose's CPU way to try it).
FROM build AS build-inference
ARG INFERENCE_DEVICE=cuda
COPY requirements-serve.txt requirements-gpu.txt ./
RUN /opt/venv/bin/pip install -r requirements-serve.txt \
    && /opt/venv/bin/pip install --no-deps nvidia-pytriton==0.7.0 \
    && if [ "$INFERENCE_DEVICE" = cuda ]; then /opt/venv/bin/pip install -r requirements-gpu.txt; fi
RUN /opt/venv/bin/python -c "from pathlib import Path; from backend.inference.serve import \
stub_environment; stub_environment(Path('/opt/triton-stub'))"

# What both images run on: the system libraries and an unprivileged user.
FROM python:3.11-slim AS runtime-base
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 tesseract-ocr-eng \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --create-home --home-dir /home/sightline sightline \
    && mkdir /data && chown sightline /data
# ONNX Runtime's telemetry stays off in every process of both images (backend/__init__.py sets
# it too, for installs without these images)
ENV ORT_DISABLE_TELEMETRY=1

# The inference service: `docker build --target inference -t sightline-inference .`
# (deploy/kubernetes/inference, docker-compose's `gpu` profile). Triton's HTTP, gRPC and
# metrics ports; Python's LIBDIR on LD_LIBRARY_PATH is set by the command itself.
FROM runtime-base AS inference
COPY --from=build-inference /opt/venv /opt/venv
COPY --from=build-inference /opt/triton-stub /opt/triton-stub
COPY --from=build-inference /app /app
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SIGHTLINE_DATA_DIR=/data \
    SIGHTLINE_VISION_SERVE_HOST=0.0.0.0 \
    SIGHTLINE_VISION_SERVE_STUB_ENV=/opt/triton-stub
USER sightline
EXPOSE 8000 8001 8002
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=2).status != 200)"
CMD ["sightline", "inference", "serve"]

# Runtime (the default target, the API): the venv and the source tree, run as an unprivileged
# user.
FROM runtime-base AS runtime
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SIGHTLINE_SERVER_HOST=0.0.0.0 \
    SIGHTLINE_SERVER_PORT=8000 \
    SIGHTLINE_DATA_DIR=/data
USER sightline
EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["sightline", "serve"]
