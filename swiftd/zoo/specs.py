"""Family specifications: the configs that define every model of every zoo family.

A family is one Stable Diffusion model (UNet, VAE, text encoder(s), scheduler) plus the ControlNets
and LoRAs made for it. Its FamilySpec, as JSON, is hashed into the family's completion marker
(swiftd.zoo.layout), so changing a spec rebuilds that family; a change to the generator itself
must bump ZOO_VERSION.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# Bump whenever the generator's output changes: every family marker records it, so old zoos rebuild.
ZOO_VERSION = "zoo-1"

DEFAULT_FAMILIES = ("tiny-sd15", "tiny-sdxl", "bench-sd15")
FULL_FAMILIES = ("sd15", "sdxl")
ALL_FAMILIES = DEFAULT_FAMILIES + FULL_FAMILIES

CONTROLNET_KINDS = ("edges", "depth")
# name suffix -> (format, rank). The kohya alphas are deliberately != rank so loaders must honour them.
LORA_KINDS = {
    "peft-r4": ("peft", 4),
    "peft-r64": ("peft", 64),
    "kohya-r16-te": ("kohya", 16),
    "kohya-r8-conv": ("kohya", 8),
}


@dataclass(frozen=True)
class FamilySpec:
    """Everything that defines one family's models. Its JSON form is hashed into the marker."""

    name: str
    kind: str  # "sd15" or "sdxl": which pipeline class and LoRA/kohya naming conventions apply
    unet: dict
    vae: dict
    text_encoders: tuple  # one CLIPTextConfig kwargs dict per encoder (SDXL: 2, second with projection)
    scheduler: dict
    cn_cond_channels: tuple  # ControlNet conditioning embedding widths; 4 entries = 8x downsampling
    fp16: bool = False  # full-size families are saved in fp16, as deployed checkpoints are
    single_file: bool = False  # also write models/<family>.safetensors in the original LDM layout

    def as_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, default=list)


# The scheduler configs real SD1.5 and SDXL ship (scheduler/scheduler_config.json), less the keys
# their classes no longer accept (clip_sample etc.), which Diffusers would only warn about.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

SD15_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SDXL_BLOCKS = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
# The test-sized two-block layouts Diffusers' own pipeline tests use.
TINY_BLOCKS = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)


def _vae(channels, layers, sample_size, scaling_factor, groups=32, force_upcast=False):
    # Four blocks always: the pipeline's vae_scale_factor is 2**(blocks-1) and ControlNet's hint
    # encoder downsamples by 8, so the latent grid must be 1/8 of the image.
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def _clip(hidden, layers, heads, inter, act="quick_gelu", projection_dim=None, vocab_size=None):
    # vocab_size None = the zoo tokenizer's size; bos/eos/pad ids are filled from the tokenizer.
    cfg = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        hidden_act=act,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        vocab_size=vocab_size,
    )
    if projection_dim is not None:
        cfg["projection_dim"] = projection_dim
    return cfg


SPECS: dict[str, FamilySpec] = {
    "tiny-sd15": FamilySpec(
        name="tiny-sd15",
        kind="sd15",
        unet=dict(
            **TINY_BLOCKS,
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=8,  # 64x64 pixels by default
            in_channels=4,
            out_channels=4,
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=32,
        ),
        vae=_vae((8, 16, 16, 16), 1, 64, 0.18215, groups=8),
        text_encoders=(_clip(32, 2, 4, 64),),
        scheduler=SD15_SCHEDULER,
        cn_cond_channels=(8, 16, 16, 32),
        single_file=True,
    ),
    "tiny-sdxl": FamilySpec(
        name="tiny-sdxl",
        kind="sdxl",
        unet=dict(
            **TINY_BLOCKS,
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 size/crop ids x 8 + te2 projection
            cross_attention_dim=32 + 32,  # te1 hidden + te2 hidden, concatenated per token
            norm_num_groups=32,
        ),
        vae=_vae((8, 16, 16, 16), 1, 64, 0.13025, groups=8, force_upcast=True),
        text_encoders=(_clip(32, 2, 4, 64), _clip(32, 2, 4, 64, act="gelu", projection_dim=32)),
        scheduler=SDXL_SCHEDULER,
        cn_cond_channels=(8, 16, 16, 32),
    ),
    "bench-sd15": FamilySpec(
        name="bench-sd15",
        kind="sd15",
        unet=dict(
            **SD15_BLOCKS,
            block_out_channels=(64, 128, 256, 256),
            layers_per_block=2,
            sample_size=32,  # 256x256 pixels by default
            in_channels=4,
            out_channels=4,
            cross_attention_dim=128,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=_vae((32, 64, 128, 128), 2, 256, 0.18215),
        text_encoders=(_clip(128, 4, 4, 512),),
        scheduler=SD15_SCHEDULER,
        cn_cond_channels=(16, 32, 96, 256),
        single_file=True,
    ),
    # Full-size: the real SD1.5 / SDXL configs. The text encoders keep CLIP's real 49408-token
    # embedding so parameter counts and memory match; the zoo tokenizer only uses the low ids.
    "sd15": FamilySpec(
        name="sd15",
        kind="sd15",
        unet=dict(
            **SD15_BLOCKS,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            sample_size=64,
            in_channels=4,
            out_channels=4,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=_vae((128, 256, 512, 512), 2, 512, 0.18215),
        text_encoders=(_clip(768, 12, 12, 3072, vocab_size=49408),),  # CLIP ViT-L/14
        scheduler=SD15_SCHEDULER,
        cn_cond_channels=(16, 32, 96, 256),
        fp16=True,
        single_file=True,
    ),
    "sdxl": FamilySpec(
        name="sdxl",
        kind="sdxl",
        unet=dict(
            **SDXL_BLOCKS,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            sample_size=128,
            in_channels=4,
            out_channels=4,
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            transformer_layers_per_block=(1, 2, 10),
            projection_class_embeddings_input_dim=6 * 256 + 1280,
            cross_attention_dim=768 + 1280,
            norm_num_groups=32,
        ),
        vae=_vae((128, 256, 512, 512), 2, 1024, 0.13025, force_upcast=True),
        text_encoders=(
            _clip(768, 12, 12, 3072, vocab_size=49408),  # CLIP ViT-L/14
            _clip(1280, 32, 20, 5120, act="gelu", projection_dim=1280, vocab_size=49408),  # OpenCLIP bigG
        ),
        scheduler=SDXL_SCHEDULER,
        cn_cond_channels=(16, 32, 96, 256),
        fp16=True,
    ),
}
