"""The UNet worker's engine: text encoding, the denoising loop on the split UNet, VAE decode.

Text encoding, scheduling and VAE decoding are Diffusers' own (the pipeline object is the
component holder); the loop itself is ours, because each step runs the UNet's encoder half while
the request's ControlNets compute their residuals elsewhere, then the decoder half with the
residuals added. With every ControlNet in-process the loop reproduces
`StableDiffusion(XL)(ControlNet)Pipeline` for the same seed; tests hold it to 1e-4 in fp32.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import PIL.Image
import torch
from opentelemetry import trace
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionXLPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from services.unet.lora_inbox import LoraFetch, LoraInbox, lora_key
from swiftd import tracing
from swiftd.controlnet_step import ControlNetResiduals, ControlNetSession, ControlNetStepper
from swiftd.errors import Cancelled, InvalidArgument
from swiftd.lora import LoraDeltas, LoraPatcher, prepare_deltas
from swiftd.split_unet import SplitUNet

log = logging.getLogger(__name__)
tracer = trace.get_tracer("swiftd.unet")

# Scheduler names of the public API -> Diffusers classes, configured from the model's own
# scheduler config (so betas, offsets and prediction type follow the checkpoint).
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}


@dataclass
class ControlNetRequest:
    """One ControlNet of a request."""

    controlnet_id: str
    image: PIL.Image.Image
    conditioning_scale: float = 1.0
    guidance_start: float = 0.0  # fraction of the schedule where this ControlNet starts acting
    guidance_end: float = 1.0  # fraction where it stops
    guess_mode: bool = False  # Diffusers guess mode: sees only the conditional half of the CFG batch
    worker_address: str = ""  # ControlNet worker to stream residuals from; empty: in-process


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    width: int | None = None  # None: the model's native size
    height: int | None = None
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    scheduler: str | None = None  # a SCHEDULERS key; None: the model's own scheduler
    controlnets: list[ControlNetRequest] = field(default_factory=list)
    loras: list[tuple[str, float]] = field(default_factory=list)  # (lora_id, scale), applied in order
    # Bounded asynchronous LoRA loading: UNet deltas are patched in at the first step boundary
    # after they are complete, and before step `lora_bound_steps` at the latest (the loop waits
    # there); 0 = before the first step, i.e. synchronous. Text-encoder deltas are always in
    # place before text encoding (they are streamed first).
    lora_bound_steps: int = 0
    lora_store_address: str = ""  # pull missing deltas from this store; empty: the worker's default
    pushed_lora_ids: list[str] = field(default_factory=list)  # deltas already on their way: wait, don't pull
    request_id: str = ""


@dataclass
class GenerationResult:
    latents: torch.Tensor  # final latents, before VAE decode
    image: PIL.Image.Image
    seed: int
    timings: dict[str, float]  # stage -> seconds, in pipeline order
    lora_applied_at_step: int = -1  # step before which the LoRA set was in place; -1: no LoRA


class ResidualSource(Protocol):
    """The residuals of one ControlNet of one request, one step at a time.

    `start_step` must not block on the ControlNet's computation: the UNet's encoder half runs
    between `start_step` and `wait_step`.
    """

    def start_step(self, step_index: int, timestep: torch.Tensor, sample: torch.Tensor) -> None: ...

    def wait_step(self) -> ControlNetResiduals: ...

    def close(self) -> None: ...


class LocalResidualSource:
    """A ControlNet run in this process, on the UNet's device (no overlap; the fallback path)."""

    def __init__(self, stepper: ControlNetStepper, session: ControlNetSession):
        self._stepper = stepper
        self._session = session
        self._cond_embedding = stepper.embed_condition(session.controlnet_cond)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def start_step(self, step_index: int, timestep: torch.Tensor, sample: torch.Tensor) -> None:
        self._pending = (timestep, sample)

    def wait_step(self) -> ControlNetResiduals:
        timestep, sample = self._pending
        s = self._session
        return self._stepper.step(
            sample, timestep, s.encoder_hidden_states, self._cond_embedding,
            s.conditioning_scale, s.guess_mode, s.text_embeds, s.time_ids,
        )  # fmt: skip

    def close(self) -> None:
        self._pending = None


ResidualSourceFactory = Callable[[ControlNetRequest, ControlNetSession], ResidualSource]
StepCallback = Callable[[int, int, torch.Tensor], None]  # (step_index, total_steps, latents)


def controlnet_active(step_index: int, num_steps: int, start: float, end: float) -> bool:
    """Diffusers' `controlnet_keep` rule: active unless the step lies outside [start, end]."""
    return not (step_index / num_steps < start or (step_index + 1) / num_steps > end)


