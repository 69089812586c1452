"""UNetWorker servicer: protobuf in, engine call, protobuf out."""

from __future__ import annotations

import logging
import queue
import threading
import time

from services.unet.controlnet_client import RemoteResidualSource
from services.unet.engine import ControlNetRequest, DenoisingEngine, GenerationRequest, GenerationResult
from swiftd import codec, rpc, tracing
from swiftd.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound
from swiftd.images import decode_image, encode_png
from swiftd.loading import check_id, pipeline_family
from swiftd.v1 import common_pb2, unet_pb2, unet_pb2_grpc

log = logging.getLogger(__name__)

SCHEDULER_NAMES = {
    common_pb2.SCHEDULER_DDIM: "ddim",
    common_pb2.SCHEDULER_EULER: "euler",
    common_pb2.SCHEDULER_EULER_ANCESTRAL: "euler_a",
    common_pb2.SCHEDULER_DPMPP_2M: "dpmpp_2m",
    common_pb2.SCHEDULER_PNDM: "pndm",
}
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_STEPS = 20


def generation_request_from_proto(request: unet_pb2.DenoiseRequest, default_lora_bound_steps: int = 0) -> GenerationRequest:
    p = request.params
    if p.width % 8 or p.height % 8 or p.width < 0 or p.height < 0:
        raise InvalidArgument("params.width" if p.width % 8 or p.width < 0 else "params.height", "must be a non-negative multiple of 8")
    if p.num_inference_steps < 0:
        raise InvalidArgument("params.num_inference_steps", "must be positive")
    if p.scheduler and p.scheduler not in SCHEDULER_NAMES:
        raise InvalidArgument("params.scheduler", f"unknown value {p.scheduler}")
    controlnets = []
    for i, attachment in enumerate(request.controlnets):
        cn = attachment.input
        start, end = cn.guidance_start, cn.guidance_end or 1.0
        if not 0.0 <= start < end <= 1.0:
            raise InvalidArgument(f"controlnets[{i}].guidance_start", "need 0 <= guidance_start < guidance_end <= 1")
        controlnets.append(
            ControlNetRequest(
                controlnet_id=cn.controlnet_id,
                image=decode_image(cn.image, f"controlnets[{i}].input.image"),
                conditioning_scale=cn.conditioning_scale or 1.0,
                guidance_start=start,
                guidance_end=end,
                guess_mode=cn.guess_mode,
                worker_address=attachment.worker_address,
            )
        )
    return GenerationRequest(
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        width=p.width or None,
        height=p.height or None,
        num_inference_steps=p.num_inference_steps or DEFAULT_STEPS,
        guidance_scale=p.guidance_scale or DEFAULT_GUIDANCE_SCALE,
        seed=p.seed if p.HasField("seed") else int(time.time_ns() % (2**31)),
        scheduler=SCHEDULER_NAMES.get(p.scheduler),
        controlnets=controlnets,
        loras=[(check_id(f"loras[{i}].lora_id", lora.lora_id), lora.scale or 1.0) for i, lora in enumerate(request.loras)],
        lora_bound_steps=(
            request.lora_bound_steps
            if request.HasField("lora_bound_steps") and request.lora_bound_steps >= 0
            else default_lora_bound_steps
        ),
        lora_store_address=request.lora_store_address,
        pushed_lora_ids=list(request.pushed_lora_ids),
        request_id=request.request_id,
    )


