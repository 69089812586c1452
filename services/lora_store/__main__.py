"""`python -m services.lora_store --model-root .zoo --cache-dir .lora-cache --host-budget-mib 4096 --address 127.0.0.1:50071`

Serves the LoRA files under `<model-root>/loras/` for the base models under `<model-root>/models/`,
with prepared deltas cached in memory (`--host-budget-mib`) and on disk (`--cache-dir`; omit it for
no disk tier). Which files are registered: all of them at start, or what `--registry` lists (kept
across restarts; replicas naming one registry and one cache dir serve one catalog).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.lora_store.servicer import LoraStoreServicer
from services.lora_store.store import LoraStore
from swiftd import rpc, tracing
from swiftd.cliargs import ExtendList
from swiftd.discovery import AllowedPeers
from swiftd.loading import DTYPES
from swiftd.server import (
    add_server_arguments,
    configure_process,
    serve,
    server_config_from_args,
)
from swiftd.v1 import lora_store_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.lora_store", description=__doc__)
    parser.add_argument("--model-root", type=Path, required=True, help="model repository with loras/ and models/")
    parser.add_argument("--cache-dir", type=Path, default=None, help="disk tier of prepared deltas (default: none)")
    parser.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="JSON file of the registered LoRA ids, kept across restarts and shared by replicas naming it "
        "(default: none: every file under loras/ registered at start, changes forgotten at exit)",
    )
    parser.add_argument(
        "--host-budget-mib",
        type=float,
        default=4096.0,
        help="byte budget of the host-memory tier of prepared deltas, MiB (fractions allowed)",
    )
    parser.add_argument(
        "--chunk-mib",
        type=float,
        default=rpc.LORA_CHUNK_BYTES / rpc.MiB,
        help="target tensor bytes per LoraDeltaChunk, MiB (fractions allowed, e.g. 0.25 = 256 KiB)",
    )
    parser.add_argument(
        "--default-dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="serving dtype for requests that leave dtype unspecified",
    )
    parser.add_argument("--push-timeout", type=float, default=300.0, help="deadline of one PushLoras stream, seconds")
    parser.add_argument(
        "--base-model",
        nargs="*",
        action=ExtendList,
        default=[],
        metavar="ID",
        help="base models to load before serving",
    )
    parser.add_argument(
        "--prefetch",
        nargs="*",
        action=ExtendList,
        default=[],
        metavar="LORA_ID",
        help="LoRAs to prepare for every --base-model (default dtype) before serving",
    )
    parser.add_argument(
        "--push-to",
        nargs="*",
        action=ExtendList,
        default=[],
        metavar="TARGET",
        help="the UNet workers PushLoras may send deltas to: host:port or dns:///name:port (a headless "
        "Service); none: any address a caller names (local runs only)",
    )
    parser.add_argument(
        "--max-base-models",
        type=int,
        default=2,
        help="base pipelines kept in memory to prepare deltas against (least recently used unloaded)",
    )
    add_server_arguments(parser)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    server_config = server_config_from_args(args)
    configure_process(server_config)
    tracing.setup_tracing("lora_store")

    chunk_bytes = max(1, int(args.chunk_mib * rpc.MiB))
    store = LoraStore(
        args.model_root,
        args.cache_dir,
        int(args.host_budget_mib * rpc.MiB),
        DTYPES[args.default_dtype],
        max_base_models=args.max_base_models,
        registry=args.registry,
    )
    for model_id in args.base_model:
        store.bases.pipeline(model_id)
        for lora_id in args.prefetch:
            store.prefetch(lora_id, model_id)
    push_to = AllowedPeers(args.push_to, "--push-to")
    servicer = LoraStoreServicer(store, chunk_bytes=chunk_bytes, push_timeout=args.push_timeout, push_to=push_to)
    serve(
        rpc.LORA_STORE_SERVICE,
        server_config,
        lambda server: lora_store_pb2_grpc.add_LoraStoreServicer_to_server(servicer, server),
    )


if __name__ == "__main__":
    main()
