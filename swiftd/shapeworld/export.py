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

from swiftd.shapeworld.models import CAPTION_WORDS, FAMILY, SPEC, fresh_components
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


def export(work: Path, out: Path) -> dict:
    """Everything trained in `work` written under `out`; returns the TRAINING.json content."""
    from diffusers import ControlNetModel, PNDMScheduler, StableDiffusionPipeline

    from swiftd.shapeworld.train import LoRA
    from swiftd.zoo.files import save_safetensors, write_json
    from swiftd.zoo.loras import kohya_unet_name
    from swiftd.zoo.models import write_pipeline

    def state(stage):
        return torch.load(work / f"{stage}.pt", map_location="cpu", weights_only=False)

    parts = fresh_components()
    vae_state, unet_state = state("vae"), state("unet")
    parts["vae"].load_state_dict(vae_state["modules"]["vae"])
    parts["vae"].register_to_config(scaling_factor=vae_state["scaling_factor"])
    parts["unet"].load_state_dict(unet_state["modules"]["unet"])
    parts["text_encoder"].load_state_dict(unet_state["modules"]["text_encoder"])
    parts["scheduler"] = PNDMScheduler(**{k: v for k, v in SPEC.scheduler.items() if not k.startswith("_")})
    write_pipeline(SPEC, parts, out / "models" / FAMILY, tokenizer_words=CAPTION_WORDS)
    stages = {"vae": vae_state, "unet": unet_state}

    if (work / "controlnet.pt").exists():
        stages["controlnet"] = state("controlnet")
        controlnet = ControlNetModel.from_unet(parts["unet"], conditioning_embedding_out_channels=SPEC.cn_cond_channels)
        controlnet.load_state_dict(stages["controlnet"]["modules"]["controlnet"])
        controlnet.save_pretrained(out / "controlnets" / CONTROLNET_ID)

    for style in STYLES:
        if not (work / f"lora-{style}.pt").exists():
            continue
        stages[f"lora-{style}"] = state(f"lora-{style}")
        lora = LoRA(parts["unet"])
        lora.load_state_dict(stages[f"lora-{style}"]["modules"]["lora"])
        layers = lora.layers()
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
        "stages": {
            name: {"steps": s["step"], "minutes": round(s["seconds"] / 60, 1), "device": s["device"], **s["config"]}
            for name, s in stages.items()
        },
    }
    write_json(out / "TRAINING.json", summary)
    return summary
