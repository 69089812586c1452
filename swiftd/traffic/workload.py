"""A seeded generator of traces shaped like production text-to-image traffic with add-ons.

What a server sees matters more than any single request: which add-ons come together, how often
the same LoRA comes back, how bursty arrivals are. The shape follows the published
characterization of production traffic (the SwiftDiffusion/Katz work, see DESIGN.md):

* most requests use add-ons (`addon_share`, default 0.8);
* ControlNet use is concentrated: the five most used ControlNets make 72-98 % of ControlNet
  invocations. Popularity is Zipf-like over the catalog's ControlNets (`controlnet_zipf_s`; 1.0
  gives ~93 % for six ControlNets, ~78 % for ten; raise it for larger catalogs);
* LoRA use is long-tailed: half of all LoRA invocations spread over 13-170 distinct LoRAs. Zipf
  with `lora_zipf_s` 0.7 over a 200-LoRA catalog puts that point at ~34 LoRAs, 80 % at ~110 and
  leaves the last ~50 LoRAs for the last 10 %. The other published figure, 75-90 % of invocations
  over ~1,100-1,400 distinct LoRAs, needs a catalog of thousands and cannot hold over 200: here
  the tail is the rest of the catalog, scaled down, not that figure;
* 0-3 ControlNets and 0-2 LoRAs per request (weights among requests with add-ons; a request with
  add-ons has at least one), each ControlNet with a guidance window: the whole schedule, ending
  early, or starting late; LoRA and conditioning scales drawn from a range.

Which ids are popular is a seeded permutation of the catalog, so popularity is not tied to an id's
position, rank or format. Arrivals are Poisson at `rate_rps`, or bursty with the same mean rate: an
on/off modulated Poisson process whose bursts are `burst_factor` times as intense as the quiet
periods between them and take `burst_time_share` of the time. Separate random streams for
arrivals, add-ons and request parameters keep each independent of the others' settings (another
add-on mix leaves the arrival times as they were). The same config and catalog give the same
trace file, byte for byte; its first line holds the config (`trace_header`).
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import PIL.Image

from swiftd.request import ControlNet, Lora, Request, scheduler_names
from swiftd.traffic.catalog import TrafficCatalog
from swiftd.traffic.trace import TraceEntry

GENERATOR = "swiftd.traffic.workload"
GENERATOR_VERSION = 1  # bump when the same config gives another trace

ARRIVAL_PROCESSES = ("poisson", "bursty")

# A small fixed vocabulary: prompts vary (the text encoder runs every time) without a corpus.
SUBJECTS = (
    "a red fox",
    "an old lighthouse",
    "a bowl of ramen",
    "a vintage motorcycle",
    "a snowy mountain village",
    "a robot gardener",
    "a sailing ship",
    "a portrait of a violinist",
    "a glass teapot",
    "a desert canyon",
    "a city street at night",
    "a koi pond",
)
SETTINGS = ("at sunrise", "in the rain", "under neon lights", "in autumn", "on a white background", "in fog")
STYLES = ("photo", "watercolor painting", "pencil sketch", "3d render", "oil painting", "anime illustration")
NEGATIVE_PROMPTS = ("", "blurry, low quality", "text, watermark, jpeg artifacts")


# -- configuration ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadConfig:
    """Everything a trace depends on besides the catalog (see the module docstring for the defaults).

    One flat dataclass, so that a trace header holds it as one JSON object and a caller changes a
    setting with `dataclasses.replace`.
    """

    seed: int = 0
    # -- arrivals: `num_requests`, or every arrival before `duration_s` (give exactly one)
    arrival: str = "poisson"  # one of ARRIVAL_PROCESSES
    rate_rps: float = 0.5  # mean arrival rate over the whole trace
    num_requests: int | None = 200
    duration_s: float | None = None
    # bursty only: rate in a burst / rate between bursts, the share of time in bursts, and the
    # mean length of one burst plus one quiet period (both exponentially distributed).
    burst_factor: float = 8.0
    burst_time_share: float = 0.2
    burst_cycle_s: float = 60.0
    # -- add-ons
    addon_share: float = 0.8  # requests with at least one ControlNet or LoRA
    # Weights of 0, 1, 2, 3 ControlNets and of 0, 1, 2 LoRAs, among requests with add-ons.
    controlnets_per_request: tuple[float, ...] = (0.30, 0.45, 0.18, 0.07)
    loras_per_request: tuple[float, ...] = (0.25, 0.55, 0.20)
    controlnet_zipf_s: float = 1.0  # popularity of the i-th most used ControlNet ~ 1 / i**s
    lora_zipf_s: float = 0.7
    lora_scale_range: tuple[float, float] = (0.5, 1.0)
    controlnet_scale_range: tuple[float, float] = (0.5, 1.0)
    # Guidance windows: [0, 1], [0, end] ending early, or [start, 1] starting late (the rest).
    window_full_share: float = 0.4
    window_early_end_share: float = 0.45
    early_end_range: tuple[float, float] = (0.4, 0.9)
    late_start_range: tuple[float, float] = (0.1, 0.3)
    # -- the rest of each request (the traffic configuration of the bench model)
    width: int = 128
    height: int = 128
    steps: int = 10
    guidance_scale: float = 7.5
    scheduler: str = "euler"  # a swiftd.request.SCHEDULERS name
    num_images: int = 6  # distinct conditioning images, reused across requests
    deadline_s: float = 120.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict) -> WorkloadConfig:
        """The config a trace header holds (JSON lists back to tuples; unknown keys are an error)."""
        return cls(**{key: _tuples(value) for key, value in obj.items()})

    def check(self) -> None:
        """ValueError naming the first setting that cannot generate a trace."""
        if self.arrival not in ARRIVAL_PROCESSES:
            raise ValueError(f"arrival: {self.arrival!r}, not one of {ARRIVAL_PROCESSES}")
        if not self.rate_rps > 0:
            raise ValueError("rate_rps must be > 0")
        if (self.num_requests is None) == (self.duration_s is None):
            raise ValueError("give exactly one of num_requests and duration_s")
        if self.arrival == "bursty" and not (
            self.burst_factor >= 1 and 0 < self.burst_time_share < 1 and self.burst_cycle_s > 0
        ):
            raise ValueError("bursty arrivals need burst_factor >= 1, 0 < burst_time_share < 1, burst_cycle_s > 0")
        if not 0 <= self.addon_share <= 1:
            raise ValueError("addon_share must be in [0, 1]")
        for name in ("controlnets_per_request", "loras_per_request"):
            weights = getattr(self, name)
            if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"{name}: weights (of 0, 1, ... add-ons) must be >= 0, not all 0")
        if self.addon_share > 0 and sum(self.controlnets_per_request[1:]) + sum(self.loras_per_request[1:]) <= 0:
            raise ValueError("addon_share > 0 needs some weight on 1 or more ControlNets or LoRAs")
        if not (self.window_full_share >= 0 and self.window_early_end_share >= 0):
            raise ValueError("window shares must be >= 0")
        if self.window_full_share + self.window_early_end_share > 1:
            raise ValueError("window_full_share + window_early_end_share must be <= 1")
        if not 0 < self.early_end_range[0] <= self.early_end_range[1] <= 1:
            raise ValueError("early_end_range must lie in (0, 1]")
        if not 0 <= self.late_start_range[0] <= self.late_start_range[1] < 1:
            raise ValueError("late_start_range must lie in [0, 1)")
        if self.num_images < 1:
            raise ValueError("num_images must be >= 1")
        if self.scheduler and self.scheduler not in scheduler_names():
            raise ValueError(f"scheduler: {self.scheduler!r}, not one of {scheduler_names()}")


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def trace_header(config: WorkloadConfig, catalog: TrafficCatalog) -> dict:
    """What the trace's first line records: the generator, its config and the catalog it drew from."""
    return {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "config": config.to_dict(),
        "catalog": {
            "model_id": catalog.model_id,
            "family": catalog.family,
            "num_loras": len(catalog.loras),
            "num_controlnets": len(catalog.controlnets),
            "fingerprint": catalog.fingerprint(),
        },
    }


