"""LoRAs: which layers they adapt, random rank-r factors, and the Diffusers/PEFT and kohya file formats.

Two formats, as found in the wild: Diffusers/PEFT (`unet.<module>.lora_A/B.weight`, no alpha, as
`save_lora_weights` writes it) and kohya/A1111 (`lora_unet_...`/`lora_te..._...` names with
`lora_down`/`lora_up` and an alpha per layer, SDXL numbered as the original sgm UNet).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from swiftd.zoo.files import save_safetensors
from swiftd.zoo.models import seed_for, te_checkpoint_name
from swiftd.zoo.specs import FamilySpec

KOHYA_TE_ALPHA = 8.0  # kohya-r16-te: alpha/rank = 0.5
KOHYA_CONV_ALPHA = 4.0  # kohya-r8-conv, linear layers: alpha/rank = 0.5
KOHYA_CONV_CONV_ALPHA = 2.0  # kohya-r8-conv, 3x3 convs: a separate conv_alpha, as LoCon trainers write

# Modules a LoRA targets, as module-name suffixes within a Transformer2DModel block of the UNet.
UNET_ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# How far random LoRA weights move things, relative to the weights they touch. Big enough that
# every test comparing "with" vs "without" sees a clear difference, small enough that the image
# stays finite and in range.
LORA_REL_DELTA = 0.1  # std(scale * up @ down) / std(W) per layer


def unet_lora_targets(unet, convs: bool = False) -> list[tuple[str, object]]:
    """(module name, module) of the UNet layers a LoRA adapts, in a stable order."""
    import torch

    out = []
    for name, mod in unet.named_modules():
        if ".attentions." in name and any(name.endswith("." + t) for t in UNET_ATTN_TARGETS):
            out.append((name, mod))
        elif convs and re.search(r"\.resnets\.\d+\.conv[12]$", name) and isinstance(mod, torch.nn.Conv2d):
            out.append((name, mod))
    return out


def te_lora_targets(te) -> list[tuple[str, object]]:
    return [(n, m) for n, m in te.named_modules() if ".layers." in n and n.rsplit(".", 1)[-1] in TE_TARGETS]


def weight_std(weight) -> float:
    # Rounded so a last-bit difference in the reduction (thread count, SIMD) cannot change the file.
    return float(f"{weight.double().std().item():.4g}")


class WeightStdMemo:
    """`weight_std` computed once per weight: a builder writing many LoRAs for one model (the
    traffic catalog writes 200) otherwise spends most of its time re-reducing the same weights.
    The weights must not change while the memo is in use."""

    def __init__(self):
        self._stds: dict[int, float] = {}
        self._weights: list = []  # held, so that no id is reused while the memo lives

    def __call__(self, weight) -> float:
        key = id(weight)
        if key not in self._stds:
            self._stds[key] = weight_std(weight)
            self._weights.append(weight)
        return self._stds[key]


def _lora_pair(gen, weight, rank: int, scale: float, std_of=weight_std):
    """Random (down, up) with std(scale * up @ down) ~= LORA_REL_DELTA * std(weight), both non-zero.

    Shapes follow the layer: Linear [r,in] / [out,r]; conv [r,in,kh,kw] / [out,r,1,1] (kohya LoCon
    and PEFT both store a conv LoRA as a conv followed by a 1x1 conv).
    """
    import torch

    out_ch, in_ch, *kernel = weight.shape
    fan_in = in_ch * math.prod(kernel)
    down = torch.randn((rank, in_ch, *kernel), generator=gen) / math.sqrt(fan_in)
    w_std = std_of(weight)
    up_std = LORA_REL_DELTA * w_std * math.sqrt(fan_in) / (scale * math.sqrt(rank))
    up = torch.randn((out_ch, rank, *[1] * len(kernel)), generator=gen) * up_std
    return down.contiguous(), up.contiguous()


def write_peft_lora(spec: FamilySpec, unet, rank: int, path: Path, lora_id: str, dtype, std_of=weight_std) -> None:
    """Diffusers/PEFT format (unet.<module>.lora_A/B.weight), as pipe.save_lora_weights writes it.

    No alpha is stored, which Diffusers reads as alpha == rank (scale 1), like its training scripts.
    """
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    gen = torch.Generator().manual_seed(seed_for(lora_id))
    layers = {}
    for name, mod in unet_lora_targets(unet):
        down, up = _lora_pair(gen, mod.weight, rank, 1.0, std_of)
        layers[f"{name}.lora_A.weight"] = down.to(dtype)
        layers[f"{name}.lora_B.weight"] = up.to(dtype)
    pipe_cls = StableDiffusionXLPipeline if spec.kind == "sdxl" else StableDiffusionPipeline
    pipe_cls.save_lora_weights(path.parent, unet_lora_layers=layers, weight_name=path.name)


def kohya_unet_name(module: str, spec: FamilySpec) -> str:
    """kohya's `lora_unet_...` name for a diffusers UNet module name.

    kohya-ss trains SD1.x on the diffusers UNet, so its names are the diffusers path with "_";
    it trains SDXL on the original (sgm) UNet, so SDXL names use input_blocks/middle_block/
    output_blocks numbering and sgm resnet layer names. Files of both kinds exist in the wild.
    """
    if spec.kind == "sdxl":
        lpb = spec.unet["layers_per_block"]
        resnet_names = {
            "conv1": "in_layers.2",
            "conv2": "out_layers.3",
            "time_emb_proj": "emb_layers.1",
            "conv_shortcut": "skip_connection",
        }

        def inner(kind, rest):
            if kind == "resnets":
                head, _, tail = rest.partition(".")
                return "0." + resnet_names.get(head, head) + ("." + tail if tail else "")
            return "1." + rest

        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            b, kind, j, rest = m.groups()
            module = f"input_blocks.{1 + int(b) * (lpb + 1) + int(j)}.{inner(kind, rest)}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            b, kind, j, rest = m.groups()
            module = f"output_blocks.{int(b) * (lpb + 1) + int(j)}.{inner(kind, rest)}"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module):
            kind, j, rest = m.groups()
            idx = 1 if kind == "attentions" else 2 * int(j)
            module = f"middle_block.{idx}.{inner(kind, rest)[2:]}"
        else:
            raise ValueError(f"no sgm name for UNet module {module}")
    return "lora_unet_" + module.replace(".", "_")


def kohya_te_name(module: str, encoder_index: int, spec: FamilySpec) -> str:
    """kohya's name for a text-encoder module: lora_te_ (SD1.x), lora_te1_ / lora_te2_ (SDXL)."""
    prefix = "lora_te_" if spec.kind == "sd15" else f"lora_te{encoder_index + 1}_"
    return prefix + te_checkpoint_name(module).replace(".", "_")


