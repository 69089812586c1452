"""OpenTelemetry, in one place for every service and client.

`setup_tracing(service)` installs the process's tracer provider. The exporter follows the
standard `OTEL_*` environment variables: with `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_TRACES_EXPORTER=otlp`) spans go to that OTLP/gRPC collector; `OTEL_TRACES_EXPORTER=console`
prints them; otherwise tracing stays on in-process (context still propagates, trace ids still
appear in responses) and nothing is exported.

Context crosses every gRPC call and stream as W3C `traceparent` metadata: servers extract it with
OpenTelemetry's gRPC server interceptor; channels made by `swiftd.rpc.create_channel` inject it
with `ClientTracingInterceptor` below. So one request is one trace across gateway, unet,
controlnet and lora_store.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

import grpc
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

log = logging.getLogger(__name__)
_configured = False


def setup_tracing(service_name: str, extra_processor: SpanProcessor | None = None) -> trace.Tracer:
    """Install this process's tracer provider once; returns the service's tracer."""
    global _configured
    if not _configured:
        # OTEL_SERVICE_NAME, when set, names the service (e.g. per deployment), as the spec says.
        service_name = os.environ.get("OTEL_SERVICE_NAME") or service_name
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
        if exporter_name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif exporter_name == "otlp" or (exporter_name != "none" and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "the default endpoint")
            log.info("exporting traces over OTLP to %s", endpoint)
            from swiftd import security

            if security.configured() is not None and not endpoint.startswith("https://"):
                # Spans carry prompts' ids, callers and plans: they deserve the calls' protection.
                log.warning(
                    "PLAINTEXT: this service speaks TLS but sends its spans to %s unencrypted; give "
                    "OTEL_EXPORTER_OTLP_ENDPOINT=https://... and OTEL_EXPORTER_OTLP_CERTIFICATE, "
                    "_CLIENT_CERTIFICATE, _CLIENT_KEY (docs/security.md)",
                    endpoint,
                )
        if extra_processor is not None:
            provider.add_span_processor(extra_processor)
        trace.set_tracer_provider(provider)
        _configured = True
    return trace.get_tracer(service_name)


def shutdown_tracing() -> None:
    """Flush spans still buffered (a stopping service calls it before it exits)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def server_interceptors() -> list:
    from opentelemetry.instrumentation.grpc import server_interceptor

    return [server_interceptor()]


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


@contextlib.contextmanager
def stage(tracer: trace.Tracer, timings: dict[str, float] | None, name: str, **attributes) -> Iterator[trace.Span]:
    """One pipeline stage: a child span named `name` and its wall time in `timings[name]`.

    Stage timings in responses and spans in traces are the same measurement, so they agree.
    """
    t0 = time.perf_counter()
    with tracer.start_as_current_span(name, attributes=attributes) as span:
        try:
            yield span
        finally:
            if timings is not None:
                timings[name] = time.perf_counter() - t0


def in_current_context(target: Callable, *args) -> threading.Thread:
    """A thread that runs `target(*args)` under the caller's trace context (threads start empty)."""
    context = contextvars.copy_context()
    return threading.Thread(
        target=context.run, args=(target, *args), daemon=True, name=getattr(target, "__name__", None)
    )


def submitter(pool) -> Callable:
    """`submit(fn, *args)` for `pool` whose tasks run under the caller's trace context."""
    context = contextvars.copy_context()
    # One copy per task: a Context cannot be entered by two threads at once.
    return lambda fn, *args: pool.submit(context.copy().run, fn, *args)


# -- client side -------------------------------------------------------------------------------


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class ClientTracingInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """A CLIENT span per call, and its context in the call's metadata.

    OpenTelemetry's own gRPC client interceptor turns server-streaming calls into plain
    generators (no `cancel()`, and the span stays current in the caller's thread between
    messages); the gateway must cancel downstream streams when its client goes away, so this one
    returns grpc's call objects untouched and ends the span when the call completes.
    """

    def __init__(self):
        self._tracer = trace.get_tracer("swiftd.rpc")

    def _intercept(self, continuation, details, request):
        service, _, method = details.method.lstrip("/").rpartition("/")
        span = self._tracer.start_span(
            details.method,
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = [*(details.metadata or []), *carrier.items()]
        details = _CallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )
        try:
            call = continuation(details, request)
        except BaseException:
            span.set_status(Status(StatusCode.ERROR))
            span.end()
            raise
        call.add_done_callback(lambda c: _end_client_span(span, c))
        return call

    intercept_unary_unary = _intercept
    intercept_unary_stream = _intercept
    intercept_stream_unary = _intercept
    intercept_stream_stream = _intercept


def _end_client_span(span: trace.Span, call) -> None:
    code = call.code()
    if code is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()
