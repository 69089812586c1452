"""BAL quality: the image when a LoRA's UNet deltas land at step K instead of before step 0.

Runs in-process on the bench model: the deltas are handed to the worker's inbox at the end of
step K-1 (as if they arrived then), so the engine patches them in at the boundary before step K.
"""

from __future__ import annotations

import torch

from bench.scenarios import GUIDANCE_SCALE, NEGATIVE_PROMPT, PROMPT, SEED
from services.unet.lora_inbox import LoraInbox
from services.unet.pipeline import UNetPipeline
from swiftd import zoo
from swiftd.loading import load_pipeline
from swiftd.lora import extract_deltas, prepare_deltas
from swiftd.request import Request


def images_by_arrival_step(
    zoo_root, family: str, lora_id: str, size: int, steps: int, arrival_steps: list[int]
) -> dict:
    """{K: PIL image} for the LoRA's UNet deltas arriving just before step K (0 = synchronous)."""
    torch.set_num_threads(1)
    pipe = load_pipeline(zoo.zoo_paths(zoo_root, family).model)
    deltas = prepare_deltas(extract_deltas(pipe, zoo.zoo_paths(zoo_root, family).loras[lora_id]), 1.0, torch.float32)
    items = list(deltas.items())
    first_unet = next(i for i, (name, _) in enumerate(items) if name.startswith("unet."))
    images = {}
    for k in arrival_steps:
        inbox = LoraInbox(budget_bytes=1 << 40, dtype=torch.float32, base_model_id=family, wait_timeout=600)
        engine = UNetPipeline(pipe, lora_inbox=inbox)
        inbox.put(lora_id, 1.0, items[: first_unet + 1], last=False)  # text encoder part: before encoding
        if k == 0:
            inbox.put(lora_id, 1.0, items[first_unet + 1 :], last=True)

        def on_step(i, total, latents, k=k, inbox=inbox):
            if i == k - 1:
                inbox.put(lora_id, 1.0, items[first_unet + 1 :], last=True)

        request = Request(
            PROMPT,
            NEGATIVE_PROMPT,
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            seed=SEED,
            scheduler="euler",
            loras=[(lora_id, 1.0)],
            lora_bound_steps=steps,
        )
        result = engine.generate(request, on_step=on_step)
        engine.lora_patcher.restore()
        assert result.lora_applied_at_step == k, (k, result.lora_applied_at_step)
        images[k] = result.image
    return images
