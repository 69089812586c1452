"""Prometheus metrics of every service, served over HTTP with prometheus-client.

`--metrics-port PORT` on any service serves `/metrics` on that port (0: a free one); the service
reports where on stdout (`SWIFTD_METRICS <host:port>`), as it reports its gRPC address. Without
the flag nothing listens. Prometheus adds `job` and `instance` at scrape time, so no metric
carries a service label. Names (all `swiftd_...`):

  rpcs_total{method, code}             RPCs answered, by gRPC status (MetricsInterceptor)
  rpc_seconds{method}                  their duration
  stage_seconds{stage}                 each stage of a request: the stage names of its timings
                                       (validate, queue, plan, text_encode, denoise, vae_decode, ...;
                                       ControlNet ids left out: controlnet.compute, controlnet.transport)
  controlnet_step_seconds{part}        per denoising step: wait for residuals, their transport
  queue_depth{model} / in_flight{model}  requests waiting / running: admission at the gateway, the
                                       denoising loop on a UNet worker
  lora_lookups_total{tier, result}     LoRA deltas looked up: worker (its inbox), store_host,
                                       store_disk; hit or miss (a store miss of both is a precompute)
  lora_bytes_total{direction}          LoRA delta bytes sent (store) or received (worker)
  compiled{part}                       1 where the part runs on compiled artifacts, 0 eager
  start_seconds                        from process start to serving (loading, compiling or not)
  device_memory_bytes{device}          allocated CUDA memory, or the process's resident memory on CPU
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from swiftd.interceptor import wrap_behavior

# Not requests: a Watch stream lasts as long as its client wants; reflection is for tooling.
_NOT_COUNTED = ("/grpc.health.v1.Health/Watch", "/grpc.reflection.")
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

RPCS = Counter("swiftd_rpcs", "RPCs answered, by gRPC status code", ["method", "code"])
RPC_SECONDS = Histogram("swiftd_rpc_seconds", "RPC duration", ["method"], buckets=LATENCY_BUCKETS)
STAGE_SECONDS = Histogram("swiftd_stage_seconds", "time per stage of a request", ["stage"], buckets=LATENCY_BUCKETS)
CONTROLNET_STEP_SECONDS = Histogram(
    "swiftd_controlnet_step_seconds",
    "per denoising step: ControlNet wait and transport",
    ["part"],
    buckets=STEP_BUCKETS,
)
CONTROLNET_STEPS = Counter(
    "swiftd_controlnet_steps",
    "steps a ControlNet worker computed, by how the sample came (ring: the residual ring's sample buffer; "
    "bytes: in a message, as for a session's first steps and inline sessions) and how the residuals left "
    "(in_place: computed straight into a ring slot; copied: into one; bytes: in a message)",
    ["sample", "residuals"],
)
RESIDUAL_RINGS = Counter(
    "swiftd_residual_rings",
    "residual rings a ControlNet worker offered, by transport, new or kept from an earlier session with the "
    "same UNet worker (reused)",
    ["transport", "ring"],
)
QUEUE_DEPTH = Gauge("swiftd_queue_depth", "requests waiting", ["model"])
IN_FLIGHT = Gauge("swiftd_in_flight", "requests running", ["model"])
LORA_LOOKUPS = Counter("swiftd_lora_lookups", "LoRA deltas looked up, by tier", ["tier", "result"])
LORA_BYTES = Counter("swiftd_lora_bytes", "LoRA delta bytes moved", ["direction"])
COMPILED = Gauge("swiftd_compiled", "1 where the part runs on compiled artifacts", ["part"])
COMPILATIONS = Gauge(
    "swiftd_compilations",
    "torch compilation work in this process so far, by kind (compiler.runtime.compile_activity; "
    "a worker on compiled artifacts stays at 0, across LoRA swaps too)",
    ["kind"],
)
START_SECONDS = Gauge("swiftd_start_seconds", "seconds from process start to serving (a warm start is short)")
DEVICE_MEMORY = Gauge("swiftd_device_memory_bytes", "allocated device memory (CPU: resident memory)", ["device"])


def add_metrics_argument(parser) -> None:
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port (0: a free one)"
    )


def serve_metrics(port: int | None, host: str) -> str | None:
    """Start the /metrics endpoint on `port` (None: none); report and return its address."""
    if port is None:
        return None
    server, _ = start_http_server(port, addr=host)
    address = f"{host}:{server.server_port}"
    print(f"SWIFTD_METRICS {address}", flush=True)
    return address


# -- what services report --------------------------------------------------------------------------

_CONTROLNET_STAGE = re.compile(r"^controlnet\.[^.]+\.(?P<part>\w+)$")  # controlnet.<id>.<part>
_PER_STEP = {"denoise.controlnet_wait": "wait", "controlnet.transport": "transport"}


def observe_stages(timings: dict[str, float], steps: int = 0) -> None:
    """A finished request's stage timings; with its step count, the per-step ControlNet parts."""
    for stage, seconds in timings.items():
        match = _CONTROLNET_STAGE.match(stage)
        if match:
            stage = f"controlnet.{match['part']}"
        STAGE_SECONDS.labels(stage).observe(seconds)
        if steps and stage in _PER_STEP:
            CONTROLNET_STEP_SECONDS.labels(_PER_STEP[stage]).observe(seconds / steps)


def track_load(model: str, waiting: Callable[[], int], running: Callable[[], int]) -> None:
    """Queue depth and in-flight count of `model`, read at scrape time."""
    QUEUE_DEPTH.labels(model).set_function(waiting)
    IN_FLIGHT.labels(model).set_function(running)


def track_compilations(activity: Callable[[], dict[str, int]]) -> None:
    """Each kind of `activity()` (torch's compile counters), read at scrape time."""
    for kind in activity():
        COMPILATIONS.labels(kind).set_function(lambda kind=kind: activity().get(kind, 0))


def track_device_memory(device: str) -> None:
    """Allocated memory of `device` (cuda:N), or this process's resident memory (cpu), at scrape time."""
    if device.startswith("cuda"):
        import torch

        DEVICE_MEMORY.labels(device).set_function(lambda: torch.cuda.memory_allocated(device))
    else:
        page = os.sysconf("SC_PAGE_SIZE")
        DEVICE_MEMORY.labels(device).set_function(lambda: _resident_pages() * page)


def _resident_pages() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1])


class MetricsInterceptor(grpc.ServerInterceptor):
    """Every RPC's status and duration (outermost, so refusals while draining count too)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_NOT_COUNTED):
            return handler

        def record(context, t0: float, otherwise: grpc.StatusCode) -> None:
            # context.code(): what the handler (or the error interceptor inside) set; else the outcome.
            code = context.code() or otherwise
            RPCS.labels(method, code.name).inc()
            RPC_SECONDS.labels(method).observe(time.perf_counter() - t0)

        def wrap_unary(behavior):
            def call(request_or_iterator, context):
                t0, outcome = time.perf_counter(), grpc.StatusCode.UNKNOWN
                try:
                    response = behavior(request_or_iterator, context)
                    outcome = grpc.StatusCode.OK
                    return response
                finally:
                    record(context, t0, outcome)

            return call

        def wrap_stream(behavior):
            def call(request_or_iterator, context):
                t0, outcome = time.perf_counter(), grpc.StatusCode.UNKNOWN
                try:
                    yield from behavior(request_or_iterator, context)
                    outcome = grpc.StatusCode.OK
                except GeneratorExit:  # the client went away mid-stream
                    outcome = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    record(context, t0, outcome)

            return call

        return wrap_behavior(handler, wrap_unary, wrap_stream)
