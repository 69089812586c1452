"""Peak memory of each service under hostile input (issue #14): the inputs that once grew a service
far past its budgets, against a gateway, a UNet worker (--lora-cache-mib 64) and a LoRA store as
processes. Reports each service's resident memory before and its peak (VmHWM, reset after
start-up) over the hostile inputs.

    python -m bench.hostile --zoo .zoo [--out out/hostile.json]
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import grpc
import PIL.Image

from swiftd import rpc
from swiftd.images import encode_png
from swiftd.launcher import start_gateway, start_lora_store, start_unet
from swiftd.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, lora_store_pb2, unet_pb2, unet_pb2_grpc

MODEL = "tiny-sd15"
LORA_BUDGET_MIB = 64


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) // 1024
    return fields


def _refused(call, request) -> str:
    try:
        call(request, timeout=120)
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


def hostile_inputs(gateway, worker) -> dict[str, str]:
    """Each hostile input and the status it got."""
    params = dict(width=64, height=64, num_inference_steps=2, model_id=MODEL)
    outcomes = {
        "16 MiB prompt": _refused(
            gateway.Generate,
            gateway_pb2.GenerateRequest(params=common_pb2.GenerationParams(prompt="a" * (16 << 20), **params)),
        ),
        "16 KiB model id": _refused(
            gateway.Generate, gateway_pb2.GenerateRequest(params=common_pb2.GenerationParams(model_id="m" * 16384))
        ),
        "300 MiB message": _refused(
            gateway.Generate,
            gateway_pb2.GenerateRequest(
                params=common_pb2.GenerationParams(prompt="a cat", **params),
                controlnets=[common_pb2.ControlNetInput(controlnet_id=f"{MODEL}-cn-edges", image=b"\0" * (300 << 20))],
            ),
        ),
    }
    bomb = common_pb2.ControlNetInput(
        controlnet_id=f"{MODEL}-cn-edges", image=encode_png(PIL.Image.new("L", (12000, 12000)))
    )
    outcomes["PNG declaring 12000x12000 (gateway)"] = _refused(
        gateway.Generate,
        gateway_pb2.GenerateRequest(params=common_pb2.GenerationParams(prompt="a cat", **params), controlnets=[bomb]),
    )
    outcomes["PNG declaring 12000x12000 (worker)"] = _refused(
        worker.Denoise,
        unet_pb2.DenoiseRequest(
            params=common_pb2.GenerationParams(prompt="a cat", **params),
            controlnets=[unet_pb2.ControlNetAttachment(input=bomb)],
        ),
    )
    # Pushes that never finish, each 16 MiB of a real parameter's worth of bytes, past the budget.
    release = threading.Event()
    chunk = lora_store_pb2.LoraDeltaChunk(lora_id="tiny-sd15-lora-peft-r4", scale=0.5)
    delta = chunk.deltas.add(parameter_name="unet.conv_in.weight")
    delta.full.CopyFrom(common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[32, 36], data=b"\0" * (32 * 36 * 4)))

    def endless(scale):
        message = lora_store_pb2.LoraDeltaChunk()
        message.CopyFrom(chunk)
        message.scale = scale
        for _ in range(64):
            yield message
        release.wait(30)

    calls = [worker.ReceiveLoraDeltas.future(endless(0.01 * i), timeout=60) for i in range(1, 65)]
    release.set()
    codes = set()
    for call in calls:
        try:
            call.result()
            codes.add("OK")
        except grpc.RpcError as error:
            codes.add(error.code().name)
    outcomes["64 unfinished pushes"] = "/".join(sorted(codes))
    return outcomes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    parser.add_argument("--zoo", type=Path, default=Path(".zoo"))
    parser.add_argument("--out", type=Path, default=Path("out/hostile.json"))
    args = parser.parse_args(argv)
    store = start_lora_store(args.zoo, args.out.parent / "hostile-cache", [MODEL], num_threads=1)
    unet = start_unet(
        args.zoo,
        MODEL,
        lora_store=store.address,
        num_threads=1,
        extra_args=["--lora-cache-mib", str(LORA_BUDGET_MIB)],
    )
    gateway = start_gateway([unet.address], lora_store=store.address)
    services = {"gateway": gateway, "unet": unet, "lora_store": store}
    channels = [rpc.create_channel(gateway.address), rpc.create_channel(unet.address)]
    try:
        for service in services.values():  # the peak from here on, not the model load's
            Path(f"/proc/{service.process.pid}/clear_refs").write_text("5")
        before = {name: _status(s.process.pid) for name, s in services.items()}
        outcomes = hostile_inputs(gateway_pb2_grpc.GatewayStub(channels[0]), unet_pb2_grpc.UNetWorkerStub(channels[1]))
        after = {name: _status(s.process.pid) for name, s in services.items()}
    finally:
        for channel in channels:
            channel.close()
        for service in services.values():
            service.stop()
    report = {
        "outcomes": outcomes,
        "memory_mib": {
            name: {"rss_before": before[name]["VmRSS"], "peak_after": after[name]["VmHWM"]} for name in services
        },
        "unet_lora_budget_mib": LORA_BUDGET_MIB,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name, status in outcomes.items():
        print(f"{name:40s} {status}")
    print(f"{'service':12s} {'RSS before':>11s} {'peak after':>11s} {'growth':>8s}  (MiB)")
    for name, memory in report["memory_mib"].items():
        growth = memory["peak_after"] - memory["rss_before"]
        print(f"{name:12s} {memory['rss_before']:11d} {memory['peak_after']:11d} {growth:8d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
