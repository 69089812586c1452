"""LoRA deltas patched in place reproduce Diffusers' load_lora_weights + fuse_lora, and removal
restores the pristine weights bit-for-bit."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

from services.unet.pipeline import UNetPipeline
from swiftd import zoo
from swiftd.errors import FailedPrecondition
from swiftd.loading import load_pipeline
from swiftd.lora import LoraPatcher, extract_deltas
from swiftd.request import Request
from tests.reference import diffusers_fused_latents

TOLERANCE = 1e-4


def weights_digest(pipe) -> str:
    h = hashlib.sha256()
    for component in ("text_encoder", "text_encoder_2", "unet"):
        module = getattr(pipe, component, None)
        if module is not None:
            for name, param in sorted(module.named_parameters()):
                h.update(name.encode())
                h.update(param.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module", params=["tiny-sd15", "tiny-sdxl"])
def family(request, zoo_root):
    paths = zoo.zoo_paths(zoo_root, request.param)
    pipe = load_pipeline(paths.model)
    deltas = {lora_id: extract_deltas(pipe, path) for lora_id, path in paths.loras.items()}
    engine = UNetPipeline(pipe, load_lora=deltas.__getitem__)
    return paths, pipe, engine, deltas


CASES = {
    "peft": [("lora-peft-r4", 1.0)],
    "kohya-te-scaled": [("lora-kohya-r16-te", 0.7)],
    "kohya-conv": [("lora-kohya-r8-conv", 1.0)],
    "two-loras": [("lora-peft-r64", 0.5), ("lora-kohya-r16-te", 0.8)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_synchronous_patch_matches_diffusers_fuse(family, case):
    paths, pipe, engine, _ = family
    loras = [(f"{paths.family}-{suffix}", scale) for suffix, scale in CASES[case]]
    pristine = weights_digest(pipe)
    request = Request(
        "a photo of a cat", height=64, width=64, num_inference_steps=4, seed=2, scheduler="euler", loras=loras
    )
    ours = engine.generate(request).latents
    engine.lora_patcher.restore()
    assert weights_digest(pipe) == pristine
    reference = diffusers_fused_latents(
        pipe,
        paths.loras,
        loras,
        prompt="a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(2),
        output_type="latent",
    )
    diff = (ours - reference).abs().max().item()
    assert diff <= TOLERANCE, f"max abs difference {diff:.3g}"
    plain = engine.generate(
        Request("a photo of a cat", height=64, width=64, num_inference_steps=4, seed=2, scheduler="euler")
    ).latents
    assert (plain - ours).abs().max().item() > 100 * TOLERANCE, "the LoRA must change the output"


def test_random_apply_remove_sequence_restores_bit_identical(family):
    paths, pipe, _, deltas = family
    patcher = LoraPatcher(pipe)
    pristine = weights_digest(pipe)
    rng = random.Random(0)
    ids = list(deltas)
    for _ in range(100):
        if rng.random() < 0.3:
            patcher.restore()
        else:
            chosen = rng.sample(ids, rng.randint(1, 3))
            patcher.apply([(i, rng.uniform(-1.5, 1.5), deltas[i]) for i in chosen])
    patcher.restore()
    assert weights_digest(pipe) == pristine


def test_patch_keeps_parameter_storage(family):
    paths, pipe, _, deltas = family
    patcher = LoraPatcher(pipe)
    pointers = {n: p.data_ptr() for n, p in pipe.unet.named_parameters()}
    patcher.apply([(i, 1.0, d) for i, d in deltas.items()])
    assert {n: p.data_ptr() for n, p in pipe.unet.named_parameters()} == pointers
    patcher.restore()


def test_preparing_a_lora_leaves_the_pipeline_as_compiled_graphs_saw_it(zoo_root):
    """PEFT freezes the weights it wraps; a graph compiled before guards on requires_grad and would
    compile again (a minute on a GPU) after the first LoRA a worker prepares itself."""
    paths = zoo.zoo_paths(zoo_root, "tiny-sd15")
    pipe = load_pipeline(paths.model)
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    assert any(flags.values())
    extract_deltas(pipe, paths.loras["tiny-sd15-lora-peft-r64"])
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags


def test_lora_for_another_family_is_refused(zoo_root):
    sd15 = load_pipeline(zoo.zoo_paths(zoo_root, "tiny-sd15").model)
    before = weights_digest(sd15)
    sdxl_lora = zoo.zoo_paths(zoo_root, "tiny-sdxl").loras["tiny-sdxl-lora-peft-r4"]
    with pytest.raises(FailedPrecondition):
        extract_deltas(sd15, sdxl_lora)
    assert weights_digest(sd15) == before
