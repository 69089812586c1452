"""Log lines of every service: plain text for a terminal (the default), or JSON lines for a log
pipeline (`--log-format json`, or SWIFTD_LOG_FORMAT=json), one object per line:

    {"time": "2026-11-30T03:41:07.123+00:00", "level": "INFO", "service": "gateway",
     "logger": "services.gateway.servicer", "message": "request r-17 -> {...}",
     "request_id": "r-17", "trace_id": "4bf9...", "span_id": "00f0..."}

The trace and span ids are those of the OpenTelemetry span current where the line was logged, so
a line leads to its trace. The request id travels with the trace as W3C baggage
(REQUEST_ID_BAGGAGE): the gateway sets it once per request (`request_scope`), every gRPC call
carries it, so a worker's lines for that request carry it too; so does the identity of the
client the gateway authenticated (CALLER_BAGGAGE, set by swiftd.security), as "caller".
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from collections.abc import Iterator

from opentelemetry import baggage, context, trace

FORMATS = ("text", "json")
FORMAT_ENV = "SWIFTD_LOG_FORMAT"
LEVEL_ENV = "SWIFTD_LOG_LEVEL"
REQUEST_ID_BAGGAGE = "swiftd.request_id"
CALLER_BAGGAGE = "swiftd.caller"  # the authenticated client of the gateway (swiftd.security)
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "service": _service_name(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = baggage.get_baggage(REQUEST_ID_BAGGAGE)
        if request_id:
            entry["request_id"] = str(request_id)
        caller = baggage.get_baggage(CALLER_BAGGAGE)
        if caller:
            entry["caller"] = str(caller)
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _service_name() -> str:
    # The tracer provider's resource (setup_tracing; OTEL_SERVICE_NAME overrides it), so logs and
    # traces name a service alike.
    resource = getattr(trace.get_tracer_provider(), "resource", None)
    return str(resource.attributes.get("service.name", "")) if resource is not None else ""


def configure_logging(log_format: str | None = None) -> None:
    """The root logger's one handler (stderr) in `log_format` (default: SWIFTD_LOG_FORMAT, else text)."""
    log_format = log_format or os.environ.get(FORMAT_ENV) or "text"
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get(LEVEL_ENV, "INFO"))


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Lines logged inside (and in every service this request's calls reach) carry `request_id`."""
    token = context.attach(baggage.set_baggage(REQUEST_ID_BAGGAGE, request_id))
    try:
        yield
    finally:
        context.detach(token)
