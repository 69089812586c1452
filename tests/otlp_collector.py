"""An OTLP/gRPC trace collector that keeps spans in memory, for tests.

Services export to it exactly as they would to a real collector (the standard `OTEL_*`
environment variables select their OTLP exporter); a test then reads one trace back and checks
its shape across processes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from swiftd import rpc


@dataclass
class CollectedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    kind: int
    attributes: dict = field(default_factory=dict)
    events: list[tuple[str, dict]] = field(default_factory=list)


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def _attributes(pairs) -> dict:
    return {kv.key: _value(kv.value) for kv in pairs}


class InMemoryCollector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, credentials: grpc.ServerCredentials | None = None):
        """`credentials`: serve TLS (exporters then need an https endpoint and the CA)."""
        self.spans: list[CollectedSpan] = []
        self._lock = threading.Lock()
        self._server = rpc.create_server(4)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        if credentials is None:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self._server.add_secure_port("127.0.0.1:0", credentials)

    def start(self) -> InMemoryCollector:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0)

    @property
    def env(self) -> dict[str, str]:
        """Environment for a service that exports here (and promptly: batches every 100 ms)."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    def Export(self, request, context):
        collected = []
        for resource_spans in request.resource_spans:
            service = _attributes(resource_spans.resource.attributes).get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    collected.append(
                        CollectedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes=_attributes(span.attributes),
                            events=[(e.name, _attributes(e.attributes)) for e in span.events],
                        )
                    )
        with self._lock:
            self.spans.extend(collected)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[CollectedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: str, done, timeout: float = 30.0) -> list[CollectedSpan]:
        """The trace's spans once `done(spans)` holds (spans arrive in batches, per service)."""
        deadline = time.monotonic() + timeout
        while not done(spans := self.trace(trace_id)):
            if time.monotonic() > deadline:
                have = sorted({(s.service, s.name) for s in spans})
                raise AssertionError(f"trace {trace_id} incomplete after {timeout:.0f} s; have {have}")
            time.sleep(0.1)
        return spans
