"""Graceful stop: refuse new RPCs with UNAVAILABLE, let the running ones finish, then stop.

Why not only `grpc.Server.stop(grace)`: once gRPC's core shuts down, an RPC that arrives
meanwhile is refused with UNAVAILABLE or CANCELLED depending on how far it got, and a caller that
sees CANCELLED does not retry elsewhere. Here the server keeps accepting during the grace period
and answers every new RPC with UNAVAILABLE itself (retryable, names the reason); `Server.stop`
runs only once nothing is in flight or the grace period is over.

Health.Watch streams are not counted as work: they stay open to report NOT_SERVING and end with
the server.
"""

from __future__ import annotations

import threading

import grpc

from swiftd.interceptor import wrap_behavior

# Not work: a Watch stream lasts as long as its client wants, reflection is for tooling.
_NOT_WORK = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class DrainInterceptor(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._draining = False
        self._in_flight = 0

    def start_draining(self) -> None:
        with self._lock:
            self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        """True once no RPC is in flight; False if `timeout` seconds passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: self._in_flight == 0, timeout)

    def _enter(self, context: grpc.ServicerContext, counted: bool) -> None:
        # Checked and counted under one lock: an RPC admitted here is one wait_idle waits for.
        with self._lock:
            if self._draining:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is draining; retry on another replica")
            if counted:
                self._in_flight += 1

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        counted = not handler_call_details.method.startswith(_NOT_WORK)

        def wrap_unary(behavior):
            def call(request_or_iterator, context):
                self._enter(context, counted)
                try:
                    return behavior(request_or_iterator, context)
                finally:
                    if counted:
                        self._leave()

            return call

        def wrap_stream(behavior):
            def call(request_or_iterator, context):
                self._enter(context, counted)
                try:
                    yield from behavior(request_or_iterator, context)
                finally:
                    if counted:
                        self._leave()

            return call

        return wrap_behavior(handler, wrap_unary, wrap_stream)
