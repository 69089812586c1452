"""One request's denoising: its state on one object, its steps as methods.

`UNetPipeline.generate` makes a `DenoisingRun` for a request and calls `run()`. The run owns
what changes during the request (latents, scheduler, prompt embeddings, the UNet's added
conditioning in one mapping as Diffusers passes `added_cond_kwargs`, timings) and calls the
request's add-ons (`services/unet/addons/`) at fixed points. Each step runs the UNet's encoder
half while the add-ons' residuals are computed elsewhere, then the decoder half with them added.
With every ControlNet in-process the loop reproduces `StableDiffusion(XL)(ControlNet)Pipeline`
for the same seed; tests hold it to 1e-4 in fp32.

How the classifier-free guidance halves are combined is the run's `Guidance`
(services/unet/guidance.py): the whole batch here, as Diffusers does, or one half here and the
other on a partner worker (`run.half`), the predictions exchanged every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import PIL.Image
import torch
from diffusers.utils.torch_utils import randn_tensor
from opentelemetry import trace

from services.unet.addons import AddOn
from services.unet.guidance import Guidance
from services.unet.step_clock import PARTS, StepClock
from swiftd import tracing
from swiftd.errors import Cancelled
from swiftd.request import Request

if TYPE_CHECKING:
    from services.unet.pipeline import UNetPipeline

tracer = trace.get_tracer("swiftd.unet")
MAX_STEPS_AHEAD = 2  # steps the host may queue beyond what the GPU has run (two keep it busy)

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step_index, total_steps, latents)


@dataclass
class GenerationResult:
    latents: torch.Tensor  # final latents, before VAE decode
    image: PIL.Image.Image | None  # None where another worker decodes (a CFG partner)
    seed: int
    timings: dict[str, float]  # stage -> seconds, in pipeline order
    lora_applied_at_step: int = -1  # step before which the LoRA set was in place; -1: no LoRA
    cfg_partner: str = ""  # the worker that computed the other CFG half; empty: none
    # How each ControlNet's residuals arrived, in request order (swiftd.transport; 0: in-process).
    controlnet_transports: list[int] = field(default_factory=list)
    cfg_partner_controlnet_transports: list[int] = field(default_factory=list)  # the same, on the partner


class DenoisingRun:
    def __init__(
        self,
        pipeline: UNetPipeline,
        request: Request,
        addons: list[AddOn],
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        guidance: Guidance | None = None,
    ):
        """`request` is resolved (every default filled in). `on_step(i, total, latents)` runs
        after each step; `should_stop()` is polled at each step boundary. `guidance`: how the CFG
        halves are computed and combined (default: the whole batch here)."""
        self.pipeline = pipeline
        self.request = request
        self.addons = addons
        self.controlnet_transports: list[int] = []  # set by the ControlNet add-on at the end
        self.cfg_partner_controlnet_transports: list[int] = []  # set by a split's guidance at the end
        self.on_step = on_step
        self.should_stop = should_stop
        self.do_cfg = request.do_classifier_free_guidance  # the step combines two predictions
        self._use(guidance or Guidance())
        self.generator = torch.Generator(device="cpu").manual_seed(request.seed)
        self.timings: dict[str, float] = {}
        # Seconds per part of a step (step_clock.PARTS; "guidance": combining the CFG halves, with
        # CFG split the exchange with the partner), summed over the steps; GPU time on a GPU.
        self.step_times = dict.fromkeys(PARTS, 0.0)
        self.clock = StepClock(pipeline.device)
        # Filled in as the run goes.
        self.prompt_embeds: torch.Tensor | None = None  # CFG batch: negative first (split: own half)
        self.added_cond_kwargs: dict[str, torch.Tensor] = {}  # SDXL: text_embeds, time_ids
        self.scheduler = None
        self.step_kwargs: dict = {}  # what this scheduler's step() takes besides the model output
        self.timesteps: torch.Tensor | None = None
        # The same on the host, read once: what is sent to ControlNet workers each step (reading a
        # GPU tensor's value would wait for the GPU at every step).
        self.timesteps_on_host: torch.Tensor | None = None
        self.latents: torch.Tensor | None = None
        self.timestep: torch.Tensor | None = None  # of the current step
        self.timestep_on_host: torch.Tensor | None = None
        self.latent_model_input: torch.Tensor | None = None  # of the current step
        self.lora_applied_at_step = -1  # set by the LoRA add-on: the step before which the set was in place

    def _use(self, guidance: Guidance) -> None:
        self.guidance = guidance
        self.half = guidance.half  # with CFG split: the half computed here ("cond", "uncond")
        self.cfg_batch = self.do_cfg and self.half is None  # the UNet's batch holds both halves

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def stage(self, name: str, **attributes):
        """A timed, traced stage of this run."""
        return tracing.stage(tracer, self.timings, name, **attributes)

    def _stopped(self) -> bool:
        return self.should_stop is not None and self.should_stop()

    def run(self) -> GenerationResult:
        # A caller that left while the request waited for the pipeline: touch nothing (the LoRA
        # set applied stays, for the requests that want it).
        if self._stopped():
            raise Cancelled("request cancelled before it started")
        # Resolve every id before changing any state, so a bad request changes nothing.
        with self.stage("resolve"):
            for addon in self.addons:
                addon.prepare(self)
        try:
            if not self.guidance.open(self):  # a split the partner refused: the whole batch here
                self._use(Guidance())
            latents = self._denoise()
            self.guidance.finish(self)
        except BaseException:
            for addon in self.addons:
                addon.fail(self)
            raise
        finally:
            self.guidance.close()
        image = None
        if self.guidance.decodes:
            if self._stopped():  # nobody waits for the image: spare the decode (the costliest stage at 1024²)
                raise Cancelled("request cancelled before the VAE decode")
            with self.stage("vae_decode"):
                image = self.pipeline.decode(latents)
        return GenerationResult(
            latents,
            image,
            self.request.seed,
            self.timings,
            self.lora_applied_at_step,
            self.guidance.partner,
            self.controlnet_transports,
            self.cfg_partner_controlnet_transports,
        )

    def _denoise(self) -> torch.Tensor:
        for addon in self.addons:
            addon.before_text_encoding(self)
        with self.stage("text_encode"):
            prompt_embeds, added_cond_kwargs = self.pipeline.encode_prompt(self.request, self.do_cfg)
            self.prompt_embeds = self.guidance.own_half(prompt_embeds)
            self.added_cond_kwargs = {k: self.guidance.own_half(v) for k, v in added_cond_kwargs.items()}
        self._prepare_latents()
        for addon in self.addons:
            addon.before_denoising(self)
        with self.stage("denoise", steps=self.num_steps) as denoise_span:
            for i, t in enumerate(self.timesteps):
                # On a GPU the host queues a step and moves on: it stays at most MAX_STEPS_AHEAD
                # steps ahead of the GPU, so that progress, cancellation and deadlines act within
                # that many steps of what the GPU has run, while the steps queued keep it busy.
                self.clock.wait_for_step(i - MAX_STEPS_AHEAD, self._stopped)
                if self._stopped():
                    raise Cancelled(f"request cancelled before step {i}")
                self.step(i, t)
                if self.on_step is not None:
                    self.on_step(i, self.num_steps, self.latents)
            # One event per step (a span each would multiply the trace by the step count), read
            # after the loop: on a GPU the parts are known once it has run them.
            steps = self.clock.read(self._stopped)
            if steps is None:
                raise Cancelled("request cancelled while the GPU ran its last steps")
            for i, (started, parts) in enumerate(steps):
                denoise_span.add_event("step", {"step": i, **{f"{k}_seconds": v for k, v in parts.items()}}, started)
                for part, seconds in parts.items():
                    self.step_times[part] += seconds
        self.timings.update({f"denoise.{k}": v for k, v in self.step_times.items()})
        for addon in self.addons:
            addon.finish(self)
        return self.latents

    def _prepare_latents(self) -> None:
        request, unet = self.request, self.pipeline.pipe.unet
        self.scheduler = self.pipeline.make_scheduler(request.scheduler)
        self.scheduler.set_timesteps(request.num_inference_steps, device=self.pipeline.device)
        self.timesteps = self.scheduler.timesteps
        self.timesteps_on_host = self.timesteps.cpu()
        scale = self.pipeline.pipe.vae_scale_factor
        shape = (1, unet.config.in_channels, request.height // scale, request.width // scale)
        noise = randn_tensor(
            shape, generator=self.generator, device=self.pipeline.device, dtype=self.prompt_embeds.dtype
        )
        self.latents = noise * self.scheduler.init_noise_sigma
        self.step_kwargs = self.pipeline.extra_step_kwargs(self.scheduler, self.generator)

    def step(self, i: int, t: torch.Tensor) -> None:
        """One denoising step: latents at t -> latents at the next timestep."""
        split_unet = self.pipeline.split_unet
        latent_model_input = torch.cat([self.latents] * 2) if self.cfg_batch else self.latents
        self.timestep, self.timestep_on_host = t, self.timesteps_on_host[i]
        # The scheduler takes the host's timestep: DDIM and PNDM index host tensors with it and
        # compare it, which with a GPU one would wait for the GPU at every step.
        self.latent_model_input = self.scheduler.scale_model_input(latent_model_input, self.timestep_on_host)
        for addon in self.addons:
            addon.before_step(self, i)

        self.clock.start_step()
        encoded = split_unet.encoder_half(self.latent_model_input, t, self.prompt_embeds, **self.added_cond_kwargs)
        self.clock.mark()
        down, mid = None, None
        for addon in self.addons:
            residuals = addon.decoder_residuals(self, i)
            if residuals is None:
                continue
            if down is None:
                down, mid = residuals.down_block_res_samples, residuals.mid_block_res_sample
            else:
                down = tuple(d + r for d, r in zip(down, residuals.down_block_res_samples))
                mid = mid + residuals.mid_block_res_sample
        self.clock.mark()
        noise_pred = split_unet.decoder_half(encoded, down, mid)
        self.clock.mark()
        noise_pred = self.guidance.combine(self, i, noise_pred)
        self.clock.mark()
        self.latents = self.scheduler.step(
            noise_pred, self.timestep_on_host, self.latents, **self.step_kwargs, return_dict=False
        )[0]
        self.clock.mark()
