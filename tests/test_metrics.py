"""Prometheus /metrics of every service: scraped around real requests through the four services
(tiny model, one ControlNet, one LoRA pushed by the store), the counts move where they should."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from swiftd.client import Client, ControlNet, Lora
from swiftd.images import edge_image
from swiftd.launcher import start_controlnet, start_gateway, start_lora_store, start_unet

MODEL, CONTROLNET, LORA = "tiny-sd15", "tiny-sd15-cn-edges", "tiny-sd15-lora-peft-r4"
METRICS = ["--metrics-port", "0"]
RESIDUALS = "/swiftd.v1.ControlNetWorker/StreamResiduals"


def scrape(address: str) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.mark.slow  # ~30 s: the four services as processes, two requests
def test_every_service_counts_requests_stages_loras_and_controlnet_steps(zoo_root, tmp_path):
    store = start_lora_store(zoo_root, tmp_path / "cache", base_models=[MODEL], extra_args=METRICS, wait=False)
    # On a core of its own the ControlNet worker counts as another device: the plan streams from it.
    controlnet = start_controlnet(
        zoo_root, preload=[CONTROLNET], extra_args=METRICS, cpu_cores=[1], num_threads=1, wait=False
    )
    store.wait_ready()
    unet = start_unet(zoo_root, MODEL, store.address, extra_args=METRICS, cpu_cores=[0], num_threads=1)
    controlnet.wait_ready()
    gateway = start_gateway([unet.address], [controlnet.address], store.address, extra_args=METRICS)
    services = {"gateway": gateway, "unet": unet, "controlnet": controlnet, "lora_store": store}
    try:
        assert all(s.metrics_address for s in services.values()), {n: s.metrics_address for n, s in services.items()}
        before = {name: scrape(s.metrics_address) for name, s in services.items()}
        with Client(gateway.address) as client:
            client.generate(
                "a cat",
                model_id=MODEL,
                width=64,
                height=64,
                num_inference_steps=3,
                loras=[Lora(LORA, 0.8)],
                controlnets=[ControlNet(CONTROLNET, edge_image(64))],
            )
            with pytest.raises(grpc.RpcError) as refused:
                client.generate("a cat", model_id=MODEL, width=63, height=64)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The ControlNet worker's stream ends just after the UNet worker closes it, which may be
        # after the response: scrape until it is counted (or 10 s).
        deadline = time.monotonic() + 10
        while True:
            after = {name: scrape(s.metrics_address) for name, s in services.items()}
            streams = value(after["controlnet"], "swiftd_rpc_seconds_count", method=RESIDUALS)
            if streams > value(before["controlnet"], "swiftd_rpc_seconds_count", method=RESIDUALS):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for service in services.values():
            service.stop()

    g0, g1 = before["gateway"], after["gateway"]
    generate = "/swiftd.v1.Gateway/Generate"
    assert moved(g0, g1, "swiftd_rpcs_total", method=generate, code="OK") == 1
    assert moved(g0, g1, "swiftd_rpcs_total", method=generate, code="INVALID_ARGUMENT") == 1
    assert moved(g0, g1, "swiftd_rpc_seconds_count", method=generate) == 2
    assert moved(g0, g1, "swiftd_stage_seconds_count", stage="total") == 1  # end to end
    assert moved(g0, g1, "swiftd_stage_seconds_count", stage="queue") == 1
    assert value(g1, "swiftd_queue_depth", model=MODEL) == 0 and value(g1, "swiftd_in_flight", model=MODEL) == 0

    u0, u1 = before["unet"], after["unet"]
    for method in ("DenoiseStream", "ReceiveLoraDeltas"):  # the request, and the store's push
        assert moved(u0, u1, "swiftd_rpcs_total", method=f"/swiftd.v1.UNetWorker/{method}", code="OK") == 1, method
    assert moved(u0, u1, "swiftd_stage_seconds_count", stage="denoise") == 1
    assert moved(u0, u1, "swiftd_stage_seconds_sum", stage="denoise") > 0
    for part in ("wait", "transport"):  # per step, one observation per request
        assert moved(u0, u1, "swiftd_controlnet_step_seconds_count", part=part) == 1, part
    assert moved(u0, u1, "swiftd_lora_lookups_total", tier="worker", result="miss") == 1  # pushed, not cached
    assert moved(u0, u1, "swiftd_lora_bytes_total", direction="received") > 0
    assert value(u1, "swiftd_compiled", part="unet") == 0  # eager
    assert value(u1, "swiftd_in_flight", model=MODEL) == 0
    assert value(u1, "swiftd_device_memory_bytes", device="cpu") > 10e6
    assert value(u1, "swiftd_start_seconds") > 0

    # The UNet worker cancels the residual stream when it has what it needs: the caller's choice,
    # not a failure of the ControlNet worker.
    c0, c1 = before["controlnet"], after["controlnet"]
    assert moved(c0, c1, "swiftd_rpc_seconds_count", method=RESIDUALS) == 1
    assert (
        moved(c0, c1, "swiftd_rpcs_total", method=RESIDUALS, code="OK")
        + moved(c0, c1, "swiftd_rpcs_total", method=RESIDUALS, code="CANCELLED")
        == 1
    )
    for name in services:  # a request that succeeded is no internal error anywhere
        internal = [k for k, v in after[name].items() if ("code", "INTERNAL") in k[1] and v]
        assert not internal, (name, internal)
    s0, s1 = before["lora_store"], after["lora_store"]
    assert moved(s0, s1, "swiftd_rpcs_total", method="/swiftd.v1.LoraStore/PushLoras", code="OK") == 1
    assert moved(s0, s1, "swiftd_lora_bytes_total", direction="sent") > 0
    assert moved(s0, s1, "swiftd_lora_lookups_total", tier="store_host", result="miss") == 1  # first use: precomputed
