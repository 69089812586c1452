"""The baselines' front: a least-loaded FIFO dispatcher serving `swiftd.v1.Gateway` in front of
Diffusers workers (bench/baselines/worker.py).

    python -m bench.baselines.dispatcher --workers 127.0.0.1:50061 127.0.0.1:50062 [--max-queue 64] \
        [--address 127.0.0.1:0] [--request-timeout 600]

What sits in front of one-pipeline-per-device servers today: one FIFO queue, each worker runs one
request at a time, and the request at the head goes to an idle worker as soon as there is one
(the one idle longest, so load spreads evenly). No placement, no affinity: that is the point of
the comparison. It is held to the same rules as our gateway, so that the two differ in what they
do with a request, not in what they accept: the same up-front checks (the gateway's own
`validate_request`, against the workers' listings) so a bad request is refused before it takes
a place in the queue; the same admission queue (`AdmissionQueue`, capacity = number of workers):
a full queue is RESOURCE_EXHAUSTED, a deadline passing in the queue DEADLINE_EXCEEDED, a cancelled
caller leaves it; the caller's remaining deadline bounds the worker call, and a caller that goes
away cancels it (the worker stops within one step).

GenerateStream sends Queued (position) while waiting, Started (the chosen worker's address, time
queued), the worker's progress and previews, then the final response. Its timings are the
worker's stages, plus "validate", "queue" (this queue, plus the worker's own lock wait, about 0)
and "total" (from arrival here to the response). Holds no weights and never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

import grpc
from opentelemetry import trace

from services.gateway.admission import AdmissionQueue
from services.gateway.catalog import MIN_FORCED_REFRESH_INTERVAL, Listing
from services.gateway.validation import validate_request
from swiftd import rpc, tracing
from swiftd.errors import Cancelled, Unavailable, from_rpc_error
from swiftd.request import Limits, Request, check_family
from swiftd.server import (
    add_limit_arguments,
    add_server_arguments,
    configure_process,
    limits_from_args,
    serve,
    server_config_from_args,
)
from swiftd.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

log = logging.getLogger("bench.baselines.dispatcher")
tracer = trace.get_tracer("bench.baselines.dispatcher")


class WorkerListings:
    """What the workers serve, from their own Gateway listings, in the shape the gateway's
    validation reads (`services.gateway.catalog.Listing`): refreshed after `ttl` seconds, or on
    an unknown id (at most once a second)."""

    # The workers load LoRA files themselves: there is no store whose absence would refuse LoRAs.
    lora_store = "in-process"

    def __init__(self, channels: rpc.ChannelPool, workers: list[str], ttl: float = 10.0, timeout: float = 5.0):
        self._channels = channels
        self._workers = workers
        self._ttl = ttl
        self._timeout = timeout
        self._listing = Listing()
        self._lock = threading.Lock()

    def get(self, force: bool = False) -> Listing:
        with self._lock:
            age = time.monotonic() - self._listing.fetched_at
            if age >= self._ttl or (force and age > MIN_FORCED_REFRESH_INTERVAL):
                self._listing = self._fetch()
            return self._listing

    def _fetch(self) -> Listing:
        listing = Listing(fetched_at=time.monotonic())
        for address in self._workers:
            stub = gateway_pb2_grpc.GatewayStub(self._channels.get(address))
            try:
                models = stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=self._timeout).models
                loras = stub.ListLoras(gateway_pb2.ListLorasRequest(), timeout=self._timeout).loras
                controlnets = stub.ListControlNets(gateway_pb2.ListControlNetsRequest(), timeout=self._timeout)
            except grpc.RpcError as exc:
                log.warning("listing %s failed: %s %s", address, exc.code().name, exc.details())
                listing.incomplete.update(("models", "loras", "controlnets"))
                continue
            for model in models:
                listing.models.setdefault(model.model_id, common_pb2.ModelInfo(**_fields(model))).workers.append(
                    address
                )
            for info in loras:
                listing.loras.setdefault(info.lora_id, info)
            for info in controlnets.controlnets:
                entry = listing.controlnets.setdefault(info.controlnet_id, common_pb2.ControlNetInfo(**_fields(info)))
                entry.loaded = entry.loaded or info.loaded
                if info.loaded:
                    entry.workers.append(address)
                    listing.controlnet_hosts.setdefault(info.controlnet_id, []).append(address)
        return listing


def _fields(message) -> dict:
    """A listing entry's own fields, without the per-worker ones this side fills in."""
    return {f.name: v for f, v in message.ListFields() if f.name != "workers"}


class WorkerPool:
    """Which workers are busy. The admission queue admits at most one request per worker, so an
    admitted request always finds an idle one; among idle workers the one idle longest is taken."""

    def __init__(self, workers: list[str]):
        self._idle = list(workers)  # idle longest first
        self._lock = threading.Lock()

    def acquire(self) -> str:
        with self._lock:
            if not self._idle:
                raise Unavailable("no idle worker although admitted (admission and pool disagree)")
            return self._idle.pop(0)

    def release(self, address: str) -> None:
        with self._lock:
            self._idle.append(address)


class DispatcherServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        workers: list[str],
        max_queue: int = 64,
        limits: Limits | None = None,
        default_model: str = "",
        request_timeout: float = 600.0,
        listing_ttl: float = 10.0,
    ):
        self.workers = list(workers)
        self.limits = limits or Limits()
        self.default_model = default_model
        self.request_timeout = request_timeout
        self.channels = rpc.ChannelPool()
        self.listings = WorkerListings(self.channels, self.workers, listing_ttl)
        self.admission = AdmissionQueue(len(self.workers), max_queue)
        self.pool = WorkerPool(self.workers)

    def Generate(self, request, context):
        final = None
        for event in self._generate(request, context, stream=False):
            final = event
        return final.final

    def GenerateStream(self, request, context):
        yield from self._generate(request, context, stream=True)

    def _generate(self, pb: gateway_pb2.GenerateRequest, context, stream: bool):
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        with tracing.stage(tracer, timings, "validate"):
            request, _ = validate_request(pb, self.listings, self.limits, self.default_model)
            if not stream:
                request.preview_every_n_steps = 0  # nobody would see them
        trace.get_current_span().set_attributes({"request.id": request.request_id})
        remaining = rpc.time_left(context, self.request_timeout)
        with tracing.stage(tracer, timings, "queue") as span:
            for position in self.admission.wait_turn(context.is_active, time.monotonic() + remaining()):
                span.add_event("queued", {"position": position})
                yield gateway_pb2.GenerateStreamResponse(queued=gateway_pb2.Queued(position=position))
        try:
            address = self.pool.acquire()
            try:
                plan = gateway_pb2.Plan(
                    unet_worker=address,
                    controlnets=[
                        gateway_pb2.ControlNetAssignment(controlnet_id=cn.controlnet_id) for cn in request.controlnets
                    ],
                    lora_ids=request.loras.ids,
                )
                log.info("request %s -> %s", request.request_id, address)
                started = gateway_pb2.Started(plan=plan, queued_seconds=timings["queue"])
                yield gateway_pb2.GenerateStreamResponse(started=started)
                yield from self._forward(request, address, context, remaining, timings, t_start)
            finally:
                self.pool.release(address)
        finally:
            self.admission.release()

    def _forward(self, request: Request, address: str, context, remaining, timings: dict, t_start: float):
        """Run the request on `address`, passing its progress on; the last event is the final."""
        stub = gateway_pb2_grpc.GatewayStub(self.channels.get(address))
        call = stub.GenerateStream(request.to_pb(), timeout=remaining())
        if not context.add_callback(call.cancel):  # the caller went away or its deadline passed
            call.cancel()  # the RPC already ended
        result = None
        try:
            for event in call:
                kind = event.WhichOneof("event")
                if kind == "progress":
                    progress = common_pb2.Progress()
                    progress.CopyFrom(event.progress)
                    progress.elapsed_seconds = time.perf_counter() - t_start
                    yield gateway_pb2.GenerateStreamResponse(progress=progress)
                elif kind == "preview":
                    yield event
                elif kind == "final":
                    result = event.final
        except grpc.RpcError as exc:
            if not context.is_active():
                raise Cancelled("the client cancelled the request") from None
            raise from_rpc_error(exc, f"worker {address}") from None
        if result is None:
            raise Unavailable(f"worker {address}: the stream ended without a result")
        for timing in result.timings:
            if timing.stage == "queue":
                timings["queue"] += timing.seconds
            elif timing.stage != "total":
                timings[timing.stage] = timing.seconds
        timings["total"] = time.perf_counter() - t_start
        response = gateway_pb2.GenerateResponse()
        response.CopyFrom(result)
        response.plan.unet_worker = address
        del response.timings[:]
        response.timings.extend(common_pb2.StageTiming(stage=k, seconds=v) for k, v in timings.items())
        response.trace_id = tracing.current_trace_id() or result.trace_id
        yield gateway_pb2.GenerateStreamResponse(final=response)

    # -- listings ----------------------------------------------------------------------------

    def ListModels(self, request, context):
        models = self.listings.get().models
        return gateway_pb2.ListModelsResponse(models=[models[k] for k in sorted(models)])

    def ListLoras(self, request, context):
        family = check_family("family", request.family)
        loras = self.listings.get().loras
        return gateway_pb2.ListLorasResponse(
            loras=[loras[k] for k in sorted(loras) if not family or loras[k].family == family]
        )

    def ListControlNets(self, request, context):
        controlnets = self.listings.get().controlnets
        return gateway_pb2.ListControlNetsResponse(controlnets=[controlnets[k] for k in sorted(controlnets)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.baselines.dispatcher",
        description="Least-loaded FIFO dispatcher serving swiftd.v1.Gateway in front of Diffusers workers.",
    )
    parser.add_argument("--workers", nargs="+", required=True, metavar="HOST:PORT", help="bench.baselines.worker's")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a worker")
    parser.add_argument("--default-model", default="", help="model for requests that name none (empty: the first)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds, when the client sets none")
    parser.add_argument("--listing-ttl", type=float, default=10.0, help="seconds between refreshes of the listings")
    add_limit_arguments(parser)
    add_server_arguments(parser)
    # Every queued or running stream holds a server thread; leave room for listings and probes.
    parser.set_defaults(max_workers=256)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    server_config = server_config_from_args(args)
    configure_process(server_config)
    tracing.setup_tracing("baseline-dispatcher")
    servicer = DispatcherServicer(
        args.workers, args.max_queue, limits_from_args(args), args.default_model, args.request_timeout, args.listing_ttl
    )
    serve(
        rpc.GATEWAY_SERVICE,
        server_config,
        lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server),
    )


if __name__ == "__main__":
    main()
