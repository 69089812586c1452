"""Writing trained shapes-sd15 as a model root, the layout the services load any checkpoint from:

<out>/models/shapes-sd15/                          Diffusers pipeline folder
<out>/controlnets/shapes-sd15-cn-edges/            ControlNetModel folder
<out>/loras/shapes-sd15-lora-<style>-peft.safetensors    Diffusers/PEFT format
<out>/loras/shapes-sd15-lora-<style>-kohya.safetensors   kohya format (alpha = rank)
<out>/TRAINING.json                                what trained them: steps, time, device, code version
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from swiftd.shapeworld.models import CAPTION_WORDS, FAMILY, SPEC, fresh_components, new_controlnet
from swiftd.shapeworld.render import STYLES

CONTROLNET_ID = f"{FAMILY}-cn-edges"
# The files that decide what training produces; their hash is the training code's version.
TRAINING_CODE = ("scene.py", "render.py", "data.py", "models.py", "train.py")


def lora_id(style: str, fmt: str) -> str:
    return f"{FAMILY}-lora-{style}-{fmt}"


def training_code_version() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join((here / name).read_bytes() for name in TRAINING_CODE))
    return digest.hexdigest()[:16]


def export(work: Path, out: Path, dtype: torch.dtype = torch.float16) -> dict:
    """Everything trained in `work` written under `out`, the UNet, VAE, ControlNet and LoRAs in
    `dtype` (float16 by default: half the bytes to commit; Diffusers and the services load them in
    the serving dtype); returns the TRAINING.json content."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from swiftd.shapeworld.train import LoRA, load_stage
    from swiftd.zoo.files import save_safetensors, write_json
    from swiftd.zoo.loras import kohya_unet_name
    from swiftd.zoo.models import write_pipeline

    parts = fresh_components()
    stages = {
        "vae": load_stage(parts, work / "vae.pt", ("vae",)),
        "unet": load_stage(parts, work / "unet.pt", ("unet", "text_encoder")),
    }
    # The text encoder stays float32 (0.6 MB): transformers loads a checkpoint in its stored dtype,
    # Diffusers' models in float32, and a pipeline of mixed dtypes is not what a user expects.
    for name in ("unet", "vae"):
        parts[name].to(dtype)
    parts["scheduler"] = PNDMScheduler(**{k: v for k, v in SPEC.scheduler.items() if not k.startswith("_")})
    write_pipeline(SPEC, parts, out / "models" / FAMILY, tokenizer_words=CAPTION_WORDS)

    if (work / "controlnet.pt").exists():
        parts["controlnet"] = new_controlnet(parts["unet"])
        stages["controlnet"] = load_stage(parts, work / "controlnet.pt", ("controlnet",))
        parts["controlnet"].to(dtype).save_pretrained(out / "controlnets" / CONTROLNET_ID)

    for style in STYLES:
        if not (work / f"lora-{style}.pt").exists():
            continue
        parts["lora"] = LoRA(parts["unet"])
        stages[f"lora-{style}"] = load_stage(parts, work / f"lora-{style}.pt", ("lora",))
        layers = {name: (down.to(dtype), up.to(dtype)) for name, (down, up) in parts["lora"].layers().items()}
        peft = {}
        kohya = {}
        for name, (down, up) in layers.items():
            peft[f"{name}.lora_A.weight"] = down.contiguous()
            peft[f"{name}.lora_B.weight"] = up.contiguous()
            kohya_name = kohya_unet_name(name, SPEC)
            kohya[f"{kohya_name}.lora_down.weight"] = down.contiguous()
            kohya[f"{kohya_name}.lora_up.weight"] = up.contiguous()
            kohya[f"{kohya_name}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: scale 1
        (out / "loras").mkdir(parents=True, exist_ok=True)
        StableDiffusionPipeline.save_lora_weights(
            out / "loras", unet_lora_layers=peft, weight_name=f"{lora_id(style, 'peft')}.safetensors"
        )
        rank = str(next(iter(layers.values()))[0].shape[0])
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": rank, "ss_network_alpha": rank}
        save_safetensors(kohya, out / "loras" / f"{lora_id(style, 'kohya')}.safetensors", meta)

    summary = {
        "family": FAMILY,
        "training_code_version": training_code_version(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "stages": {
            name: {
                **{k: v for k, v in s["config"].items() if k != "steps"},
                "steps": s["step"],  # trained; the learning-rate schedule ran over schedule_steps
                "schedule_steps": s["config"]["steps"],
                "minutes": round(s["seconds"] / 60, 1),
                "device": s["device"],
                "trained_against_steps": s.get("trained_against", {}),
            }
            for name, s in stages.items()
        },
    }
    write_json(out / "TRAINING.json", summary)
    return summary
