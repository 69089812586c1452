"""`python -m services.gateway --unet 10.0.0.5:50051 10.0.0.6:50051 --controlnet 10.0.0.7:50052 --lora-store 10.0.0.8:50053`

The public API. Workers are addresses, several per service, so the same gateway runs the suite on
one machine or many. Holds no weights (and never imports torch).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from services.gateway.config import GatewayConfig
from services.gateway.servicer import GatewayServicer
from swiftd import rpc, tracing
from swiftd.server import (
    add_limit_arguments,
    add_server_arguments,
    configure_process,
    limits_from_args,
    serve,
    server_config_from_args,
)
from swiftd.v1 import gateway_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.gateway", description=__doc__)
    parser.add_argument(
        "--unet",
        nargs="+",
        required=True,
        metavar="TARGET",
        help="UNet workers: HOST:PORT each, or dns:///NAME:PORT for every address of NAME (re-resolved on each catalog refresh)",
    )
    parser.add_argument("--controlnet", nargs="*", default=[], metavar="TARGET", help="ControlNet workers, as --unet")
    parser.add_argument(
        "--dns-server", default="", metavar="HOST:PORT", help="DNS server for dns:/// targets (default: the system's)"
    )
    parser.add_argument("--lora-store", default="", metavar="HOST:PORT", help="LoRA store (empty: LoRAs are refused)")
    parser.add_argument(
        "--default-model", default="", help="model for requests that name none (empty: the first listed)"
    )
    parser.add_argument(
        "--per-worker-concurrency", type=int, default=1, help="requests admitted per UNet worker of a model"
    )
    parser.add_argument("--max-queue", type=int, default=64, help="requests per model that may wait for admission")
    parser.add_argument(
        "--lora-bound-steps",
        type=int,
        default=None,
        help="BAL bound K for requests that give none (default: the UNet workers' own default)",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds, when the client sets no deadline"
    )
    parser.add_argument("--catalog-ttl", type=float, default=10.0, help="seconds between refreshes of the listings")
    parser.add_argument(
        "--cfg-split",
        choices=("auto", "never"),
        default="auto",
        help="auto: split a request's classifier-free guidance halves over two UNet workers on idle devices; "
        "never: one UNet worker per request",
    )
    parser.add_argument(
        "--tokens-file",
        type=Path,
        default=None,
        help="clients' bearer tokens, lines `IDENTITY TOKEN` (re-read on change); with --tls-dir and "
        "no tokens file, clients need a certificate from the CA",
    )
    add_limit_arguments(parser)
    add_server_arguments(parser)
    # Every queued or running stream holds a server thread; leave room for listings and probes.
    parser.set_defaults(max_workers=256)
    return parser


def config_from_args(args) -> GatewayConfig:
    return GatewayConfig(
        unet_workers=args.unet,
        controlnet_workers=args.controlnet,
        dns_server=args.dns_server,
        lora_store=args.lora_store,
        default_model=args.default_model,
        limits=limits_from_args(args),
        per_worker_concurrency=args.per_worker_concurrency,
        max_queue=args.max_queue,
        default_lora_bound_steps=args.lora_bound_steps,
        request_timeout=args.request_timeout,
        catalog_ttl=args.catalog_ttl,
        cfg_split=args.cfg_split,
    )


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    # A message larger than the largest valid request is refused before it is read into memory.
    server_config = replace(server_config_from_args(args), max_receive_bytes=config.limits.max_request_bytes)
    configure_process(server_config)
    tracing.setup_tracing("gateway")
    servicer = GatewayServicer(config)
    serve(
        rpc.GATEWAY_SERVICE,
        server_config,
        lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server),
        on_health=servicer.keep_health,
        public=True,
    )


if __name__ == "__main__":
    main()
