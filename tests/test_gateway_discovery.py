"""Worker discovery: the gateway finds its UNet workers behind a DNS name (as a headless Service's
records are its ready pods), re-resolved on every catalog refresh. Real processes: a DNS server on
loopback, two UNet workers on two loopback addresses with one port, a gateway naming only the DNS
name; records are added and removed while it runs."""

from __future__ import annotations

import time

import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSServer

from swiftd.client import Client
from swiftd.launcher import start_gateway, start_unet
from tests.net import free_port

NAME = "unet.swiftd.test."
MODEL = "tiny-sd15"
TTL = 0.5  # the gateway's catalog refresh interval, seconds


class Records(BaseResolver):
    """A records of NAME: whatever `addresses` holds at query time."""

    def __init__(self):
        self.addresses: list[str] = []

    def resolve(self, request, handler):
        reply = request.reply()
        if str(request.q.qname) == NAME and request.q.qtype == QTYPE.A:
            for ip in self.addresses:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=0))
        return reply


def _workers_listed(client: Client) -> set[str]:
    deadline = time.monotonic() + 10 * TTL + 5
    last = None
    while time.monotonic() < deadline:
        models = {m.model_id: set(m.workers) for m in client.list_models()}
        current = models.get(MODEL, set())
        if current == last:  # the same answer over two refreshes: settled
            return current
        last = current
        time.sleep(TTL * 2)
    return last or set()


@pytest.mark.slow  # ~25 s: two UNet workers and a gateway as processes
def test_the_gateway_follows_its_workers_through_dns(zoo_root):
    records = Records()
    dns = DNSServer(records, address="127.0.0.1", port=0)
    dns.start_thread()
    dns_port = dns.server.server_address[1]
    port = free_port("127.0.0.2")
    first, second = f"127.0.0.2:{port}", f"127.0.0.3:{port}"
    workers = [start_unet(zoo_root, MODEL, num_threads=1, address=address, wait=False) for address in (first, second)]
    records.addresses = ["127.0.0.2"]
    gateway = None
    try:
        for worker in workers:
            worker.wait_ready()
        target = f"dns:///{NAME.rstrip('.')}:{port}"
        gateway = start_gateway(
            [target], extra_args=["--dns-server", f"127.0.0.1:{dns_port}", "--catalog-ttl", str(TTL)]
        )
        with Client(gateway.address) as client:
            assert _workers_listed(client) == {first}
            result = client.generate("a cat", model_id=MODEL, width=64, height=64, num_inference_steps=2)
            assert result.plan.unet_worker == first

            records.addresses = ["127.0.0.2", "127.0.0.3"]  # scaled up: a pod appears
            assert _workers_listed(client) == {first, second}

            records.addresses = ["127.0.0.3"]  # scaled down: the first pod is gone
            assert _workers_listed(client) == {second}
            for _ in range(2):
                result = client.generate("a cat", model_id=MODEL, width=64, height=64, num_inference_steps=2)
                assert result.plan.unet_worker == second
    finally:
        if gateway is not None:
            gateway.stop()
        for worker in workers:
            worker.stop()
        dns.stop()


def test_channels_to_workers_that_left_are_forgotten_without_cutting_their_running_calls():
    """The gateway's channel pool follows the workers (retained at each catalog refresh), so it does
    not grow with every pod an autoscaler ever made; a call still running on a dropped worker's
    channel (a draining pod finishing its request) goes on to its end."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from swiftd import rpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    port = server.add_insecure_port("127.0.0.1:0")
    health = rpc.add_health_and_reflection(server, ["swiftd.test"])
    server.start()
    pool = rpc.ChannelPool()
    try:
        address = f"127.0.0.1:{port}"
        channel = pool.get(address)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="swiftd.test"))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        pool.retain([address, "127.0.0.1:1"])  # still listed: kept
        assert pool.get(address) is channel

        pool.retain(["127.0.0.1:1"])  # the worker left DNS: forgotten, a new channel if named again
        assert pool.get(address) is not channel
        health.set("swiftd.test", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # still streaming
        watch.cancel()
    finally:
        pool.close()
        server.stop(None)


def test_readiness_tells_whether_a_model_can_be_served(zoo_root):
    """The gateway's readiness (`swiftd.v1.Gateway`) and per-model health (`swiftd.v1.Gateway/<id>`)
    follow its workers: NOT_SERVING once no UNet worker of the model answers, SERVING again when
    one does; the server itself ("") answers SERVING throughout (liveness)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from swiftd import rpc

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    worker = start_unet(zoo_root, MODEL, num_threads=1, address=address)
    gateway = start_gateway([address], extra_args=["--catalog-ttl", str(TTL)])
    channel = rpc.create_channel(gateway.address)
    health = health_pb2_grpc.HealthStub(channel)

    def status(name: str):
        try:
            return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        except grpc.RpcError as error:  # a model the gateway has not heard of yet
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
            return grpc.StatusCode.NOT_FOUND

    def statuses() -> tuple:
        return tuple(status(name) for name in ("", rpc.GATEWAY_SERVICE, f"{rpc.GATEWAY_SERVICE}/{MODEL}"))

    def wait_for(want: tuple) -> None:
        deadline = time.monotonic() + 20
        while (got := statuses()) != want:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)

    try:
        wait_for((serving, serving, serving))
        worker.stop()
        wait_for((serving, not_serving, not_serving))
        with Client(gateway.address) as client, pytest.raises(grpc.RpcError) as refused:
            client.generate("a cat", model_id=MODEL, width=64, height=64, num_inference_steps=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        worker = start_unet(zoo_root, MODEL, num_threads=1, address=address)  # back, same address
        wait_for((serving, serving, serving))
        with Client(gateway.address) as client:
            assert client.generate("a cat", model_id=MODEL, width=64, height=64, num_inference_steps=2).image_png
    finally:
        channel.close()
        gateway.stop()
        worker.stop()
