"""Quality: what the images show, scored, on the trained shape-world model (group `quality`).

Every other group checks that the suite computes what Diffusers computes; this one asks whether
the settings that make it faster change what an image *shows*. On held-out prompts of the shape
world (captions no training batch contained: swiftd/shapeworld/data.py) with seeds 0..N-1, the
deterministic scorer (swiftd/shapeworld/score.py) rates

- Diffusers' own pipelines on the model root: plain, with the edges ControlNet, with a LoRA;
- the suite through its gateway (real processes): the same three, the ControlNet's residuals as
  float16 on the wire, and the backbone compiled (float32, and bfloat16);
- bounded asynchronous LoRA loading at K = 0, 2, 5, 10: the worker's engine in this process with
  the LoRA's UNet deltas handed over just before step K (bench/bal.py), the latest a bound of K
  lets them land.

Prompts alternate between the two LoRA styles (outline, pastel). A style "hit" is the prompt's
style seen with its LoRA; a "false" hit is that style seen without it. Deltas are the largest
change of any score against the setting's reference (K = 0, float32 wire, eager float32). The
grid (docs/img/quality_grid.png) shows the first prompts across the settings.

Sides run at the same time (quality is not timed): the suite's UNet workers on the device core,
Diffusers and the in-process engine in this process on the other core, 1 thread each.
"""

from __future__ import annotations

import io
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from bench.artifacts import compiled_artifacts
from bench.bal import image_with_arrival_at, lora_deltas
from bench.scenarios import IMAGE_TOLERANCE, REPO, BenchConfig, Figure, GroupResult, max_abs_diff
from swiftd.client import Client
from swiftd.launcher import start_controlnet, start_gateway, start_lora_store, start_unet
from swiftd.request import ControlNet, Lora, Request
from swiftd.shapeworld.data import IMAGE_SIZE, held_out_scenes
from swiftd.shapeworld.evaluate import GUIDANCE_SCALE, STEPS, generate
from swiftd.shapeworld.export import CONTROLNET_ID, lora_id
from swiftd.shapeworld.models import FAMILY
from swiftd.shapeworld.render import STYLES, edge_map, render
from swiftd.shapeworld.score import Verdict, score

K_VALUES = (0, 2, 5, 10)
COMPILED_VARIANTS = {"compiled": "float32", "compiled_bf16": "bfloat16"}  # suite variant -> its dtype
GRID_PROMPTS = 4
GRID_ZOOM = 3


@dataclass
class Prompts:
    """The held-out prompts, their hints and their LoRA styles, as requests."""

    scenes: list
    hints: list[np.ndarray]
    styles: list[str]

    @classmethod
    def held_out(cls, count: int) -> Prompts:
        scenes = held_out_scenes(count)
        return cls(scenes, [edge_map(s, IMAGE_SIZE) for s in scenes], [STYLES[i % 2] for i in range(count)])

    def __len__(self) -> int:
        return len(self.scenes)

    def request(self, i: int) -> Request:
        return Request(
            self.scenes[i].caption(),
            width=IMAGE_SIZE,
            height=IMAGE_SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE_SCALE,
            seed=i,
            scheduler="euler",
            model_id=FAMILY,
        )

    def with_style(self, style: str) -> list[int]:
        return [i for i, s in enumerate(self.styles) if s == style]


def _rgb(image) -> np.ndarray:
    if isinstance(image, bytes):
        image = PIL.Image.open(io.BytesIO(image))
    return np.asarray(image.convert("RGB"))


# -- Diffusers, and the engine in this process ----------------------------------------------------


