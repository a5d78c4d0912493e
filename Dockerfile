# Images of the caption ranking service: a CUDA one (the default, last stage) and a CPU one.
#
#   docker build -t transresnet .                        # GPU: CUDA 12 runtime, torch cu126, faiss-gpu-cu12
#   docker build --target cpu -t transresnet:cpu .       # CPU: python slim, the CPU-only torch build
#   docker run --gpus all -p 8000:8000 -v $PWD/runs/flickr8k/best:/models/checkpoint:ro \
#       -v $PWD/indexes/flickr8k:/index:ro transresnet
#
# The checkpoint directory and the index root are mounted volumes; the entry point is `transresnet serve`,
# so any of its flags (or TRANSRESNET_* variables) can be passed. The GPU image also runs without --gpus.
#
# One CUDA major version for everything that links CUDA: the base image's runtime, torch's wheel index
# (cuXYZ) and faiss-gpu-cuXY must agree, or faiss and torch load two CUDA runtimes and the driver may
# support only one of them. tests/test_dockerfile.py checks that they agree.

# ------------------------------------------------------------------------------------------------- cpu
FROM python:3.11-slim AS cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY transresnet ./transresnet
COPY index ./index
COPY service ./service
COPY configs ./configs

# The CPU-only torch build (about 200 MB instead of several GB of CUDA libraries), then the project.
RUN pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu \
    && pip install .

RUN useradd --create-home --uid 10001 app && mkdir -p /models /index && chown app /app
USER app

# Weights load from the mounted checkpoint only; nothing is fetched from a model hub. (Thread and
# tokenizer defaults are set by the transresnet command itself: transresnet/runtime.py.)
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TRANSRESNET_HOST=0.0.0.0 \
    TRANSRESNET_PORT=8000 \
    TRANSRESNET_DEMO_DIR=/app/.cache/demo

VOLUME ["/models", "/index"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TRANSRESNET_PORT', '8000'), timeout=4)" || exit 1

ENTRYPOINT ["transresnet", "serve"]
CMD ["--checkpoint", "/models/checkpoint", "--index", "/index"]

# ------------------------------------------------------------------------------------------------- gpu
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04 AS gpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY transresnet ./transresnet
COPY index ./index
COPY service ./service
COPY configs ./configs

# torch pinned to its CUDA 12.6 wheels (PyPI's default torch now links CUDA 13, which faiss-gpu-cu12 does
# not); faiss-cpu (a base dependency) and faiss-gpu-cu12 (the gpu extra) ship the same `faiss` module:
# install both, then drop faiss-cpu and restore the GPU build's files.
RUN pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126 \
    && pip install ".[gpu]" \
    && pip uninstall -y faiss-cpu \
    && pip install --no-deps --force-reinstall "faiss-gpu-cu12>=1.8"

RUN useradd --create-home --uid 10001 app && mkdir -p /models /index && chown app /app
USER app

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TRANSRESNET_HOST=0.0.0.0 \
    TRANSRESNET_PORT=8000 \
    TRANSRESNET_DEMO_DIR=/app/.cache/demo

VOLUME ["/models", "/index"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TRANSRESNET_PORT', '8000'), timeout=4)" || exit 1

ENTRYPOINT ["transresnet", "serve"]
CMD ["--checkpoint", "/models/checkpoint", "--index", "/index"]
