"""One Diffusers pipeline process per device, serving `swiftd.v1.Gateway`: the baselines' worker.

    python -m bench.baselines.worker --model-root .zoo --model-id tiny-sd15 --mode fuse \
        [--adapter-cache 4] [--dtype float32] [--address 127.0.0.1:0] [--cpu-cores 0] [--num-threads 1]

What people run today, as the issue describes it: the model's Diffusers pipeline and all of its
ControlNets in memory (a `*ControlNetPipeline` per ControlNet combination, sharing the base
components; a `MultiControlNetModel` for several), one request at a time. LoRAs go in the way each
baseline variant does it, all inside the request's latency:

* `fuse`: per request, `load_lora_weights` each LoRA, `set_adapters` with the request's scales,
  `fuse_lora`; generate; `unfuse_lora` + `unload_lora_weights`. (Unfusing subtracts, so the base
  weights drift by rounding errors over many requests, as they do in such a server.)
* `adapters`: the stronger variant. Up to `--adapter-cache` LoRAs stay loaded as PEFT adapters
  (least recently used deleted first with `delete_adapters`); each request activates its own with
  `set_adapters` and its scales, never fused; a request without LoRAs runs with `disable_lora`.

It speaks the same API as our gateway, so the same load generator and the same client drive it,
and it runs under `swiftd.server` (health, drain, pinning, error mapping, the SWIFTD_LISTENING
line that `swiftd.launcher` reads). Requests are read and checked with `swiftd.request`, with our
defaults (native size, 20 steps, CFG 7.5, a drawn seed) and our limits, so a request means the
same thing on both sides. `lora_bound_steps` and `controlnet_wire_dtype` are checked and then have
nothing to act on here (LoRAs are always in place before the first step; ControlNets run in this
process). A cancelled call or a passed deadline stops the loop at the next step boundary
(`callback_on_step_end`), so the worker is free again within one step.

Stage timings (seconds, in execution order):
  queue               waiting for this worker's lock (about 0 behind the dispatcher)
  lora_load_fuse      fuse mode: load_lora_weights + set_adapters + fuse_lora
  lora_load           adapters mode: loading the request's LoRAs missing from the adapter cache
                      (and deleting evicted adapters)
  lora_set_adapters   adapters mode: enable_lora + set_adapters (or disable_lora without LoRAs)
  generate            the Diffusers pipeline call (text encoding, denoising, VAE decode) + PNG encoding
  lora_unfuse_unload  fuse mode: unfuse_lora + unload_lora_weights
  total               from the request's arrival at this worker to its response
LoRA stages appear only for requests with LoRAs (in adapters mode `lora_set_adapters` whenever
adapters are loaded). `plan.pushed_lora_ids` lists the LoRAs this request had to load from their
files (fuse: all of them; adapters: the cache misses).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import PIL.Image
import torch
from diffusers import (
    MultiControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)
from opentelemetry import trace

from bench.baseline_process import _quiet
from services.lora_store.catalog import LoraCatalog, LoraFileInfo
from services.unet.pipeline import LATENT_RGB_FACTORS, make_scheduler
from swiftd import codec, rpc, tracing
from swiftd.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from swiftd.images import encode_png
from swiftd.loading import DTYPES, controlnet_family, list_ids, load_controlnet, load_pipeline, pipeline_family, resolve
from swiftd.request import FAMILY_SDXL, Limits, Request, check_family, ensure_request_id, validate
from swiftd.server import (
    add_limit_arguments,
    add_server_arguments,
    configure_process,
    limits_from_args,
    serve,
    server_config_from_args,
)
from swiftd.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

log = logging.getLogger("bench.baselines.worker")
tracer = trace.get_tracer("bench.baselines.worker")

MODES = ("fuse", "adapters")

# Called after each denoising step with (steps done, total steps, latents).
StepCallback = Callable[[int, int, torch.Tensor], None]


def preview_image(latents: torch.Tensor, family: str) -> PIL.Image.Image:
    """The cheap preview our worker streams (a linear latent->RGB map), so streams look alike."""
    factors = torch.tensor(LATENT_RGB_FACTORS[family], dtype=torch.float32)
    if latents.shape[1] != factors.shape[0]:
        factors = torch.zeros(latents.shape[1], 3)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), factors)
    return PIL.Image.fromarray(((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy())


class _Stop(Exception):
    """Raised from `callback_on_step_end` to leave Diffusers' loop; carries the caller's verdict."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


