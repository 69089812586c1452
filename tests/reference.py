"""Reference runs through Diffusers' own pipelines, and the tiny families they run on."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import (
    MultiControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)

from services.unet.pipeline import UNetPipeline
from swiftd import zoo
from swiftd.controlnet_step import ControlNetStepper
from swiftd.loading import load_controlnet, load_pipeline
from swiftd.request import ControlNet

TOLERANCE = 1e-4  # max abs difference of fp32 latents against Diffusers
SIZE = 64
STEPS = 5


def conditioning_image(seed: int) -> PIL.Image.Image:
    rng = np.random.RandomState(seed)
    return PIL.Image.fromarray((rng.rand(SIZE, SIZE, 3) * 255).astype(np.uint8))


class Family:
    def __init__(self, root, name):
        paths = zoo.zoo_paths(root, name)
        self.pipe = load_pipeline(paths.model)
        self.controlnets = {cid: load_controlnet(p) for cid, p in paths.controlnets.items()}
        self.ids = list(self.controlnets)
        self.engine = UNetPipeline(self.pipe, load_controlnet=lambda cid: ControlNetStepper(self.controlnets[cid]))
        self.is_sdxl = paths.kind == "sdxl"

    def diffusers_latents(self, scheduler, controlnets: list[ControlNet], guess_mode=False, **kwargs):
        """The same request through Diffusers' own pipeline, the usual way."""
        kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent", **kwargs)
        return self.diffusers_run(scheduler, controlnets, guess_mode, **kwargs)

    def diffusers_run(self, scheduler, controlnets: list[ControlNet], guess_mode=False, **kwargs):
        if not controlnets:
            pipe = self.pipe.__class__(**self.pipe.components)
        else:
            cls = StableDiffusionXLControlNetPipeline if self.is_sdxl else StableDiffusionControlNetPipeline
            models = [self.controlnets[c.controlnet_id] for c in controlnets]
            controlnet = models[0] if len(models) == 1 else MultiControlNetModel(models)
            components = {k: v for k, v in self.pipe.components.items() if k not in ("image_encoder",)}
            pipe = cls(**components, controlnet=controlnet)
            one = len(controlnets) == 1
            pick = (lambda xs: xs[0]) if one else (lambda xs: xs)
            kwargs.update(
                image=pick([c.image for c in controlnets]),
                controlnet_conditioning_scale=pick([c.conditioning_scale for c in controlnets]),
                control_guidance_start=pick([c.guidance_start for c in controlnets]),
                control_guidance_end=pick([c.guidance_end for c in controlnets]),
                guess_mode=guess_mode,
            )
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = self.engine.make_scheduler(scheduler)
        return pipe(**kwargs).images


def assert_close(ours, reference, tolerance=TOLERANCE):
    assert ours.shape == reference.shape
    assert torch.isfinite(ours).all()
    diff = (ours - reference).abs().max().item()
    assert diff <= tolerance, f"max abs difference {diff:.3g} > {tolerance}"


def diffusers_fused_latents(pipe, lora_paths: dict, loras, **kwargs):
    """The usual way: load_lora_weights + fuse_lora per request (Euler), then unfuse + unload."""
    from diffusers import EulerDiscreteScheduler

    reference = pipe.__class__(**pipe.components)  # same modules, own scheduler
    reference.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    names = []
    for i, (lora_id, _) in enumerate(loras):
        reference.load_lora_weights(str(lora_paths[lora_id]), adapter_name=f"a{i}")
        names.append(f"a{i}")
    reference.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    reference.fuse_lora(adapter_names=names)
    try:
        return reference(**kwargs).images
    finally:
        reference.unfuse_lora()
        reference.unload_lora_weights()