# -- arrivals ---------------------------------------------------------------------------------------


def _poisson_times(rng: np.random.Generator, rate: float) -> Iterator[float]:
    t = 0.0
    while True:
        t += rng.exponential(1.0 / rate)
        yield t


def _bursty_times(rng: np.random.Generator, config: WorkloadConfig) -> Iterator[float]:
    """On/off modulated Poisson: rate_on = burst_factor * rate_off, mean rate = config.rate_rps."""
    share = config.burst_time_share
    rate_off = config.rate_rps / (share * config.burst_factor + 1 - share)
    rates = {True: config.burst_factor * rate_off, False: rate_off}
    mean_period = {True: share * config.burst_cycle_s, False: (1 - share) * config.burst_cycle_s}
    bursting = bool(rng.random() < share)  # start in the stationary mix of states
    t, period_end = 0.0, rng.exponential(mean_period[bursting])
    while True:
        nxt = t + rng.exponential(1.0 / rates[bursting])
        if nxt < period_end:
            t = nxt
            yield t
        else:  # memoryless: drawing afresh from the switch is exact
            t, bursting = period_end, not bursting
            period_end = t + rng.exponential(mean_period[bursting])


def arrival_times(rng: np.random.Generator, config: WorkloadConfig) -> list[float]:
    """Send times in seconds from the start (rounded to the trace's microseconds), non-decreasing."""
    times = _poisson_times(rng, config.rate_rps) if config.arrival == "poisson" else _bursty_times(rng, config)
    out = []
    for t in times:
        if config.duration_s is not None and t >= config.duration_s:
            break
        if config.num_requests is not None and len(out) >= config.num_requests:
            break
        out.append(round(t, 6))
    return out


