# FA Pool serving image (GPU). Also the image of the KubeRay manifests in deploy/kuberay/.
#
#   docker build -t fapool:latest .
#   docker build -t fapool:h100 --build-arg EXTRAS=flash4 .     # FlashAttention 4 (Hopper)
#   docker run --gpus all --shm-size=16g -p 8000:8000 -p 8265:8265 fapool:latest
#
# The `flash` extra (FlashAttention 2) compiles CUDA code unless a prebuilt wheel matches:
# build it with --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG EXTRAS=""
# Optional PyTorch wheel index, e.g. https://download.pytorch.org/whl/cu128 to match the
# CUDA of BASE_IMAGE; empty installs torch from PyPI with the rest.
ARG TORCH_INDEX_URL=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# Ubuntu 24.04 images ship a user `ubuntu` with uid 1000; give that uid to fapool
# (the uid KubeRay's and Ray's own images run as).
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --uid 1000 --create-home --shell /bin/bash fapool

WORKDIR /app
COPY pyproject.toml README.md* ./
COPY fapool ./fapool
COPY actors ./actors
COPY serve ./serve
COPY bench ./bench
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install torch --index-url "$TORCH_INDEX_URL"; fi \
    && pip install ".${EXTRAS:+[$EXTRAS]}"
# serve_config.yaml and friends, for `serve run deploy/serve_config.yaml` in the container.
COPY deploy ./deploy

USER fapool
ENV HOME=/home/fapool
EXPOSE 8000 8265

# Liveness only: /health answers without a model step. Adjust the port if you pass --port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# KubeRay and the Ray cluster launcher override the entrypoint with their own `ray start`.
ENTRYPOINT ["fapool"]
CMD ["serve", "--host", "0.0.0.0"]