@dataclass
class Generated:
    image_png: bytes
    seed: int
    timings: dict[str, float]
    loaded_lora_ids: list[str] = field(default_factory=list)  # read from their files for this request


class DiffusersWorker:
    """The Diffusers side of one device: the pipeline, its ControlNets, the LoRA policy, one lock."""

    def __init__(
        self,
        model_root: Path,
        model_id: str,
        mode: str,
        adapter_cache: int = 4,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        limits: Limits | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if mode == "adapters" and adapter_cache < 1:
            raise ValueError("--adapter-cache must be at least 1")
        self.model_root = Path(model_root)
        self.model_id = model_id
        self.mode = mode
        self.adapter_cache = adapter_cache
        self.device = device
        self.limits = limits or Limits()
        path = resolve(self.model_root, "models", model_id, "model_id")
        self.family = pipeline_family(path if path.is_dir() else path.with_suffix(""))
        self.pipe = load_pipeline(path, dtype, device)
        self.dtype = self.pipe.unet.dtype
        self.native_size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        # Every ControlNet of the root that fits this model, in memory from the start. The others
        # are listed unloaded, so that asking for one is a clear error rather than a shape mismatch.
        self.controlnet_families: dict[str, str] = {}
        self.controlnets: dict[str, torch.nn.Module] = {}
        for cid in list_ids(self.model_root, "controlnets"):
            cn_path = resolve(self.model_root, "controlnets", cid, "controlnet_id")
            self.controlnet_families[cid] = controlnet_family(cn_path)
            config = cn_path / "config.json"
            if self.controlnet_families[cid] not in ("", self.family) or (
                config.is_file() and not self._fits(json.loads(config.read_text()))
            ):
                continue
            model = load_controlnet(cn_path, self.dtype, device)
            if self._fits(model.config):
                self.controlnets[cid] = model
        self.loras = LoraCatalog(self.model_root)
        self.loras.scan()
        self._cn_pipelines: dict[tuple[str, ...], diffusers.DiffusionPipeline] = {}
        self._adapters: OrderedDict[str, str] = OrderedDict()  # lora_id -> adapter name, LRU first
        self._adapter_serial = 0
        self._lock = threading.Lock()
        log.info(
            "%s (%s, %s) on %s, mode %s%s; ControlNets in memory: %s",
            model_id,
            self.family,
            self.dtype,
            device,
            mode,
            f" (adapter cache {adapter_cache})" if mode == "adapters" else "",
            sorted(self.controlnets) or "none",
        )

    def _fits(self, controlnet_config) -> bool:
        """Whether a ControlNet was made for this UNet: same block layout and text-context width."""
        unet = self.pipe.unet.config
        keys = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim")
        return all(_as_list(controlnet_config.get(k)) == _as_list(unet.get(k)) for k in keys)

    # -- listings ------------------------------------------------------------------------------

    def model_info(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            model_id=self.model_id,
            family=self.family,
            default_width=self.native_size,
            default_height=self.native_size,
            dtype=codec.dtype_to_proto(self.dtype),
        )

    def lora_infos(self, family: str) -> list[common_pb2.LoraInfo]:
        self.loras.scan()  # files dropped in since the start are servable too
        return [info.to_pb() for info in self.loras.list(check_family("family", family))]

    def controlnet_infos(self) -> list[common_pb2.ControlNetInfo]:
        """Every ControlNet of the root; `loaded` for those of this model's family (all in memory)."""
        infos = []
        for cid, family in sorted(self.controlnet_families.items()):
            model = self.controlnets.get(cid)
            size = sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0
            infos.append(
                common_pb2.ControlNetInfo(
                    controlnet_id=cid, family=family or self.family, size_bytes=size, loaded=model is not None
                )
            )
        return infos

    # -- requests ------------------------------------------------------------------------------

    def check(self, pb: gateway_pb2.GenerateRequest) -> Request:
        """The request as it will run (our defaults and limits), every id known: before any work."""
        request = Request.from_pb(pb)
        if request.model_id and request.model_id != self.model_id:
            raise NotFound("params.model_id", request.model_id)
        ensure_request_id(request, self.limits)
        request = request.resolved(self.native_size)
        request.model_id = self.model_id
        validate(request, self.limits)
        for i, lora in enumerate(request.loras):
            info = self._lora(lora.lora_id, f"loras[{i}].lora_id")
            if info.family and info.family != self.family:
                raise InvalidArgument(
                    f"loras[{i}].lora_id", f"LoRA {lora.lora_id!r} is for {info.family}; this model is {self.family}"
                )
        for i, cn in enumerate(request.controlnets):
            where = f"controlnets[{i}].controlnet_id"
            if cn.controlnet_id not in self.controlnet_families:
                raise NotFound(where, cn.controlnet_id)
            family = self.controlnet_families[cn.controlnet_id]
            if family and family != self.family:
                raise InvalidArgument(
                    where, f"ControlNet {cn.controlnet_id!r} is for {family}; this model is {self.family}"
                )
            if cn.controlnet_id not in self.controlnets:
                raise FailedPrecondition(f"{where}: ControlNet {cn.controlnet_id!r} was not made for {self.model_id}")
        if len({cn.guess_mode for cn in request.controlnets}) > 1:
            # Diffusers takes one guess_mode for all ControlNets of a call.
            raise InvalidArgument(
                "controlnets[0].guess_mode", "the Diffusers baseline runs guess mode for all ControlNets or none"
            )
        return request

    def _lora(self, lora_id: str, where: str) -> LoraFileInfo:
        try:
            return self.loras.get(lora_id, where)
        except NotFound:
            self.loras.scan()  # a file added since the last scan
            return self.loras.get(lora_id, where)

    def generate(
        self,
        request: Request,
        check_active: Callable[[], None],
        on_started: Callable[[float], None] | None = None,
        on_step: StepCallback | None = None,
    ) -> Generated:
        """Run one checked request. `check_active()` raises when the caller is gone (polled while
        waiting for the lock and at every step boundary); `on_started(lock wait)` runs once the
        request holds the worker; `on_step(done, total, latents)` after each step."""
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        with tracing.stage(tracer, timings, "queue"):
            while not self._lock.acquire(timeout=0.05):
                check_active()
        try:
            check_active()
            if on_started is not None:
                on_started(timings["queue"])
            if self.mode == "fuse":
                result = self._generate_fused(request, check_active, on_step, timings)
            else:
                result = self._generate_with_adapters(request, check_active, on_step, timings)
        finally:
            self._lock.release()
        timings["total"] = time.perf_counter() - t_start
        return result

    def _generate_fused(self, request, check_active, on_step, timings) -> Generated:
        names = []
        try:
            if request.loras:
                with tracing.stage(tracer, timings, "lora_load_fuse"):
                    for i, lora in enumerate(request.loras):
                        names.append(f"req{i}")
                        self._load_adapter(lora.lora_id, names[-1], i)
                    self.pipe.set_adapters(names, adapter_weights=[lora.scale for lora in request.loras])
                    self.pipe.fuse_lora(adapter_names=names)
            image_png = self._run_pipeline(request, check_active, on_step, timings)
        finally:
            if names:
                with tracing.stage(tracer, timings, "lora_unfuse_unload"):
                    self.pipe.unfuse_lora()
                    self.pipe.unload_lora_weights()
        return Generated(image_png, request.seed, timings, request.loras.ids)

    def _generate_with_adapters(self, request, check_active, on_step, timings) -> Generated:
        missing = [lora.lora_id for lora in request.loras if lora.lora_id not in self._adapters]
        if missing:
            with tracing.stage(tracer, timings, "lora_load"):
                keep = set(request.loras.ids)
                for i, lora in enumerate(request.loras):
                    if lora.lora_id in self._adapters:
                        continue
                    # Room first: the least recently used adapters this request does not use go.
                    while len(self._adapters) >= self.adapter_cache:
                        victim = next((lid for lid in self._adapters if lid not in keep), None)
                        if victim is None:
                            break  # the request alone needs more than the cache holds: hold them all for it
                        self.pipe.delete_adapters(self._adapters.pop(victim))
                    self._adapter_serial += 1
                    name = f"lora{self._adapter_serial}"
                    self._load_adapter(lora.lora_id, name, i)
                    self._adapters[lora.lora_id] = name
        for lora_id in request.loras.ids:
            self._adapters.move_to_end(lora_id)
        if self._adapters:
            with tracing.stage(tracer, timings, "lora_set_adapters"):
                if request.loras:
                    self.pipe.enable_lora()
                    self.pipe.set_adapters(
                        [self._adapters[lora.lora_id] for lora in request.loras],
                        adapter_weights=[lora.scale for lora in request.loras],
                    )
                else:
                    self.pipe.disable_lora()
        image_png = self._run_pipeline(request, check_active, on_step, timings)
        return Generated(image_png, request.seed, timings, missing)

    def _load_adapter(self, lora_id: str, adapter_name: str, index: int) -> None:
        path = self.loras.path_of(lora_id, f"loras[{index}].lora_id")
        try:
            self.pipe.load_lora_weights(str(path), adapter_name=adapter_name)
        except (ValueError, KeyError, RuntimeError) as exc:
            # What Diffusers says when a LoRA does not fit this model; nothing of it stays loaded.
            try:
                self.pipe.delete_adapters(adapter_name)
            except (ValueError, KeyError, RuntimeError):
                pass
            raise FailedPrecondition(
                f"loras[{index}].lora_id: {lora_id!r} does not fit {self.model_id}: {exc}"
            ) from None

    def pipeline_for(self, controlnet_ids: tuple[str, ...]):
        """The pipeline a usual server keeps per ControlNet combination (all share the base components)."""
        if not controlnet_ids:
            return self.pipe
        if controlnet_ids not in self._cn_pipelines:
            models = [self.controlnets[c] for c in controlnet_ids]
            controlnet = models[0] if len(models) == 1 else MultiControlNetModel(models)
            cls = (
                StableDiffusionXLControlNetPipeline if self.family == FAMILY_SDXL else StableDiffusionControlNetPipeline
            )
            accepted = set(inspect.signature(cls.__init__).parameters)
            components = {k: v for k, v in self.pipe.components.items() if k in accepted}
            if "requires_safety_checker" in accepted:
                components["requires_safety_checker"] = False
            pipe = cls(**components, controlnet=controlnet)
            pipe.set_progress_bar_config(disable=True)
            self._cn_pipelines[controlnet_ids] = pipe
        return self._cn_pipelines[controlnet_ids]

    def _run_pipeline(self, request: Request, check_active, on_step, timings) -> bytes:
        controlnets = request.controlnets
        pipe = self.pipeline_for(tuple(cn.controlnet_id for cn in controlnets))
        pipe.scheduler = make_scheduler(self.pipe.scheduler, request.scheduler)

        def step_end(pipeline, i, _t, callback_kwargs):
            try:
                check_active()
            except (Cancelled, DeadlineExceeded) as exc:
                raise _Stop(exc) from None
            if on_step is not None:
                on_step(i + 1, pipeline.num_timesteps, callback_kwargs["latents"])
            return {}

        kwargs = dict(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,  # None: Diffusers' default, as our worker
            height=request.height,
            width=request.width,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            generator=torch.Generator(device="cpu").manual_seed(request.seed),
            callback_on_step_end=step_end,
        )
        if controlnets:
            one = len(controlnets) == 1
            pick = (lambda xs: xs[0]) if one else (lambda xs: xs)
            kwargs.update(
                image=pick([cn.decoded_image() for cn in controlnets]),
                controlnet_conditioning_scale=pick([cn.conditioning_scale for cn in controlnets]),
                control_guidance_start=pick([cn.guidance_start for cn in controlnets]),
                control_guidance_end=pick([cn.guidance_end for cn in controlnets]),
                guess_mode=controlnets[0].guess_mode,
            )
        with tracing.stage(tracer, timings, "generate"):
            try:
                with torch.no_grad():
                    image = pipe(**kwargs).images[0]
            except _Stop as stop:
                raise stop.error from None
            return encode_png(image)


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _active_check(context) -> Callable[[], None]:
    """Raises the caller's verdict once the call is over: its deadline passed, or it cancelled."""

    def check() -> None:
        if context.is_active():
            return
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("deadline passed; the request stopped at a step boundary")
        raise Cancelled("the caller cancelled; the request stopped at a step boundary")

    return check


class BaselineWorkerServicer(gateway_pb2_grpc.GatewayServicer):
    """Gateway API on one `DiffusersWorker`: protobuf in, engine call, protobuf out."""

    def __init__(self, worker: DiffusersWorker):
        self.worker = worker
        self.address = ""  # host:port, once bound

    def _plan(self, request: Request, loaded: list[str]) -> gateway_pb2.Plan:
        return gateway_pb2.Plan(
            unet_worker=self.address,
            controlnets=[
                gateway_pb2.ControlNetAssignment(controlnet_id=cn.controlnet_id) for cn in request.controlnets
            ],
            lora_ids=request.loras.ids,
            pushed_lora_ids=loaded,
        )

    def _response(self, request: Request, result: Generated) -> gateway_pb2.GenerateResponse:
        return gateway_pb2.GenerateResponse(
            image_png=result.image_png,
            seed=result.seed,
            timings=[common_pb2.StageTiming(stage=k, seconds=v) for k, v in result.timings.items()],
            trace_id=tracing.current_trace_id(),
            request_id=request.request_id,
            plan=self._plan(request, result.loaded_lora_ids),
            lora_applied_at_step=0 if request.loras else -1,
        )

    def _checked(self, pb) -> Request:
        request = self.worker.check(pb)
        trace.get_current_span().set_attributes(
            {"request.id": request.request_id, "request.model_id": request.model_id}
        )
        return request

    def Generate(self, pb, context):
        request = self._checked(pb)
        return self._response(request, self.worker.generate(request, _active_check(context)))

    def GenerateStream(self, pb, context):
        request = self._checked(pb)
        events: queue.Queue = queue.Queue()
        t0 = time.perf_counter()
        every = request.preview_every_n_steps

        def on_started(waited: float) -> None:
            started = gateway_pb2.Started(plan=self._plan(request, []), queued_seconds=waited)
            events.put(gateway_pb2.GenerateStreamResponse(started=started))

        def on_step(done: int, total: int, latents: torch.Tensor) -> None:
            progress = common_pb2.Progress(step=done, total_steps=total, elapsed_seconds=time.perf_counter() - t0)
            events.put(gateway_pb2.GenerateStreamResponse(progress=progress))
            if every > 0 and done % every == 0 and done < total:
                image = encode_png(preview_image(latents, self.worker.family))
                events.put(gateway_pb2.GenerateStreamResponse(preview=common_pb2.Preview(step=done, image_png=image)))

        outcome: dict = {}

        def work():
            try:
                outcome["result"] = self.worker.generate(request, _active_check(context), on_started, on_step)
            except BaseException as exc:  # re-raised on the RPC thread, where the interceptor maps it
                outcome["error"] = exc
            finally:
                events.put(None)

        thread = tracing.in_current_context(work)
        # Not a daemon: a drain past its grace period cancels the call, and the process must not
        # exit under the loop before it stops at its next step boundary.
        thread.daemon = False
        thread.start()
        while (event := events.get()) is not None:
            yield event
        if "error" in outcome:
            raise outcome["error"]
        yield gateway_pb2.GenerateStreamResponse(final=self._response(request, outcome["result"]))

    def ListModels(self, request, context):
        return gateway_pb2.ListModelsResponse(models=[self.worker.model_info()])

    def ListLoras(self, request, context):
        return gateway_pb2.ListLorasResponse(loras=self.worker.lora_infos(request.family))

    def ListControlNets(self, request, context):
        return gateway_pb2.ListControlNetsResponse(controlnets=self.worker.controlnet_infos())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.baselines.worker",
        description="One Diffusers pipeline on one device, serving swiftd.v1.Gateway (the baselines' worker).",
    )
    parser.add_argument(
        "--model-root", type=Path, required=True, help="model repository (models/, controlnets/, loras/)"
    )
    parser.add_argument("--model-id", required=True, help="base model to serve")
    parser.add_argument("--mode", choices=MODES, required=True, help="fuse: load+fuse per request; adapters: PEFT LRU")
    parser.add_argument("--adapter-cache", type=int, default=4, help="adapters mode: LoRAs kept loaded")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    add_limit_arguments(parser)
    add_server_arguments(parser)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    server_config = server_config_from_args(args)
    configure_process(server_config)  # pinned and threads set before any model is loaded
    _quiet()
    tracing.setup_tracing("baseline-worker")
    worker = DiffusersWorker(
        args.model_root,
        args.model_id,
        args.mode,
        args.adapter_cache,
        DTYPES[args.dtype],
        args.device,
        limits_from_args(args),
    )
    servicer = BaselineWorkerServicer(worker)
    host = server_config.address.rsplit(":", 1)[0]

    def on_bound(port: int) -> None:
        servicer.address = f"{host}:{port}"

    serve(
        rpc.GATEWAY_SERVICE,
        server_config,
        lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server),
        on_bound=on_bound,
    )


if __name__ == "__main__":
    main()
