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
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import heapq
import json
import math
import re
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

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
KOHYA_TE_ALPHA = 8.0  # kohya-r16-te: alpha/rank = 0.5
KOHYA_CONV_ALPHA = 4.0  # kohya-r8-conv, linear layers: alpha/rank = 0.5
KOHYA_CONV_CONV_ALPHA = 2.0  # kohya-r8-conv, 3x3 convs: a separate conv_alpha, as LoCon trainers write

# Modules a LoRA targets, as module-name suffixes within a Transformer2DModel block of the UNet.
UNET_ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# How far random LoRA / ControlNet weights move things, relative to the weights they touch. Big
# enough that every test comparing "with" vs "without" sees a clear difference, small enough that
# the image stays finite and in range.
LORA_REL_DELTA = 0.1  # std(scale * up @ down) / std(W) per layer
CN_ZERO_CONV_GAIN = 0.25  # std of re-randomised zero convs = gain / sqrt(fan_in)


# --------------------------------------------------------------------------------------------------
# Family specifications
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Paths and ids: the one place that knows the layout, so tests and benchmarks never hard-code it
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyPaths:
    family: str
    kind: str  # "sd15" -> StableDiffusionPipeline, "sdxl" -> StableDiffusionXLPipeline
    model: Path  # Diffusers pipeline folder
    single_file: Path | None  # original-layout checkpoint, or None if the family has none
    controlnets: dict[str, Path] = field(default_factory=dict)  # id -> ControlNetModel folder
    loras: dict[str, Path] = field(default_factory=dict)  # id -> .safetensors file
    marker: Path | None = None

    @property
    def pipeline_class(self) -> str:
        return "StableDiffusionXLPipeline" if self.kind == "sdxl" else "StableDiffusionPipeline"

    def all_outputs(self) -> list[Path]:
        paths = [self.model, *self.controlnets.values(), *self.loras.values()]
        return paths + ([self.single_file] if self.single_file else [])


def controlnet_ids(family: str) -> list[str]:
    return [f"{family}-cn-{kind}" for kind in CONTROLNET_KINDS]


def lora_ids(family: str) -> list[str]:
    return [f"{family}-lora-{kind}" for kind in LORA_KINDS]


def zoo_paths(out: str | Path, family: str) -> FamilyPaths:
    """Where every artefact of `family` lives under the zoo root `out` (whether built or not)."""
    spec = SPECS[family]
    out = Path(out)
    return FamilyPaths(
        family=family,
        kind=spec.kind,
        model=out / "models" / family,
        single_file=out / "models" / f"{family}.safetensors" if spec.single_file else None,
        controlnets={cid: out / "controlnets" / cid for cid in controlnet_ids(family)},
        loras={lid: out / "loras" / f"{lid}.safetensors" for lid in lora_ids(family)},
        marker=out / f".complete-{family}",
    )


# --------------------------------------------------------------------------------------------------
# Tokenizer: a real CLIP byte-level BPE vocabulary, learned deterministically from a built-in word list
# --------------------------------------------------------------------------------------------------

