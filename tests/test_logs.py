"""Structured logs: JSON lines on request, each line of a request carrying its request id and the
trace and span ids of where it was logged, in every service the request reaches; text otherwise."""

from __future__ import annotations

import json
import logging

import pytest

from swiftd import logs, tracing
from swiftd.client import Client
from swiftd.launcher import start_gateway, start_unet


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("services.test", logging.INFO, __file__, 1, message, (), None)


def test_a_json_line_carries_the_request_and_the_span_it_was_logged_in():
    tracer = tracing.setup_tracing("test")
    formatter = logs.JsonFormatter()
    outside = json.loads(formatter.format(_record("idle")))
    assert outside["message"] == "idle" and outside["level"] == "INFO" and outside["logger"] == "services.test"
    assert "request_id" not in outside and "trace_id" not in outside

    with logs.request_scope("r-42"), tracer.start_as_current_span("work") as span:
        line = json.loads(formatter.format(_record('a "quoted"\nmessage')))
    context = span.get_span_context()
    assert line["message"] == 'a "quoted"\nmessage'
    assert line["request_id"] == "r-42"
    assert line["trace_id"] == format(context.trace_id, "032x") and line["span_id"] == format(context.span_id, "016x")
    assert "request_id" not in json.loads(formatter.format(_record("after")))  # the scope ended


@pytest.mark.slow  # ~20 s: a UNet worker and a gateway as processes, one request
def test_every_service_logs_json_lines_with_the_request_and_trace_ids(zoo_root):
    json_logs = ["--log-format", "json"]
    unet = start_unet(zoo_root, "tiny-sd15", extra_args=json_logs, num_threads=1)
    gateway = start_gateway([unet.address], extra_args=json_logs)
    try:
        with Client(gateway.address) as client:
            result = client.generate("a cat", width=64, height=64, num_inference_steps=2, request_id="json-logs-1")
    finally:
        gateway.stop()
        unet.stop()
    for service, name in ((gateway, "gateway"), (unet, "unet")):
        lines = [json.loads(line) for line in service.log_lines if line.startswith("{")]
        assert lines, f"{service.name} wrote no JSON lines:\n{service.log_tail()}"
        assert all({"time", "level", "service", "logger", "message"} <= set(line) for line in lines)
        mine = [line for line in lines if line.get("request_id") == "json-logs-1"]
        assert mine, f"{service.name}: no line of the request:\n{service.log_tail()}"
        assert all(line["trace_id"] == result.trace_id and line["service"] == name for line in mine), mine
