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


def test_a_worker_stopped_with_requests_running_past_its_grace_period_exits_0_every_time(zoo_root):
    """SIGTERM with a grace period far shorter than the request: the call is cancelled, its loop
    stops at its next step check (or before the VAE decode), and the process exits 0, never
    SIGABRT. Unary and streamed calls, each with an in-process ControlNet and a LoRA."""
    import random
    import re
    import signal
    import time

    from swiftd.images import edge_image
    from swiftd.launcher import start_unet
    from swiftd.v1 import common_pb2, unet_pb2, unet_pb2_grpc

    model = "tiny-sd15"
    request = unet_pb2.DenoiseRequest(
        params=common_pb2.GenerationParams(
            prompt="a cat", width=64, height=64, num_inference_steps=600, guidance_scale=7.5, seed=1, model_id=model
        ),
        controlnets=[
            unet_pb2.ControlNetAttachment(
                input=common_pb2.ControlNetInput(
                    controlnet_id=f"{model}-cn-edges", image=edge_image(64), conditioning_scale=0.9
                )
            )
        ],
        loras=[common_pb2.LoraRef(lora_id=f"{model}-lora-peft-r4", scale=0.7)],
    )
    shuffle = random.Random(14)
    for attempt, kind in enumerate(["unary", "stream"] * 3):
        worker = start_unet(
            zoo_root, model, num_threads=1, extra_args=["--grace-seconds", "0.2", "--max-steps", "1000"]
        )
        channel = rpc.create_channel(worker.address)
        stub = unet_pb2_grpc.UNetWorkerStub(channel)
        try:
            call = (
                stub.Denoise.future(request, timeout=60) if kind == "unary" else stub.DenoiseStream(request, timeout=60)
            )
            deadline = time.monotonic() + 30
            while not stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=5).requests_in_flight:
                assert time.monotonic() < deadline, worker.log_tail()
                time.sleep(0.02)
            time.sleep(shuffle.uniform(0, 0.3))  # somewhere inside a step
            worker.process.send_signal(signal.SIGTERM)
            assert worker.process.wait(timeout=45) == 0, f"attempt {attempt} ({kind}):\n{worker.log_tail()}"
            with pytest.raises(grpc.RpcError) as cut_off:
                call.result() if kind == "unary" else list(call)
            assert cut_off.value.code() == grpc.StatusCode.UNAVAILABLE
            log = "\n".join(worker.log_lines)
            assert re.search(r"request cancelled before (step \d+|the VAE decode)", log), log[-2000:]
        finally:
            channel.close()
            worker.stop()
