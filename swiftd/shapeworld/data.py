"""Training and held-out data of the shape world.

Scenes are drawn from seeded generators, so a batch is a function of (seed, step) and a resumed
run sees the same data as an uninterrupted one. Prompts are split by the caption's CRC: one in
HELD_OUT_MODULUS captions never appears in training, and the held-out prompts of the quality figures
are drawn from those, so the figures measure generalisation to unseen combinations.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import numpy as np

from swiftd.shapeworld.render import edge_map, render
from swiftd.shapeworld.scene import Scene

HELD_OUT_MODULUS = 8
IMAGE_SIZE = 64


def is_held_out(caption: str) -> bool:
    return zlib.crc32(caption.encode()) % HELD_OUT_MODULUS == 0


def sample_scenes(rng: random.Random, count: int, held_out: bool = False) -> list[Scene]:
    scenes: list[Scene] = []
    while len(scenes) < count:
        scene = Scene.sample(rng)
        if is_held_out(scene.caption()) == held_out:
            scenes.append(scene)
    return scenes


def held_out_scenes(count: int = 200, seed: int = 2026) -> list[Scene]:
    """The held-out prompts of the quality figures: captions no training batch contains."""
    return sample_scenes(random.Random(seed), count, held_out=True)


@dataclass
class Batch:
    scenes: list[Scene]
    captions: list[str]
    images: np.ndarray  # (n, 3, H, W) float32 in [-1, 1], as the VAE takes them

    def edges(self) -> np.ndarray:
        """(n, 3, H, W) float32 in [0, 1], as a ControlNet takes its hint (only its stage asks)."""
        return np.stack([edge_map(s, IMAGE_SIZE) for s in self.scenes]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def to_model_range(images: list[np.ndarray]) -> np.ndarray:
    return np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def training_batch(seed: int, step: int, size: int, style: str | None = None) -> Batch:
    """Batch `step` of a run seeded `seed`: training captions only."""
    rng = random.Random(zlib.crc32(f"{seed}/{step}".encode()))
    scenes = sample_scenes(rng, size)
    return Batch(
        scenes=scenes,
        captions=[s.caption() for s in scenes],
        images=to_model_range([render(s, IMAGE_SIZE, style=style) for s in scenes]),
    )
