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

# Runtime: the venv and the source tree, run as an unprivileged user.
FROM python:3.11-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 tesseract-ocr-eng \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --create-home --home-dir /home/sightline sightline \
    && mkdir /data && chown sightline /data
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
