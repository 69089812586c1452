"""Scoring what training produced, on held-out prompts: the VAE's reconstructions and generated images.

    python -m swiftd.shapeworld evaluate --root weights [--count 50] [--controlnet] [--lora outline]

Generation goes through Diffusers' own pipelines on the exported model root (the reference every
fast path of the suite is compared with); the suite's figures are in `make bench ONLY=quality`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from swiftd.shapeworld.data import IMAGE_SIZE, held_out_scenes, to_model_range
from swiftd.shapeworld.render import edge_map, render
from swiftd.shapeworld.scene import Scene
from swiftd.shapeworld.score import score

GUIDANCE_SCALE = 4.0
STEPS = 20


@dataclass
class Scores:
    prompt_adherence: float
    control_iou: float | None
    style_hit: dict[str, float]  # style -> share of images showing it

    def describe(self) -> str:
        parts = [f"prompt adherence {self.prompt_adherence:.3f}"]
        if self.control_iou is not None:
            parts.append(f"control IoU {self.control_iou:.3f}")
        parts += [f"{name} {share:.2f}" for name, share in self.style_hit.items()]
        return ", ".join(parts)


def summarise(images: list[np.ndarray], scenes: list[Scene], controls: list[np.ndarray] | None = None) -> Scores:
    verdicts = [
        score(image, scene, None if controls is None else control)
        for image, scene, control in zip(images, scenes, controls or [None] * len(scenes))
    ]
    return Scores(
        prompt_adherence=statistics.mean(v.prompt_adherence for v in verdicts),
        control_iou=None if controls is None else statistics.mean(v.control_iou for v in verdicts),
        style_hit={name: statistics.mean(v.style[name] for v in verdicts) for name in verdicts[0].style},
    )


def reconstructions(vae, scenes: list[Scene], style: str | None = None) -> list[np.ndarray]:
    """The scenes rendered, encoded and decoded by the VAE: what the UNet can at best produce."""
    images = torch.from_numpy(to_model_range([render(s, IMAGE_SIZE, style=style) for s in scenes]))
    with torch.no_grad():
        decoded = vae.decode(vae.encode(images).latent_dist.mean).sample
    return [_to_uint8(image) for image in decoded]


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def generate(pipe, scenes: list[Scene], seed: int = 0, controls: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """One image per scene from its caption, seed `seed + i`, at 64x64 (and its hint, if given)."""
    images = []
    for i, scene in enumerate(scenes):
        kwargs = {}
        if controls is not None:
            kwargs["image"] = torch.from_numpy(controls[i]).permute(2, 0, 1)[None].float() / 255.0
        out = pipe(
            scene.caption(),
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE_SCALE,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            generator=torch.Generator().manual_seed(seed + i),
            output_type="np",
            **kwargs,
        ).images[0]
        images.append((out * 255).round().astype(np.uint8))
    return images


def evaluate(root: Path, count: int = 50, controlnet: bool = False, lora: str | None = None) -> Scores:
    """Diffusers on the model root `root`: `count` held-out prompts, with the edges ControlNet
    and/or a LoRA style if asked."""
    from diffusers import (
        ControlNetModel,
        EulerDiscreteScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    from swiftd.shapeworld.export import CONTROLNET_ID, lora_id
    from swiftd.shapeworld.models import FAMILY

    scenes = held_out_scenes(count)
    model = root / "models" / FAMILY
    controls = [edge_map(s, IMAGE_SIZE) for s in scenes] if controlnet else None
    if controlnet:
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            model, controlnet=ControlNetModel.from_pretrained(root / "controlnets" / CONTROLNET_ID), safety_checker=None
        )
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(root / "loras", weight_name=f"{lora_id(lora, 'peft')}.safetensors")
    return summarise(generate(pipe, scenes, controls=controls), scenes, controls)
