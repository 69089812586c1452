"""Deterministic model zoo: Stable Diffusion models, ControlNets and LoRAs made locally.

No machine in this project can download weights, so every model the suite serves, tests or
benchmarks is generated here, with random weights, in exactly the on-disk layout a deployer's real
model repository has (Diffusers pipeline folders, ControlNet folders, LoRA files in the
Diffusers/PEFT and kohya formats). Code that works on this zoo works unchanged on real checkpoints.

    python -m swiftd.zoo build --out .zoo [--only FAMILY ...] [--full]

Layout of one family (ids are the folder/file names)::

    <out>/models/<family>/                                   Diffusers pipeline folder
    <out>/models/<family>.safetensors                        single-file LDM checkpoint (sd15 kinds)
    <out>/controlnets/<family>-cn-edges/, <family>-cn-depth/  ControlNetModel folders
    <out>/loras/<family>-lora-peft-r4.safetensors            Diffusers/PEFT, UNet attention+ff+proj
    <out>/loras/<family>-lora-peft-r64.safetensors           same targets, rank 64 (the benchmark LoRA)
    <out>/loras/<family>-lora-kohya-r16-te.safetensors       kohya, UNet + text encoder(s), alpha != rank
    <out>/loras/<family>-lora-kohya-r8-conv.safetensors      kohya LoCon, UNet linear + resnet 3x3 convs
    <out>/.complete-<family>                                  marker, written last

Every random init is seeded per component, so the same command gives byte-identical files run to
run (and machine to machine with the same torch/diffusers/transformers). A family whose marker
matches the current generator is skipped, so callers may run `build` every time.

The modules, in the order a family is made:

    specs.py        the families: UNet/VAE/text-encoder/scheduler configs, ControlNet and LoRA kinds
    layout.py       where each artefact lives (zoo_paths), the completion marker
    tokenizer.py    a CLIP BPE tokenizer learned from a built-in word list
    models.py       seeded components, the Diffusers pipeline folder, ControlNets
    single_file.py  the pipeline as one checkpoint in the original LDM key layout
    loras.py        LoRA targets and the Diffusers/PEFT and kohya formats
    files.py        reproducible safetensors/JSON writing, file permissions
    builder.py      build(): families to build, one family's artefacts in order, marker last
    __main__.py     the command line
"""

from swiftd.zoo.builder import build, build_family, resolve_families
from swiftd.zoo.layout import FamilyPaths, controlnet_ids, is_complete, lora_ids, marker_text, zoo_paths
from swiftd.zoo.loras import kohya_te_name, kohya_unet_name, te_lora_targets, unet_lora_targets
from swiftd.zoo.models import clip_text_config, seed_for, te_checkpoint_name
from swiftd.zoo.single_file import ldm_unet_key, ldm_vae_key
from swiftd.zoo.specs import (
    ALL_FAMILIES,
    CONTROLNET_KINDS,
    DEFAULT_FAMILIES,
    FULL_FAMILIES,
    LORA_KINDS,
    SPECS,
    ZOO_VERSION,
    FamilySpec,
)
from swiftd.zoo.tokenizer import TOKENIZER_PADS, learn_bpe

__all__ = [
    "ALL_FAMILIES",
    "CONTROLNET_KINDS",
    "DEFAULT_FAMILIES",
    "FULL_FAMILIES",
    "LORA_KINDS",
    "SPECS",
    "TOKENIZER_PADS",
    "ZOO_VERSION",
    "FamilyPaths",
    "FamilySpec",
    "build",
    "build_family",
    "clip_text_config",
    "controlnet_ids",
    "is_complete",
    "kohya_te_name",
    "kohya_unet_name",
    "ldm_unet_key",
    "ldm_vae_key",
    "learn_bpe",
    "lora_ids",
    "marker_text",
    "resolve_families",
    "seed_for",
    "te_checkpoint_name",
    "te_lora_targets",
    "unet_lora_targets",
    "zoo_paths",
]
