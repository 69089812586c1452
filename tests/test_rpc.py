"""`rpc.responses`: a response stream read to its end, or to its failure even where gRPC never
completes the receive the call's own iterator waits in (real calls on loopback)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swiftd import rpc
from tests.net import FAILING_PEERS, failing_peer


class StuckOnFailure(grpc.RpcError):  # as gRPC's own call objects are: an iterator and an RpcError
    """A real call whose iterator, once the call has failed, blocks for good instead of raising:
    what grpcio 1.85 does now and then when the server's GOAWAY comes during connection set-up."""

    def __init__(self, call):
        self._call = call

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._call)
        except grpc.RpcError:
            threading.Event().wait()

    def __getattr__(self, name):
        return getattr(self._call, name)


@pytest.fixture
def health_server():
    server = rpc.create_server(4)
    health = rpc.add_health_and_reflection(server, ["test.Service"])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", health
    server.stop(0)


def test_messages_arrive_in_order_and_the_call_ends_with_its_status(health_server):
    address, health = health_server
    with rpc.create_channel(address) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="test.Service"), timeout=60
        )
        seen = []
        with pytest.raises(grpc.RpcError) as info:
            for message in rpc.responses(call):
                seen.append(message.status)
                if len(seen) == 1:
                    health.set("test.Service", health_pb2.HealthCheckResponse.NOT_SERVING)
                else:
                    call.cancel()
        assert seen == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
        assert info.value.code() == grpc.StatusCode.CANCELLED


@pytest.mark.timeout(60)  # a regression hangs: fail it here, not at the suite's limit
@pytest.mark.parametrize("peer", list(FAILING_PEERS))
def test_a_failed_call_ends_the_stream_even_if_its_receive_never_completes(peer):
    with failing_peer(peer) as address, rpc.create_channel(address) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=1)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(rpc.responses(StuckOnFailure(call)))
        assert info.value.code() == FAILING_PEERS[peer]
        assert time.monotonic() - t0 < 5
