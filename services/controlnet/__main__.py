"""`python -m services.controlnet --model-root .zoo --address 127.0.0.1:50061 [--preload ID ...]`"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.controlnet.engine import ControlNetRegistry
from services.controlnet.servicer import ControlNetWorkerServicer
from swiftd import rpc, tracing
from swiftd.loading import DTYPES
from swiftd.server import (
    add_server_arguments,
    configure_process,
    serve,
    server_config_from_args,
)
from swiftd.v1 import controlnet_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.controlnet", description=__doc__)
    parser.add_argument("--model-root", type=Path, required=True, help="model repository with controlnets/")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--budget-mib", type=int, default=8192, help="memory budget for resident ControlNets")
    parser.add_argument("--preload", nargs="*", default=[], metavar="ID", help="ControlNets to load before serving")
    add_server_arguments(parser)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    server_config = server_config_from_args(args)
    configure_process(server_config)
    tracing.setup_tracing("controlnet")

    registry = ControlNetRegistry(args.model_root, args.budget_mib << 20, DTYPES[args.dtype], args.device)
    for controlnet_id in args.preload:
        registry.load(controlnet_id)
    servicer = ControlNetWorkerServicer(registry)
    serve(rpc.CONTROLNET_SERVICE, server_config,
          lambda server: controlnet_pb2_grpc.add_ControlNetWorkerServicer_to_server(servicer, server))  # fmt: skip


if __name__ == "__main__":
    main()
