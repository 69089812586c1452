# UNet workers, ControlNet workers, the LoRA store and the compile Job: everything that holds
# weights runs this image (one image, so compiled artifacts always meet the torch they were
# built with). The command is chosen per deployment: `python -m services.unet ...`,
# `python -m services.controlnet ...`, `python -m services.lora_store ...`, `python -m compiler build ...`.
#
#   docker build -f deploy/docker/worker.Dockerfile -t swiftd-worker:<tag> .
#
# torch is the project's pinned version (pyproject.toml), the CUDA build matching the base image.
# Base images are pinned to an exact release; pin them by digest (@sha256:...) in your registry's
# mirror when you build for production.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/swiftd
# torch first, from the CUDA index: the worker extra's torch pin then finds it installed.
RUN /opt/swiftd/bin/pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY swiftd swiftd
COPY services services
COPY compiler compiler
RUN /opt/swiftd/bin/pip install ".[worker]"

FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# build-essential stays: torch.compile (Inductor) and the compile Job need a C++ compiler at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 build-essential \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin swiftd
COPY --from=build /opt/swiftd /opt/swiftd
# Caches torch and Triton write at run time go under /tmp (an emptyDir: the root filesystem is read-only).
ENV PATH=/opt/swiftd/bin:$PATH PYTHONUNBUFFERED=1 SWIFTD_LOG_FORMAT=json \
    HOME=/tmp TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor TRITON_CACHE_DIR=/tmp/triton
USER 10001
EXPOSE 50051 50052 50053
# No ENTRYPOINT: a pod's `args` (deploy/k8s) are the whole command line.
CMD ["python", "-m", "services.unet", "--help"]
