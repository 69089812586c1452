"""The split UNet and our denoising loop reproduce Diffusers' pipelines (fp32, same seed).

Bound: latents within 1e-4 max abs difference of `StableDiffusion(XL)Pipeline` and
`StableDiffusion(XL)ControlNetPipeline` (one ControlNet, and MultiControlNet for two), for every
scheduler of the public enum and the model's own. In process on CPU every case here is moreover
bit-identical (the same operations in the same order), and the tests assert it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from swiftd.request import ControlNet, Request, scheduler_names
from swiftd.split_unet import SplitUNet
from tests.reference import (
    SIZE,
    STEPS,
    assert_bit_identical,
    assert_far,
    conditioning_image,
)


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


# Every scheduler of the public enum, plus the model's own ("": sd15's config names PNDM, sdxl's
# Euler), for both families, without and with one ControlNet.
SCHEDULER_CASES = [*scheduler_names(), ""]
PROMPT = "a cat in space"


@pytest.fixture(scope="module")
def runs(request):
    """Memoised runs of one request per (family, scheduler, with a ControlNet): ours and Diffusers'."""
    cache = {}

    def get(family: str, scheduler: str, controlnet: bool, which: str) -> torch.Tensor:
        key = (family, scheduler, controlnet, which)
        if key not in cache:
            fam = request.getfixturevalue(family)
            controlnets = [ControlNet(fam.ids[0], conditioning_image(0))] if controlnet else []
            if which == "ours":
                cache[key] = fam.engine.generate(
                    Request(
                        PROMPT,
                        height=SIZE,
                        width=SIZE,
                        num_inference_steps=STEPS,
                        seed=5,
                        scheduler=scheduler,
                        controlnets=controlnets,
                    )
                ).latents
            else:
                cache[key] = fam.diffusers_latents(
                    scheduler,
                    controlnets,
                    prompt=PROMPT,
                    guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(5),
                )
        return cache[key]

    return get


def case_id(scheduler: str) -> str:
    return scheduler or "model-default"


@pytest.mark.parametrize("controlnet", [False, True], ids=["plain", "controlnet"])
@pytest.mark.parametrize("scheduler", SCHEDULER_CASES, ids=case_id)
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_scheduler_matches_diffusers(runs, family, scheduler, controlnet):
    ours = runs(family, scheduler, controlnet, "ours")
    reference = runs(family, scheduler, controlnet, "diffusers")
    assert_bit_identical(ours, reference)
    if controlnet:  # negative control: without its residuals the same request fails the tolerance
        assert_far(runs(family, scheduler, False, "diffusers"), reference)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_schedulers_are_distinguishable_at_the_tolerance(runs, family):
    """Negative control for the matrix: another scheduler's result fails the tolerance, so
    passing it says the right scheduler ran; the model's own is exactly the one its config names."""
    names = scheduler_names()
    for a in names:
        for b in names:
            if a < b:
                assert_far(runs(family, a, False, "diffusers"), runs(family, b, False, "diffusers"))
    own = {"sd15": "pndm", "sdxl": "euler"}[family]
    assert torch.equal(runs(family, "", False, "diffusers"), runs(family, own, False, "diffusers"))


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
    assert_bit_identical(ours.latents, reference)
    assert ours.image.size == (SIZE, SIZE)


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
    request = Request(
        "an astronaut riding a horse",
        guidance_scale=guidance,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        seed=11,
        scheduler="euler",
        controlnets=controlnets,
    )
    ours = fam.engine.generate(request)
    reference = fam.diffusers_latents(
        "euler",
        controlnets,
        guess_mode=guess,
        prompt="an astronaut riding a horse",
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(11),
    )
    assert_bit_identical(ours.latents, reference)
    # The ControlNets must matter, or this test would prove nothing.
    plain = fam.engine.generate(replace(request, controlnets=[]))
    assert_far(plain.latents, ours.latents)


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
