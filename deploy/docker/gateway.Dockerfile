# The gateway: the public API. It holds no weights and imports no torch, so its image is the
# project's base dependencies on a slim Python (about 250 MB instead of several GB).
#
#   docker build -f deploy/docker/gateway.Dockerfile -t swiftd-gateway:<tag> .
#
# Base images are pinned to an exact release; pin them by digest (@sha256:...) in your registry's
# mirror when you build for production.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/swiftd
WORKDIR /src
COPY pyproject.toml README.md ./
COPY swiftd swiftd
COPY services services
COPY compiler compiler
# No extras: grpc, protobuf, OpenTelemetry, Pillow, numpy. The worker extra (torch, diffusers) stays out.
RUN /opt/swiftd/bin/pip install . \
 && /opt/swiftd/bin/python -c "import sys, services.gateway.__main__; assert 'torch' not in sys.modules"

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin swiftd
COPY --from=build /opt/swiftd /opt/swiftd
ENV PATH=/opt/swiftd/bin:$PATH PYTHONUNBUFFERED=1 SWIFTD_LOG_FORMAT=json
USER 10001
EXPOSE 50050
# No ENTRYPOINT: a pod's `args` (deploy/k8s) are the whole command line.
CMD ["python", "-m", "services.gateway", "--help"]
