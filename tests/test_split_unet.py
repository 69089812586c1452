"""The split UNet and our denoising loop reproduce Diffusers' pipelines (fp32, same seed).

Bound: latents within 1e-4 max abs difference of `StableDiffusion(XL)Pipeline` and
`StableDiffusion(XL)ControlNetPipeline` (one ControlNet, and MultiControlNet for two).
"""

from __future__ import annotations

import pytest
import torch

from swiftd.request import ControlNet, Request
from swiftd.split_unet import SplitUNet
from tests.reference import SIZE, STEPS, TOLERANCE, assert_close, conditioning_image


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
        added = {
            "text_embeds": torch.randn(2, fam.pipe.text_encoder_2.config.projection_dim, generator=gen),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    t = torch.tensor(421)
    with torch.no_grad():
        encoded = split.encoder_half(sample, t, hidden, added.get("text_embeds"), added.get("time_ids"))
        down = tuple(torch.randn(r.shape, generator=gen) * 0.1 for r in encoded.down_block_res_samples)
        mid = torch.randn(encoded.sample.shape, generator=gen) * 0.1
        ours = split.decoder_half(encoded, down, mid)
        reference = unet(
            sample,
            t,
            hidden,
            added_cond_kwargs=added or None,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        plain = split(sample, t, hidden, added.get("text_embeds"), added.get("time_ids"))
        plain_reference = unet(sample, t, hidden, added_cond_kwargs=added or None).sample
    assert torch.equal(ours, reference)
    assert torch.equal(plain, plain_reference)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m", "euler_a"])
def test_sd15_text_to_image_matches_diffusers(sd15, scheduler):
    ours = sd15.engine.generate(
        Request("a photo of a cat", height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=7, scheduler=scheduler)
    )
    reference = sd15.diffusers_latents(
        scheduler, [], prompt="a photo of a cat", guidance_scale=7.5, generator=torch.Generator().manual_seed(7)
    )
    assert_close(ours.latents, reference)
    assert ours.image.size == (SIZE, SIZE)


def test_sd15_without_cfg_matches_diffusers(sd15):
    ours = sd15.engine.generate(
        Request(
            "a red horse",
            guidance_scale=1.0,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            seed=3,
            scheduler="ddim",
        )
    )
    reference = sd15.diffusers_latents(
        "ddim", [], prompt="a red horse", guidance_scale=1.0, generator=torch.Generator().manual_seed(3)
    )
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
        ControlNet(fam.ids[i], conditioning_image(i), scale, start, end, guess_mode=guess)
        for i, (scale, start, end) in enumerate(specs)
    ]
    ours = fam.engine.generate(
        Request(
            "an astronaut riding a horse",
            guidance_scale=guidance,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            seed=11,
            scheduler="euler",
            controlnets=controlnets,
        )
    )
    reference = fam.diffusers_latents(
        "euler",
        controlnets,
        guess_mode=guess,
        prompt="an astronaut riding a horse",
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(11),
    )
    assert_close(ours.latents, reference)
    # The ControlNets must matter, or this test would prove nothing.
    plain = fam.engine.generate(
        Request(
            "an astronaut riding a horse",
            guidance_scale=guidance,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            seed=11,
            scheduler="euler",
        )
    )
    assert (plain.latents - ours.latents).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_sdxl_text_to_image_matches_diffusers(sdxl, scheduler):
    ours = sdxl.engine.generate(
        Request("a cat in space", height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=5, scheduler=scheduler)
    )
    reference = sdxl.diffusers_latents(
        scheduler, [], prompt="a cat in space", guidance_scale=7.5, generator=torch.Generator().manual_seed(5)
    )
    assert_close(ours.latents, reference)


def test_hint_embedding_cached_once_per_request(sd15):
    """The ControlNet's hint encoder runs once per request, not once per step."""
    controlnet = sd15.controlnets[sd15.ids[0]]
    calls = []
    handle = controlnet.controlnet_cond_embedding.register_forward_hook(lambda *a: calls.append(1))
    try:
        sd15.engine.generate(
            Request(
                "a cat",
                height=SIZE,
                width=SIZE,
                num_inference_steps=STEPS,
                seed=1,
                controlnets=[ControlNet(sd15.ids[0], conditioning_image(0))],
            )
        )
    finally:
        handle.remove()
    assert len(calls) == 1
