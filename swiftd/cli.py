"""`swiftd` command line: generate an image through a running worker.

    swiftd generate --address 127.0.0.1:50051 --model tiny-sd15 --prompt "a cat" \\
        --lora tiny-sd15-lora-peft-r4:0.8 --controlnet tiny-sd15-cn-edges=edges.png:1.0 -o out.png

Until the gateway lands, `--address` names a UNet worker.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from swiftd import rpc
from swiftd.client import format_timings
from swiftd.v1 import common_pb2, unet_pb2, unet_pb2_grpc

SCHEDULERS = {
    "ddim": common_pb2.SCHEDULER_DDIM,
    "euler": common_pb2.SCHEDULER_EULER,
    "euler_a": common_pb2.SCHEDULER_EULER_ANCESTRAL,
    "dpmpp_2m": common_pb2.SCHEDULER_DPMPP_2M,
    "pndm": common_pb2.SCHEDULER_PNDM,
}


def parse_lora(text: str) -> common_pb2.LoraRef:
    lora_id, _, scale = text.partition(":")
    return common_pb2.LoraRef(lora_id=lora_id, scale=float(scale) if scale else 1.0)


def parse_controlnet(text: str) -> common_pb2.ControlNetInput:
    """id=image.png[:scale[:start[:end]]]"""
    controlnet_id, sep, rest = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--controlnet {text!r}: expected ID=IMAGE[:SCALE[:START[:END]]]")
    image, *numbers = rest.split(":")
    values = [float(v) for v in numbers] + [1.0, 0.0, 1.0][len(numbers):]
    return common_pb2.ControlNetInput(
        controlnet_id=controlnet_id, image=Path(image).read_bytes(),
        conditioning_scale=values[0], guidance_start=values[1], guidance_end=values[2],
    )  # fmt: skip


def generate(args) -> int:
    request = unet_pb2.DenoiseRequest(
        params=common_pb2.GenerationParams(
            prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
            num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=SCHEDULERS[args.scheduler],
            model_id=args.model, **({"seed": args.seed} if args.seed is not None else {}),
        ),
        loras=args.lora,
        controlnets=[unet_pb2.ControlNetAttachment(input=cn) for cn in args.controlnet],
    )  # fmt: skip
    with rpc.create_channel(args.address) as channel:
        stub = unet_pb2_grpc.UNetWorkerStub(channel)
        final = None
        try:
            for event in stub.DenoiseStream(request, timeout=args.timeout):
                if event.HasField("progress"):
                    p = event.progress
                    bar = "#" * (30 * p.step // p.total_steps)
                    print(f"\r[{bar:<30}] step {p.step}/{p.total_steps} {p.elapsed_seconds:6.1f} s", end="", file=sys.stderr)
                elif event.HasField("final"):
                    final = event.final
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(file=sys.stderr)
    args.output.write_bytes(final.image_png)
    print(f"wrote {args.output} (seed {final.seed})")
    print(format_timings([(t.stage, t.seconds) for t in final.timings]))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="swiftd")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one image")
    g.add_argument("--address", default="127.0.0.1:50051")
    g.add_argument("--model", default="", help="model id (empty: the worker's model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--width", type=int, default=0)
    g.add_argument("--height", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="euler")
    g.add_argument("--lora", type=parse_lora, action="append", default=[], metavar="ID[:SCALE]")
    g.add_argument("--controlnet", type=parse_controlnet, action="append", default=[], metavar="ID=IMAGE[:SCALE[:START[:END]]]")
    g.add_argument("--timeout", type=float, default=600)
    g.add_argument("-o", "--output", type=Path, default=Path("out.png"))
    args = parser.parse_args(argv)
    return generate(args)


if __name__ == "__main__":
    sys.exit(main())
