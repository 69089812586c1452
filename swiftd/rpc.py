"""gRPC server and channel construction with the suite's explicit limits.

Every service builds its server with ``create_server`` and every client its channel with
``create_channel``, so message-size limits and keepalive agree on both ends of each connection.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from swiftd import security, tracing
from swiftd.v1 import controlnet_pb2, gateway_pb2, lora_store_pb2, unet_pb2

MiB = 1 << 20

#: Largest message either side sends or accepts. ControlNet residuals are the largest messages
#: (~54 MB fp32 per step at SD1.5 512^2 with CFG; ~4x that for SDXL at 1024^2), far above gRPC's
#: 4 MiB default; images and latents are smaller. LoRA deltas travel in chunks of
#: LORA_CHUNK_BYTES instead of one message per LoRA.
MAX_MESSAGE_BYTES = 512 * MiB

#: Target size of the tensor data in one LoraDeltaChunk (a chunk holds whole ParameterDeltas, so
#: one larger than this travels alone).
LORA_CHUNK_BYTES = 16 * MiB
# Initial metadata a UNet worker sends once it has checked and taken a request: from then on the
# request is that worker's, and a failure is the request's, not a sign the worker is unreachable.
ACCEPTED = ("swiftd-accepted", "1")

#: Options for both servers and channels (each side ignores the ones that do not apply to it).
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Keepalive: ping every 30 s, also while a long stream is idle (a UNet worker waiting on LoRA
    # deltas, a queued GenerateStream), and drop the connection if a ping goes unanswered for 10 s,
    # so a dead peer fails the stream instead of hanging it.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Server side: accept those pings (the default policy rejects pings more often than every
    # 5 min without data and closes the connection with GOAWAY "too_many_pings").
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    # Server side: fail to bind a port that is already in use instead of sharing it silently.
    ("grpc.so_reuseport", 0),
]

#: Fully qualified names of the suite's services, for health checks and reflection.
GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
UNET_SERVICE = unet_pb2.DESCRIPTOR.services_by_name["UNetWorker"].full_name
CONTROLNET_SERVICE = controlnet_pb2.DESCRIPTOR.services_by_name["ControlNetWorker"].full_name
LORA_STORE_SERVICE = lora_store_pb2.DESCRIPTOR.services_by_name["LoraStore"].full_name


#: Reads that change nothing, retried by the channel itself on UNAVAILABLE (a worker restarting,
#: a connection being re-established): status polls, listings and health checks. Nothing that
#: runs or changes work is retried here; the gateway re-plans a request itself. The throttle
#: stops retries once more than about one call in ten fails, so a dead peer is not hammered.
IDEMPOTENT_READS = {
    GATEWAY_SERVICE: ["ListModels", "ListLoras", "ListControlNets"],
    UNET_SERVICE: ["GetWorkerStatus", "ListModels"],
    CONTROLNET_SERVICE: ["ListControlNets"],
    LORA_STORE_SERVICE: ["ListLoras"],
    "grpc.health.v1.Health": ["Check"],
}
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": s, "method": m} for s, methods in IDEMPOTENT_READS.items() for m in methods],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
)
GRPC_OPTIONS.append(("grpc.service_config", SERVICE_CONFIG))


def _merge(extra: Iterable[tuple[str, object]]) -> list[tuple[str, object]]:
    """GRPC_OPTIONS with ``extra`` overriding options of the same name."""
    extra = list(extra)
    names = {name for name, _ in extra}
    return [opt for opt in GRPC_OPTIONS if opt[0] not in names] + extra


def create_server(
    max_workers: int,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    options: Iterable[tuple[str, object]] = (),
    max_waiting: int | None = None,
) -> grpc.Server:
    """A thread-pool gRPC server with GRPC_OPTIONS (``options`` override them by name).

    Each in-flight RPC, a whole stream included, holds one of the ``max_workers`` threads for its
    duration: size the pool for the concurrent streams the service must carry. ``max_waiting``:
    RPCs that may wait for a thread beyond those (None: no limit); more are refused with
    RESOURCE_EXHAUSTED before their messages pile up in gRPC's buffers. Add ports and servicers,
    then ``start()``.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-server")
    limit = None if max_waiting is None else max_workers + max_waiting
    return grpc.server(pool, interceptors=list(interceptors), options=_merge(options), maximum_concurrent_rpcs=limit)