# Common English plus the words prompts are made of. Every other word still tokenizes (down to
# single bytes, as CLIP's does for rare words); these just get whole-word tokens.
WORDS = """
a an the of and or but if then than so as at by for from in into on onto off out over under up down
with without about above below after before between through during to too very not no yes all any
each every some many much more most few less least other another such same own only just also even
still again once here there where when why how what which who whom whose this that these those it its
i me my we us our you your he him his she her they them their is are was were be been being am have
has had do does did done will would can could shall should may might must make made take took get got
go went come came see saw look looking looks show shown give gave find found think know knew want use
used work call try ask need feel felt become leave put mean keep let begin seem help talk turn start
run running ran move live lived believe hold bring happen write wrote sit sitting stand standing lose
pay meet include continue set learn change lead understand watch follow stop create speak read allow
add spend grow open walk walking win offer remember love consider appear buy wait serve die send
expect build stay fall cut reach kill remain suggest raise pass sell require report decide pull
riding ride flying fly swimming swim jumping jump dancing dance playing play eating eat sleeping sleep
man woman men women boy girl child children people person friend family mother father king queen
knight wizard warrior robot astronaut soldier pirate princess monk samurai ninja scientist doctor
cat cats dog dogs horse horses bird birds fish lion tiger bear wolf fox rabbit owl eagle dragon
elephant monkey deer cow sheep goat duck frog snake butterfly whale dolphin shark unicorn
house home city town village street road bridge tower castle temple church building room window door
garden park forest tree trees flower flowers grass leaf mountain mountains hill river lake sea ocean
beach island desert field sky cloud clouds sun moon star stars space planet earth world fire water
ice snow rain storm wind light dark shadow night day morning evening sunset sunrise winter summer
spring autumn time year years
red orange yellow green blue purple pink brown black white gray grey gold golden silver colorful
big small large little tall short long old new young beautiful pretty cute ugly happy sad angry
calm quiet loud bright soft hard warm cold hot wet dry clean dirty rich poor strong weak fast slow
high low deep wide empty full real fake good bad best better great
photo photograph photography portrait landscape painting paint drawing sketch illustration art
artwork artist style styled render rendering rendered concept digital oil watercolor acrylic ink
pencil charcoal canvas poster cover anime manga cartoon comic pixel vector abstract surreal
realistic photorealistic hyperrealistic detailed intricate highly ultra sharp focus bokeh blur
blurry lens camera shot closeup close macro wide angle cinematic dramatic lighting studio volumetric
octane unreal engine trending artstation masterpiece quality resolution hd 4k 8k award winning
by greg rutkowski van gogh monet picasso rembrandt vermeer klimt hokusai da vinci
fantasy science fiction scifi futuristic cyberpunk steampunk medieval ancient modern vintage retro
minimalist baroque gothic renaissance impressionism impressionist cubism expressionism pop
view scene background foreground composition color colors texture pattern shape line edge edges
depth map mask pose face eyes hair hand hands body dress shirt hat helmet armor sword shield crown
car train ship boat plane airplane bicycle motorcycle rocket spaceship
food coffee tea cake bread apple fruit pizza wine table chair bed book lamp cup bottle
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def learn_bpe(max_merges: int = 1500) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Learn BPE merges over WORDS; return (vocab, merges) in CLIP's vocabulary order.

    CLIP's order: the 256 byte symbols, the same with "</w>" (end of word), one entry per merge,
    then <|startoftext|> and <|endoftext|>. Ties between equally frequent pairs break on the pair
    itself, so the result depends only on WORDS.
    """
    byte_enc = bytes_to_unicode()
    counts: dict[tuple[str, ...], int] = {}
    for word in WORDS:
        chars = [byte_enc[b] for b in word.lower().encode("utf-8")]
        symbols = tuple(chars[:-1] + [chars[-1] + "</w>"])
        counts[symbols] = counts.get(symbols, 0) + 1

    # Classic BPE: repeatedly merge the most frequent adjacent pair. Pair counts are kept up to date
    # incrementally (only words containing the merged pair change) with a lazy max-heap, so this
    # takes a fraction of a second rather than recounting every pair for every merge.
    words = [list(symbols) for symbols in sorted(counts)]
    freq = [counts[tuple(w)] for w in words]
    pair_count: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}

    def account(i: int, sign: int) -> None:
        for pair in zip(words[i], words[i][1:]):
            pair_count[pair] = pair_count.get(pair, 0) + sign * freq[i]
            if sign > 0:
                where.setdefault(pair, set()).add(i)
            heapq.heappush(heap, (-pair_count[pair], pair))

    heap: list[tuple[int, tuple[str, str]]] = []
    for i in range(len(words)):
        account(i, +1)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < max_merges:
        neg, best = heapq.heappop(heap)
        if -neg != pair_count.get(best, 0) or -neg <= 0:
            continue  # stale entry; ties pop in pair order, so the result depends only on WORDS
        merges.append(best)
        for i in sorted(where.pop(best)):
            account(i, -1)
            symbols, out, j = words[i], [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(symbols[j] + symbols[j + 1])
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = out
            account(i, +1)

    tokens = list(byte_enc.values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for tok in tokens:  # two merge paths can spell the same token; keep its first id
        vocab.setdefault(tok, len(vocab))
    return vocab, tuple(merges)


# Pad token of tokenizer / tokenizer_2: real SDXL's second tokenizer pads with "!".
TOKENIZER_PADS = ("<|endoftext|>", "!")


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """Write a CLIPTokenizer folder the way SD checkpoints ship it (vocab.json + merges.txt)."""
    vocab, merges = learn_bpe()
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", vocab, sort_keys=False)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    def special(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    _write_json(
        folder / "special_tokens_map.json",
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token, "unk_token": "<|endoftext|>"},
    )
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": special("<|startoftext|>"),
            "do_lower_case": True,
            "eos_token": special("<|endoftext|>"),
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": special("<|endoftext|>"),
        },
    )


# --------------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------------


def seed_for(*parts: str) -> int:
    """A stable seed per component (never Python's hash(), which is salted per process)."""
    return zlib.crc32("/".join(parts).encode())


def _seeded(seed: int):
    # Diffusers/transformers initialise parameters from torch's global generator.
    import torch

    torch.manual_seed(seed)


