"""UNetWorker servicer: protobuf in, `UNetPipeline` call, protobuf out."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from services.unet.addons.controlnet_stream import FailoverResidualSource, RemoteResidualSource
from services.unet.guidance import Guidance, LeaderGuidance, PartnerGuidance, done_message
from services.unet.pipeline import UNetPipeline
from services.unet.run import GenerationResult
from swiftd import codec, device, metrics, rpc, tracing, transport
from swiftd.discovery import AllowedPeers
from swiftd.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from swiftd.images import encode_png
from swiftd.loading import pipeline_family
from swiftd.request import Limits, LoraSet, Request, check_text, validate
from swiftd.v1 import common_pb2, unet_pb2, unet_pb2_grpc

log = logging.getLogger(__name__)


def response_from_result(result: GenerationResult, request: Request) -> unet_pb2.DenoiseResponse:
    response = unet_pb2.DenoiseResponse(
        image_png=encode_png(result.image),
        seed=result.seed,
        request_id=request.request_id,
        lora_applied_at_step=result.lora_applied_at_step,
        cfg_partner=result.cfg_partner,
        timings=[common_pb2.StageTiming(stage=k, seconds=v) for k, v in result.timings.items()],
        controlnet_transports=result.controlnet_transports,
        cfg_partner_controlnet_transports=result.cfg_partner_controlnet_transports,
    )
    if request.return_latents:
        response.latents.CopyFrom(codec.tensor_to_proto(result.latents))
    return response


@dataclass
class UNetWorkerConfig:
    model_id: str
    model_path: Path  # the model's folder or single file (its family is read from it)
    limits: Limits = field(default_factory=Limits)
    controlnet_step_timeout: float = 60.0  # seconds: longest wait for one step's residuals
    # Seconds: longest wait for a CFG split's other half at one exchange. Generous: the other side
    # may be waiting for its LoRA deltas before the first step, or for a ControlNet worker.
    cfg_step_timeout: float = 300.0
    # Residual transports besides inline offered to ControlNet workers, fastest first.
    residual_transports: tuple[int, ...] = transport.parse(transport.DEFAULT)


class UNetWorkerServicer(unet_pb2_grpc.UNetWorkerServicer):
    def __init__(self, pipeline: UNetPipeline, config: UNetWorkerConfig, peers: AllowedPeers | None = None):
        self.pipeline = pipeline
        self.config = config
        self.peers = peers or AllowedPeers([], "--peers")  # what a request may make this worker dial
        self.limits = config.limits
        self.channels = rpc.ChannelPool()
        self.model_id = config.model_id
        model_path = config.model_path
        self.family = pipeline_family(model_path if model_path.is_dir() else model_path.with_suffix(""))
        # After configure_process pinned the cores: the device as the gateway compares devices.
        self.device = device.local_device(str(pipeline.device))
        self.host = device.local_host()
        self._in_flight = 0
        self._waiting = 0
        self._count_lock = threading.Lock()
        metrics.track_load(self.model_id, lambda: self._waiting, lambda: self._in_flight)
        if str(pipeline.device).startswith("cuda"):
            metrics.track_device_memory(str(pipeline.device))

    def _check(self, pb: unet_pb2.DenoiseRequest) -> Request:
        """The request with this worker's defaults filled in, checked before anything changes."""
        request = Request.from_pb(pb)
        check_text(request, self.limits)  # before an id is echoed or a prompt reaches the tokenizer
        if request.model_id and request.model_id != self.model_id:
            raise NotFound("params.model_id", request.model_id)
        request = self.pipeline.resolve(request)
        validate(request, self.limits, controlnet_field="controlnets[{i}].input")
        self._check_peers(request)
        if request.cfg_split is not None:
            split = request.cfg_split
            if not request.do_classifier_free_guidance:
                raise InvalidArgument("cfg_split", "needs classifier-free guidance (params.guidance_scale > 1)")
            if split.partner_controlnet_workers and len(split.partner_controlnet_workers) != len(request.controlnets):
                raise InvalidArgument("cfg_split.partner_controlnet_workers", "one entry per ControlNet, or none")
            # Both halves must see the same weights at every step (services/unet/guidance.py).
            request = replace(request, lora_bound_steps=0)
        return request

    def _check_peers(self, request: Request) -> None:
        """Every address the request would have this worker dial is a configured peer."""
        for i, cn in enumerate(request.controlnets):
            for address in (cn.worker_address, *cn.fallback_workers):
                self.peers.check(f"controlnets[{i}].worker_address", address)
        if request.cfg_split is not None:
            self.peers.check("cfg_split.partner_address", request.cfg_split.partner_address)
            for address in request.cfg_split.partner_controlnet_workers:
                self.peers.check("cfg_split.partner_controlnet_workers", address)
        self.peers.check("lora_store_address", request.lora_store_address)

    def _controlnet_opener(self, request: Request, context):
        """Residual sources for this request: remote where the plan names a worker."""

        def open_at(cn, session, address):
            if not address:
                return self.pipeline.open_local_controlnet(cn, session)
            return RemoteResidualSource(
                self.channels.get(address),
                address,
                session,
                request.controlnet_wire_dtype,
                request.request_id,
                timeout=context.time_remaining(),
                step_timeout=self.config.controlnet_step_timeout,
                out_dtype=self.pipeline.dtype,
                out_device=self.pipeline.device,
                transports=self.config.residual_transports,
            )

        def open_controlnet(cn, session):
            if not cn.worker_address:
                return open_at(cn, session, "")
            # If its worker goes away mid-request: the other workers hosting it, then this process.
            candidates = list(dict.fromkeys([cn.worker_address, *cn.fallback_workers]))  # each once
            if cn.controlnet_id in self.pipeline.local_controlnets():
                candidates.append("")
            if len(candidates) == 1:
                return open_at(cn, session, cn.worker_address)
            return FailoverResidualSource(cn.controlnet_id, candidates, lambda address: open_at(cn, session, address))

        return open_controlnet

    def _guidance(self, request: Request, context) -> Guidance | None:
        """A leader's side of a CFG split, when the plan gives the request a partner."""
        if request.cfg_split is None:
            return None
        return LeaderGuidance(
            self.channels.get(request.cfg_split.partner_address),
            timeout=context.time_remaining(),
            step_timeout=self.config.cfg_step_timeout,
            device=self.pipeline.device,
            dtype=self.pipeline.dtype,
        )

    def _run(self, request: Request, context, on_step=None, guidance=None, exclusive=False) -> GenerationResult:
        """`exclusive`: refuse (RESOURCE_EXHAUSTED) rather than wait behind another request."""
        with self._count_lock:
            if exclusive and (self._in_flight or self._waiting):
                raise ResourceExhausted(
                    f"busy with {self._in_flight + self._waiting} request(s): a CFG partner does not queue"
                )
            self._waiting += 1
        started = False

        def should_stop():
            nonlocal started
            if not started:
                started = True
                with self._count_lock:
                    self._waiting -= 1
                    self._in_flight += 1
            return not context.is_active()

        try:
            open_controlnet = self._controlnet_opener(request, context)
            guidance = guidance or self._guidance(request, context)
            t0 = time.perf_counter()
            result = self.pipeline.generate(request, open_controlnet, on_step, should_stop, guidance)
            metrics.observe_stages(result.timings, request.num_inference_steps)
            log.info(
                "request %s: %d steps at %dx%d, %d ControlNet(s), %d LoRA(s) (in place before step %d) in %.2f s",
                request.request_id or "-",
                request.num_inference_steps,
                request.width,
                request.height,
                len(request.controlnets),
                len(request.loras),
                result.lora_applied_at_step,
                time.perf_counter() - t0,
            )
            return result
        except Cancelled as exc:  # the caller may be gone already: say here where the loop stopped
            log.info("request %s: %s", request.request_id or "-", exc.message)
            raise
        finally:
            with self._count_lock:
                if started:
                    self._in_flight -= 1
                else:
                    self._waiting -= 1

    def Denoise(self, pb, context):
        request = self._check(pb)
        context.send_initial_metadata((rpc.ACCEPTED,))  # taken: a failure from here on is not a refusal
        return response_from_result(self._run(request, context), request)

    def DenoiseStream(self, pb, context):
        request = self._check(pb)
        context.send_initial_metadata((rpc.ACCEPTED,))
        events: queue.Queue = queue.Queue()
        t0 = time.perf_counter()
        every = request.preview_every_n_steps

        def on_step(step, total, latents):
            elapsed = time.perf_counter() - t0
            progress = common_pb2.Progress(step=step + 1, total_steps=total, elapsed_seconds=elapsed)
            events.put(unet_pb2.DenoiseStreamResponse(progress=progress))
            if every > 0 and (step + 1) % every == 0 and step + 1 < total:
                preview = common_pb2.Preview(step=step + 1, image_png=encode_png(self.pipeline.preview(latents)))
                events.put(unet_pb2.DenoiseStreamResponse(preview=preview))

        def work():
            result = self._run(request, context, on_step)
            return unet_pb2.DenoiseStreamResponse(final=response_from_result(result, request))

        yield from _streamed(work, events)

    def ExchangeGuidance(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "start":
            raise InvalidArgument("start", "the first message of a guidance exchange must be a GuidanceStart")
        request = self._check(first.start.request)
        if request.cfg_split is not None:
            raise InvalidArgument("start.request.cfg_split", "a partner runs its half; it does not split again")
        if not request.do_classifier_free_guidance:
            raise InvalidArgument("start.request.params.guidance_scale", "no classifier-free guidance to split")
        request = replace(request, lora_bound_steps=0)  # as the leader: the same weights at every step
        events: queue.Queue = queue.Queue()
        guidance = PartnerGuidance(
            events.put, request_iterator, self.config.cfg_step_timeout, self.pipeline.device, self.pipeline.dtype
        )

        def work():
            result = self._run(request, context, guidance=guidance, exclusive=True)
            return done_message(result)

        yield from _streamed(work, events)

    def GetWorkerStatus(self, request, context):
        inbox = self.pipeline.lora_inbox
        with self._count_lock:
            in_flight, waiting = self._in_flight, self._waiting
        return unet_pb2.GetWorkerStatusResponse(
            model_ids=[self.model_id],
            applied_loras=LoraSet.of(self.pipeline.lora_patcher.applied).to_pb(),
            cached_loras=LoraSet.of(inbox.cached()).to_pb() if inbox else [],
            requests_in_flight=in_flight,
            queue_length=waiting,
            dtype=codec.dtype_to_proto(self.pipeline.dtype),
            device=self.device,
            host=self.host,
            host_identity=transport.host_identity(),
        )

    def ListModels(self, request, context):
        size = self.pipeline.default_size()
        model = common_pb2.ModelInfo(
            model_id=self.model_id,
            family=self.family,
            default_width=size,
            default_height=size,
            dtype=codec.dtype_to_proto(self.pipeline.dtype),
        )
        controlnets = [
            common_pb2.ControlNetInfo(controlnet_id=c, family=self.family, loaded=loaded)
            for c, loaded in sorted(self.pipeline.local_controlnets().items())
        ]
        return unet_pb2.UNetWorkerListModelsResponse(models=[model], controlnets=controlnets)

    def ReceiveLoraDeltas(self, request_iterator, context):
        if self.pipeline.lora_inbox is None:
            raise FailedPrecondition("this worker has no LoRA inbox")
        completed, parameters, nbytes = self.pipeline.lora_inbox.receive(request_iterator)
        return unet_pb2.ReceiveLoraDeltasResponse(
            lora_ids=completed, parameters_received=parameters, bytes_received=nbytes
        )


def _streamed(work, events: queue.Queue):
    """Run `work()` on a thread of its own while yielding the events it puts in `events`, then
    its result; its error is raised here, on the RPC's thread, where the interceptor maps it."""
    outcome: dict = {}

    def run():
        try:
            outcome["last"] = work()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            events.put(None)

    worker = tracing.in_current_context(run)  # the loop's spans belong to this call's trace
    # Not a daemon: a drain past its grace period cancels the call, and the process must not
    # exit under the loop (mid-step: SIGABRT) before it stops at its next step boundary.
    worker.daemon = False
    worker.start()
    try:
        while (event := events.get()) is not None:
            yield event
    finally:
        # Closed early when the call ends (cancelled, deadline, drain): the call counts as running
        # until its loop has stopped at the next step check, so a stopping server waits for it.
        worker.join()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["last"]
