"""One place where exceptions become gRPC statuses, for every service.

`ServingError` subclasses carry their status code and a message meant for the caller. Anything
else is a bug or an environment failure: the caller gets INTERNAL with a generic message and an
incident id, the log gets the traceback under the same id. A request never takes a server down.
"""

from __future__ import annotations

import logging
import uuid

import grpc

from swiftd.errors import ServingError

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


def _abort(context: grpc.ServicerContext, method: str, exc: BaseException):
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


class ErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def wrap_unary(behavior):
            def call(request_or_iterator, context):
                try:
                    return behavior(request_or_iterator, context)
                except Exception as exc:  # noqa: BLE001 - mapped to a status here, by design
                    if context.code() is not None and not isinstance(exc, ServingError):
                        raise  # context.abort() already ran inside the handler
                    _abort(context, method, exc)

            return call

        def wrap_stream(behavior):
            def call(request_or_iterator, context):
                try:
                    yield from behavior(request_or_iterator, context)
                except Exception as exc:  # noqa: BLE001
                    if context.code() is not None and not isinstance(exc, ServingError):
                        raise
                    _abort(context, method, exc)

            return call

        return wrap_behavior(handler, wrap_unary, wrap_stream)
