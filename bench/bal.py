"""BAL quality: the image when a LoRA's UNet deltas land at step K instead of before step 0.

Runs in-process on the worker's own engine (`UNetPipeline`): the deltas are handed to its inbox at
the end of step K-1 (as if they arrived then), so the engine patches them in at the boundary
before step K. This is the worst case bounded asynchronous loading allows with bound K; over the
services, deltas land whenever they arrive (usually before step 0).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import PIL.Image
import torch

from bench.scenarios import GUIDANCE_SCALE, NEGATIVE_PROMPT, PROMPT, SEED
from services.unet.lora_inbox import LoraInbox
from services.unet.pipeline import UNetPipeline
from swiftd import zoo
from swiftd.loading import load_pipeline
from swiftd.lora import extract_deltas, prepare_deltas
from swiftd.request import Request

Deltas = list[tuple[str, torch.Tensor]]


def lora_deltas(pipe, lora_path: Path, scale: float = 1.0) -> Deltas:
    """The LoRA file's deltas for `pipe`, prepared at `scale`, in the order the store sends them
    (text encoder first)."""
    return list(prepare_deltas(extract_deltas(pipe, lora_path), scale, pipe.unet.dtype).items())


def image_with_arrival_at(pipe, lora_id: str, deltas: Deltas, request: Request, k: int) -> PIL.Image.Image:
    """`request` with the LoRA (deltas at scale 1) whose UNet deltas arrive just before step `k`
    (0: before the loop, synchronous); the pipeline's weights are restored afterwards."""
    inbox = LoraInbox(budget_bytes=1 << 40, dtype=pipe.unet.dtype, base_model_id="", wait_timeout=600)
    engine = UNetPipeline(pipe, lora_inbox=inbox)
    first_unet = next(i for i, (name, _) in enumerate(deltas) if name.startswith("unet."))
    inbox.put(lora_id, 1.0, deltas[: first_unet + 1], last=False)  # text encoder part: before encoding
    if k == 0:
        inbox.put(lora_id, 1.0, deltas[first_unet + 1 :], last=True)

    def on_step(i, total, latents):
        if i == k - 1:
            inbox.put(lora_id, 1.0, deltas[first_unet + 1 :], last=True)

    request = replace(request, loras=[(lora_id, 1.0)], lora_bound_steps=request.num_inference_steps)
    result = engine.generate(request, on_step=on_step)
    engine.lora_patcher.restore()
    if result.lora_applied_at_step != k:
        raise RuntimeError(f"deltas meant for step {k} were applied at step {result.lora_applied_at_step}")
    return result.image


def images_by_arrival_step(
    zoo_root, family: str, lora_id: str, size: int, steps: int, arrival_steps: list[int]
) -> dict:
    """{K: PIL image} of the bench prompt with the zoo LoRA's UNet deltas arriving just before step K."""
    torch.set_num_threads(1)
    paths = zoo.zoo_paths(zoo_root, family)
    pipe = load_pipeline(paths.model)
    deltas = lora_deltas(pipe, paths.loras[lora_id])
    request = Request(
        PROMPT,
        NEGATIVE_PROMPT,
        width=size,
        height=size,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE_SCALE,
        seed=SEED,
        scheduler="euler",
    )
    return {k: image_with_arrival_at(pipe, lora_id, deltas, request, k) for k in arrival_steps}
