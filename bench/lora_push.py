"""Store throughput: precompute, disk-tier load, and delta streaming over loopback gRPC (MB/s).

    python -m bench.lora_push --zoo .zoo [--model bench-sd15] [--lora bench-sd15-lora-peft-r64]

MB are 10^6 bytes of prepared delta tensors (fp32 unless --dtype). Precompute = parse the file,
map it onto the base model, validate, fold, cast (`extract_deltas` + `prepare_deltas`), base
model already loaded. Streaming = a StreamDeltas call served from the host tier, timed at the
client until the last chunk arrived ("receive") and with every delta decoded to tensors
("receive+decode"); push = PushLoras into a minimal in-process ReceiveLoraDeltas servicer that
decodes what it gets. Medians of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from swiftd import rpc
from swiftd.loading import DTYPES, load_pipeline, resolve
from swiftd.lora import delta_from_proto


def measure_precompute(zoo: Path, model: str, lora: str, dtype: torch.dtype, repeats: int) -> dict:
    from services.lora_store.store import LoraStore

    pipe = load_pipeline(resolve(zoo, "models", model, "base_model_id"))
    precompute, disk, nbytes = [], [], 0
    with tempfile.TemporaryDirectory() as cache:
        for i in range(repeats):
            store = LoraStore(zoo, Path(cache) / str(i), 1 << 40, pipeline_loader=lambda _path: pipe)
            prepared, tier, seconds = store.entry(lora, model, dtype)
            assert tier == "precompute"
            precompute.append(seconds)
            nbytes = prepared.nbytes
            store.host.drop(lambda _key: True)
            prepared, tier, seconds = store.entry(lora, model, dtype)
            assert tier == "disk"
            disk.append(seconds)
    return {
        "delta_bytes": nbytes,
        "precompute_seconds": statistics.median(precompute),
        "precompute_mb_per_s": nbytes / 1e6 / statistics.median(precompute),
        "disk_load_mb_per_s": nbytes / 1e6 / statistics.median(disk),
    }


def measure_streaming(zoo: Path, model: str, lora: str, dtype: torch.dtype, repeats: int, chunk_mib: float) -> dict:
    from swiftd import codec
    from swiftd.launcher import start_service
    from swiftd.v1 import common_pb2, lora_store_pb2, lora_store_pb2_grpc, unet_pb2, unet_pb2_grpc

    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    service = start_service(
        "lora_store",
        "services.lora_store",
        [
            "--model-root",
            str(zoo),
            "--base-model",
            model,
            "--prefetch",
            lora,
            "--default-dtype",
            dtype_name,
            "--chunk-mib",
            str(chunk_mib),
        ],
    )

    class Receiver(unet_pb2_grpc.UNetWorkerServicer):
        def ReceiveLoraDeltas(self, request_iterator, context):
            ids, n = [], 0
            for chunk in request_iterator:
                for entry in chunk.deltas:
                    delta_from_proto(entry)
                    n += 1
                if chunk.last:
                    ids.append(chunk.lora_id)
            return unet_pb2.ReceiveLoraDeltasResponse(lora_ids=ids, parameters_received=n)

    server = rpc.create_server(4)
    unet_pb2_grpc.add_UNetWorkerServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = rpc.create_channel(service.address)
    try:
        stub = lora_store_pb2_grpc.LoraStoreStub(channel)
        request = lora_store_pb2.StreamDeltasRequest(
            loras=[common_pb2.LoraRef(lora_id=lora)], base_model_id=model, dtype=codec.dtype_to_proto(dtype)
        )
        receive, decode, nbytes, chunks = [], [], 0, 0
        list(stub.StreamDeltas(request, timeout=300))  # warm-up (channel, host tier)
        for _ in range(repeats):
            t0 = time.perf_counter()
            messages = list(stub.StreamDeltas(request, timeout=300))
            receive.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            nbytes = sum(delta_from_proto(e)[1].nbytes for m in messages for e in m.deltas)
            decode.append(receive[-1] + time.perf_counter() - t0)
            chunks = len(messages)
        push = []
        for _ in range(repeats):
            response = stub.PushLoras(
                lora_store_pb2.PushLorasRequest(
                    loras=[common_pb2.LoraRef(lora_id=lora)],
                    base_model_id=model,
                    dtype=codec.dtype_to_proto(dtype),
                    unet_worker_address=f"127.0.0.1:{port}",
                ),
                timeout=300,
            )
            assert lora in response.cache_hits
            push.append(response.seconds)
    finally:
        channel.close()
        server.stop(None)
        service.stop()
    return {
        "chunks": chunks,
        "stream_receive_mb_per_s": nbytes / 1e6 / statistics.median(receive),
        "stream_receive_decode_mb_per_s": nbytes / 1e6 / statistics.median(decode),
        "stream_seconds": statistics.median(receive),
        "push_mb_per_s": nbytes / 1e6 / statistics.median(push),
        "push_seconds": statistics.median(push),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lora_push", description=__doc__)
    parser.add_argument("--zoo", type=Path, default=Path(".zoo"))
    parser.add_argument("--model", default="bench-sd15")
    parser.add_argument("--lora", default="bench-sd15-lora-peft-r64")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-mib", type=float, default=rpc.LORA_CHUNK_BYTES / rpc.MiB)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dtype = DTYPES[args.dtype]
    result = {"model": args.model, "lora": args.lora, "dtype": args.dtype}
    result.update(measure_precompute(args.zoo, args.model, args.lora, dtype, args.repeats))
    result.update(measure_streaming(args.zoo, args.model, args.lora, dtype, args.repeats, args.chunk_mib))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
