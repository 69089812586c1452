"""Add-ons of a request (ControlNet, LoRA): each one implementation of `AddOn`."""

from services.unet.addons.base import AddOn
from services.unet.addons.controlnet import ControlNetAddOn
from services.unet.addons.lora import LoraAddOn

__all__ = ["AddOn", "ControlNetAddOn", "LoraAddOn"]
