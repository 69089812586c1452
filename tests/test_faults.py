"""Bad days, over real processes: the LoRA store killed in the middle of a push, and twice the load
the gateway admits. Nothing is lost: every request gets its image or a clean status within its
deadline, and the suite serves afterwards. (A ControlNet worker killed mid-request, with and
without a replica: tests/test_failover.py; a UNet worker stopped past its grace period:
tests/test_drain.py; a poisoned push: tests/test_lora_service.py.)"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from swiftd.client import Client
from swiftd.launcher import start_gateway, start_lora_store, start_unet

MODEL = "tiny-sd15"
BIG_LORA = f"{MODEL}-lora-peft-r64"  # 2 MB of deltas: in 64 KiB chunks, a push of many messages
CLEAN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}


def test_the_store_killed_mid_push_fails_the_request_cleanly_and_the_suite_recovers(zoo_root, tmp_path):
    store_args = ["--chunk-mib", "0.0625"]
    store = start_lora_store(zoo_root, tmp_path / "cache", [MODEL], num_threads=1, extra_args=store_args)
    unet = start_unet(zoo_root, MODEL, lora_store=store.address, num_threads=1)
    gateway = start_gateway([unet.address], lora_store=store.address)
    try:
        with Client(gateway.address) as client:
            fields = dict(model_id=MODEL, width=64, height=64, num_inference_steps=2, loras=[(BIG_LORA, 0.9)])
            t0 = time.monotonic()
            events = client.generate_stream("a cat", timeout=60, lora_bound_steps=0, **fields)
            try:
                for event in events:
                    if event.HasField("started"):  # the push begins now
                        store.process.send_signal(signal.SIGKILL)
                    if event.HasField("final"):
                        assert event.final.image_png  # the deltas were in before the store died
            except grpc.RpcError as error:
                assert error.code() in CLEAN, (error.code(), error.details())
            assert time.monotonic() - t0 < 60
            store.process.wait(10)
            # The worker had taken the request: the store's failure is not the worker's, so the
            # request is not planned again (which would mark a healthy worker down).
            assert not [line for line in gateway.log_lines if "planning it again" in line], gateway.log_tail()

            # The store comes back at its address; the worker's half-received entry is not used.
            store = start_lora_store(
                zoo_root, tmp_path / "cache", [MODEL], num_threads=1, extra_args=store_args, address=store.address
            )
            result = client.generate("a cat", timeout=60, **fields)
            assert result.image_png and list(result.plan.lora_ids) == [BIG_LORA]
    finally:
        gateway.stop()
        unet.stop()
        store.stop()


def test_twice_the_admitted_load_gets_images_or_clean_refusals(zoo_root):
    """One worker, one request at a time, two more queued: 3 admitted. Six at once: each gets its
    image or RESOURCE_EXHAUSTED within its deadline, nothing else, and the suite serves on."""
    unet = start_unet(zoo_root, MODEL, num_threads=1)
    gateway = start_gateway([unet.address], extra_args=["--per-worker-concurrency", "1", "--max-queue", "2"])

    def one(i: int):
        with Client(gateway.address) as client:
            t0 = time.monotonic()
            try:
                client.generate("a cat", timeout=60, model_id=MODEL, width=64, height=64, num_inference_steps=8, seed=i)
                return "image", time.monotonic() - t0
            except grpc.RpcError as error:
                return error.code(), time.monotonic() - t0

    try:
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(one, range(6)))
        kinds = [kind for kind, _ in outcomes]
        assert set(kinds) <= {"image", grpc.StatusCode.RESOURCE_EXHAUSTED}, outcomes
        assert kinds.count("image") >= 3, outcomes  # the admitted ones all complete
        assert all(seconds < 60 for _, seconds in outcomes)
        assert one(99)[0] == "image"
    finally:
        gateway.stop()
        unet.stop()
    assert unet.process.returncode == 0 and gateway.process.returncode == 0