def reference_images(root: Path, prompts: Prompts, log) -> dict[str, list[np.ndarray]]:
    """Diffusers' images (plain, ControlNet, LoRA) and the in-process BAL sweep (`bal.k<K>`)."""
    from diffusers import (
        ControlNetModel,
        EulerDiscreteScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    from swiftd.loading import load_pipeline

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(root / "models" / FAMILY, safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    controlnet = ControlNetModel.from_pretrained(root / "controlnets" / CONTROLNET_ID)
    with_controlnet = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    with_controlnet.set_progress_bar_config(disable=True)

    # Prompt i with seed i, as Prompts.request(i) asks the suite.
    n = len(prompts)
    images: dict[str, list] = {"diffusers.plain": generate(pipe, prompts.scenes)}
    log("[quality] diffusers: plain done")
    images["diffusers.controlnet"] = generate(with_controlnet, prompts.scenes, controls=prompts.hints)
    log("[quality] diffusers: controlnet done")
    images["diffusers.lora"] = [None] * n
    for style in STYLES:
        pipe.load_lora_weights(root / "loras", weight_name=f"{lora_id(style, 'peft')}.safetensors")
        for i in prompts.with_style(style):
            (images["diffusers.lora"][i],) = generate(pipe, [prompts.scenes[i]], seed=i)
        pipe.unload_lora_weights()
    log("[quality] diffusers: lora done")

    engine_pipe = load_pipeline(root / "models" / FAMILY)
    for k in K_VALUES:
        images[f"bal.k{k}"] = [None] * n
    for style in STYLES:
        lora = lora_id(style, "peft")
        deltas = lora_deltas(engine_pipe, root / "loras" / f"{lora}.safetensors")
        for i in prompts.with_style(style):
            for k in K_VALUES:
                images[f"bal.k{k}"][i] = _rgb(image_with_arrival_at(engine_pipe, lora, deltas, prompts.request(i), k))
    log("[quality] in-process BAL sweep done")
    return images


# -- the suite ------------------------------------------------------------------------------------


class QualitySuite:
    """The services on the model root: a LoRA store and a ControlNet worker on the other core; on
    the device core an eager float32 UNet worker with its gateway (every add-on), and per compiled
    variant a UNet worker on those artifacts behind a gateway of its own (a gateway picks among
    its workers by load, so a variant is chosen by its gateway)."""

    def __init__(self, root: Path, config: BenchConfig, compiled: dict[str, tuple[Path, str]]):
        side, device = [config.controlnet_core], [config.device_core]
        self._cache = tempfile.TemporaryDirectory(prefix="swiftd-quality-lora-cache-")
        loras = [lora_id(style, "peft") for style in STYLES]
        self.store = start_lora_store(
            root, Path(self._cache.name), base_models=[FAMILY], prefetch=loras, cpu_cores=side, num_threads=1
        )
        controlnet = start_controlnet(root, preload=[CONTROLNET_ID], cpu_cores=side, num_threads=1, wait=False)
        workers = {"eager": start_unet(root, FAMILY, self.store.address, cpu_cores=device, num_threads=1, wait=False)}
        for name, (artifacts, dtype) in compiled.items():
            extra = ["--compiled-artifacts", str(artifacts), "--dtype", dtype]
            workers[name] = start_unet(root, FAMILY, extra_args=extra, cpu_cores=device, num_threads=1, wait=False)
        self.services = [self.store, controlnet, *workers.values()]
        for service in self.services:
            service.wait_ready()
        gateways = {
            "eager": start_gateway([workers["eager"].address], [controlnet.address], self.store.address, cpu_cores=side)
        }
        for name in compiled:
            gateways[name] = start_gateway([workers[name].address], cpu_cores=side)
        self.services += gateways.values()
        self.clients = {name: Client(gateway.address) for name, gateway in gateways.items()}

    def images(self, variant: str, requests: list[Request]) -> list[np.ndarray]:
        return [_rgb(self.clients[variant].generate(r).image_png) for r in requests]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        for service in reversed(self.services):
            service.stop()
        self._cache.cleanup()


def suite_images(suite: QualitySuite, prompts: Prompts, log) -> dict[str, list[np.ndarray]]:
    n = range(len(prompts))
    hinted = [
        replace(prompts.request(i), controlnets=[ControlNet(CONTROLNET_ID, PIL.Image.fromarray(prompts.hints[i]))])
        for i in n
    ]
    images = {"suite.plain": suite.images("eager", [prompts.request(i) for i in n])}
    log("[quality] suite: plain done")
    images["suite.controlnet"] = suite.images("eager", hinted)
    images["suite.controlnet_fp16_wire"] = suite.images(
        "eager", [replace(r, controlnet_wire_dtype="float16") for r in hinted]
    )
    log("[quality] suite: controlnet (float32 and float16 wire) done")
    images["suite.lora"] = suite.images(
        "eager",
        [
            replace(prompts.request(i), loras=[Lora(lora_id(prompts.styles[i], "peft"), 1.0)], lora_bound_steps=0)
            for i in n
        ],
    )
    log("[quality] suite: lora done")
    for variant in suite.clients:
        if variant != "eager":
            images[f"suite.{variant}"] = suite.images(variant, [prompts.request(i) for i in n])
            log(f"[quality] suite: {variant} done")
    return images


# -- scores and figures ---------------------------------------------------------------------------


@dataclass
class SettingScores:
    prompt_adherence: float
    control_iou: float | None
    style_hit: float  # share of images showing their prompt's LoRA style
    style_hit_by_style: dict[str, float]  # the same, over the prompts of each style

    @classmethod
    def of(cls, verdicts: list[Verdict], styles: list[str]) -> SettingScores:
        ious = [v.control_iou for v in verdicts if v.control_iou is not None]
        hits = [float(v.style[s]) for v, s in zip(verdicts, styles)]
        return cls(
            prompt_adherence=statistics.mean(v.prompt_adherence for v in verdicts),
            control_iou=statistics.mean(ious) if ious else None,
            style_hit=statistics.mean(hits),
            style_hit_by_style={
                style: statistics.mean(h for h, s in zip(hits, styles) if s == style) for style in sorted(set(styles))
            },
        )

    def largest_change(self, other: SettingScores) -> float:
        changes = [abs(self.prompt_adherence - other.prompt_adherence), abs(self.style_hit - other.style_hit)]
        if self.control_iou is not None and other.control_iou is not None:
            changes.append(abs(self.control_iou - other.control_iou))
        return max(changes)


def scores(images: dict[str, list[np.ndarray]], prompts: Prompts) -> dict[str, SettingScores]:
    out = {}
    for name, setting in images.items():
        hinted = "controlnet" in name
        verdicts = [
            score(image, scene, hint if hinted else None)
            for image, scene, hint in zip(setting, prompts.scenes, prompts.hints)
        ]
        out[name] = SettingScores.of(verdicts, prompts.styles)
    return out


def same_image_share(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Share of prompts whose two images differ by at most IMAGE_TOLERANCE in every pixel."""
    same = [max_abs_diff(x, y) <= IMAGE_TOLERANCE for x, y in zip(a, b)]
    return statistics.mean(same)


def figures_of(s: dict[str, SettingScores], images: dict[str, list], group: str) -> list[Figure]:
    figures = [
        Figure("quality.prompt_adherence", s["suite.plain"].prompt_adherence, "x", group),
        Figure("quality.prompt_adherence.diffusers", s["diffusers.plain"].prompt_adherence, "x", group),
        Figure("quality.control_iou", s["suite.controlnet"].control_iou, "x", group),
        Figure("quality.control_iou.diffusers", s["diffusers.controlnet"].control_iou, "x", group),
        Figure("quality.prompt_adherence.controlnet", s["suite.controlnet"].prompt_adherence, "x", group),
        Figure("quality.lora_style_hit", s["suite.lora"].style_hit, "x", group),
        Figure("quality.lora_style_hit.diffusers", s["diffusers.lora"].style_hit, "x", group),
        *(
            Figure(f"quality.lora_style_hit.{style}", hit, "x", group)
            for style, hit in s["suite.lora"].style_hit_by_style.items()
        ),
        Figure("quality.lora_style_false", s["suite.plain"].style_hit, "x", group),
        Figure("quality.prompt_adherence.lora", s["suite.lora"].prompt_adherence, "x", group),
        Figure(
            "quality.fp16_wire_delta",
            s["suite.controlnet_fp16_wire"].largest_change(s["suite.controlnet"]),
            "x",
            group,
            dtype="float16 on the wire",
        ),
    ]
    for k in K_VALUES:
        figures.append(Figure(f"quality.bal_style_hit.k{k}", s[f"bal.k{k}"].style_hit, "x", group))
        if k:
            figures.append(Figure(f"quality.bal_delta.k{k}", s[f"bal.k{k}"].largest_change(s["bal.k0"]), "x", group))
    for variant, dtype in COMPILED_VARIANTS.items():
        if f"suite.{variant}" in s:
            delta = s[f"suite.{variant}"].largest_change(s["suite.plain"])
            figures.append(Figure(f"quality.{variant}_delta", delta, "x", group, dtype=dtype))
    for setting in ("plain", "controlnet", "lora"):
        share = same_image_share(images[f"suite.{setting}"], images[f"diffusers.{setting}"])
        figures.append(Figure(f"quality.same_image_share.{setting}", share, "x", group))
    figures.append(
        Figure("quality.same_image_share.bal_k0", same_image_share(images["suite.lora"], images["bal.k0"]), "x", group)
    )
    return figures


def table_of(s: dict[str, SettingScores], n: int, config_line: str) -> str:
    lines = [
        config_line,
        f"  {'setting':<30}{'prompt adherence':>18}{'control IoU':>13}{'style hit':>11}",
    ]
    for name, v in s.items():
        iou = "" if v.control_iou is None else f"{v.control_iou:.3f}"
        lines.append(f"  {name:<30}{v.prompt_adherence:>18.3f}{iou:>13}{v.style_hit:>11.3f}")
    lines.append(
        f"  ({n} held-out prompts, seeds 0..{n - 1}; style hit: the prompt's LoRA style seen, which on the plain "
        "settings is a false hit)"
    )
    return "\n".join(lines)


# -- the grid -------------------------------------------------------------------------------------

GRID_COLUMNS = (
    ("asked", None),
    ("hint", None),
    ("Diffusers", "diffusers.plain"),
    ("suite", "suite.plain"),
    ("+ControlNet", "suite.controlnet"),
    ("fp16 wire", "suite.controlnet_fp16_wire"),
    ("+LoRA K=0", "bal.k0"),
    ("LoRA K=10", "bal.k10"),
    ("compiled", "suite.compiled"),
    ("bf16", "suite.compiled_bf16"),
)


def write_grid(images: dict[str, list], prompts: Prompts, path: Path) -> None:
    """The first GRID_PROMPTS prompts (rows) across the settings (columns), zoomed GRID_ZOOM times."""
    columns = [(title, key) for title, key in GRID_COLUMNS if key is None or key in images]
    cell, label = IMAGE_SIZE * GRID_ZOOM, 16
    rows = min(GRID_PROMPTS, len(prompts))
    grid = PIL.Image.new("RGB", (cell * len(columns), label + cell * rows), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(grid)
    for c, (title, key) in enumerate(columns):
        draw.text((c * cell + 4, 2), title, fill=(0, 0, 0))
        for r in range(rows):
            if key is None:
                image = render(prompts.scenes[r], IMAGE_SIZE) if title == "asked" else prompts.hints[r]
            else:
                image = images[key][r]
            tile = PIL.Image.fromarray(image).resize((cell, cell), PIL.Image.NEAREST)
            grid.paste(tile, (c * cell, label + r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# -- the group ------------------------------------------------------------------------------------


def group_quality(config: BenchConfig, session) -> GroupResult:
    group = "quality"
    root = config.quality_root
    if not (root / "models" / FAMILY).is_dir():
        raise FileNotFoundError(f"{root}: no trained {FAMILY} model root (python -m swiftd.shapeworld export)")
    prompts = Prompts.held_out(config.quality_count)
    compiled = {}
    if config.quality_compiled:
        artifacts = REPO / ".zoo" / "quality"
        for variant, dtype in COMPILED_VARIANTS.items():
            out = artifacts / f"{FAMILY}-{dtype}-{IMAGE_SIZE}"
            compiled[variant] = (
                compiled_artifacts(root, FAMILY, out, IMAGE_SIZE, dtype=dtype, log=config.log),
                dtype,
            )
    config.log(f"[quality] {len(prompts)} held-out prompts; starting the suite on {root} ...")
    suite = QualitySuite(root, config, compiled)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="reference") as pool:
            reference = pool.submit(reference_images, root, prompts, config.log)
            images = suite_images(suite, prompts, config.log)
            images.update(reference.result())
    finally:
        suite.close()
    s = scores(images, prompts)
    write_grid(images, prompts, config.quality_grid)
    hw = {
        "suite": f"UNet workers core {config.device_core}; ControlNet worker, store, gateways core "
        f"{config.controlnet_core}; 1 thread each",
        "diffusers": f"in the bench process, core {config.controlnet_core}, 1 thread",
    }
    result = GroupResult(hardware=hw, figures=figures_of(s, images, group))
    result.table = table_of(
        s,
        len(prompts),
        f"quality: {FAMILY} ({root}), {IMAGE_SIZE}x{IMAGE_SIZE}, Euler {STEPS} steps, guidance {GUIDANCE_SCALE}; "
        f"grid {config.quality_grid}",
    )
    return result