def response_from_result(result: GenerationResult, request: unet_pb2.DenoiseRequest) -> unet_pb2.DenoiseResponse:
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
    def __init__(self, engine: DenoisingEngine, model_id: str, model_path, controlnet_step_timeout: float = 60.0,
                 default_lora_bound_steps: int = 0):  # fmt: skip
        self.engine = engine
        self.default_lora_bound_steps = default_lora_bound_steps
        self.channels = rpc.ChannelPool()
        self.controlnet_step_timeout = controlnet_step_timeout
        self.model_id = model_id
        self.family = pipeline_family(model_path if model_path.is_dir() else model_path.with_suffix(""))
        self._in_flight = 0
        self._waiting = 0
        self._count_lock = threading.Lock()

    def _check(self, request: unet_pb2.DenoiseRequest) -> GenerationRequest:
        if request.params.model_id and request.params.model_id != self.model_id:
            raise NotFound("params.model_id", request.params.model_id)
        return generation_request_from_proto(request, self.default_lora_bound_steps)

    def _controlnet_opener(self, request: unet_pb2.DenoiseRequest, context):
        """Residual sources for this request: remote where the plan names a worker."""
        wire_dtype = request.controlnet_wire_dtype
        if wire_dtype not in (common_pb2.DTYPE_UNSPECIFIED, common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_FLOAT16, common_pb2.DTYPE_BFLOAT16):
            raise InvalidArgument("controlnet_wire_dtype", "must be FLOAT32, FLOAT16 or BFLOAT16")

        def open_controlnet(cn, session):
            if not cn.worker_address:
                return self.engine.open_local_controlnet(cn, session)
            return RemoteResidualSource(
                self.channels.get(cn.worker_address), cn.worker_address, session, wire_dtype, request.request_id,
                timeout=context.time_remaining(), step_timeout=self.controlnet_step_timeout,
                out_dtype=self.engine.dtype, out_device=self.engine.device,
            )  # fmt: skip

        return open_controlnet

    def _run(self, generation: GenerationRequest, context, on_step=None, open_controlnet=None) -> GenerationResult:
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
            return self.engine.generate(generation, open_controlnet=open_controlnet, on_step=on_step, should_stop=should_stop)
        except Cancelled as exc:  # the caller may be gone already: say here where the loop stopped
            log.info("request %s: %s", generation.request_id or "-", exc.message)
            raise
        finally:
            with self._count_lock:
                if started:
                    self._in_flight -= 1
                else:
                    self._waiting -= 1

    def Denoise(self, request, context):
        generation = self._check(request)
        result = self._run(generation, context, open_controlnet=self._controlnet_opener(request, context))
        return response_from_result(result, request)

    def DenoiseStream(self, request, context):
        generation = self._check(request)
        open_controlnet = self._controlnet_opener(request, context)
        events: queue.Queue = queue.Queue()
        t0 = time.perf_counter()
        every = request.preview_every_n_steps

        def on_step(step, total, latents):
            events.put(unet_pb2.DenoiseStreamResponse(
                progress=common_pb2.Progress(step=step + 1, total_steps=total, elapsed_seconds=time.perf_counter() - t0)
            ))  # fmt: skip
            if every > 0 and (step + 1) % every == 0 and step + 1 < total:
                preview = common_pb2.Preview(step=step + 1, image_png=encode_png(self.engine.preview(latents)))
                events.put(unet_pb2.DenoiseStreamResponse(preview=preview))

        outcome: dict = {}

        def work():
            try:
                outcome["result"] = self._run(generation, context, on_step, open_controlnet)
            except BaseException as exc:  # re-raised on the RPC thread, where the interceptor maps it
                outcome["error"] = exc
            finally:
                events.put(None)

        tracing.in_current_context(work).start()  # the loop's spans belong to this call's trace
        while (event := events.get()) is not None:
            yield event
        if "error" in outcome:
            raise outcome["error"]
        yield unet_pb2.DenoiseStreamResponse(final=response_from_result(outcome["result"], request))

    def GetWorkerStatus(self, request, context):
        inbox = self.engine.lora_inbox
        with self._count_lock:
            in_flight, waiting = self._in_flight, self._waiting
        return unet_pb2.GetWorkerStatusResponse(
            model_ids=[self.model_id],
            applied_loras=[common_pb2.LoraRef(lora_id=i, scale=s) for i, s in self.engine.lora_patcher.applied],
            cached_loras=[common_pb2.LoraRef(lora_id=i, scale=s) for i, s in inbox.cached()] if inbox else [],
            requests_in_flight=in_flight,
            queue_length=waiting,
            dtype=codec.dtype_to_proto(self.engine.dtype),
            device=str(self.engine.device),
        )

    def ListModels(self, request, context):
        size = self.engine.default_size()
        return unet_pb2.UNetWorkerListModelsResponse(
            models=[common_pb2.ModelInfo(
                model_id=self.model_id, family=self.family, default_width=size, default_height=size,
                dtype=codec.dtype_to_proto(self.engine.dtype),
            )]
        )  # fmt: skip

    def ReceiveLoraDeltas(self, request_iterator, context):
        if self.engine.lora_inbox is None:
            raise FailedPrecondition("this worker has no LoRA inbox")
        completed, parameters, nbytes = self.engine.lora_inbox.receive(request_iterator)
        return unet_pb2.ReceiveLoraDeltasResponse(lora_ids=completed, parameters_received=parameters, bytes_received=nbytes)
