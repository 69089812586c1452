"""What the gateway adds to a request: the same small request sent straight to the UNet worker and
through the gateway (validation, admission, status polls and planning, one more gRPC hop and the
streamed events), alternating, many times.

The request is kept small (64x64, one step, no CFG) so that the difference is not lost in the
±20 % noise of a full request on this machine; what the gateway does per request does not grow
with the image.
"""

from __future__ import annotations

import time
from dataclasses import replace

from bench.scenarios import BenchConfig, Figure, GroupResult, baseline_scenarios, median
from swiftd import rpc
from swiftd.launcher import start_gateway
from swiftd.request import ControlNet, Request
from swiftd.v1 import gateway_pb2_grpc

PAIRS = 20
SIZE = 64


def group_gateway(config: BenchConfig, session) -> GroupResult:
    group = "gateway"
    ours = session.ours()
    gateway = start_gateway(
        [ours.service.address],
        [s.address for s in ours.controlnet_services],
        ours.store.address,
        cpu_cores=[config.controlnet_core],
    )
    channel = rpc.create_channel(gateway.address)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    cn1_lora1 = next(s for s in baseline_scenarios(config.family, SIZE) if s.name == "cn1_lora1")
    cases = {
        "plain": ([], []),
        # The LoRA set stays applied between requests (affinity): what is measured is the checking
        # and planning of add-ons (the conditioning image decoded, ids looked up), not a transfer.
        "cn1_lora1": (cn1_lora1.loras, [(cn, ours.controlnet_services[0].address) for cn in cn1_lora1.controlnets]),
    }
    figures, rows = [], []
    try:
        for name, (loras, controlnets) in cases.items():
            request = Request(
                prompt="a lighthouse",
                width=SIZE,
                height=SIZE,
                num_inference_steps=1,
                guidance_scale=1.0,
                seed=1,
                scheduler="euler",
                model_id=config.family,
                loras=loras,
                controlnets=[ControlNet(cn.controlnet_id, cn.image_png, cn.scale) for cn, _ in controlnets],
            )
            through = request.to_pb()
            planned = replace(
                request,
                lora_store_address=ours.store.address,
                controlnets=[replace(cn, worker_address=a) for cn, (_, a) in zip(request.controlnets, controlnets)],
            )
            direct = planned.to_denoise_pb()
            times: dict[str, list[float]] = {"direct": [], "gateway": []}
            stages: dict[str, list[float]] = {"validate": [], "queue": [], "plan": []}
            for i in range(PAIRS + 3):  # the first three pairs warm up (connections, caches)
                t0 = time.perf_counter()
                ours.stub.Denoise(direct, timeout=600)
                t1 = time.perf_counter()
                response = stub.Generate(through, timeout=600)
                t2 = time.perf_counter()
                if i >= 3:
                    times["direct"].append(t1 - t0)
                    times["gateway"].append(t2 - t1)
                    timings = {t.stage: t.seconds for t in response.timings}
                    for stage in stages:
                        stages[stage].append(timings[stage])
            added = median(times["gateway"]) - median(times["direct"])
            figures += [
                Figure(f"gateway.added_latency_s.{name}", added, "s", group),
                Figure(f"gateway.latency_s.direct.{name}", median(times["direct"]), "s", group),
                *[Figure(f"gateway.stage_s.{name}.{stage}", median(v), "s", group) for stage, v in stages.items()],
            ]
            rows.append(
                f"  {name:<10} direct {median(times['direct']) * 1e3:7.1f} ms   through the gateway "
                f"{median(times['gateway']) * 1e3:7.1f} ms   added {added * 1e3:6.1f} ms   (validate "
                f"{median(stages['validate']) * 1e3:.1f}, queue {median(stages['queue']) * 1e3:.1f}, plan "
                f"{median(stages['plan']) * 1e3:.1f} ms)"
            )
    finally:
        channel.close()
        gateway.stop()
    table = "\n".join(
        [
            f"gateway: {config.family}, {SIZE}x{SIZE}, 1 step, no CFG; direct to the UNet worker vs through the gateway "
            f"(on core {config.controlnet_core}), alternating; median of {PAIRS} pairs",
            *rows,
        ]
    )
    where = f"gateway core {config.controlnet_core}; UNet worker core {config.device_core} (1 thread)"
    return GroupResult(figures, table, hardware={"ours": where})
