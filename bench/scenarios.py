"""What the benchmark measures: its configuration, the request scenarios, and the figures it emits.

Shared by the bench process (`bench.run`), the pinned Diffusers baseline process
(`bench.baseline_process`) and the UNet-worker client (`bench.ours`), so both sides of every
comparison run exactly the same request.
"""

from __future__ import annotations

import base64
import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image

from swiftd.images import edge_image

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE_PROMPT = "blurry"
SEED = 42
GUIDANCE_SCALE = 7.5
SCHEDULER = "euler"  # both sides: EulerDiscreteScheduler from the model's own scheduler config

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "bench" / "results.jsonl"


@dataclass
class BenchConfig:
    zoo: Path
    family: str = "bench-sd15"
    size: int = 256
    steps: int = 20
    repeats: int = 1  # timed requests per scenario and side (after one untimed warm-up); median reported
    device_core: int = 0  # the one core a "device" is: the UNet worker's and the 1-core Diffusers'
    controlnet_core: int = 1  # our ControlNet workers' and store's device; the 2-core Diffusers uses both
    out: Path = DEFAULT_RESULTS
    verbose: bool = True
    # The quality group: the trained shape-world model root, how many held-out prompts, whether to
    # build and run the compiled backbones, where the image grid goes.
    quality_root: Path = REPO / "weights"
    quality_count: int = 200
    quality_compiled: bool = True
    quality_grid: Path = REPO / "docs" / "img" / "quality_grid.png"

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)


@dataclass(frozen=True)
class ControlNetSpec:
    controlnet_id: str
    image_png: bytes
    scale: float = 1.0


@dataclass(frozen=True)
class Scenario:
    name: str
    controlnets: tuple[ControlNetSpec, ...] = ()
    loras: tuple[tuple[str, float], ...] = ()  # (lora_id, scale), in application order

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "controlnets": [
                {"id": c.controlnet_id, "image": base64.b64encode(c.image_png).decode(), "scale": c.scale}
                for c in self.controlnets
            ],
            "loras": [list(pair) for pair in self.loras],
        }

    @classmethod
    def from_json(cls, obj: dict) -> Scenario:
        return cls(
            name=obj["name"],
            controlnets=tuple(
                ControlNetSpec(c["id"], base64.b64decode(c["image"]), c["scale"]) for c in obj["controlnets"]
            ),
            loras=tuple((lora_id, float(scale)) for lora_id, scale in obj["loras"]),
        )


def depth_image(size: int) -> bytes:
    """A synthetic depth map (a sphere in front of a sloped floor) as PNG: a stand-in for MiDaS output."""
    y, x = np.mgrid[0:size, 0:size] / size
    floor = 0.2 + 0.5 * y
    sphere = np.sqrt(np.clip(0.09 - (x - 0.5) ** 2 - (y - 0.45) ** 2, 0.0, None)) / 0.3
    depth = np.maximum(floor, sphere)
    image = PIL.Image.fromarray((depth * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def baseline_scenarios(family: str, size: int) -> list[Scenario]:
    """base, cn1, cn1_lora1, cn2_lora2 for a zoo family (ids follow swiftd.zoo's naming)."""
    edges = ControlNetSpec(f"{family}-cn-edges", edge_image(size), 1.0)
    depth = ControlNetSpec(f"{family}-cn-depth", depth_image(size), 1.0)
    r64 = f"{family}-lora-peft-r64"
    kohya_te = f"{family}-lora-kohya-r16-te"
    return [
        Scenario("base"),
        Scenario("cn1", (edges,)),
        Scenario("cn1_lora1", (edges,), ((r64, 1.0),)),
        Scenario("cn2_lora2", (edges, depth), ((r64, 0.8), (kohya_te, 0.5))),
    ]


def rank64_lora_id(family: str) -> str:
    return f"{family}-lora-peft-r64"


# -- figures -----------------------------------------------------------------------------------


@dataclass
class Figure:
    figure: str
    value: float
    unit: str  # "s", "x" (a ratio) or "dB"
    group: str
    # What each side ran on ("ours", "diffusers"): cores and threads. None: the group's default.
    hardware: dict[str, str] | None = None
    dtype: str = "float32"

    def as_dict(self) -> dict:
        return {
            "figure": self.figure,
            "value": float(f"{float(self.value):.6g}"),
            "unit": self.unit,
            "group": self.group,
            "hardware": self.hardware or {},
            "dtype": self.dtype,
        }


@dataclass
class GroupResult:
    """What one group produced: its figures, the hardware of each side, a human-readable table."""

    figures: list[Figure] = field(default_factory=list)
    table: str = ""
    hardware: dict[str, str] = field(default_factory=dict)  # the default of its figures


#: Largest pixel difference (0..255) accepted between the two sides' images of the same request.
#: Both run fp32 from the same weights and seed; Diffusers' unfuse (a subtraction) leaves its
#: weights a rounding error away from pristine, which may move a pixel by one level.
IMAGE_TOLERANCE = 2


def check_same_image(png_a: bytes, png_b: bytes, what: str) -> int:
    """The pixel difference of two sides' images; the run is refused beyond IMAGE_TOLERANCE."""
    diff = image_max_abs_diff(png_a, png_b)
    if diff > IMAGE_TOLERANCE:
        raise RuntimeError(f"{what}: the two sides' images differ by {diff} > {IMAGE_TOLERANCE} levels; not comparable")
    return diff


def hardware(config: BenchConfig) -> dict[str, str]:
    """What each side of the usual comparison runs on."""
    return {
        "diffusers": f"core {config.device_core}, 1 thread",
        "diffusers_2cores": f"cores {config.device_core},{config.controlnet_core}, 2 threads",
        "ours": (
            f"UNet worker core {config.device_core} (1 thread); ControlNet workers and LoRA store "
            f"core {config.controlnet_core} (1 thread each)"
        ),
        "in_process": f"core {config.device_core}, 1 thread",
    }


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def image_max_abs_diff(png_a: bytes, png_b: bytes) -> int:
    """Largest per-pixel difference (0..255) of two PNGs: a sanity check that both sides did the same work."""
    return max_abs_diff(*(np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB")) for png in (png_a, png_b)))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest per-pixel difference (0..255) of two 8-bit images (255 when their shapes differ)."""
    if a.shape != b.shape:
        return 255
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
