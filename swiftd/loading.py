"""Loading base pipelines and ControlNets from local checkpoints, never from a hub.

A model repository is laid out as

    <root>/models/<model_id>/             Diffusers pipeline folder (model_index.json, unet/, vae/, ...)
    <root>/models/<model_id>.safetensors  or a single-file (A1111/LDM) checkpoint, whose Diffusers
                                          config folder is <root>/models/<model_id>/ or given explicitly
    <root>/controlnets/<controlnet_id>/   ControlNetModel folder (or <controlnet_id>.safetensors)
    <root>/loras/<lora_id>.safetensors    LoRA file (Diffusers/PEFT or kohya/A1111 keys)

The zoo (`python -m swiftd.zoo build`) writes this layout; real SD1.5/SDXL checkpoints placed the
same way load with the same code. Ids are names, never paths: `resolve` refuses anything that
would leave the root.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from swiftd.errors import InvalidArgument, NotFound
from swiftd.request import FAMILY_SD15, FAMILY_SDXL, WIRE_DTYPES, check_id

log = logging.getLogger(__name__)

# Serving dtypes by the names the services' --dtype flags take: the float dtypes of the wire.
DTYPES = {name: getattr(torch, name) for name in WIRE_DTYPES}

_PIPELINE_CLASSES = {FAMILY_SD15: StableDiffusionPipeline, FAMILY_SDXL: StableDiffusionXLPipeline}
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def resolve(root: Path, section: str, item_id: str, field: str) -> Path:
    """The folder or single file for `item_id` under `root/section`, or NotFound."""
    check_id(field, item_id)
    base = Path(root) / section
    folder = base / item_id
    if folder.is_dir():
        return folder
    for suffix in _SINGLE_FILE_SUFFIXES:
        if (base / f"{item_id}{suffix}").is_file():
            return base / f"{item_id}{suffix}"
    raise NotFound(field, item_id)


def list_ids(root: Path, section: str) -> list[str]:
    base = Path(root) / section
    if not base.is_dir():
        return []
    ids = {p.name if p.is_dir() else p.stem for p in base.iterdir() if p.is_dir() or p.suffix in _SINGLE_FILE_SUFFIXES}
    return sorted(ids)


def pipeline_family(config_folder: Path) -> str:
    """'sd15' or 'sdxl', from the pipeline folder's model_index.json."""
    index = json.loads((Path(config_folder) / "model_index.json").read_text())
    name = index.get("_class_name", "")
    if "XL" in name:
        return FAMILY_SDXL
    if name.startswith("StableDiffusion"):
        return FAMILY_SD15
    raise InvalidArgument("model_id", f"unsupported pipeline class {name!r} in {config_folder}")


def controlnet_family(path: Path) -> str:
    """'sd15' or 'sdxl' for a ControlNet folder (from its config.json); '' when it cannot tell."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return ""  # a single-file ControlNet: its family is only known once loaded
    settings = json.loads(config.read_text())
    return FAMILY_SDXL if settings.get("addition_embed_type") == "text_time" else FAMILY_SD15


def load_pipeline(
    path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", config: Path | None = None
) -> DiffusionPipeline:
    """Load an SD1.5/SDXL pipeline from a Diffusers folder or a single-file checkpoint.

    For a single file, `config` is the Diffusers folder describing its architecture (defaults to
    the folder of the same name beside the file); nothing is fetched from a hub.
    """
    path = Path(path)
    if path.is_dir():
        cls = _PIPELINE_CLASSES[pipeline_family(path)]
        kwargs = {"safety_checker": None, "feature_extractor": None} if cls is StableDiffusionPipeline else {}
        pipe = cls.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
    else:
        config = Path(config) if config else path.with_suffix("")
        if not (config / "model_index.json").is_file():
            raise NotFound("config", f"{config} (a single-file checkpoint needs its Diffusers config folder)")
        cls = _PIPELINE_CLASSES[pipeline_family(config)]
        pipe = cls.from_single_file(str(path), config=str(config), dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_controlnet(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ControlNetModel:
    path = Path(path)
    if path.is_dir():
        model = ControlNetModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    else:
        model = ControlNetModel.from_single_file(str(path), dtype=dtype, local_files_only=True)
    return model.to(device).eval()
