"""Gateway servicer: validate, admit, plan, start the LoRA pushes, run the request on its UNet worker.

Generate and GenerateStream share one path (`_generate`, a generator of stream events; Generate
keeps the last). The client's deadline (or the configured request timeout) bounds every
downstream call; a client that goes away cancels them, and the UNet worker stops its loop within
one step. A request planned as a CFG split runs on its UNet worker all the same: that worker calls
its partner (services/unet/guidance.py); the gateway's part is the plan and a LoRA push to each.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import grpc
from grpc_health.v1 import health_pb2
from opentelemetry import trace

from services.gateway.admission import AdmissionQueue
from services.gateway.catalog import Catalog
from services.gateway.config import GatewayConfig
from services.gateway.planner import Planner, PlannerConfig, placement_name
from services.gateway.validation import validate_request
from swiftd import logs, metrics, rpc, tracing, transport
from swiftd.discovery import WorkerTargets
from swiftd.errors import Cancelled, Unavailable, from_rpc_error
from swiftd.request import CfgSplit, Request, check_conditioning_pixels, check_family
from swiftd.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    lora_store_pb2,
    lora_store_pb2_grpc,
    unet_pb2_grpc,
)

log = logging.getLogger(__name__)
_SERVING = {True: health_pb2.HealthCheckResponse.SERVING, False: health_pb2.HealthCheckResponse.NOT_SERVING}
tracer = trace.get_tracer("swiftd.gateway")


def plan_attributes(plan: gateway_pb2.Plan) -> dict:
    attributes = {
        "plan.placement": placement_name(plan.placement),
        "plan.reason": plan.reason,
        "plan.unet_worker": plan.unet_worker,
        "plan.controlnet_workers": [a.worker for a in plan.controlnets],
        "plan.lora_ids": list(plan.lora_ids),
        "plan.lora_set_already_applied": plan.lora_set_already_applied,
        "plan.pushed_lora_ids": list(plan.pushed_lora_ids),
    }
    if plan.failed_over_from:
        attributes["plan.failed_over_from"] = plan.failed_over_from
    if plan.HasField("cfg_partner"):
        partner = plan.cfg_partner
        attributes["plan.cfg_partner.unet_worker"] = partner.unet_worker
        attributes["plan.cfg_partner.controlnet_workers"] = [a.worker for a in partner.controlnets]
        attributes["plan.cfg_partner.pushed_lora_ids"] = list(partner.pushed_lora_ids)
    return attributes


def lora_pushes(plan: gateway_pb2.Plan) -> list[tuple[str, list[str]]]:
    """(UNet worker, LoRA ids to push there) for each worker of the plan that lacks some."""
    pushes = [(plan.unet_worker, list(plan.pushed_lora_ids))]
    if plan.HasField("cfg_partner"):
        pushes.append((plan.cfg_partner.unet_worker, list(plan.cfg_partner.pushed_lora_ids)))
    return [(worker, ids) for worker, ids in pushes if ids]


def _ran_unsplit(plan: gateway_pb2.Plan) -> gateway_pb2.Plan:
    """A CFG-split plan whose partner refused before it started (busy, or unreachable): the UNet
    worker ran the whole batch itself, and the response says so."""
    ran = gateway_pb2.Plan()
    ran.CopyFrom(plan)
    ran.ClearField("cfg_partner")
    ran.placement = gateway_pb2.PLACEMENT_PACK
    ran.reason = f"{plan.reason}; but cfg partner {plan.cfg_partner.unet_worker} refused, so it ran unsplit"
    return ran


class _Unreachable(Exception):
    """The planned UNet worker answered UNAVAILABLE before it sent anything: nothing ran there."""

    def __init__(self, error: Unavailable):
        super().__init__(error.message)
        self.error = error


def _failed(call) -> bool:
    """A finished call that failed on its own (not one cancelled here)."""
    return call.done() and not call.cancelled() and call.code() != grpc.StatusCode.OK


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.channels = rpc.ChannelPool()
        # One view of where the workers are, shared by the catalog (which refreshes it) and the planner.
        unet_workers = WorkerTargets(config.unet_workers, config.dns_server, config.status_timeout)
        self.catalog = Catalog(
            self.channels,
            unet_workers,
            WorkerTargets(config.controlnet_workers, config.dns_server, config.status_timeout),
            config.lora_store,
            config.catalog_ttl,
            config.status_timeout,
        )
        self.planner = Planner(
            self.channels,
            PlannerConfig(
                unet_workers=unet_workers,
                slots_per_worker=config.per_worker_concurrency,
                status_timeout=config.status_timeout,
                allow_cfg_split=config.cfg_split == "auto",
            ),
        )
        self._admission: dict[str, AdmissionQueue] = {}  # per model: one model's load never blocks another's
        self._admission_lock = threading.Lock()

    def admission(self, model: common_pb2.ModelInfo) -> AdmissionQueue:
        """The model's queue, sized by the workers serving it now."""
        with self._admission_lock:
            queue = self._admission.get(model.model_id)
            if queue is None:
                queue = self._admission[model.model_id] = AdmissionQueue(1, self.config.max_queue)
                metrics.track_load(model.model_id, lambda: queue.snapshot()[1], lambda: queue.snapshot()[0])
            queue.resize(max(1, len(model.workers)) * self.config.per_worker_concurrency)
            return queue

    # -- readiness ---------------------------------------------------------------------------

    def keep_health(self, health) -> None:
        """Readiness that tells the truth, refreshed with the catalog: `swiftd.v1.Gateway/<model>`
        is SERVING while some UNet worker of that model answers, `swiftd.v1.Gateway` while any
        model is served. ("" stays SERVING: the gateway itself answers; that is liveness.) Until
        the first refresh ends nothing is known to serve, so readiness starts NOT_SERVING, and a
        model not yet heard of is NOT_FOUND."""
        health.set(rpc.GATEWAY_SERVICE, _SERVING[False])

        def follow():
            known: set[str] = set()
            while True:
                try:
                    models = self.catalog.get().models
                except Exception:  # noqa: BLE001 - a refresh that failed: nothing is known to serve
                    log.exception("catalog refresh for readiness failed")
                    models = {}
                known |= set(models)
                for model_id in known:
                    serving = model_id in models and bool(models[model_id].workers)
                    health.set(f"{rpc.GATEWAY_SERVICE}/{model_id}", _SERVING[serving])
                health.set(rpc.GATEWAY_SERVICE, _SERVING[any(m.workers for m in models.values())])
                time.sleep(self.config.catalog_ttl)

        threading.Thread(target=follow, name="readiness", daemon=True).start()

    # -- generation --------------------------------------------------------------------------

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
        server_span = trace.get_current_span()
        with tracing.stage(tracer, timings, "validate"):
            request, model = validate_request(pb, self.catalog, self.config.limits, self.config.default_model)
            if not stream:
                request.preview_every_n_steps = 0  # nobody would see them
        server_span.set_attributes({"request.id": request.request_id, "request.model_id": model.model_id})
        with logs.request_scope(request.request_id):  # every log line of this request, in every service
            yield from self._admitted(request, model, context, timings, t_start)

    def _admitted(self, request: Request, model: common_pb2.ModelInfo, context, timings, t_start):
        """A validated request: its turn in the model's queue, its plan, its run."""
        server_span = trace.get_current_span()
        remaining = rpc.time_left(context, self.config.request_timeout)

        admission = self.admission(model)
        with tracing.stage(tracer, timings, "queue") as span:
            for position in admission.wait_turn(context.is_active, time.monotonic() + remaining()):
                span.add_event("queued", {"position": position})
                yield gateway_pb2.GenerateStreamResponse(queued=gateway_pb2.Queued(position=position))
        try:
            if request.controlnets:  # pixels only for admitted requests: a refused one never costs a decode
                with tracing.stage(tracer, timings, "decode_images"):
                    check_conditioning_pixels(request, self.config.limits)
            failed_over_from = ""
            while True:
                with tracing.stage(tracer, timings, "plan") as span:
                    plan, worker_dtype = self.planner.plan(request, self.catalog.get(), remaining())
                    plan.failed_over_from = failed_over_from
                    span.set_attributes(plan_attributes(plan))
                try:
                    server_span.set_attributes(plan_attributes(plan))
                    log.info("request %s -> %s", request.request_id, plan_attributes(plan))
                    started = gateway_pb2.Started(plan=plan, queued_seconds=timings["queue"])
                    yield gateway_pb2.GenerateStreamResponse(started=started)
                    yield from self._run(
                        self._planned(request, plan), plan, worker_dtype, context, remaining, timings, t_start
                    )
                    return
                except _Unreachable as unreachable:
                    # Nothing ran there: plan once more without that worker, if time is left.
                    if failed_over_from or remaining() <= 0:
                        raise unreachable.error from None
                    failed_over_from = plan.unet_worker
                    self.planner.mark_down(failed_over_from)
                    log.warning("request %s: %s; planning it again", request.request_id, unreachable.error.message)
                finally:
                    self.planner.release(plan)
        finally:
            admission.release()

    def _planned(self, request: Request, plan: gateway_pb2.Plan) -> Request:
        """The request as its UNet worker runs it: where each ControlNet runs, where LoRAs come from,
        and with CFG split, the partner and its share."""
        cfg_split = None
        if plan.HasField("cfg_partner"):
            partner = plan.cfg_partner
            cfg_split = CfgSplit(
                partner.unet_worker,
                tuple(a.worker for a in partner.controlnets),
                tuple(partner.pushed_lora_ids),
            )
        return replace(
            request,
            cfg_split=cfg_split,
            controlnets=[
                replace(cn, worker_address=a.worker, fallback_workers=self._fallbacks(cn.controlnet_id, a.worker))
                for cn, a in zip(request.controlnets, plan.controlnets)
            ],
            # Missing deltas the plan did not push (e.g. evicted since the status poll) are pulled.
            lora_store_address=self.config.lora_store if request.loras else "",
            pushed_lora_ids=tuple(plan.pushed_lora_ids),
            lora_bound_steps=(
                request.lora_bound_steps
                if request.lora_bound_steps is not None
                else self.config.default_lora_bound_steps
            ),
        )

    def _fallbacks(self, controlnet_id: str, worker: str) -> tuple[str, ...]:
        """The other ControlNet workers hosting `controlnet_id`, loaded ones first: where its UNet
        worker turns if `worker` goes away mid-request (none for an in-process ControlNet)."""
        if not worker:
            return ()
        listing = self.catalog.get()
        loaded = set(listing.controlnets[controlnet_id].workers) if controlnet_id in listing.controlnets else set()
        hosts = [a for a in listing.controlnet_hosts.get(controlnet_id, []) if a != worker]
        return tuple(sorted(hosts, key=lambda a: a not in loaded))

    def _run(self, request: Request, plan: gateway_pb2.Plan, worker_dtype: int, context, remaining, timings, t_start):
        # Started before the denoise call: with bounded asynchronous loading the worker starts
        # denoising while the deltas stream in. With CFG split, each half's worker gets its own.
        pushes = []
        for worker, lora_ids in lora_pushes(plan):
            push_request = lora_store_pb2.PushLorasRequest(
                loras=request.loras.only(lora_ids).to_pb(),
                base_model_id=request.model_id,
                dtype=worker_dtype,
                unet_worker_address=worker,
                request_id=request.request_id,
            )
            store = lora_store_pb2_grpc.LoraStoreStub(self.channels.get(self.config.lora_store))
            pushes.append(store.PushLoras.future(push_request, timeout=remaining()))
        stub = unet_pb2_grpc.UNetWorkerStub(self.channels.get(plan.unet_worker))
        stream = stub.DenoiseStream(request.to_denoise_pb(), timeout=remaining())
        calls = [stream, *pushes]

        # The client went away or its deadline passed: stop the downstream work too. (At a normal
        # end the calls are done and cancel() does nothing.)
        def cancel_downstream():
            for call in calls:
                call.cancel()

        if not context.add_callback(cancel_downstream):
            cancel_downstream()  # the RPC already ended
        for push in pushes:
            # A failed push leaves a worker waiting for deltas that never come: stop it now.
            push.add_done_callback(lambda f: stream.cancel() if _failed(f) else None)

        result = None
        heard = False  # the worker accepted the request or sent an event: then it is not replaced
        try:
            for event in rpc.responses(stream):
                heard = True
                kind = event.WhichOneof("event")
                if kind == "progress":
                    p = event.progress
                    elapsed = time.perf_counter() - t_start
                    progress = common_pb2.Progress(step=p.step, total_steps=p.total_steps, elapsed_seconds=elapsed)
                    yield gateway_pb2.GenerateStreamResponse(progress=progress)
                elif kind == "preview":
                    yield gateway_pb2.GenerateStreamResponse(preview=event.preview)
                elif kind == "final":
                    result = event.final
        except grpc.RpcError as exc:
            if not context.is_active():
                raise Cancelled("the client cancelled the request") from None
            heard = heard or rpc.ACCEPTED in (exc.initial_metadata() or ())  # it took the request
            if not heard and exc.code() == grpc.StatusCode.UNAVAILABLE and not any(_failed(p) for p in pushes):
                cancel_downstream()  # its LoRA pushes too: the new plan sends its own
                raise _Unreachable(from_rpc_error(exc, f"unet worker {plan.unet_worker}")) from None
            for push in pushes:
                if _failed(push):
                    raise from_rpc_error(push, f"lora store {self.config.lora_store}") from None
            raise from_rpc_error(exc, f"unet worker {plan.unet_worker}") from None
        if result is None:
            raise Unavailable(f"unet worker {plan.unet_worker}: the stream ended without a result")

        timings.update((t.stage, t.seconds) for t in result.timings)
        timings["total"] = time.perf_counter() - t_start
        metrics.observe_stages(timings)
        if plan.HasField("cfg_partner") and not result.cfg_partner:
            plan = _ran_unsplit(plan)
        for assignment, used in zip(plan.controlnets, result.controlnet_transports):
            assignment.transport = used  # negotiated by the workers, known only now
        for assignment, used in zip(plan.cfg_partner.controlnets, result.cfg_partner_controlnet_transports):
            assignment.transport = used
        if plan.controlnets:
            trace.get_current_span().set_attribute(
                "plan.controlnet_transports", [transport.name(a.transport) for a in plan.controlnets]
            )
        if plan.cfg_partner.controlnets:
            trace.get_current_span().set_attribute(
                "plan.cfg_partner.controlnet_transports",
                [transport.name(a.transport) for a in plan.cfg_partner.controlnets],
            )
        response = gateway_pb2.GenerateResponse(
            image_png=result.image_png,
            seed=result.seed,
            timings=[common_pb2.StageTiming(stage=k, seconds=v) for k, v in timings.items()],
            trace_id=tracing.current_trace_id(),
            request_id=request.request_id,
            plan=plan,
            lora_applied_at_step=result.lora_applied_at_step,
        )
        yield gateway_pb2.GenerateStreamResponse(final=response)

    # -- listings ----------------------------------------------------------------------------

    def ListModels(self, request, context):
        models = self.catalog.get().models
        return gateway_pb2.ListModelsResponse(models=[models[k] for k in sorted(models)])

    def ListLoras(self, request, context):
        family = check_family("family", request.family)
        loras = self.catalog.get().loras
        return gateway_pb2.ListLorasResponse(
            loras=[loras[k] for k in sorted(loras) if not family or loras[k].family == family]
        )

    def ListControlNets(self, request, context):
        controlnets = self.catalog.get().controlnets
        return gateway_pb2.ListControlNetsResponse(controlnets=[controlnets[k] for k in sorted(controlnets)])
