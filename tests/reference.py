"""Reference runs through Diffusers' own pipelines, and the tiny families they run on.

The references share no code with what they check: schedulers are built from Diffusers' classes
named here (not through `UNetPipeline.make_scheduler` or `swiftd.request.SCHEDULERS`), LoRAs go in
with Diffusers' `load_lora_weights` + `fuse_lora` (not `swiftd.lora`).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    MultiControlNetModel,
    PNDMScheduler,
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

# What each scheduler name of the API means, written out independently of swiftd.request: the
# Diffusers class a user of Diffusers would pick. "" is the model's own (its scheduler_config.json).
DIFFUSERS_SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}


def conditioning_image(seed: int) -> PIL.Image.Image:
    rng = np.random.RandomState(seed)
    return PIL.Image.fromarray((rng.rand(SIZE, SIZE, 3) * 255).astype(np.uint8))


def model_scheduler(model_folder: Path):
    """The scheduler a Diffusers pipeline folder names, loaded by Diffusers from that folder."""
    config = json.loads((Path(model_folder) / "scheduler" / "scheduler_config.json").read_text())
    return getattr(diffusers, config["_class_name"]).from_pretrained(model_folder, subfolder="scheduler")


def reference_scheduler(model_folder: Path, name: str):
    """A fresh Diffusers scheduler for the API's scheduler `name` ("" = the model's own), configured
    from the model's scheduler config as Diffusers' `Scheduler.from_config` does."""
    own = model_scheduler(model_folder)
    return own if not name else DIFFUSERS_SCHEDULERS[name].from_config(own.config)


class Family:
    def __init__(self, root, name):
        paths = zoo.zoo_paths(root, name)
        self.model_folder = paths.model
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
        pipe.scheduler = reference_scheduler(self.model_folder, scheduler)
        return pipe(**kwargs).images


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_close(ours, reference, tolerance=TOLERANCE):
    assert ours.shape == reference.shape
    assert torch.isfinite(ours).all()
    diff = max_abs_diff(ours, reference)
    assert diff <= tolerance, f"max abs difference {diff:.3g} > {tolerance}"


def assert_bit_identical(ours, reference):
    """Within the stated bound (TOLERANCE), and in fact the same bits: where our loop runs the same
    operations in the same order as Diffusers (fp32, CPU), nothing less is right."""
    assert_close(ours, reference)
    assert torch.equal(ours, reference), f"within the bound, not bit-identical ({max_abs_diff(ours, reference):.3g})"


def assert_far(ours, reference, tolerance=TOLERANCE, factor=100):
    """A negative control: `ours` must fail `assert_close` against `reference` by a wide margin."""
    diff = max_abs_diff(ours, reference)
    assert diff > factor * tolerance, f"max abs difference {diff:.3g}: within {factor}x the tolerance {tolerance}"


_LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")


def diffusers_patched_at_step(pipe, lora_paths: dict, loras, step: int, **kwargs):
    """Diffusers (Euler) with a LoRA set loaded the usual way (`load_lora_weights`, `set_adapters`
    with the scales, `fuse_lora`), its text-encoder part in from the start and its UNet part in
    before step `step` (swapped in by `callback_on_step_end` after step `step - 1`): what a request
    reporting `lora_applied_at_step == step` must give. Step 0: plain load + fuse.

    Runs on `pipe`'s own modules and puts their original weights back afterwards (copied, never
    unfused by subtraction)."""
    modules = {c: getattr(pipe, c) for c in _LORA_COMPONENTS if getattr(pipe, c, None) is not None}
    pristine = {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in modules.items()}
    reference = pipe.__class__(**pipe.components)  # same modules, own scheduler
    reference.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    try:
        names = []
        for i, (lora_id, _) in enumerate(loras):
            reference.load_lora_weights(str(lora_paths[lora_id]), adapter_name=f"a{i}")
            names.append(f"a{i}")
        reference.set_adapters(names, adapter_weights=[scale for _, scale in loras])
        reference.fuse_lora(adapter_names=names)
        reference.unload_lora_weights()  # the fused weights stay; the adapter layers go
        fused_unet = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
        if step > 0:
            pipe.unet.load_state_dict(pristine["unet"])

        def patch(_pipe, i, _t, _callback_kwargs):
            if i == step - 1:
                pipe.unet.load_state_dict(fused_unet)
            return {}

        return reference(**kwargs, callback_on_step_end=patch).images
    finally:
        for component, module in modules.items():
            module.load_state_dict(pristine[component])


def diffusers_fused_latents(pipe, lora_paths: dict, loras, **kwargs):
    """The usual way: load_lora_weights + fuse_lora (Euler), the LoRA set in before step 0."""
    return diffusers_patched_at_step(pipe, lora_paths, loras, 0, **kwargs)