# -- add-ons ----------------------------------------------------------------------------------------


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Probability of the i-th most popular of n items ~ 1 / i**s."""
    if n == 0:
        return np.zeros(0)
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


@dataclass(frozen=True)
class _Popularity:
    """Ids in popularity order (a seeded permutation of the catalog) and their Zipf weights."""

    ids: tuple[str, ...]
    weights: np.ndarray

    @classmethod
    def of(cls, rng: np.random.Generator, ids: Sequence[str], s: float) -> _Popularity:
        order = rng.permutation(len(ids))
        return cls(tuple(sorted(ids)[i] for i in order), zipf_weights(len(ids), s))

    def draw(self, rng: np.random.Generator, k: int) -> list[str]:
        """k distinct ids, each draw by popularity among those not yet drawn."""
        k = min(k, len(self.ids))
        return [self.ids[i] for i in rng.choice(len(self.ids), size=k, replace=False, p=self.weights)] if k else []


def _counts(rng: np.random.Generator, config: WorkloadConfig, num_cns: int, num_loras: int) -> tuple[int, int]:
    """(ControlNets, LoRAs) of one request: none, or a draw with at least one add-on."""
    cn_w = np.array(config.controlnets_per_request[: num_cns + 1], dtype=float)
    lora_w = np.array(config.loras_per_request[: num_loras + 1], dtype=float)
    if rng.random() >= config.addon_share or (cn_w[1:].sum() + lora_w[1:].sum()) == 0:
        return 0, 0
    while True:
        n_cn = int(rng.choice(len(cn_w), p=cn_w / cn_w.sum())) if cn_w.sum() else 0
        n_lora = int(rng.choice(len(lora_w), p=lora_w / lora_w.sum())) if lora_w.sum() else 0
        if n_cn or n_lora:
            return n_cn, n_lora


def _round2(x: float) -> float:
    return float(round(x, 2))


def _window(rng: np.random.Generator, config: WorkloadConfig) -> tuple[float, float]:
    """(guidance_start, guidance_end) of one ControlNet, 0 <= start < end <= 1."""
    u = rng.random()
    if u < config.window_full_share:
        return 0.0, 1.0
    if u < config.window_full_share + config.window_early_end_share:
        return 0.0, _round2(rng.uniform(*config.early_end_range))
    return _round2(rng.uniform(*config.late_start_range)), 1.0


# -- request parameters -----------------------------------------------------------------------------


def conditioning_image(index: int, width: int, height: int) -> bytes:
    """Synthetic conditioning image `index` as PNG bytes at width x height: rings, stripes, a smooth
    depth-like gradient, or box outlines, each placed by its index (no randomness: same bytes)."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width]).reshape(2, 1, 1)
    cx, cy = 0.3 + 0.4 * ((index * 0.37) % 1), 0.3 + 0.4 * ((index * 0.61) % 1)
    pattern = index % 4
    if pattern == 0:  # edge-map-like rings
        img = (np.abs(np.sin(np.hypot(x - cx, y - cy) * (30 + 5 * index))) < 0.15) * 255.0
    elif pattern == 1:  # line-art-like stripes
        angle = math.radians(20 + 37 * index)
        img = (np.abs(np.sin((x * math.cos(angle) + y * math.sin(angle)) * (25 + 3 * index))) < 0.1) * 255.0
    elif pattern == 2:  # depth-like smooth gradient
        img = 255.0 * np.clip(1.0 - np.hypot(x - cx, y - cy) * 1.4, 0.0, 1.0)
    else:  # pose/segmentation-like box outlines
        img = np.zeros_like(x)
        for j in range(3):
            x0, y0 = (cx + 0.2 * j) % 0.7, (cy + 0.3 * j) % 0.7
            inside = (x >= x0) & (x <= x0 + 0.25) & (y >= y0) & (y <= y0 + 0.25)
            border = inside & ~((x >= x0 + 0.02) & (x <= x0 + 0.23) & (y >= y0 + 0.02) & (y <= y0 + 0.23))
            img[border] = 255.0
    buffer = io.BytesIO()
    PIL.Image.fromarray(img.astype(np.uint8)).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _prompt(rng: np.random.Generator) -> tuple[str, str]:
    subject, setting = SUBJECTS[rng.integers(len(SUBJECTS))], SETTINGS[rng.integers(len(SETTINGS))]
    style = STYLES[rng.integers(len(STYLES))]
    return f"a {style} of {subject} {setting}", NEGATIVE_PROMPTS[rng.integers(len(NEGATIVE_PROMPTS))]


