"""Single-file checkpoints: a family's pipeline as one .safetensors in the original LDM / A1111 key layout.

SD1.5 checkpoints are mostly shared this way; StableDiffusionPipeline.from_single_file reads it (with the
pipeline folder as its config) back to the very same weights. The key mapping is the exact inverse of
Diffusers' LDM converters, for any block count.
"""

from __future__ import annotations

import re
from pathlib import Path

from swiftd.zoo.files import save_safetensors
from swiftd.zoo.models import te_checkpoint_name
from swiftd.zoo.specs import FamilySpec

_UNET_RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_unet_key(key: str, config: dict) -> str:
    """A diffusers UNet parameter name in the original LDM layout (no `model.diffusion_model.`).

    The exact inverse of Diffusers' convert_ldm_unet_checkpoint, for any block count: LDM numbers
    the encoder's layers input_blocks.1.. with layers_per_block (resnet[, attention]) entries plus
    one downsampler per block, the decoder's output_blocks.0.. with layers_per_block + 1 entries.
    """
    per = config["layers_per_block"] + 1
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    head, _, leaf = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{leaf}"

    def resnet(rest):
        first, _, tail = rest.partition(".")
        return _UNET_RESNET_LDM.get(first, first) + ("." + tail if tail else "")

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + b * per + j
        return f"input_blocks.{idx}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = b * per + j
        return f"output_blocks.{idx}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        has_attn = "CrossAttn" in config["up_block_types"][b]
        return f"output_blocks.{b * per + per - 1}.{2 if has_attn else 1}.conv.{m[2]}"
    raise ValueError(f"no LDM name for UNet parameter {key}")


def ldm_vae_key(key: str, config: dict) -> str:
    """A diffusers AutoencoderKL parameter name in the LDM layout (no `first_stage_model.`)."""
    n = len(config["block_out_channels"])
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.", key)
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", key
    )
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN_LDM[m[2]]}.{m[3]}"
    return key


def write_single_file(spec: FamilySpec, parts: dict, path: Path) -> None:
    """One .safetensors in the original LDM / A1111 layout, as SD1.5 checkpoints are shared.

    Loads with StableDiffusionPipeline.from_single_file(path, config=<pipeline folder>) to the very
    same weights as the folder. (SD1.x layout only: SDXL's has two differently laid-out text encoders.)
    """
    assert spec.kind == "sd15", "single-file export is implemented for the SD1.x layout"
    tensors = {}
    for k, v in parts["unet"].state_dict().items():
        tensors["model.diffusion_model." + ldm_unet_key(k, spec.unet)] = v
    for k, v in parts["vae"].state_dict().items():
        name = ldm_vae_key(k, spec.vae)
        if ".mid.attn_1." in name and name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convs
        tensors["first_stage_model." + name] = v
    for k, v in parts["text_encoder"].state_dict().items():
        tensors["cond_stage_model.transformer." + te_checkpoint_name(k)] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in sorted(tensors.items())}, path, {"format": "pt"})
