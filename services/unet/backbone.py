"""The backbone a UNet worker runs its steps on: eager modules or compiled artifacts.

Both implement the same small interface, chosen once at start-up (`services/unet/__main__.py`):
the UNet as two halves (encoder half: down and mid blocks; decoder half: up blocks, with
ControlNet residuals as inputs), the VAE decoder, ControlNet steppers for in-process ControlNets,
and `refresh`, called after every weight patch, so that nothing derived from a weight is stale.
"""

from __future__ import annotations

from typing import Protocol

import torch
from diffusers import DiffusionPipeline

from swiftd.controlnet_step import ControlNetStepper
from swiftd.split_unet import SplitUNet


class Backbone(Protocol):
    def split_unet(self) -> SplitUNet:
        """The UNet's `encoder_half` and `decoder_half` (compiled: same call signatures)."""

    def vae_decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """`vae.decode(latents, return_dict=False)[0]`."""

    def refresh(self) -> int:
        """Recompute what derives from weights a patch changed; returns how many constants."""

    def controlnet_stepper(self, controlnet) -> ControlNetStepper:
        """What runs an in-process ControlNet's steps."""


class EagerBackbone:
    """The pipeline's own modules, run as they are."""

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe

    def split_unet(self) -> SplitUNet:
        return SplitUNet(self.pipe.unet)

    def vae_decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents, return_dict=False)[0]

    def refresh(self) -> int:
        return 0  # eager modules read their weights at every call

    def controlnet_stepper(self, controlnet) -> ControlNetStepper:
        return ControlNetStepper(controlnet)
