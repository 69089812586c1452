"""shapes-sd15: the shape world's models, in SD1.5's architecture at a size these 2 cores train.

Every component is the class a real SD1.5 checkpoint uses (CLIPTextModel + CLIPTokenizer,
AutoencoderKL with four blocks, UNet2DConditionModel with cross-attention, ControlNetModel, LoRAs
in PEFT and kohya files), saved in the same folder layout, so the suite serves the trained model
through the code paths it serves a downloaded one with. Sizes: 64x64 images, 8x8x4 latents (the
VAE downsamples by 8, as SD1.5's), a 2-layer text encoder of width 64 over a vocabulary learned
from the captions' words.
"""

from __future__ import annotations

from swiftd.shapeworld.scene import BACKGROUNDS, COLOURS, KINDS, POSITIONS
from swiftd.zoo.specs import SD15_SCHEDULER, FamilySpec, _clip, _vae

FAMILY = "shapes-sd15"
# The tokenizer's words: every caption word, plus the styles' names (a prompt may mention them).
CAPTION_WORDS = tuple(
    sorted(
        {"a", "an", "at", "and", "on", "the", "background", "style", "in", "outline", "pastel"}
        | set(KINDS)
        | set(COLOURS)
        | set(BACKGROUNDS)
        | {word for words in POSITIONS.values() for word in words.split()}
    )
)

SPEC = FamilySpec(
    name=FAMILY,
    kind="sd15",
    unet=dict(
        sample_size=8,  # latents of a 64x64 image
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    # scaling_factor 1/std of the trained VAE's latents is set by training (train.py, stage vae)
    vae=_vae((16, 32, 64, 64), 1, 64, 1.0, groups=8),
    text_encoders=(_clip(64, 2, 4, 256),),
    scheduler=SD15_SCHEDULER,
    cn_cond_channels=(16, 32, 64, 64),
)


def fresh_components(seed: int = 0) -> dict:
    """Untrained components (seeded), as training starts them: unet, vae, text_encoder, scheduler."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from swiftd.zoo.models import clip_text_config

    torch.manual_seed(seed)
    return {
        "unet": UNet2DConditionModel(**SPEC.unet),
        "vae": AutoencoderKL(**SPEC.vae),
        "text_encoder": CLIPTextModel(clip_text_config(SPEC.text_encoders[0], "<|endoftext|>", CAPTION_WORDS)),
        # Training noises with the schedule SD1.5 was trained on; the pipeline folder ships PNDM.
        "scheduler": DDPMScheduler(
            **{k: v for k, v in SPEC.scheduler.items() if k in ("beta_start", "beta_end", "beta_schedule")},
            num_train_timesteps=SPEC.scheduler["num_train_timesteps"],
        ),
    }


def new_controlnet(unet):
    """A ControlNet as training starts it: a copy of the UNet's encoder with the family's hint
    encoder widths (8x downsampling, as the VAE)."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=SPEC.cn_cond_channels)


def tokenizer(folder):
    """The family's CLIPTokenizer, written to `folder` and loaded from it."""
    from pathlib import Path

    from transformers import CLIPTokenizer

    from swiftd.zoo.tokenizer import TOKENIZER_PADS, write_tokenizer

    write_tokenizer(Path(folder), pad_token=TOKENIZER_PADS[0], words=CAPTION_WORDS)
    return CLIPTokenizer.from_pretrained(str(folder))
