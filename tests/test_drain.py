"""Draining (swiftd.drain): once a server drains, every new RPC is refused with UNAVAILABLE (never
CANCELLED, which callers do not retry elsewhere), and the RPCs already running are waited for.
The end-to-end SIGTERM test is in test_serving_claims.py; this one hammers the race."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swiftd import rpc
from swiftd.drain import DrainInterceptor


class SlowService:
    """`Wait` blocks until released: an RPC that stays in flight as long as the test wants."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Semaphore(0)

    def wait(self, request: bytes, context) -> bytes:
        self.started.release()
        self.release.wait(30)
        return b"done:" + request

    def echo(self, request: bytes, context) -> bytes:
        return request

    def handler(self):
        def unary(fn):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=None, response_serializer=None)

        return grpc.method_handlers_generic_handler("test.Slow", {"Wait": unary(self.wait), "Echo": unary(self.echo)})


@pytest.fixture()
def draining_server():
    gate = DrainInterceptor()
    service = SlowService()
    server = rpc.create_server(8, interceptors=[gate])
    server.add_generic_rpc_handlers([service.handler()])
    health = rpc.add_health_and_reflection(server, ["test.Slow"])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield gate, service, health, channel
    service.release.set()
    channel.close()
    server.stop(None)


def test_new_rpcs_are_refused_with_unavailable_while_running_ones_finish(draining_server):
    gate, service, health, channel = draining_server
    wait = channel.unary_unary("/test.Slow/Wait")
    echo = channel.unary_unary("/test.Slow/Echo")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    assert echo(b"x", timeout=5) == b"x"

    in_flight = wait.future(b"a", timeout=30)
    assert service.started.acquire(timeout=10)
    gate.start_draining()
    health.enter_graceful_shutdown()
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not gate.wait_idle(0.2), "the running RPC is in flight"

    def refused_code(_):
        try:
            echo(b"late", timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
        return None, "accepted"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(refused_code, range(64)))
    assert {code for code, _ in outcomes} == {grpc.StatusCode.UNAVAILABLE}, outcomes[:3]
    assert "draining" in outcomes[0][1]
    with pytest.raises(grpc.RpcError) as health_check:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health_check.value.code() == grpc.StatusCode.UNAVAILABLE

    service.release.set()
    assert in_flight.result(timeout=10) == b"done:a"
    # The open Watch stream is not work: the server is idle once the running RPC is done.
    assert gate.wait_idle(5)
    watch.cancel()
