"""Failover instead of failure. A request whose UNet worker cannot be reached before its first step
is planned again, once, onto another worker, and the plan says so (real workers, and between the
gateway and the first one a TCP relay that cuts the connection when the request itself arrives,
as a worker that dies between the gateway's status poll and its call). A ControlNet worker killed
mid-request is replaced at that step by another worker hosting the ControlNet, or by the UNet
worker itself, with the image unchanged."""

from __future__ import annotations

import socket
import threading

import grpc
import numpy as np
import pytest

from swiftd import rpc
from swiftd.client import Client
from swiftd.images import decode_image, edge_image
from swiftd.launcher import start_controlnet, start_gateway, start_lora_store, start_unet
from swiftd.request import Request
from swiftd.v1 import unet_pb2_grpc

MODEL = "tiny-sd15"
LORA = "tiny-sd15-lora-peft-r4"
# A status poll is tens of bytes; a request with this prompt is kilobytes: the relay tells them apart.
PROMPT = "a red square on a blue circle, " * 100
REQUEST_BYTES = 2048


class CuttingRelay:
    """Relays TCP to `target` until a client sends a read of REQUEST_BYTES or more; then it resets
    that connection and refuses every later one (the worker is gone)."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source, sink, from_client):
        try:
            while data := source.recv(65536):
                if from_client and len(data) >= REQUEST_BYTES:
                    self.cut.set()
                    self.listener.close()
                    for s in (source, sink):  # a reset, as from a host that went away
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        s.close()
                    return
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.close()
            except OSError:
                pass


def test_a_worker_unreachable_before_the_first_step_is_failed_over_once(zoo_root, tmp_path):
    store = start_lora_store(zoo_root, tmp_path / "cache", [MODEL], num_threads=1)
    first = start_unet(zoo_root, MODEL, lora_store=store.address, num_threads=1, wait=False)
    second = start_unet(zoo_root, MODEL, lora_store=store.address, num_threads=1, wait=False)
    first.wait_ready()
    second.wait_ready()
    # The first worker gets the request's LoRA set applied, so the planner's affinity sends the
    # request there (through the relay).
    warm = Request("a cat", width=64, height=64, num_inference_steps=1, model_id=MODEL, loras=[(LORA, 0.8)])
    with rpc.create_channel(first.address) as channel:
        unet_pb2_grpc.UNetWorkerStub(channel).Denoise(warm.to_denoise_pb(), timeout=60)
    relay = CuttingRelay(first.address)
    gateway = start_gateway([relay.address, second.address], lora_store=store.address)
    try:
        with Client(gateway.address) as client:
            fields = dict(model_id=MODEL, width=64, height=64, num_inference_steps=2, seed=7, loras=[(LORA, 0.8)])
            result = client.generate(PROMPT, **fields)
            assert relay.cut.is_set()  # the call to the first worker was cut
            assert result.plan.failed_over_from == relay.address
            assert result.plan.unet_worker == second.address
            # The image is the one an uninterrupted request gives (the relay is now left out).
            again = client.generate(PROMPT, **fields)
            assert again.plan.unet_worker == second.address and not again.plan.failed_over_from
            assert np.array_equal(
                np.asarray(decode_image(result.image_png, "image")), np.asarray(decode_image(again.image_png, "image"))
            )
    finally:
        gateway.stop()
        for service in (first, second, store):
            service.stop()


def test_a_request_is_failed_over_once_not_twice(zoo_root):
    """With every worker cut, the request fails UNAVAILABLE after one re-plan, naming the worker."""
    worker = start_unet(zoo_root, MODEL, num_threads=1)
    relays = [CuttingRelay(worker.address), CuttingRelay(worker.address)]
    gateway = start_gateway([r.address for r in relays])
    try:
        with Client(gateway.address) as client, pytest.raises(grpc.RpcError) as failed:
            client.generate(PROMPT, model_id=MODEL, width=64, height=64, num_inference_steps=2)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        assert all(r.cut.is_set() for r in relays)  # each tried once
    finally:
        gateway.stop()
        worker.stop()


def test_a_controlnet_worker_killed_mid_request_is_replaced_and_the_image_is_unchanged(zoo_root):
    """Its stream breaks at some step; the UNet worker sends that step again to the next worker
    hosting the ControlNet (with a replica) or runs it in-process (without one), and the final
    latents equal the uninterrupted request's within 1e-4 (fp32 wire)."""
    import signal

    import torch

    from swiftd import codec
    from swiftd.request import ControlNet

    cn_id = f"{MODEL}-cn-edges"
    workers = [start_controlnet(zoo_root, preload=[cn_id], num_threads=1, wait=False) for _ in range(3)]
    unet = start_unet(zoo_root, MODEL, num_threads=1, extra_args=["--max-steps", "1000"], wait=False)
    for service in (*workers, unet):
        service.wait_ready()
    doomed_with_replica, replica, doomed_alone = workers
    channel = rpc.create_channel(unet.address)
    stub = unet_pb2_grpc.UNetWorkerStub(channel)

    def request(worker: str, fallbacks=()):
        cn = ControlNet(cn_id, edge_image(64), worker_address=worker, fallback_workers=tuple(fallbacks))
        planned = Request(
            "a cat", width=64, height=64, num_inference_steps=40, seed=3, model_id=MODEL, controlnets=[cn]
        )
        planned.return_latents = True
        return planned.to_denoise_pb()

    def latents(response) -> torch.Tensor:
        return codec.tensor_from_proto(response.latents)

    try:
        reference = latents(stub.Denoise(request(replica.address), timeout=120))
        for doomed, fallbacks in ((doomed_with_replica, [replica.address]), (doomed_alone, [])):
            stream = stub.DenoiseStream(request(doomed.address, fallbacks), timeout=120)
            for event in stream:
                if event.HasField("progress") and event.progress.step >= 5:
                    doomed.process.send_signal(signal.SIGKILL)  # mid-request, while the UNet waits on it
                    break
            final = [e for e in stream if e.HasField("final")][-1].final
            diff = (latents(final) - reference).abs().max().item()
            assert diff <= 1e-4, (doomed.address, diff)
        log = "\n".join(unet.log_lines)
        assert f"again on {replica.address}" in log and "again on this worker" in log, log[-3000:]
    finally:
        channel.close()
        for service in (*workers, unet):
            service.stop()
