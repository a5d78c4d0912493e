# GPU-ready image of the caption ranking service.
#
#   docker build -t transresnet .
#   docker run --gpus all -p 8000:8000 \
#       -v $PWD/runs/flickr8k/best:/models/checkpoint:ro -v $PWD/index-root:/index:ro transresnet
#
# The checkpoint directory and the index root are mounted volumes; the entry point is `transresnet serve`,
# so any of its flags (or TRANSRESNET_* variables) can be passed. Without --gpus it runs on the CPU.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

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

# faiss-cpu (a base dependency) and faiss-gpu-cu12 (the gpu extra) ship the same `faiss` module:
# install both, then drop faiss-cpu and restore the GPU build's files.
RUN pip install ".[gpu]" \
    && pip uninstall -y faiss-cpu \
    && pip install --no-deps --force-reinstall "faiss-gpu-cu12>=1.8"

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
