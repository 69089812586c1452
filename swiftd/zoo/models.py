"""Model construction: seeded random pipeline components, the Diffusers pipeline folder, ControlNets.

Every component is initialised from its own seed (seed_for), so a family's files depend only on its
spec and the library versions, not on what was built before it.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

from swiftd.zoo.files import save_safetensors, write_json
from swiftd.zoo.specs import FamilySpec
from swiftd.zoo.tokenizer import TOKENIZER_PADS, learn_bpe, write_tokenizer

# How far random ControlNet weights move things: std of re-randomised zero convs = gain / sqrt(fan_in).
# Big enough that every test comparing "with" vs "without" sees a clear difference, small enough that
# the image stays finite and in range.
CN_ZERO_CONV_GAIN = 0.25


def seed_for(*parts: str) -> int:
    """A stable seed per component (never Python's hash(), which is salted per process)."""
    return zlib.crc32("/".join(parts).encode())


def _seeded(seed: int):
    # Diffusers/transformers initialise parameters from torch's global generator.
    import torch

    torch.manual_seed(seed)


def clip_text_config(spec_cfg: dict, pad_token: str, tokenizer_words: tuple[str, ...] | None = None):
    """The CLIPTextConfig of one text encoder of a spec, its vocabulary and special ids from the
    tokenizer learned from `tokenizer_words` (by default the zoo's word list)."""
    from transformers import CLIPTextConfig

    vocab, _ = learn_bpe(words=tokenizer_words)
    cfg = dict(spec_cfg)
    cfg["vocab_size"] = cfg["vocab_size"] or len(vocab)
    # eos_token_id matters: CLIP pools the hidden state at the first <|endoftext|> token.
    ids = dict(
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab[pad_token],
    )
    return CLIPTextConfig(**cfg, **ids)


def make_unet(spec: FamilySpec):
    from diffusers import UNet2DConditionModel

    _seeded(seed_for(spec.name, "unet"))
    return UNet2DConditionModel(**spec.unet)


def make_components(spec: FamilySpec) -> dict:
    """Instantiate (in fp32, seeded) every pipeline component except the tokenizers."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = {"unet": make_unet(spec)}
    _seeded(seed_for(spec.name, "vae"))
    parts["vae"] = AutoencoderKL(**spec.vae)
    encoder_classes = (CLIPTextModel, CLIPTextModelWithProjection)
    for i, te_cfg in enumerate(spec.text_encoders):
        name = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        _seeded(seed_for(spec.name, name))
        parts[name] = encoder_classes[i](clip_text_config(te_cfg, TOKENIZER_PADS[i])).eval()
    scheduler_classes = {"PNDMScheduler": PNDMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler}
    sched_cls = scheduler_classes[spec.scheduler["_class_name"]]
    parts["scheduler"] = sched_cls(**{k: v for k, v in spec.scheduler.items() if not k.startswith("_")})
    return parts


def te_checkpoint_name(module: str) -> str:
    """A text-encoder module/parameter name as real checkpoints spell it: under `text_model.`.

    transformers 5 flattened CLIPTextModel (its modules are `encoder.layers...`, no `text_model`),
    while CLIPTextModelWithProjection keeps `text_model.`; real SD checkpoints and kohya LoRAs
    always use `text_model.`, and transformers strips it again on load.
    """
    return module if module.startswith(("text_model.", "text_projection")) else "text_model." + module


def _restore_text_model_prefix(path: Path) -> None:
    # A from-scratch CLIPTextModel saves without the prefix; rewrite so the file matches real repos.
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    renamed = {te_checkpoint_name(k): v for k, v in tensors.items()}
    if renamed.keys() != tensors.keys():
        save_safetensors(renamed, path, {"format": "pt"})


def write_pipeline(spec: FamilySpec, parts: dict, folder: Path, tokenizer_words: tuple[str, ...] | None = None) -> None:
    """Save a Diffusers pipeline folder component by component plus model_index.json (the
    tokenizer learned from `tokenizer_words`, by default the zoo's word list)."""
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae"):
        parts[name].save_pretrained(folder / name)
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].save_pretrained(folder / name)
            _restore_text_model_prefix(folder / name / "model.safetensors")
    parts["scheduler"].save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer", pad_token=TOKENIZER_PADS[0], words=tokenizer_words)
    index = {
        "_class_name": "StableDiffusionXLPipeline" if spec.kind == "sdxl" else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", spec.scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if spec.kind == "sdxl":
        write_tokenizer(folder / "tokenizer_2", pad_token=TOKENIZER_PADS[1])
        index.update(
            force_zeros_for_empty_prompt=True,
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
        )
    else:
        index.update(requires_safety_checker=False, safety_checker=[None, None])
    write_json(folder / "model_index.json", index)


def make_controlnet(spec: FamilySpec, unet, cn_kind: str):
    """A ControlNet as training starts it (a copy of the UNet encoder), with non-zero "zero convs".

    from_unet zero-initialises the output convs, which would make every ControlNet a no-op and
    every test of it vacuous; they get small random weights instead (gain / sqrt(fan_in), so each
    residual is a fraction of the features it comes from), and the hint encoder's random init
    comes from the ControlNet's own seed, so the two ControlNets of a family differ.
    """
    import torch
    from diffusers import ControlNetModel

    seed = seed_for(spec.name, "controlnet", cn_kind)
    _seeded(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=spec.cn_cond_channels)
    gen = torch.Generator().manual_seed(seed)
    zero_convs = [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            fan_in = conv.weight[0].numel()
            w = torch.randn(conv.weight.shape, generator=gen) * (CN_ZERO_CONV_GAIN / math.sqrt(fan_in))
            conv.weight.copy_(w)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.01)
    return cn.eval()
