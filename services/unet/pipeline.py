"""The UNet worker's pipeline: one base model's components and what every request shares.

Text encoding, scheduling and VAE decoding are Diffusers' own (the pipeline object is the
component holder); the denoising loop is a `DenoisingRun` (services/unet/run.py) per request, on a
`Backbone` chosen at start-up (eager or compiled), with the request's add-ons (ControlNet, LoRA).
Requests run one at a time: the worker owns the weights, and a LoRA set stays patched in for the
next request that wants it.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable

import diffusers
import PIL.Image
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from diffusers.image_processor import VaeImageProcessor

from services.unet.addons import ControlNetAddOn, LoraAddOn
from services.unet.addons.controlnet import LocalResidualSource, ResidualSource, ResidualSourceFactory
from services.unet.backbone import Backbone, EagerBackbone
from services.unet.guidance import Guidance
from services.unet.lora_inbox import LoraInbox
from services.unet.run import DenoisingRun, GenerationResult, StepCallback
from swiftd.controlnet_step import ControlNetSession, ControlNetStepper
from swiftd.errors import InvalidArgument
from swiftd.lora import LoraDeltas, LoraPatcher, prepare_deltas
from swiftd.request import ControlNet, Request, scheduler_row


def make_scheduler(model_scheduler, name: str):
    """A fresh scheduler of the named kind (empty: the model's own), configured from the model's
    scheduler config, so betas, offsets and prediction type follow the checkpoint. The Diffusers
    baselines (bench/baselines) use it too, so a scheduler name means the same on both sides."""
    config = model_scheduler.config
    if not name:
        return model_scheduler.__class__.from_config(config)
    return getattr(diffusers, scheduler_row(name).diffusers_class).from_config(config)


class UNetPipeline:
    def __init__(
        self,
        pipe: DiffusionPipeline,
        backbone: Backbone | None = None,
        load_controlnet: Callable[[str], ControlNetStepper] | None = None,
        lora_inbox: LoraInbox | None = None,
        load_lora: Callable[[str], LoraDeltas] | None = None,
        default_lora_bound_steps: int = 0,
        list_controlnets: Callable[[], dict[str, bool]] | None = None,
    ):
        """`backbone`: None runs the pipeline's modules eagerly. `load_controlnet(id)` gives the
        stepper of an in-process ControlNet, `list_controlnets()` the ids it can load, each with
        whether it is loaded (the worker's listing: the gateway packs only those beside the UNet). `lora_inbox` is where
        LoRA deltas arrive; `load_lora` (id -> scale-1 deltas) is a shortcut for an inbox that
        prepares them here. `default_lora_bound_steps`: the bound K of requests that give none."""
        self.pipe = pipe
        self.is_sdxl = isinstance(pipe, StableDiffusionXLPipeline)
        self.backbone = backbone if backbone is not None else EagerBackbone(pipe)
        self.split_unet = self.backbone.split_unet()
        self.device = pipe.unet.device
        self._schedules_ok: set[tuple[str, int]] = set()  # (scheduler, steps) that passed _check_schedule
        self.dtype = pipe.unet.dtype
        self.default_lora_bound_steps = default_lora_bound_steps
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )
        self._load_controlnet = load_controlnet
        self._list_controlnets = list_controlnets
        if lora_inbox is None and load_lora is not None:
            lora_inbox = LoraInbox(
                budget_bytes=1 << 40,
                dtype=self.dtype,
                base_model_id="",
                prepare_local=lambda lora_id, scale: prepare_deltas(load_lora(lora_id), scale, self.dtype),
            )
        self.lora_inbox = lora_inbox
        self.lora_patcher = LoraPatcher(pipe)
        if lora_inbox is not None:  # pushed deltas must fit this model's parameters
            lora_inbox.check_targets = self.lora_patcher.check
        self._lock = threading.Lock()

    def default_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def resolve(self, request: Request) -> Request:
        """The request with this pipeline's defaults filled in (size, steps, guidance, seed, K),
        refused if its scheduler cannot take that many steps on this model."""
        request = request.resolved(self.default_size(), self.default_lora_bound_steps)
        self._check_schedule(request)
        return request

    def _check_schedule(self, request: Request) -> None:
        # Some schedulers accept a step count their timestep spacing cannot serve (DDIM and PNDM
        # with steps_offset=1 and 1000 steps ask for timestep 1000 of 0..999) and fail mid-loop
        # with an IndexError (PNDM with SDXL's config cannot take 1 step). A throwaway scheduler's
        # first step on a 1-pixel latent finds out in milliseconds: refused up front, as the
        # caller's error, before anything changes.
        key = (request.scheduler, request.num_inference_steps)
        if key in self._schedules_ok:  # a few ms per check; requests repeat a few step counts
            return
        scheduler = self.make_scheduler(request.scheduler)
        steps = request.num_inference_steps
        try:
            scheduler.set_timesteps(steps, device="cpu")
            probe, t = torch.zeros(1, 1, 1, 1), scheduler.timesteps[0]
            # Its own generator: an ancestral step draws noise, which must not come from torch's global one.
            kwargs = self.extra_step_kwargs(scheduler, torch.Generator().manual_seed(0))
            scheduler.step(probe, t, scheduler.scale_model_input(probe, t), **kwargs)
        except (IndexError, ValueError) as exc:
            raise InvalidArgument(
                "params.num_inference_steps",
                f"{steps} steps do not fit the {type(scheduler).__name__} schedule of this model "
                f"({exc.__class__.__name__}: {exc})",
            ) from None
        self._schedules_ok.add(key)

    @torch.no_grad()
    def generate(
        self,
        request: Request,
        open_controlnet: ResidualSourceFactory | None = None,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        guidance: Guidance | None = None,
    ) -> GenerationResult:
        """Run one request. `open_controlnet` opens each ControlNet's residual source (default: in
        this process); `on_step(i, total, latents)` runs after each step; `should_stop()` is
        polled at each step boundary (a cancelled caller stops the loop); `guidance`: the CFG
        batch here (default) or one half of it, the other on a partner worker."""
        request = self.resolve(request)
        addons = [
            LoraAddOn(request.loras, self.lora_patcher, self.lora_inbox, self.backbone),
            ControlNetAddOn(
                request.controlnets,
                open_controlnet or self.open_local_controlnet,
                self._local_controlnet,
                self.prepare_control_image,
            ),
        ]
        with self._lock:
            return DenoisingRun(self, request, addons, on_step, should_stop, guidance).run()

    def open_local_controlnet(self, controlnet: ControlNet, session: ControlNetSession) -> ResidualSource:
        return LocalResidualSource(self._local_controlnet(controlnet.controlnet_id), session)

    def local_controlnets(self) -> dict[str, bool]:
        """The ControlNets this worker can run in-process, each with whether it is loaded."""
        return self._list_controlnets() if self._list_controlnets is not None else {}

    def _local_controlnet(self, controlnet_id: str) -> ControlNetStepper:
        if self._load_controlnet is None:
            raise InvalidArgument("controlnets", "this worker has no ControlNet models configured")
        return self._load_controlnet(controlnet_id)

    def make_scheduler(self, name: str):
        return make_scheduler(self.pipe.scheduler, name)

    @staticmethod
    def extra_step_kwargs(scheduler, generator) -> dict:
        params = set(inspect.signature(scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = 0.0
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def encode_prompt(self, request: Request, do_cfg: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Prompt embeddings (CFG batch: negative first), and the UNet's added conditioning (SDXL)."""
        height, width = request.height, request.width
        pipe = self.pipe
        negative_prompt = request.negative_prompt or None  # None: Diffusers' default handling
        if not self.is_sdxl:
            prompt_embeds, negative_embeds = pipe.encode_prompt(request.prompt, self.device, 1, do_cfg, negative_prompt)
            if do_cfg:
                prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
            return prompt_embeds, {}

        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=request.prompt,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt,
        )
        projection_dim = (
            pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(pooled.shape[-1])
        )
        time_ids = pipe._get_add_time_ids(
            (height, width),
            (0, 0),
            (height, width),
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        )
        text_embeds = pooled
        if do_cfg:
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
            text_embeds = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return prompt_embeds, {"text_embeds": text_embeds.to(self.device), "time_ids": time_ids.to(self.device)}

    def prepare_control_image(self, image: PIL.Image.Image, height: int, width: int) -> torch.Tensor:
        """Diffusers' ControlNet preprocessing: RGB, resize to the output size, range [0, 1]; float32
        on the host, once (ControlNetSession.conditioning moves, casts and repeats it for CFG)."""
        return self.control_image_processor.preprocess(image, height=height, width=width).to(torch.float32)

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
        image = self.backbone.vae_decode(vae, latents)
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
    "sd15": [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ],
    "sdxl": [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ],
}