def _text_config(spec_cfg: dict, pad_token: str):
    from transformers import CLIPTextConfig

    vocab, _ = learn_bpe()
    cfg = dict(spec_cfg)
    cfg["vocab_size"] = cfg["vocab_size"] or len(vocab)
    # eos_token_id matters: CLIP pools the hidden state at the first <|endoftext|> token.
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab[pad_token])
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
        parts[name] = encoder_classes[i](_text_config(te_cfg, TOKENIZER_PADS[i])).eval()
    sched_cls = {"PNDMScheduler": PNDMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler}[spec.scheduler["_class_name"]]
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


def write_pipeline(spec: FamilySpec, parts: dict, folder: Path) -> None:
    """Save a Diffusers pipeline folder component by component plus model_index.json."""
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae"):
        parts[name].save_pretrained(folder / name)
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].save_pretrained(folder / name)
            _restore_text_model_prefix(folder / name / "model.safetensors")
    parts["scheduler"].save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer", pad_token=TOKENIZER_PADS[0])
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
    _write_json(folder / "model_index.json", index)


# --------------------------------------------------------------------------------------------------
# ControlNets
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# LoRAs
# --------------------------------------------------------------------------------------------------


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


def _lora_pair(gen, weight, rank: int, scale: float):
    """Random (down, up) with std(scale * up @ down) ~= LORA_REL_DELTA * std(weight), both non-zero.

    Shapes follow the layer: Linear [r,in] / [out,r]; conv [r,in,kh,kw] / [out,r,1,1] (kohya LoCon
    and PEFT both store a conv LoRA as a conv followed by a 1x1 conv).
    """
    import torch

    out_ch, in_ch, *kernel = weight.shape
    fan_in = in_ch * math.prod(kernel)
    down = torch.randn((rank, in_ch, *kernel), generator=gen) / math.sqrt(fan_in)
    # Rounded so a last-bit difference in the reduction (thread count, SIMD) cannot change the file.
    w_std = float(f"{weight.double().std().item():.4g}")
    up_std = LORA_REL_DELTA * w_std * math.sqrt(fan_in) / (scale * math.sqrt(rank))
    up = torch.randn((out_ch, rank, *[1] * len(kernel)), generator=gen) * up_std
    return down.contiguous(), up.contiguous()


def write_peft_lora(spec: FamilySpec, unet, rank: int, path: Path, lora_id: str, dtype) -> None:
    """Diffusers/PEFT format (unet.<module>.lora_A/B.weight), as pipe.save_lora_weights writes it.

    No alpha is stored, which Diffusers reads as alpha == rank (scale 1), like its training scripts.
    """
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    gen = torch.Generator().manual_seed(seed_for(lora_id))
    layers = {}
    for name, mod in unet_lora_targets(unet):
        down, up = _lora_pair(gen, mod.weight, rank, 1.0)
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
        resnet_names = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}

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


def write_kohya_lora(spec: FamilySpec, parts: dict, rank: int, path: Path, lora_id: str, dtype, te: bool, convs: bool) -> None:
    """kohya/A1111 format: <name>.lora_down.weight, <name>.lora_up.weight, <name>.alpha (scale alpha/rank)."""
    import torch

    gen = torch.Generator().manual_seed(seed_for(lora_id))
    tensors = {}

    def add(name, weight, alpha):
        down, up = _lora_pair(gen, weight, rank, alpha / rank)
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


# --------------------------------------------------------------------------------------------------
# Single-file checkpoint (original LDM / A1111 key layout)
# --------------------------------------------------------------------------------------------------

_UNET_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTN_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_unet_key(key: str, config: dict) -> str:
    """A diffusers UNet parameter name in the original LDM layout (no `model.diffusion_model.`).

    The exact inverse of Diffusers' convert_ldm_unet_checkpoint, for any block count: LDM numbers
    the encoder's layers input_blocks.1.. with layers_per_block (resnet[, attention]) entries plus
    one downsampler per block, the decoder's output_blocks.0.. with layers_per_block + 1 entries.
    """
    per = config["layers_per_block"] + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
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
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", key)
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


# --------------------------------------------------------------------------------------------------
# Build driver
# --------------------------------------------------------------------------------------------------


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """safetensors.save_file with a reproducible header.

    safetensors keeps `__metadata__` in a Rust HashMap, so with more than one entry its order (and
    the file's bytes) changes from process to process. Rewrite the header with sorted metadata:
    same JSON, same length, so the data offsets stay valid.
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= n, "safetensors header grew"
        fh.seek(8)
        fh.write(text + b" " * (n - len(text)))


def _write_json(path: Path, obj, sort_keys: bool = True) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n", encoding="utf-8")


def marker_text(family: str) -> str:
    """What `.complete-<family>` holds: the generator version and a hash of the family's spec."""
    spec_hash = hashlib.sha256((ZOO_VERSION + SPECS[family].as_json()).encode()).hexdigest()[:16]
    return f"{ZOO_VERSION} {family} {spec_hash}\n"