class DenoisingEngine:
    """Runs requests on one base pipeline, one at a time (the worker owns the weights)."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        load_controlnet: Callable[[str], ControlNetStepper] | None = None,
        load_lora: Callable[[str], LoraDeltas] | None = None,
        lora_inbox: LoraInbox | None = None,
        compiled=None,
    ):
        """`lora_inbox` is where LoRA deltas arrive; `load_lora` (id -> scale-1 deltas) is a
        shortcut for an inbox that prepares them in-process. `compiled` (a
        compiler.runtime.CompiledBackbone loaded for `pipe`) runs the UNet halves and the VAE
        decoder compiled; None: eagerly."""
        self.pipe = pipe
        self.is_sdxl = isinstance(pipe, StableDiffusionXLPipeline)
        self.compiled = compiled
        self.split_unet = compiled.split_unet() if compiled is not None else SplitUNet(pipe.unet)
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )
        self._load_controlnet = load_controlnet
        if lora_inbox is None and load_lora is not None:
            lora_inbox = LoraInbox(
                budget_bytes=1 << 40, dtype=self.dtype, base_model_id="",
                prepare_local=lambda lora_id, scale: prepare_deltas(load_lora(lora_id), scale, self.dtype),
            )  # fmt: skip
        self.lora_inbox = lora_inbox
        self.lora_patcher = LoraPatcher(pipe)
        self._lock = threading.Lock()

    # -- public ----------------------------------------------------------------------------

    def default_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def open_local_controlnet(self, request: ControlNetRequest, session: ControlNetSession) -> ResidualSource:
        return LocalResidualSource(self._local_controlnet(request.controlnet_id), session)

    @torch.no_grad()
    def generate(
        self,
        request: GenerationRequest,
        open_controlnet: ResidualSourceFactory | None = None,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Run one request. `on_step(i, total, latents)` runs after each step; `should_stop()` is
        polled at each step boundary (a cancelled caller stops the loop)."""
        with self._lock:
            return self._generate(request, open_controlnet or self.open_local_controlnet, on_step, should_stop)

    # -- the loop ----------------------------------------------------------------------------

    def _generate(self, request, open_controlnet, on_step, should_stop) -> GenerationResult:
        timings: dict[str, float] = {}
        height = request.height or self.default_size()
        width = request.width or self.default_size()
        do_cfg = request.guidance_scale > 1.0
        generator = torch.Generator(device="cpu").manual_seed(request.seed)

        # A caller that left while the request waited for the engine: touch nothing (the LoRA set
        # applied stays, for the requests that want it).
        if should_stop is not None and should_stop():
            raise Cancelled("request cancelled before it started")
        # Resolve every id before changing any state, so a bad request changes nothing.
        with tracing.stage(tracer, timings, "resolve"):
            fetch = self._fetch_loras(request, should_stop)
            for cn in request.controlnets:
                if not cn.worker_address:
                    self._local_controlnet(cn.controlnet_id)
        try:
            return self._denoise(request, fetch, open_controlnet, on_step, should_stop, timings, height, width, do_cfg, generator)
        except BaseException:
            if fetch is not None:  # a set half patched in is no set: back to the base weights
                self.lora_patcher.restore()
            raise

    def _denoise(self, request, fetch, open_controlnet, on_step, should_stop, timings, height, width, do_cfg, generator):
        pipe = self.pipe
        # LoRAs: a worker that already has this set applied does nothing. Otherwise denoising
        # starts from the base weights; text-encoder deltas go in before text encoding.
        applied_at = (0 if request.loras else -1) if fetch is None else None
        lora_ids = [lora_id for lora_id, _ in request.loras]
        with tracing.stage(tracer, timings, "lora_text_encoder", **{"lora.ids": lora_ids, "lora.already_applied": fetch is None}):
            if fetch is not None or (not request.loras and self.lora_patcher.applied):
                self.lora_patcher.restore()
                if self.compiled is not None and fetch is None:  # else the patch's refresh covers both
                    self.compiled.refresh()
            if fetch is not None:
                for lora_id, deltas in fetch.text_encoder_deltas():
                    self.lora_patcher.add(lora_id, deltas)

        with tracing.stage(tracer, timings, "text_encode"):
            prompt_embeds, text_embeds, time_ids = self._encode_prompt(request, height, width, do_cfg)

        scheduler = self._make_scheduler(request.scheduler)
        scheduler.set_timesteps(request.num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        latents = randn_tensor(
            (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor),
            generator=generator, device=self.device, dtype=prompt_embeds.dtype,
        ) * scheduler.init_noise_sigma  # fmt: skip
        step_kwargs = self._extra_step_kwargs(scheduler, generator)

        with tracing.stage(tracer, timings, "controlnet_setup", **{"controlnet.ids": [cn.controlnet_id for cn in request.controlnets]}):
            sources = self._open_controlnets(request, open_controlnet, prompt_embeds, text_embeds, time_ids, height, width, do_cfg)

        step_times = {"encoder_half": 0.0, "controlnet_wait": 0.0, "decoder_half": 0.0, "scheduler": 0.0}
        try:
            with tracing.stage(tracer, timings, "denoise", steps=len(timesteps)) as denoise_span:
                bound = min(max(request.lora_bound_steps, 0), len(timesteps) - 1)
                for i, t in enumerate(timesteps):
                    if should_stop is not None and should_stop():
                        raise Cancelled(f"request cancelled before step {i}")
                    if applied_at is None and (i >= bound or fetch.is_complete()):
                        with tracing.stage(tracer, timings, "lora_unet_patch", **{"lora.ids": lora_ids, "lora.applied_at_step": i}) as span:
                            for lora_id, deltas in fetch.unet_deltas():  # waits here at the bound
                                self.lora_patcher.add(lora_id, deltas)
                            self.lora_patcher.applied = fetch.key
                            if self.compiled is not None:  # frozen constants of patched weights, re-packed
                                span.set_attribute("compiled.constants_recomputed", self.compiled.refresh())
                        applied_at = i
                    step_start = dict(step_times)
                    latents = self._step(
                        i, t, latents, len(timesteps), request, sources, prompt_embeds, text_embeds, time_ids,
                        do_cfg, scheduler, step_kwargs, step_times,
                    )  # fmt: skip
                    # One event per step (a span each would multiply the trace by the step count).
                    denoise_span.add_event("step", {"step": i, **{f"{k}_seconds": v - step_start[k] for k, v in step_times.items()}})
                    if on_step is not None:
                        on_step(i, len(timesteps), latents)
        finally:
            for _, source in sources:
                source.close()
        timings.update({f"denoise.{k}": v for k, v in step_times.items()})
        for cn, source in sources:  # remote ControlNets report their own compute and transport
            for key, value in getattr(source, "stats", {}).items():
                if key != "steps":
                    timings[f"controlnet.{cn.controlnet_id}.{key}"] = value

        with tracing.stage(tracer, timings, "vae_decode"):
            image = self.decode(latents)
        return GenerationResult(
            latents=latents, image=image, seed=request.seed, timings=timings,
            lora_applied_at_step=applied_at,
        )  # fmt: skip

    def _fetch_loras(self, request: GenerationRequest, should_stop) -> LoraFetch | None:
        """The request's LoRA deltas (possibly still arriving), or None when nothing is to patch."""
        key = tuple(lora_key(i, s) for i, s in request.loras)
        if not request.loras or key == self.lora_patcher.applied:
            return None
        if self.lora_inbox is None:
            raise InvalidArgument("loras", "this worker has no LoRA source configured")
        return self.lora_inbox.fetch(
            request.loras, request.request_id, request.lora_store_address, should_stop, pushed=request.pushed_lora_ids
        )

    def _local_controlnet(self, controlnet_id: str) -> ControlNetStepper:
        if self._load_controlnet is None:
            raise InvalidArgument("controlnets", "this worker has no ControlNet models configured")
        return self._load_controlnet(controlnet_id)

    def _step(self, i, t, latents, num_steps, request, sources, prompt_embeds, text_embeds, time_ids,
              do_cfg, scheduler, step_kwargs, step_times) -> torch.Tensor:  # fmt: skip
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        # Start every ControlNet that acts at this step; those outside their window would
        # contribute zeros in Diffusers, so they are not run at all.
        active = [
            (cn, source) for cn, source in sources
            if controlnet_active(i, num_steps, cn.guidance_start, cn.guidance_end)
        ]  # fmt: skip
        guess_input = None
        for cn, source in active:
            if cn.guess_mode and do_cfg:
                # Guess mode: the ControlNet sees only the conditional half of the batch.
                if guess_input is None:
                    guess_input = scheduler.scale_model_input(latents, t)
                source.start_step(i, t, guess_input)
            else:
                source.start_step(i, t, latent_model_input)

        t0 = time.perf_counter()
        encoded = self.split_unet.encoder_half(latent_model_input, t, prompt_embeds, text_embeds, time_ids)
        t1 = time.perf_counter()
        down_residuals, mid_residual = None, None
        for cn, source in active:
            residuals = source.wait_step()
            down, mid = list(residuals.down_block_res_samples), residuals.mid_block_res_sample
            if cn.guess_mode and do_cfg:  # nothing for the unconditional half
                down = [torch.cat([torch.zeros_like(d), d]) for d in down]
                mid = torch.cat([torch.zeros_like(mid), mid])
            if down_residuals is None:
                down_residuals, mid_residual = down, mid
            else:
                down_residuals = [d + r for d, r in zip(down_residuals, down)]
                mid_residual = mid_residual + mid
        t2 = time.perf_counter()
        noise_pred = self.split_unet.decoder_half(
            encoded, tuple(down_residuals) if down_residuals is not None else None, mid_residual
        )
        t3 = time.perf_counter()
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + request.guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        t4 = time.perf_counter()
        step_times["encoder_half"] += t1 - t0
        step_times["controlnet_wait"] += t2 - t1
        step_times["decoder_half"] += t3 - t2
        step_times["scheduler"] += t4 - t3
        return latents

    # -- pieces ------------------------------------------------------------------------------

    def _encode_prompt(self, request, height, width, do_cfg):
        """Prompt embeddings (CFG batch: negative first), and SDXL's added conditioning."""
        pipe = self.pipe
        negative_prompt = request.negative_prompt or None  # None: Diffusers' default handling
        if not self.is_sdxl:
            prompt_embeds, negative_embeds = pipe.encode_prompt(
                request.prompt, self.device, 1, do_cfg, negative_prompt
            )
            if do_cfg:
                prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
            return prompt_embeds, None, None

        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=request.prompt, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
        )  # fmt: skip
        projection_dim = (
            pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(pooled.shape[-1])
        )
        time_ids = pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        )  # fmt: skip
        text_embeds = pooled
        if do_cfg:
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
            text_embeds = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return prompt_embeds, text_embeds.to(self.device), time_ids.to(self.device)

    def _make_scheduler(self, name: str | None):
        if not name:
            return self.pipe.scheduler.__class__.from_config(self.pipe.scheduler.config)
        if name not in SCHEDULERS:
            raise InvalidArgument("scheduler", f"unknown scheduler {name!r}; one of {sorted(SCHEDULERS)}")
        return SCHEDULERS[name].from_config(self.pipe.scheduler.config)

    @staticmethod
    def _extra_step_kwargs(scheduler, generator) -> dict:
        params = set(inspect.signature(scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = 0.0
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def _open_controlnets(self, request, open_controlnet, prompt_embeds, text_embeds, time_ids, height, width, do_cfg):
        """One ResidualSource per ControlNet, each sent what is constant for the request."""
        sources: list[tuple[ControlNetRequest, ResidualSource]] = []
        try:
            for cn in request.controlnets:
                guess_cfg = cn.guess_mode and do_cfg
                cond = self.prepare_control_image(cn.image, height, width, duplicate_for_cfg=do_cfg and not cn.guess_mode)
                session = ControlNetSession(
                    controlnet_id=cn.controlnet_id,
                    controlnet_cond=cond,
                    encoder_hidden_states=prompt_embeds.chunk(2)[1] if guess_cfg else prompt_embeds,
                    text_embeds=(text_embeds.chunk(2)[1] if guess_cfg else text_embeds) if text_embeds is not None else None,
                    time_ids=(time_ids.chunk(2)[1] if guess_cfg else time_ids) if time_ids is not None else None,
                    conditioning_scale=cn.conditioning_scale,
                    guess_mode=cn.guess_mode,
                )
                sources.append((cn, open_controlnet(cn, session)))
        except BaseException:
            for _, source in sources:
                source.close()
            raise
        return sources

    def prepare_control_image(self, image: PIL.Image.Image, height: int, width: int, duplicate_for_cfg: bool) -> torch.Tensor:
        """Diffusers' ControlNet preprocessing: RGB, resize to the output size, range [0, 1]."""
        cond = self.control_image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        cond = cond.to(device=self.device, dtype=self.dtype)
        return torch.cat([cond] * 2) if duplicate_for_cfg else cond

    def decode(self, latents: torch.Tensor) -> PIL.Image.Image:
        """VAE decode as the Diffusers pipelines do (SDXL: fp16 upcast, latents mean/std)."""
        vae = self.pipe.vae
        needs_upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if needs_upcast:
            vae = vae.to(torch.float32)
        latents = latents.to(vae.dtype)
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        if self.compiled is not None:
            image = self.compiled.vae_decode(vae, latents)
        else:
            image = vae.decode(latents, return_dict=False)[0]
        if needs_upcast:
            vae.to(torch.float16)
        return self.pipe.image_processor.postprocess(image, output_type="pil")[0]

    def preview(self, latents: torch.Tensor) -> PIL.Image.Image:
        """A cheap low-resolution preview: a linear latent->RGB map instead of the VAE."""
        factors = torch.tensor(LATENT_RGB_FACTORS["sdxl" if self.is_sdxl else "sd15"], dtype=torch.float32)
        if latents.shape[1] != factors.shape[0]:
            factors = torch.zeros(latents.shape[1], 3)
        rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), factors)
        rgb = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
        return PIL.Image.fromarray(rgb)


# Linear approximations of the SD1.5 and SDXL VAEs (latent channel -> RGB), as used for live
# previews by ComfyUI and A1111.
LATENT_RGB_FACTORS = {
    "sd15": [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
    "sdxl": [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
}
