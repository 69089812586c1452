"""`python -m services.controlnet --model-root .zoo --address 127.0.0.1:50061 [--preload ID ...]`"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from compiler.probe import add_unusable_artifacts_argument
from services.controlnet.registry import ControlNetRegistry
from services.controlnet.servicer import ControlNetWorkerServicer
from swiftd import metrics, rpc, tracing, transport
from swiftd.cliargs import ExtendList
from swiftd.controlnet_step import ControlNetStepper
from swiftd.loading import DTYPES
from swiftd.server import (
    add_server_arguments,
    configure_process,
    serve,
    server_config_from_args,
)
from swiftd.transport import shm
from swiftd.v1 import controlnet_pb2_grpc

log = logging.getLogger("services.controlnet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.controlnet", description=__doc__)
    parser.add_argument("--model-root", type=Path, required=True, help="model repository with controlnets/")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--budget-mib", type=int, default=8192, help="memory budget for resident ControlNets")
    parser.add_argument(
        "--preload", nargs="*", action=ExtendList, default=[], metavar="ID", help="ControlNets to load before serving"
    )
    parser.add_argument(
        "--compiled-artifacts",
        type=Path,
        nargs="+",
        default=[],
        metavar="DIR",
        help="artifact directories from `python -m compiler build --controlnet-id ...` (one per base "
        "model family served): ControlNets of a compiled architecture run compiled, others eagerly",
    )
    add_unusable_artifacts_argument(parser, "are missing or do not fit")
    transport.add_argument(parser, "accepts")
    add_server_arguments(parser)
    return parser


def stepper_factory(args):
    """(make_stepper, compiled artifacts): what the registry makes of a loaded ControlNet, a
    compiled stepper where an artifact of its architecture exists, else an eager one.

    Artifacts that are missing or do not fit this dtype, torch/diffusers version or machine: the
    worker serves eagerly and logs why (`--on-unusable-artifacts exit`: it stops with the
    compiler's exit code instead).
    """
    if not args.compiled_artifacts:
        log.info("serving eagerly: no --compiled-artifacts given")
        return ControlNetStepper, []
    from compiler.artifacts import CompilerError
    from compiler.probe import unusable
    from compiler.runtime import CompiledControlNets

    compiled = []
    for directory in args.compiled_artifacts:
        try:
            compiled.append(CompiledControlNets.load(directory, dtype=DTYPES[args.dtype], device=args.device))
        except CompilerError as exc:
            unusable(args, directory, exc)
            return ControlNetStepper, []
        log.info("compiled: %s", compiled[-1].describe())

    def make_stepper(controlnet) -> ControlNetStepper:
        from compiler.artifacts import module_fingerprint

        # The first directory with an artifact of this architecture serves it (its resolutions).
        fingerprint = module_fingerprint(controlnet)
        artifacts = next((a for a in compiled if fingerprint in a.fingerprints()), compiled[0])
        try:
            return artifacts.stepper(controlnet)  # no artifact of its architecture: eager, logged
        except (CompilerError, RuntimeError):
            # Serving this ControlNet slower beats not serving it (the directory itself was checked at start).
            log.exception(
                "cannot bind the compiled artifacts of %s to this ControlNet: it runs eagerly", artifacts.directory
            )
            return ControlNetStepper(controlnet)

    return make_stepper, compiled


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    server_config = server_config_from_args(args)
    configure_process(server_config)
    tracing.setup_tracing("controlnet")

    make_stepper, compiled = stepper_factory(args)
    metrics.COMPILED.labels("controlnet").set(1 if compiled else 0)  # per ControlNet: ListControlNets
    if args.device.startswith("cuda"):
        metrics.track_device_memory(args.device)
    registry = ControlNetRegistry(
        args.model_root, args.budget_mib << 20, DTYPES[args.dtype], args.device, make_stepper=make_stepper
    )
    for controlnet_id in args.preload:
        registry.load(controlnet_id)
    report = None
    if compiled:
        from collections import Counter

        from compiler.runtime import compile_activity

        metrics.track_compilations(compile_activity)
        log.info(
            "ready: compiled %s; compilation so far in this process: %s",
            sorted(registry.compiled()),
            compile_activity(),
        )

        def report():
            steps = sum((Counter(artifacts.calls()) for artifacts in compiled), Counter())
            log.info("first session done: steps %s; compilation in this process: %s", dict(steps), compile_activity())

    shm.remove_abandoned()  # rings of workers on this host killed before their reader mapped them
    servicer = ControlNetWorkerServicer(
        registry, after_first_session=report, transports=transport.parse(args.residual_transports)
    )
    serve(
        rpc.CONTROLNET_SERVICE,
        server_config,
        lambda server: controlnet_pb2_grpc.add_ControlNetWorkerServicer_to_server(servicer, server),
    )


if __name__ == "__main__":
    main()