def is_complete(out: str | Path, family: str) -> bool:
    paths = zoo_paths(out, family)
    if not paths.marker.is_file() or paths.marker.read_text() != marker_text(family):
        return False
    return all(p.exists() for p in paths.all_outputs())


def _make_readable(paths: list[Path]) -> None:
    # safetensors writes its files 0600; a model repository is read by other users (containers).
    import os

    umask = os.umask(0)
    os.umask(umask)
    for root in paths:
        for f in [root] if root.is_file() else root.rglob("*"):
            if f.is_file():
                f.chmod(0o666 & ~umask)


def _log(msg: str) -> None:
    print(f"[zoo] {msg}", file=sys.stderr, flush=True)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_family(out: Path, family: str) -> None:
    import torch

    spec, paths = SPECS[family], zoo_paths(out, family)
    t0 = time.perf_counter()
    for p in [paths.marker, *paths.all_outputs()]:  # a half-built family is rebuilt from scratch
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    with torch.no_grad():
        parts = make_components(spec)
        dtype = torch.float16 if spec.fp16 else torch.float32
        if spec.fp16:
            for name, mod in parts.items():
                if isinstance(mod, torch.nn.Module):
                    parts[name] = mod.to(dtype)
        write_pipeline(spec, parts, paths.model)
        if paths.single_file:
            write_single_file(spec, parts, paths.single_file)
        cn_params = []
        for cn_id, kind in zip(paths.controlnets, CONTROLNET_KINDS):
            cn = make_controlnet(spec, parts["unet"], kind)
            cn = cn.to(dtype) if spec.fp16 else cn
            cn.save_pretrained(paths.controlnets[cn_id])
            cn_params.append(_count(cn))
            del cn
        for lora_id, (fmt, rank) in zip(paths.loras, LORA_KINDS.values()):
            if fmt == "peft":
                write_peft_lora(spec, parts["unet"], rank, paths.loras[lora_id], lora_id, dtype)
            else:
                te, convs = lora_id.endswith("-te"), lora_id.endswith("-conv")
                write_kohya_lora(spec, parts, rank, paths.loras[lora_id], lora_id, dtype, te=te, convs=convs)

    _make_readable(paths.all_outputs())
    paths.marker.write_text(marker_text(family))  # last: its presence means the family is whole
    _log(
        f"built {family} in {time.perf_counter() - t0:.1f}s: UNet {_count(parts['unet']) / 1e6:.2f} M params, "
        f"ControlNets {', '.join(f'{n / 1e6:.2f} M' for n in cn_params)}"
    )


@contextlib.contextmanager
def _locked(out: Path):
    # `make run` and `make test` may build the same zoo at once; one builds, the other then skips.
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_libraries():
    # Saving dozens of small models makes Diffusers/transformers print progress bars and notices
    # that bury the zoo's own one line per family; silence them for the build only.
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        tlog.enable_progress_bar()


def resolve_families(only: list[str] | None = None, full: bool = False) -> list[str]:
    if only:
        unknown = [f for f in only if f not in SPECS]
        if unknown:
            raise ValueError(f"unknown zoo families {unknown}; known: {list(SPECS)}")
        return list(dict.fromkeys(only))
    return list(DEFAULT_FAMILIES + (FULL_FAMILIES if full else ()))


def build(out: str | Path, only: list[str] | None = None, full: bool = False) -> None:
    """Build the default families (plus the full-size ones if `full`), or exactly `only`.

    Families already complete for this ZOO_VERSION are skipped.
    """
    out = Path(out)
    families = resolve_families(only, full)
    if all(is_complete(out, f) for f in families):  # no lock needed (the zoo may be read-only)
        _log(f"{', '.join(families)}: up to date")
        return
    with _locked(out):
        todo = [f for f in families if not is_complete(out, f)]  # again: another builder may have run
        for family in families:
            if family not in todo:
                _log(f"{family}: up to date")
        # torch & co. are imported only now, so an up-to-date zoo is checked in milliseconds.
        import torch

        with _quiet_libraries(), torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
            for family in todo:
                build_family(out, family)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swiftd.zoo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="generate the model zoo (idempotent)")
    b.add_argument("--out", default=".zoo", type=Path)
    b.add_argument("--only", nargs="+", metavar="FAMILY", choices=list(SPECS), help="build exactly these families")
    b.add_argument("--full", action="store_true", help="also build the full-size sd15 and sdxl families")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        build(args.out, only=args.only, full=args.full)
    return 0


if __name__ == "__main__":
    sys.exit(main())
