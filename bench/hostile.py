"""Peak memory of each service under hostile input (issue #14): the inputs that once grew a service
far past its budgets, against a gateway, a UNet worker (--lora-cache-mib 64) and a LoRA store as
processes. Reports each service's resident memory before and its peak (VmHWM, reset after
start-up) over the hostile inputs.

    python -m bench.hostile --zoo .zoo [--family tiny-sd15] [--out out/hostile.json]

`--family sd15` runs it on the full-size SD1.5 architecture (`python -m swiftd.zoo build --only
sd15` first: random fp16 weights, served in fp32 on the CPU).
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


def hostile_inputs(gateway, worker, model: str, conv_in: tuple[int, int]) -> dict[str, str]:
    """Each hostile input and the status it got (`conv_in`: the UNet's conv_in weight as a matrix,
    the shape a real delta for it has)."""
    params = dict(width=64, height=64, num_inference_steps=2, model_id=model)
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
                controlnets=[common_pb2.ControlNetInput(controlnet_id=f"{model}-cn-edges", image=b"\0" * (300 << 20))],
            ),
        ),
    }
    bomb = common_pb2.ControlNetInput(
        controlnet_id=f"{model}-cn-edges", image=encode_png(PIL.Image.new("L", (12000, 12000)))
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
    chunk = lora_store_pb2.LoraDeltaChunk(lora_id=f"{model}-lora-peft-r4", scale=0.5)
    delta = chunk.deltas.add(parameter_name="unet.conv_in.weight")
    rows, cols = conv_in
    delta.full.CopyFrom(
        common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[rows, cols], data=b"\0" * (rows * cols * 4))
    )

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
    parser.add_argument("--family", default="tiny-sd15", help="zoo family (sd15: the full-size architecture)")
    args = parser.parse_args(argv)
    model = args.family
    unet_config = json.loads((args.zoo / "models" / model / "unet" / "config.json").read_text())
    conv_in = (unet_config["block_out_channels"][0], unet_config["in_channels"] * 9)
    store = start_lora_store(args.zoo, args.out.parent / "hostile-cache", [model], num_threads=1)
    unet = start_unet(
        args.zoo,
        model,
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
        outcomes = hostile_inputs(
            gateway_pb2_grpc.GatewayStub(channels[0]), unet_pb2_grpc.UNetWorkerStub(channels[1]), model, conv_in
        )
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
