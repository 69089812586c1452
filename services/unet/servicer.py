"""UNetWorker servicer: protobuf in, `UNetPipeline` call, protobuf out."""

from __future__ import annotations

import logging
import queue
import threading
import time

from services.unet.addons.controlnet_stream import RemoteResidualSource
from services.unet.pipeline import UNetPipeline
from services.unet.run import GenerationResult
from swiftd import codec, rpc, tracing
from swiftd.errors import Cancelled, FailedPrecondition, NotFound
from swiftd.images import encode_png
from swiftd.loading import pipeline_family
from swiftd.request import Limits, LoraSet, Request, validate
from swiftd.v1 import common_pb2, unet_pb2, unet_pb2_grpc

log = logging.getLogger(__name__)


def response_from_result(result: GenerationResult, request: Request) -> unet_pb2.DenoiseResponse:
    response = unet_pb2.DenoiseResponse(
        image_png=encode_png(result.image),
        seed=result.seed,
        request_id=request.request_id,
        lora_applied_at_step=result.lora_applied_at_step,
        timings=[common_pb2.StageTiming(stage=k, seconds=v) for k, v in result.timings.items()],
    )
    if request.return_latents:
        response.latents.CopyFrom(codec.tensor_to_proto(result.latents))
    return response


class UNetWorkerServicer(unet_pb2_grpc.UNetWorkerServicer):
    def __init__(
        self,
        pipeline: UNetPipeline,
        model_id: str,
        model_path,
        controlnet_step_timeout: float = 60.0,
        limits: Limits | None = None,
    ):
        self.pipeline = pipeline
        self.limits = limits or Limits()
        self.channels = rpc.ChannelPool()
        self.controlnet_step_timeout = controlnet_step_timeout
        self.model_id = model_id
        self.family = pipeline_family(model_path if model_path.is_dir() else model_path.with_suffix(""))
        self._in_flight = 0
        self._waiting = 0
        self._count_lock = threading.Lock()

    def _check(self, pb: unet_pb2.DenoiseRequest) -> Request:
        """The request with this worker's defaults filled in, checked before anything changes."""
        request = Request.from_pb(pb)
        if request.model_id and request.model_id != self.model_id:
            raise NotFound("params.model_id", request.model_id)
        request = self.pipeline.resolve(request)
        validate(request, self.limits, controlnet_field="controlnets[{i}].input")
        return request

    def _controlnet_opener(self, request: Request, context):
        """Residual sources for this request: remote where the plan names a worker."""

        def open_controlnet(cn, session):
            if not cn.worker_address:
                return self.pipeline.open_local_controlnet(cn, session)
            return RemoteResidualSource(
                self.channels.get(cn.worker_address),
                cn.worker_address,
                session,
                request.controlnet_wire_dtype,
                request.request_id,
                timeout=context.time_remaining(),
                step_timeout=self.controlnet_step_timeout,
                out_dtype=self.pipeline.dtype,
                out_device=self.pipeline.device,
            )

        return open_controlnet

    def _run(self, request: Request, context, on_step=None) -> GenerationResult:
        with self._count_lock:
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
            return self.pipeline.generate(request, open_controlnet, on_step=on_step, should_stop=should_stop)
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
        return response_from_result(self._run(request, context), request)

    def DenoiseStream(self, pb, context):
        request = self._check(pb)
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

        outcome: dict = {}

        def work():
            try:
                outcome["result"] = self._run(request, context, on_step)
            except BaseException as exc:  # re-raised on the RPC thread, where the interceptor maps it
                outcome["error"] = exc
            finally:
                events.put(None)

        worker = tracing.in_current_context(work)  # the loop's spans belong to this call's trace
        # Not a daemon: a drain past its grace period cancels the call, and the process must not
        # exit under the loop (mid-step: SIGABRT) before it stops at its next step boundary.
        worker.daemon = False
        worker.start()
        while (event := events.get()) is not None:
            yield event
        if "error" in outcome:
            raise outcome["error"]
        yield unet_pb2.DenoiseStreamResponse(final=response_from_result(outcome["result"], request))

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
            device=str(self.pipeline.device),
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
        return unet_pb2.UNetWorkerListModelsResponse(models=[model])

    def ReceiveLoraDeltas(self, request_iterator, context):
        if self.pipeline.lora_inbox is None:
            raise FailedPrecondition("this worker has no LoRA inbox")
        completed, parameters, nbytes = self.pipeline.lora_inbox.receive(request_iterator)
        return unet_pb2.ReceiveLoraDeltasResponse(
            lora_ids=completed, parameters_received=parameters, bytes_received=nbytes
        )