# -- the trace --------------------------------------------------------------------------------------


def generate(config: WorkloadConfig, catalog: TrafficCatalog) -> list[TraceEntry]:
    """The trace `config` describes over `catalog`'s model, LoRAs and ControlNets."""
    config.check()
    streams = np.random.SeedSequence(config.seed).spawn(4)
    arrival_rng, popularity_rng, addon_rng, param_rng = (np.random.default_rng(s) for s in streams)
    times = arrival_times(arrival_rng, config)
    cn_popularity = _Popularity.of(popularity_rng, catalog.controlnet_ids, config.controlnet_zipf_s)
    lora_popularity = _Popularity.of(popularity_rng, catalog.lora_ids, config.lora_zipf_s)
    images = [conditioning_image(i, config.width, config.height) for i in range(config.num_images)]
    entries = []
    for i, at_s in enumerate(times):
        n_cn, n_lora = _counts(addon_rng, config, len(catalog.controlnets), len(catalog.loras))
        controlnets = []
        for cn_id in cn_popularity.draw(addon_rng, n_cn):
            start, end = _window(addon_rng, config)
            scale = _round2(addon_rng.uniform(*config.controlnet_scale_range))
            image = images[addon_rng.integers(len(images))]
            controlnets.append(ControlNet(cn_id, image, scale, guidance_start=start, guidance_end=end))
        loras = [
            Lora(lid, _round2(addon_rng.uniform(*config.lora_scale_range)))
            for lid in lora_popularity.draw(addon_rng, n_lora)
        ]
        prompt, negative = _prompt(param_rng)
        request = Request(
            prompt=prompt,
            negative_prompt=negative,
            width=config.width,
            height=config.height,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance_scale,
            seed=int(param_rng.integers(0, 2**31)),
            scheduler=config.scheduler,
            model_id=catalog.model_id,
            loras=loras,
            controlnets=controlnets,
            request_id=f"w{config.seed}-{i:06d}",
        )
        entries.append(TraceEntry(at_s=at_s, request=request.to_pb(), deadline_s=config.deadline_s))
    return entries


# -- what a trace looks like ------------------------------------------------------------------------


def _share_of_top(counts: Counter, k: int) -> float:
    total = sum(counts.values())
    return sum(c for _, c in counts.most_common(k)) / total if total else 0.0


def _items_for_share(counts: Counter, share: float) -> int:
    """How many of the most used items make `share` of all invocations."""
    total, covered = sum(counts.values()), 0
    for n, (_, c) in enumerate(counts.most_common(), start=1):
        covered += c
        if covered >= share * total:
            return n
    return 0


def popularity_stats(entries: Sequence[TraceEntry]) -> dict:
    """The shape of a trace, in the terms of the published characterization."""
    cn_counts: Counter = Counter()
    lora_counts: Counter = Counter()
    cns_per_request: Counter = Counter()
    loras_per_request: Counter = Counter()
    windows = []
    with_addons = 0
    for entry in entries:
        pb = entry.request
        cn_counts.update(cn.controlnet_id for cn in pb.controlnets)
        lora_counts.update(lora.lora_id for lora in pb.loras)
        cns_per_request[len(pb.controlnets)] += 1
        loras_per_request[len(pb.loras)] += 1
        with_addons += bool(pb.controlnets or pb.loras)
        windows += [(cn.guidance_end or 1.0) - cn.guidance_start for cn in pb.controlnets]
    n = len(entries)
    span = entries[-1].at_s if entries else 0.0
    return {
        "requests": n,
        "duration_s": round(span, 3),
        "mean_rate_rps": round(n / span, 4) if span > 0 else 0.0,
        "addon_share": round(with_addons / n, 4) if n else 0.0,
        "controlnet_invocations": sum(cn_counts.values()),
        "distinct_controlnets": len(cn_counts),
        "controlnet_top5_share": round(_share_of_top(cn_counts, 5), 4),
        "controlnet_mean_window": round(sum(windows) / len(windows), 4) if windows else 0.0,
        "lora_invocations": sum(lora_counts.values()),
        "distinct_loras": len(lora_counts),
        "loras_for_half_of_invocations": _items_for_share(lora_counts, 0.5),
        "controlnets_per_request": {str(k): cns_per_request[k] for k in sorted(cns_per_request)},
        "loras_per_request": {str(k): loras_per_request[k] for k in sorted(loras_per_request)},
    }
