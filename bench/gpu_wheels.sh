#!/bin/sh
# The Python packages a lent GPU machine lacks (its image has torch, transformers, peft, accelerate,
# safetensors, numpy, pillow, prometheus-client; docs/gpu.md), as cp312 wheels in .whl (ignored by
# git), for `run` to carry. Run here, from the repository root, before asking for the machine.
set -e
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    diffusers==0.42.1 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 \
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 \
    opentelemetry-exporter-otlp-proto-grpc==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 \
    opentelemetry-semantic-conventions==0.66b2 opentelemetry-instrumentation==0.66b2 \
    opentelemetry-instrumentation-grpc==0.66b2 googleapis-common-protos==1.76.0 dnspython==2.9.2 \
    importlib-metadata==8.7.0  # the image's huggingface-hub (1.33) satisfies diffusers (>=1.32)
du -sh .whl
