"""OpenTelemetry setup, in one place for every service and client.

The exporter follows the standard `OTEL_*` environment variables: with
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_TRACES_EXPORTER=otlp`) spans go to that OTLP collector;
`OTEL_TRACES_EXPORTER=console` prints them; otherwise tracing stays on in-process (context still
propagates, ids still appear in responses) and nothing is exported. gRPC calls and streams carry
the trace context through OpenTelemetry's gRPC instrumentation interceptors.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

log = logging.getLogger(__name__)
_configured = False


def setup_tracing(service_name: str, extra_processor: SpanProcessor | None = None) -> trace.Tracer:
    """Install this process's tracer provider once; returns the service's tracer."""
    global _configured
    if not _configured:
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
        if exporter_name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif exporter_name == "otlp" or (exporter_name != "none" and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            log.info("exporting traces over OTLP to %s", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "the default endpoint"))
        if extra_processor is not None:
            provider.add_span_processor(extra_processor)
        trace.set_tracer_provider(provider)
        _configured = True
    return trace.get_tracer(service_name)


def server_interceptors() -> list:
    from opentelemetry.instrumentation.grpc import server_interceptor

    return [server_interceptor()]


def client_interceptors() -> list:
    from opentelemetry.instrumentation.grpc import client_interceptor

    return [client_interceptor()]


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