def create_channel(address: str, options: Iterable[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to ``address`` ("host:port") with GRPC_OPTIONS (``options`` override): mutual TLS
    with this process's certificate where `swiftd.security` is configured, else plaintext.

    Calls on it carry the caller's trace context (W3C traceparent metadata) and get CLIENT spans.
    """
    tls = security.configured()
    if tls is None:
        channel = grpc.insecure_channel(address, options=_merge(options))
    else:
        credentials, tls_options = security.channel_credentials(tls)
        channel = grpc.secure_channel(address, credentials, options=_merge([*tls_options, *options]))
    return grpc.intercept_channel(channel, tracing.ClientTracingInterceptor())


class ChannelPool:
    """One channel per worker address, shared by all requests (HTTP/2 multiplexes streams).

    With TLS, a channel is made anew once the process's certificate files change (a renewed
    certificate; looked at once a second at most), so new connections present it; calls still
    running keep the old channel."""

    STAMP_EVERY_S = 1.0  # how often the certificate files are looked at (three stats), at most

    def __init__(self):
        self._channels: dict[str, tuple[grpc.Channel, object]] = {}
        self._lock = threading.Lock()
        self._stamp: tuple[float, object] = (float("-inf"), None)

    def _tls_stamp(self):
        tls = security.configured()
        if tls is None:
            return None
        checked_at, stamp = self._stamp
        now = time.monotonic()
        if now - checked_at >= self.STAMP_EVERY_S:
            stamp = tls.stamp()
            self._stamp = (now, stamp)
        return stamp

    def get(self, address: str) -> grpc.Channel:
        stamp = self._tls_stamp()
        with self._lock:
            entry = self._channels.get(address)
            if entry is None or entry[1] != stamp:
                entry = self._channels[address] = (create_channel(address), stamp)
            return entry[0]

    def retain(self, addresses: Iterable[str]) -> None:
        """Forget the channels to every other address (workers that left DNS), so a pool that
        follows scaling workers does not grow without bound. Not closed: a request still running
        on one holds the channel and finishes on it; it is freed when the last call ends."""
        keep = set(addresses)
        with self._lock:
            for address in [a for a in self._channels if a not in keep]:
                del self._channels[address]

    def close(self) -> None:
        with self._lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()


def add_health_and_reflection(server: grpc.Server, service_names: Iterable[str]) -> health.HealthServicer:
    """Register grpc.health.v1 (SERVING for ``service_names`` and "") and server reflection.

    Returns the health servicer, so the service can flip statuses (e.g. NOT_SERVING on drain).
    """
    names = list(service_names)
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


def tune_allocator_for_large_messages(threshold_bytes: int = 1 << 30) -> bool:
    """Opt-in, process-wide: keep large buffers on glibc's heap instead of fresh mmap()s.

    glibc serves allocations above its mmap threshold (at most 32 MiB by default) with a new
    mapping each time, so every 54 MB residual message page-faults its memory in again; measured
    on the 2-core dev box, encode+decode of a 54 MB fp32 tensor drops from ~140-200 ms to ~30-55
    ms with this. Cost: freed memory is kept for reuse rather than returned to the OS (RSS stays
    near its peak). Call once at service start, before the first large message. Returns False
    (and does nothing) where glibc's mallopt is unavailable. The environment variables
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ do the same from outside the process.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, ctypes.c_int(min(threshold_bytes, 2**31 - 1)))
    ok &= mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1))
    return bool(ok)


def time_left(context: grpc.ServicerContext, cap: float) -> Callable[[], float]:
    """Seconds left for the call being served: its client's deadline, capped at `cap` seconds (a
    call without a deadline gets `cap`), as a function to ask again before each downstream call."""
    client = context.time_remaining()
    end = time.monotonic() + (cap if client is None else min(client, cap))
    return lambda: max(0.0, end - time.monotonic())


_END = object()


def responses(call, poll_seconds: float = 0.25, ahead: int = 4) -> Iterator:
    """The messages of a call that streams responses, ending as iterating the call would (its
    RpcError raised at the end), and also when the call fails while gRPC never completes the
    receive that the call's iterator waits in: grpcio 1.85 ends such a call now and then (status
    set, done callbacks run) when the server's GOAWAY comes during connection set-up, and the
    iterator then blocks for good, past the deadline. Read on a thread of its own, at most
    `ahead` messages ahead of the consumer (gRPC's flow control still holds)."""
    items: queue.Queue = queue.Queue(maxsize=ahead)
    consumer_gone = threading.Event()

    def put(item) -> bool:
        while not consumer_gone.is_set():
            try:
                items.put(item, timeout=poll_seconds)
                return True
            except queue.Full:
                continue
        return False

    def pump():
        try:
            for message in call:
                if not put(message):
                    return
            put(_END)
        except grpc.RpcError as exc:
            put(exc)

    threading.Thread(target=pump, name="grpc-responses", daemon=True).start()
    try:
        failed_polls = 0  # polls that found the call failed and nothing to read
        while True:
            try:
                item = items.get(timeout=poll_seconds)
            except queue.Empty:
                failed = call.done() and call.code() != grpc.StatusCode.OK
                failed_polls = failed_polls + 1 if failed else 0
                if failed_polls >= 2:  # twice: a message the reader holds has had time to arrive
                    raise call from None  # failed, and its receive never completed
                continue
            if item is _END:
                return
            if isinstance(item, grpc.RpcError):
                raise item
            yield item
    finally:
        consumer_gone.set()
