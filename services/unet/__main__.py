"""`python -m services.unet --model-root .zoo --model-id tiny-sd15 --address 127.0.0.1:50051`"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from compiler import parts as P
from compiler.build import BACKENDS
from compiler.probe import add_unusable_artifacts_argument
from services.unet.backbone import Backbone, EagerBackbone
from services.unet.lora_inbox import LoraInbox
from services.unet.pipeline import UNetPipeline
from services.unet.servicer import UNetWorkerConfig, UNetWorkerServicer
from swiftd import metrics, rpc, tracing, transport
from swiftd.cliargs import ExtendList
from swiftd.controlnet_step import ControlNetStepper
from swiftd.discovery import AllowedPeers
from swiftd.loading import DTYPES, controlnet_family, list_ids, load_controlnet, load_pipeline, pipeline_family, resolve
from swiftd.lora import LoraDeltas, extract_deltas, prepare_deltas
from swiftd.server import (
    add_limit_arguments,
    add_server_arguments,
    configure_process,
    limits_from_args,
    serve,
    server_config_from_args,
)
from swiftd.v1 import unet_pb2_grpc

log = logging.getLogger("services.unet")
BACKBONE_PARTS = (P.UNET_ENCODER, P.UNET_DECODER, P.VAE_DECODER)  # what a UNet worker compiles (ControlNets: the CLI)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.unet", description=__doc__)
    parser.add_argument(
        "--model-root", type=Path, required=True, help="model repository (models/, controlnets/, loras/)"
    )
    parser.add_argument("--model-id", required=True, help="base model to serve: models/<id> folder or single file")
    parser.add_argument(
        "--config", type=Path, default=None, help="Diffusers config folder for a single-file checkpoint"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--lora-cache-mib",
        type=float,
        default=2048,
        help="byte budget of LoRA deltas held and under way, MiB (fractions allowed)",
    )
    parser.add_argument(
        "--lora-stall-seconds",
        type=float,
        default=30.0,
        help="a LoRA transfer that sends nothing for this long is dropped, its bytes let go",
    )
    parser.add_argument(
        "--lora-store", default="", help="LoRA store address to pull deltas from (empty: prepare locally)"
    )
    parser.add_argument(
        "--lora-bound-steps",
        type=int,
        default=0,
        help="default BAL bound K: LoRA deltas are in place before step K at the latest (0: synchronous)",
    )
    parser.add_argument(
        "--lora-wait-timeout", type=float, default=120.0, help="longest wait for a LoRA's deltas (seconds)"
    )
    parser.add_argument(
        "--peers",
        nargs="*",
        action=ExtendList,
        default=[],
        metavar="TARGET",
        help="the ControlNet workers, CFG partners and LoRA stores a request may name: host:port or "
        "dns:///name:port; none: any address a request names (local runs only)",
    )
    parser.add_argument(
        "--controlnet-step-timeout",
        type=float,
        default=60.0,
        help="longest wait for one step's residuals from a ControlNet worker (seconds)",
    )
    parser.add_argument(
        "--cfg-step-timeout",
        type=float,
        default=300.0,
        help="longest wait for the other half of a CFG split at one step (seconds; the other side may "
        "be waiting for its LoRA deltas first)",
    )
    parser.add_argument(
        "--compiled-artifacts",
        type=Path,
        default=None,
        help="artifact directory from `python -m compiler build`: the UNet halves, VAE decoder and "
        "in-process ControlNets run compiled (none given: eagerly)",
    )
    parser.add_argument(
        "--compile-missing",
        action="store_true",
        help="build --compiled-artifacts at start when the directory has none (compiles for minutes)",
    )
    parser.add_argument(
        "--compile-resolution",
        type=int,
        nargs="+",
        default=None,
        help="resolutions --compile-missing builds (default: the model's native size)",
    )
    parser.add_argument(
        "--compile-backend",
        choices=BACKENDS,
        default=None,
        help="backend --compile-missing builds with (default: graphs on CUDA, inductor elsewhere; "
        "see python -m compiler build --help)",
    )
    parser.add_argument(
        "--compile-batch-sizes",
        type=int,
        nargs="+",
        default=[1, 2],
        help="batch sizes --compile-missing builds: 1 without CFG (or one half of a CFG split), 2 with CFG",
    )
    parser.add_argument(
        "--compile-parts",
        nargs="+",
        choices=BACKBONE_PARTS,
        default=list(BACKBONE_PARTS),
        help="parts --compile-missing builds",
    )
    add_unusable_artifacts_argument(parser, "are missing, do not fit or fail their probe")
    parser.add_argument(
        "--probe-artifacts",
        choices=["auto", "always", "never"],
        default="auto",
        help="verify the artifacts in a child process before loading them here, so that a native "
        "crash ends the child, not the worker (auto: on CUDA)",
    )
    add_limit_arguments(parser)
    transport.add_argument(parser, "offers")
    add_server_arguments(parser)
    return parser


def load_backbone(args, pipe) -> Backbone:
    """The compiled backbone from --compiled-artifacts (built first with --compile-missing), or
    the eager one.

    Artifacts that are missing, do not fit this model, dtype, torch/diffusers version or machine,
    or fail their probe in a child process: the worker serves eagerly and logs why
    (`--on-unusable-artifacts exit`: it stops with the compiler's exit code instead).
    """
    if args.compiled_artifacts is None:
        log.info("serving eagerly: no --compiled-artifacts given")
        return EagerBackbone(pipe)
    from compiler.artifacts import MANIFEST, CompilerError
    from compiler.build import build
    from compiler.probe import probe_artifacts, unusable
    from compiler.runtime import CompiledBackbone, compile_activity

    try:
        if args.compile_missing and not (args.compiled_artifacts / MANIFEST).exists():
            resolutions = args.compile_resolution or [pipe.unet.config.sample_size * pipe.vae_scale_factor]
            log.info(
                "compiling the backbone into %s for %s px (--compile-missing) ...", args.compiled_artifacts, resolutions
            )
            build(
                pipe,
                args.compiled_artifacts,
                model_id=args.model_id,
                backend=args.compile_backend,
                resolutions=resolutions,
                batch_sizes=args.compile_batch_sizes,
                parts=args.compile_parts,
                device=args.device,
                force=True,
            )
        if args.probe_artifacts == "always" or (args.probe_artifacts == "auto" and native_code_on_cuda(args)):
            seconds = probe_artifacts(
                args.compiled_artifacts,
                model_root=args.model_root,
                model_id=args.model_id,
                device=args.device,
                dtype=args.dtype,
                config=args.config,
            )
            log.info(
                "compiled artifacts %s passed their probe in a child process (%.1f s)", args.compiled_artifacts, seconds
            )
        compiled = CompiledBackbone.load(args.compiled_artifacts, pipe, device=args.device)
    except CompilerError as exc:
        unusable(args, args.compiled_artifacts, exc)
        return EagerBackbone(pipe)
    log.info("compiled: %s; compilation so far in this process: %s", compiled.describe(), compile_activity())
    metrics.track_compilations(compile_activity)  # at scrape time: a recompilation would show
    return compiled


def native_code_on_cuda(args) -> bool:
    """Whether --probe-artifacts auto probes: artifacts of compiled native code (AOTInductor
    packages, TensorRT engines) on CUDA, where loading one has ended a process. The graphs
    backend loads no native code of its own (a probe would only compile it all twice)."""
    from compiler.artifacts import read_manifest

    return args.device.startswith("cuda") and read_manifest(args.compiled_artifacts).backend != "graphs"


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    server_config = server_config_from_args(args)
    configure_process(server_config)
    tracing.setup_tracing("unet")

    dtype = DTYPES[args.dtype]
    model_path = resolve(args.model_root, "models", args.model_id, "model_id")
    pipe = load_pipeline(model_path, dtype=dtype, device=args.device, config=args.config)
    backbone = load_backbone(args, pipe)
    metrics.COMPILED.labels("unet").set(0 if isinstance(backbone, EagerBackbone) else 1)
    controlnets: dict[str, ControlNetStepper] = {}

    def load_local_controlnet(controlnet_id: str) -> ControlNetStepper:
        # In-process ControlNets (no worker address given): loaded on first use, then kept.
        if controlnet_id not in controlnets:
            path = resolve(args.model_root, "controlnets", controlnet_id, "controlnet_id")
            model = load_controlnet(path, dtype=dtype, device=args.device)
            controlnets[controlnet_id] = backbone.controlnet_stepper(model)
        return controlnets[controlnet_id]

    family = pipeline_family(model_path if model_path.is_dir() else model_path.with_suffix(""))

    def list_local_controlnets() -> dict[str, bool]:
        # Those of the model's family (unknown family: a single file, only known once loaded).
        ids = list_ids(args.model_root, "controlnets")
        fitting = [c for c in ids if controlnet_family(args.model_root / "controlnets" / c) in ("", family)]
        return {c: c in controlnets for c in fitting}

    def prepare_local_lora(lora_id: str, scale: float) -> LoraDeltas:
        # Without a LoRA store the worker prepares deltas from its own model root (the inbox
        # caches the result); with one, they are pushed or pulled ready to apply.
        path = resolve(args.model_root, "loras", lora_id, "loras.lora_id")
        return prepare_deltas(extract_deltas(pipe, path), scale, dtype)

    inbox = LoraInbox(
        budget_bytes=int(args.lora_cache_mib * (1 << 20)),
        dtype=dtype,
        base_model_id=args.model_id,
        prepare_local=None if args.lora_store else prepare_local_lora,
        default_store=args.lora_store,
        wait_timeout=args.lora_wait_timeout,
        stall_timeout=args.lora_stall_seconds,
    )
    pipeline = UNetPipeline(
        pipe,
        backbone,
        load_controlnet=load_local_controlnet,
        lora_inbox=inbox,
        default_lora_bound_steps=args.lora_bound_steps,
        list_controlnets=list_local_controlnets,
    )
    config = UNetWorkerConfig(
        model_id=args.model_id,
        model_path=model_path,
        limits=limits_from_args(args),
        controlnet_step_timeout=args.controlnet_step_timeout,
        cfg_step_timeout=args.cfg_step_timeout,
        residual_transports=transport.parse(args.residual_transports),
    )
    peers = AllowedPeers(args.peers, "--peers", extra=(args.lora_store,))
    servicer = UNetWorkerServicer(pipeline, config, peers)
    serve(
        rpc.UNET_SERVICE, server_config, lambda server: unet_pb2_grpc.add_UNetWorkerServicer_to_server(servicer, server)
    )


if __name__ == "__main__":
    main()
