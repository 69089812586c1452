"""`swiftd` command line: generate through the gateway, list what it serves.

    swiftd generate --address 127.0.0.1:50050 --prompt "a cat" \\
        --lora tiny-sd15-lora-peft-r4:0.8 --controlnet tiny-sd15-cn-edges=edges.png:1.0 -o out.png
    swiftd models | loras | controlnets --address 127.0.0.1:50050

Exit status: 0 on success, 1 when the server refused or failed the request (its status code and
message are printed), 2 for bad command-line arguments, 130 on Ctrl-C (the request is cancelled).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

from swiftd import security
from swiftd.client import Client, Result, format_timings
from swiftd.request import FAMILIES, WIRE_DTYPES, ControlNet, Lora, scheduler_names

DEFAULT_ADDRESS = "127.0.0.1:50050"
TOKEN_ENV = "SWIFTD_TOKEN"


def parse_lora(text: str) -> Lora:
    """ID[:SCALE]"""
    lora_id, _, scale = text.partition(":")
    try:
        return Lora(lora_id, float(scale) if scale else 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: expected ID[:SCALE]") from None


def parse_controlnet(text: str) -> ControlNet:
    """ID=IMAGE[:SCALE[:START[:END]]]"""
    controlnet_id, sep, rest = text.partition("=")
    image, *numbers = rest.split(":")
    try:
        if not sep or not image:
            raise ValueError
        values = [float(v) for v in numbers] + [1.0, 0.0, 1.0][len(numbers) :]
        data = Path(image).read_bytes()
    except ValueError:
        raise argparse.ArgumentTypeError(f"--controlnet {text!r}: expected ID=IMAGE[:SCALE[:START[:END]]]") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"--controlnet {text!r}: cannot read {image}: {exc.strerror}") from None
    return ControlNet(
        controlnet_id, data, conditioning_scale=values[0], guidance_start=values[1], guidance_end=values[2]
    )


def _progress(step: int, total: int, elapsed: float) -> None:
    bar = "#" * (30 * step // max(total, 1))
    print(f"\r[{bar:<30}] step {step}/{total} {elapsed:6.1f} s", end="", file=sys.stderr, flush=True)


def generate(args) -> int:
    options = dict(
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        scheduler=args.scheduler,
        model_id=args.model,
        loras=args.lora,
        controlnets=args.controlnet,
        lora_bound_steps=args.lora_bound_steps,
        request_id=args.request_id,
        controlnet_wire_dtype=args.controlnet_wire_dtype,
    )
    result = None
    with _client(args, timeout=args.timeout) as client:
        try:
            for event in client.generate_stream(args.prompt, **options):
                kind = event.WhichOneof("event")
                if kind == "queued":
                    print(f"\rqueued: {event.queued.position} ahead", end="", file=sys.stderr, flush=True)
                elif kind == "progress":
                    _progress(event.progress.step, event.progress.total_steps, event.progress.elapsed_seconds)
                elif kind == "final":
                    result = Result.from_pb(event.final)
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(file=sys.stderr)
    result.save(args.output)
    print(f"wrote {args.output} (seed {result.seed}, request {result.request_id}, trace {result.trace_id})")
    plan = result.plan
    print(f"plan: {describe_plan(plan, result.lora_applied_at_step)}")
    print(format_timings(result.timings))
    return 0


def describe_plan(plan, lora_applied_at_step: int) -> str:
    text = f"unet {plan.unet_worker}" + "".join(f"; {a.controlnet_id} on {a.worker}" for a in plan.controlnets)
    if plan.lora_ids:
        if plan.lora_set_already_applied:
            delivery = "already applied"
        else:
            delivery = f"pushed {list(plan.pushed_lora_ids)}, in place before step {lora_applied_at_step}"
        text += f"; LoRAs {list(plan.lora_ids)} {delivery}"
    return text


def list_items(args) -> int:
    with _client(args) as client:
        try:
            if args.command == "models":
                for m in client.list_models():
                    print(f"{m.model_id}\t{m.family}\t{m.default_width}x{m.default_height}\t{','.join(m.workers)}")
            elif args.command == "loras":
                for lora in client.list_loras(args.family):
                    print(f"{lora.lora_id}\t{lora.family}\trank {lora.rank}\t{lora.format}\t{lora.size_bytes} bytes")
            else:
                for cn in client.list_controlnets():
                    print(
                        f"{cn.controlnet_id}\t{cn.family}\t{'loaded on ' + ','.join(cn.workers) if cn.loaded else 'not loaded'}"
                    )
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def _client(args, **kwargs) -> Client:
    if args.tls_dir is not None:  # ca.crt, and tls.crt/tls.key if this client has a certificate
        security.configure_client(security.TlsConfig(args.tls_dir, args.tls_server_name))
    return Client(args.address, token=args.token or os.environ.get(TOKEN_ENV, ""), **kwargs)


def _connection_arguments(parser) -> None:
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="gateway host:port")
    parser.add_argument("--tls-dir", type=Path, default=None, help="TLS: a folder with ca.crt (and tls.crt/tls.key)")
    parser.add_argument("--tls-server-name", default="", help="the name in the gateway's certificate, if not the host")
    parser.add_argument("--token", default="", help=f"bearer token for the gateway (default: ${TOKEN_ENV})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swiftd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one image through the gateway")
    _connection_arguments(g)
    g.add_argument("--model", default="", help="model id (empty: the gateway's default)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--width", type=int, default=0, help="0: the model's native size")
    g.add_argument("--height", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--seed", type=int, default=None, help="default: the server picks one and reports it")
    g.add_argument("--scheduler", choices=scheduler_names(), default="euler")
    g.add_argument("--lora", type=parse_lora, action="append", default=[], metavar="ID[:SCALE]")
    g.add_argument(
        "--controlnet", type=parse_controlnet, action="append", default=[], metavar="ID=IMAGE[:SCALE[:START[:END]]]"
    )
    g.add_argument("--lora-bound-steps", type=int, default=None, metavar="K", help="BAL bound (default: the server's)")
    g.add_argument("--controlnet-wire-dtype", choices=sorted(WIRE_DTYPES), default="")
    g.add_argument("--request-id", default="")
    g.add_argument("--timeout", type=float, default=600, help="deadline in seconds, propagated to every service")
    g.add_argument("-o", "--output", type=Path, default=Path("out.png"))
    for name in ("models", "loras", "controlnets"):
        p = sub.add_parser(name, help=f"list the {name} the gateway serves")
        _connection_arguments(p)
        if name == "loras":
            p.add_argument("--family", default="", choices=["", *FAMILIES])
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return generate(args) if args.command == "generate" else list_items(args)
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
