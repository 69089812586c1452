"""A model root for tests that need a LoRA the store lists but cannot prepare."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

BOGUS = "tiny-sd15-lora-bogus-key"


def make_root(zoo_root, path):
    """A model root: the zoo's base models and ControlNets (linked), copies of its tiny LoRAs, and
    one sd15 LoRA with a target that exists in no model (the store refuses to prepare it)."""
    (path / "loras").mkdir(parents=True)
    for section in ("models", "controlnets"):
        (path / section).symlink_to((zoo_root / section).resolve())
    for lora in sorted((zoo_root / "loras").glob("tiny-*.safetensors")):
        shutil.copy(lora, path / "loras" / lora.name)
    state = load_file(zoo_root / "loras" / "tiny-sd15-lora-kohya-r8-conv.safetensors")
    state["lora_unet_nonexistent_layer.lora_down.weight"] = torch.randn(8, 32)
    state["lora_unet_nonexistent_layer.lora_up.weight"] = torch.randn(32, 8)
    state["lora_unet_nonexistent_layer.alpha"] = torch.tensor(4.0)
    save_file(state, path / "loras" / f"{BOGUS}.safetensors")
    return path
