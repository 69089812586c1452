"""One place where exceptions become gRPC statuses, for every service.

Requests are parsed here too, so that bytes that are not the RPC's message are INVALID_ARGUMENT.

`ServingError` subclasses carry their status code and a message meant for the caller. Anything
else is a bug or an environment failure: the caller gets INTERNAL with a generic message and an
incident id, the log gets the traceback under the same id. A request never takes a server down;
a device that failed under it does (swiftd.device.failure: the caller gets UNAVAILABLE, to retry
elsewhere, and the server is told, to stop in favour of a new process).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import grpc

from swiftd import device
from swiftd.errors import InvalidArgument, ServingError

log = logging.getLogger(__name__)


def wrap_behavior(handler: grpc.RpcMethodHandler, wrap_unary, wrap_stream) -> grpc.RpcMethodHandler:
    """`handler` with its behavior wrapped: by `wrap_unary` when the RPC returns one message, by
    `wrap_stream` (which must return a generator function) when it streams its responses."""
    if handler.unary_unary:
        return handler._replace(unary_unary=wrap_unary(handler.unary_unary))
    if handler.stream_unary:
        return handler._replace(stream_unary=wrap_unary(handler.stream_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=wrap_stream(handler.unary_stream))
    if handler.stream_stream:
        return handler._replace(stream_stream=wrap_stream(handler.stream_stream))
    return handler


def _abort(
    context: grpc.ServicerContext, method: str, exc: BaseException, on_device_failure: Callable[[str], None] | None
):
    # First: a failed device is the process's end, whatever else the call raised or whoever left.
    failed = device.failure(exc)
    if failed is not None and on_device_failure is not None:
        log.critical("%s: the device failed (%s)", method, failed, exc_info=exc)
        on_device_failure(failed)
        context.abort(
            grpc.StatusCode.UNAVAILABLE, f"this worker's device failed ({failed}); it is restarting: retry elsewhere"
        )
    if isinstance(exc, ServingError):
        log.warning("%s -> %s: %s", method, exc.code.name, exc.message)
        context.abort(exc.code, exc.message)
    if not context.is_active():
        # The caller went away (cancelled, or its deadline passed) and reading its stream raised:
        # not a bug here. A UNet worker ends each ControlNet residual stream this way.
        log.info("%s: the caller went away (%s)", method, type(exc).__name__)
        context.abort(grpc.StatusCode.CANCELLED, "the caller cancelled the call")
    incident = uuid.uuid4().hex[:12]
    log.exception("%s failed (incident %s)", method, incident)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}; details in the server log)")


def _parse_here(handler: grpc.RpcMethodHandler) -> tuple[grpc.RpcMethodHandler, object]:
    """`handler` taking raw bytes, and a function that parses its request (or request stream)
    inside the call: gRPC's own deserializer answers INTERNAL to bytes that are not the message,
    before any interceptor runs; parsed here, they are INVALID_ARGUMENT."""
    parse = handler.request_deserializer
    if parse is None:
        return handler, lambda request_or_iterator: request_or_iterator

    def parse_one(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or worse for hostile bytes
            raise InvalidArgument("request", f"is not a valid message ({type(exc).__name__})") from None

    def parse_request(request_or_iterator):
        if handler.request_streaming:
            return (parse_one(data) for data in request_or_iterator)
        return parse_one(request_or_iterator)

    return handler._replace(request_deserializer=None), parse_request


class ErrorInterceptor(grpc.ServerInterceptor):
    def __init__(self, on_device_failure: Callable[[str], None] | None = None):
        """`on_device_failure(reason)`: called when a call fails because the device did."""
        self._on_device_failure = on_device_failure

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        handler, parse_request = _parse_here(handler)

        def wrap_unary(behavior):
            def call(request_or_iterator, context):
                try:
                    return behavior(parse_request(request_or_iterator), context)
                except Exception as exc:  # noqa: BLE001 - mapped to a status here, by design
                    if context.code() is not None and not isinstance(exc, ServingError):
                        raise  # context.abort() already ran inside the handler
                    _abort(context, method, exc, self._on_device_failure)

            return call

        def wrap_stream(behavior):
            def call(request_or_iterator, context):
                try:
                    yield from behavior(parse_request(request_or_iterator), context)
                except Exception as exc:  # noqa: BLE001
                    if context.code() is not None and not isinstance(exc, ServingError):
                        raise
                    _abort(context, method, exc, self._on_device_failure)

            return call

        return wrap_behavior(handler, wrap_unary, wrap_stream)
