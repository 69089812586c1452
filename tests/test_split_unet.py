"""The split UNet and our denoising loop reproduce Diffusers' pipelines (fp32, same seed).

Bound: latents within 1e-4 max abs difference of `StableDiffusion(XL)Pipeline` and
`StableDiffusion(XL)ControlNetPipeline` (one ControlNet, and MultiControlNet for two).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    MultiControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)

from services.unet.engine import ControlNetRequest, DenoisingEngine, GenerationRequest
from swiftd import zoo
from swiftd.controlnet_step import ControlNetStepper
from swiftd.loading import load_controlnet, load_pipeline
from swiftd.split_unet import SplitUNet

TOLERANCE = 1e-4
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
        self.engine = DenoisingEngine(self.pipe, load_controlnet=lambda cid: ControlNetStepper(self.controlnets[cid]))
        self.is_sdxl = paths.kind == "sdxl"

    def diffusers_latents(self, scheduler, controlnets: list[ControlNetRequest], guess_mode=False, **kwargs):
        """The same request through Diffusers' own pipeline, the usual way."""
        kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent", **kwargs)
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
        pipe.scheduler = self.engine._make_scheduler(scheduler)
        return pipe(**kwargs).images


@pytest.fixture(scope="module")
def sd15(zoo_root):
    return Family(zoo_root, "tiny-sd15")


@pytest.fixture(scope="module")
def sdxl(zoo_root):
    return Family(zoo_root, "tiny-sdxl")


def assert_close(ours, reference):
    assert ours.shape == reference.shape
    assert torch.isfinite(ours).all()
    diff = (ours - reference).abs().max().item()
    assert diff <= TOLERANCE, f"max abs difference {diff:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_split_unet_forward_equals_unet(family, request):
    fam = request.getfixturevalue(family)
    unet = fam.pipe.unet
    split = SplitUNet(unet)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=gen)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    added = {}
    if fam.is_sdxl:
        added = {"text_embeds": torch.randn(2, fam.pipe.text_encoder_2.config.projection_dim, generator=gen),
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}  # fmt: skip
    t = torch.tensor(421)
    with torch.no_grad():
        encoded = split.encoder_half(sample, t, hidden, added.get("text_embeds"), added.get("time_ids"))
        down = tuple(torch.randn(r.shape, generator=gen) * 0.1 for r in encoded.down_block_res_samples)
        mid = torch.randn(encoded.sample.shape, generator=gen) * 0.1
        ours = split.decoder_half(encoded, down, mid)
        reference = unet(sample, t, hidden, added_cond_kwargs=added or None,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid).sample  # fmt: skip
        plain = split(sample, t, hidden, added.get("text_embeds"), added.get("time_ids"))
        plain_reference = unet(sample, t, hidden, added_cond_kwargs=added or None).sample
    assert torch.equal(ours, reference)
    assert torch.equal(plain, plain_reference)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m", "euler_a"])
def test_sd15_text_to_image_matches_diffusers(sd15, scheduler):
    ours = sd15.engine.generate(GenerationRequest("a photo of a cat", height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=7, scheduler=scheduler))
    reference = sd15.diffusers_latents(scheduler, [], prompt="a photo of a cat", guidance_scale=7.5, generator=torch.Generator().manual_seed(7))
    assert_close(ours.latents, reference)
    assert ours.image.size == (SIZE, SIZE)


def test_sd15_without_cfg_matches_diffusers(sd15):
    ours = sd15.engine.generate(GenerationRequest("a red horse", guidance_scale=1.0, height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=3, scheduler="ddim"))
    reference = sd15.diffusers_latents("ddim", [], prompt="a red horse", guidance_scale=1.0, generator=torch.Generator().manual_seed(3))
    assert_close(ours.latents, reference)


CONTROLNET_CASES = {
    # name: (scales and windows per ControlNet, guidance_scale, guess_mode)
    "one": ([(1.0, 0.0, 1.0)], 7.5, False),
    "one-scaled-window-no-cfg": ([(0.6, 0.2, 0.8)], 1.0, False),
    "two": ([(0.8, 0.0, 0.6), (0.5, 0.4, 1.0)], 7.5, False),
    "two-guess-mode": ([(1.0, 0.0, 1.0), (0.7, 0.0, 1.0)], 7.5, True),
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("case", list(CONTROLNET_CASES))
def test_controlnet_matches_diffusers(family, case, request):
    fam = request.getfixturevalue(family)
    specs, guidance, guess = CONTROLNET_CASES[case]
    controlnets = [
        ControlNetRequest(fam.ids[i], conditioning_image(i), scale, start, end, guess_mode=guess)
        for i, (scale, start, end) in enumerate(specs)
    ]
    ours = fam.engine.generate(GenerationRequest(
        "an astronaut riding a horse", guidance_scale=guidance, height=SIZE, width=SIZE,
        num_inference_steps=STEPS, seed=11, scheduler="euler", controlnets=controlnets,
    ))  # fmt: skip
    reference = fam.diffusers_latents(
        "euler", controlnets, guess_mode=guess, prompt="an astronaut riding a horse",
        guidance_scale=guidance, generator=torch.Generator().manual_seed(11),
    )  # fmt: skip
    assert_close(ours.latents, reference)
    # The ControlNets must matter, or this test would prove nothing.
    plain = fam.engine.generate(GenerationRequest(
        "an astronaut riding a horse", guidance_scale=guidance, height=SIZE, width=SIZE,
        num_inference_steps=STEPS, seed=11, scheduler="euler",
    ))  # fmt: skip
    assert (plain.latents - ours.latents).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_sdxl_text_to_image_matches_diffusers(sdxl, scheduler):
    ours = sdxl.engine.generate(GenerationRequest("a cat in space", height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=5, scheduler=scheduler))
    reference = sdxl.diffusers_latents(scheduler, [], prompt="a cat in space", guidance_scale=7.5, generator=torch.Generator().manual_seed(5))
    assert_close(ours.latents, reference)


def test_hint_embedding_cached_once_per_request(sd15):
    """The ControlNet's hint encoder runs once per request, not once per step."""
    controlnet = sd15.controlnets[sd15.ids[0]]
    calls = []
    handle = controlnet.controlnet_cond_embedding.register_forward_hook(lambda *a: calls.append(1))
    try:
        sd15.engine.generate(GenerationRequest(
            "a cat", height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=1,
            controlnets=[ControlNetRequest(sd15.ids[0], conditioning_image(0))],
        ))  # fmt: skip
    finally:
        handle.remove()
    assert len(calls) == 1