def write_kohya_lora(
    spec: FamilySpec,
    parts: dict,
    rank: int,
    path: Path,
    lora_id: str,
    dtype,
    te: bool,
    convs: bool,
    std_of=weight_std,
) -> None:
    """kohya/A1111 format: <name>.lora_down.weight, <name>.lora_up.weight, <name>.alpha (scale alpha/rank)."""
    import torch

    gen = torch.Generator().manual_seed(seed_for(lora_id))
    tensors = {}

    def add(name, weight, alpha):
        down, up = _lora_pair(gen, weight, rank, alpha / rank, std_of)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)

    linear_alpha = KOHYA_TE_ALPHA if te else KOHYA_CONV_ALPHA
    for name, mod in unet_lora_targets(parts["unet"], convs=convs):
        is_3x3 = mod.weight.ndim == 4 and mod.weight.shape[-1] == 3
        add(kohya_unet_name(name, spec), mod.weight, KOHYA_CONV_CONV_ALPHA if is_3x3 else linear_alpha)
    if te:
        for i, te_name in enumerate(n for n in ("text_encoder", "text_encoder_2") if n in parts):
            for name, mod in te_lora_targets(parts[te_name]):
                add(kohya_te_name(name, i, spec), mod.weight, linear_alpha)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(linear_alpha)}
    if convs:
        meta.update(ss_network_args=json.dumps({"conv_dim": str(rank), "conv_alpha": str(KOHYA_CONV_CONV_ALPHA)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, meta)
