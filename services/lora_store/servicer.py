"""LoraStore servicer: protobuf in and out; the work is in `store.LoraStore`."""

from __future__ import annotations

import logging
import time

import grpc
from opentelemetry import trace

from services.lora_store.store import LoraStore, ServedLora
from swiftd import codec, metrics, rpc
from swiftd.discovery import AllowedPeers
from swiftd.errors import Cancelled, InvalidArgument, Unavailable, from_rpc_error, shown
from swiftd.lora import deltas_to_chunks
from swiftd.request import LoraSet, check_family
from swiftd.v1 import lora_store_pb2, lora_store_pb2_grpc, unet_pb2_grpc

log = logging.getLogger(__name__)
tracer = trace.get_tracer("swiftd.lora_store")


def dtype_from_request(value: int):
    try:
        return codec.dtype_from_proto(value, allow_unspecified=True)
    except ValueError as exc:
        raise InvalidArgument("dtype", str(exc)) from None


def chunks(served: list[ServedLora], request_id: str, chunk_bytes: int):
    """LoraDeltaChunk messages of each LoRA in turn (never interleaved), `last` on each LoRA's final one."""
    for lora in served:
        metrics.LORA_BYTES.labels("sent").inc(lora.nbytes)
        yield from deltas_to_chunks(lora.lora_id, lora.scale, lora.deltas, request_id, chunk_bytes)


class LoraStoreServicer(lora_store_pb2_grpc.LoraStoreServicer):
    def __init__(
        self,
        store: LoraStore,
        chunk_bytes: int = rpc.LORA_CHUNK_BYTES,
        push_timeout: float = 300.0,
        push_to: AllowedPeers | None = None,
    ):
        self.store = store
        self.chunk_bytes = chunk_bytes
        self.push_timeout = push_timeout
        self.push_to = push_to or AllowedPeers([], "--push-to")
        self._channels = rpc.ChannelPool()

    def RegisterLora(self, request, context):
        info, already = self.store.register(request.lora_id)
        return lora_store_pb2.RegisterLoraResponse(lora=info.to_pb(), already_registered=already)

    def ListLoras(self, request, context):
        family = check_family("family", request.family)
        return lora_store_pb2.LoraStoreListLorasResponse(loras=[i.to_pb() for i in self.store.list(family)])

    def RemoveLora(self, request, context):
        return lora_store_pb2.RemoveLoraResponse(removed=self.store.remove(request.lora_id))

    def PrefetchLora(self, request, context):
        dtype = dtype_from_request(request.dtype)
        already, seconds, size = self.store.prefetch(request.lora_id, request.base_model_id, dtype)
        return lora_store_pb2.PrefetchLoraResponse(already_hot=already, prepare_seconds=seconds, size_bytes=size)

    def _served(self, request) -> list[ServedLora]:
        dtype = dtype_from_request(request.dtype)
        with tracer.start_as_current_span("lora_store.prepare") as span:
            served = self.store.lora_set(LoraSet.from_pb(request.loras), request.base_model_id, dtype)
            span.set_attributes(
                {
                    "lora.ids": [s.lora_id for s in served],
                    "lora.tiers": [s.tier for s in served],
                    "lora.bytes": sum(s.nbytes for s in served),
                }
            )
        return served

    def StreamDeltas(self, request, context):
        served = self._served(request)  # everything prepared and validated before the first chunk
        yield from chunks(served, request.request_id, self.chunk_bytes)

    def PushLoras(self, request, context):
        t0 = time.perf_counter()
        address = request.unet_worker_address
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument("unet_worker_address", f"{shown(address)} is not host:port")
        self.push_to.check("unet_worker_address", address)  # never a caller's arbitrary address
        served = self._served(request)
        stub = unet_pb2_grpc.UNetWorkerStub(self._channels.get(address))
        # The caller's deadline bounds the transfer, and its cancellation stops it (gRPC does not
        # pass either on to calls made inside a handler by itself).
        remaining = context.time_remaining()
        timeout = self.push_timeout if remaining is None else min(self.push_timeout, remaining)
        call = stub.ReceiveLoraDeltas.future(chunks(served, request.request_id, self.chunk_bytes), timeout=timeout)
        if not context.add_callback(call.cancel):
            call.cancel()
        try:
            ack = call.result()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"unet worker {address}") from None
        except grpc.FutureCancelledError:
            raise Cancelled("the caller cancelled the push") from None
        missing = [s.lora_id for s in served if s.lora_id not in set(ack.lora_ids)]
        if missing:
            raise Unavailable(f"unet worker {address} did not acknowledge lora(s) {missing}")
        seconds = time.perf_counter() - t0
        parameters = sum(len(s.deltas) for s in served)
        nbytes = sum(s.nbytes for s in served)
        log.info(
            "pushed %d lora(s), %d parameters, %.1f MB to %s in %.3f s (request %s)",
            len(served),
            parameters,
            nbytes / 1e6,
            address,
            seconds,
            request.request_id,
        )
        return lora_store_pb2.PushLorasResponse(
            parameters_sent=parameters,
            bytes_sent=nbytes,
            seconds=seconds,
            cache_hits=[s.lora_id for s in served if s.tier == "host"],
        )
