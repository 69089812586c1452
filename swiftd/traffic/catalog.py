"""The traffic catalog: a model repository with hundreds of LoRAs and several ControlNets for one model.

Production traffic touches a long tail of LoRAs and a handful of ControlNets (DESIGN.md, "Serving
under traffic"); the zoo has four LoRAs and two ControlNets per family, too few for a cache, an
affinity policy or a LoRA switch to be exercised the way traffic exercises them. The catalog is
generated from a zoo family, by default into `<zoo>/traffic-<family>/` (default_root), in the
layout every service reads with `--model-root`::

    <out>/models/<family>                       relative symlink to the zoo's pipeline folder
    <out>/models/<family>.safetensors           relative symlink to its single-file checkpoint, if any
    <out>/loras/<family>-t-lora-NNN-<variant>-r<rank>.safetensors
    <out>/controlnets/<family>-t-cn-NN-<conditioning>/   ControlNetModel folders
    <out>/catalog.json                          what is in it (load_catalog), for generators and benchmarks
    <out>/.complete-traffic                     marker, written last: catalog version + config hash

LoRA i has rank `ranks[i % len(ranks)]` and variant `LORA_VARIANTS[i % 5]`; with the default six
ranks (4..128) the first 30 LoRAs hold every rank x variant pair. Variants: Diffusers/PEFT
(UNet attention, feed-forward, projections), kohya with the same targets, kohya with the text
encoder too, kohya LoCon (UNet 3x3 convs too). Files are fp16 by default, as published LoRAs are.
Each ControlNet is the zoo's ControlNet construction seeded by its id, so all differ. Every file is written from seeded generators, so a build gives the same bytes every time;
a catalog whose marker matches its config is not rebuilt, one that does not is rebuilt from scratch.

torch is imported only when something is built: `load_catalog` and `plan_catalog` are cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump whenever the catalog's files change for the same config: the marker records it.
CATALOG_VERSION = "traffic-catalog-1"
CATALOG_FILE = "catalog.json"
MARKER_FILE = ".complete-traffic"

# (name suffix, file format, text-encoder layers, conv layers). Five: coprime with six ranks.
LORA_VARIANTS = (
    ("peft", "peft", False, False),
    ("kohya", "kohya", False, False),
    ("peft", "peft", False, False),
    ("kohya-te", "kohya", True, False),
    ("kohya-conv", "kohya", False, True),
)
# ControlNet conditionings as deployments name them; only the name and seed differ (weights are random).
CONDITIONINGS = ("canny", "depth", "openpose", "scribble", "lineart", "softedge", "seg", "normal", "mlsd", "tile")


@dataclass(frozen=True)
class CatalogConfig:
    """What to build: its JSON form is hashed into the marker, so changing any field rebuilds."""

    family: str = "bench-sd15"  # the zoo family whose model the add-ons are made for
    num_loras: int = 200
    num_controlnets: int = 6
    lora_ranks: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    lora_dtype: str = "float16"  # a torch dtype name

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class CatalogLora:
    lora_id: str
    rank: int
    format: str  # "peft" (Diffusers/PEFT keys) or "kohya" (kohya/A1111 keys with alphas)
    has_te: bool  # adapts the text encoder too
    has_conv: bool  # adapts UNet 3x3 convolutions too (LoCon)


@dataclass(frozen=True)
class CatalogControlNet:
    controlnet_id: str
    conditioning: str  # what its conditioning image is meant to be ("canny", "depth", ...): a name only


@dataclass(frozen=True)
class TrafficCatalog:
    """What a traffic catalog holds, by id (the files live under `root` when it was built)."""

    model_id: str
    family: str
    kind: str  # "sd15" or "sdxl"
    loras: tuple[CatalogLora, ...]
    controlnets: tuple[CatalogControlNet, ...]
    root: Path | None = None

    @property
    def lora_ids(self) -> list[str]:
        return [lora.lora_id for lora in self.loras]

    @property
    def controlnet_ids(self) -> list[str]:
        return [cn.controlnet_id for cn in self.controlnets]

    def to_json(self) -> dict:
        return {
            "catalog_version": CATALOG_VERSION,
            "model_id": self.model_id,
            "family": self.family,
            "kind": self.kind,
            "loras": [asdict(lora) for lora in self.loras],
            "controlnets": [asdict(cn) for cn in self.controlnets],
        }

    def fingerprint(self) -> str:
        """A short hash of the ids and their properties: what a trace generated from it depends on."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def plan_catalog(config: CatalogConfig) -> TrafficCatalog:
    """The catalog `config` describes (ids, ranks, formats), without building anything."""
    from swiftd.zoo.specs import SPECS

    if config.family not in SPECS:
        raise ValueError(f"unknown zoo family {config.family!r}; known: {sorted(SPECS)}")
    if config.num_loras < 0 or config.num_controlnets < 0 or not config.lora_ranks:
        raise ValueError("num_loras and num_controlnets must be >= 0, lora_ranks not empty")
    family = config.family
    width = max(3, len(str(config.num_loras - 1)))
    loras = []
    for i in range(config.num_loras):
        rank = config.lora_ranks[i % len(config.lora_ranks)]
        name, fmt, te, conv = LORA_VARIANTS[i % len(LORA_VARIANTS)]
        loras.append(CatalogLora(f"{family}-t-lora-{i:0{width}d}-{name}-r{rank}", rank, fmt, te, conv))
    controlnets = []
    for i in range(config.num_controlnets):
        conditioning = CONDITIONINGS[i] if i < len(CONDITIONINGS) else f"extra{i}"
        controlnets.append(CatalogControlNet(f"{family}-t-cn-{i:02d}-{conditioning}", conditioning))
    return TrafficCatalog(family, family, SPECS[family].kind, tuple(loras), tuple(controlnets))


def load_catalog(root: str | Path) -> TrafficCatalog:
    """The catalog built under `root`, from its catalog.json."""
    root = Path(root)
    path = root / CATALOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CATALOG_FILE} under {root}: build it with `python -m swiftd.traffic catalog`")
    obj = json.loads(path.read_text())
    return TrafficCatalog(
        model_id=obj["model_id"],
        family=obj["family"],
        kind=obj["kind"],
        loras=tuple(CatalogLora(**lora) for lora in obj["loras"]),
        controlnets=tuple(CatalogControlNet(**cn) for cn in obj["controlnets"]),
        root=root,
    )


# -- where things go --------------------------------------------------------------------------------


def marker_text(config: CatalogConfig) -> str:
    """The marker's content: the catalog version, and a hash of the config and the zoo family's marker
    (a rebuilt zoo family may have other weights, so its add-ons are rebuilt too)."""
    from swiftd.zoo.layout import marker_text as zoo_marker_text

    digest = hashlib.sha256((CATALOG_VERSION + config.as_json() + zoo_marker_text(config.family)).encode())
    return f"{CATALOG_VERSION} {config.family} {digest.hexdigest()[:16]}\n"


def lora_path(root: Path, lora_id: str) -> Path:
    return Path(root) / "loras" / f"{lora_id}.safetensors"


def controlnet_path(root: Path, controlnet_id: str) -> Path:
    return Path(root) / "controlnets" / controlnet_id


def _outputs(root: Path, catalog: TrafficCatalog) -> list[Path]:
    paths = [root / "models" / catalog.model_id, root / CATALOG_FILE]
    paths += [lora_path(root, lora.lora_id) for lora in catalog.loras]
    return paths + [controlnet_path(root, cn.controlnet_id) for cn in catalog.controlnets]


def is_complete(root: str | Path, config: CatalogConfig) -> bool:
    root = Path(root)
    marker = root / MARKER_FILE
    if not marker.is_file() or marker.read_text() != marker_text(config):
        return False
    return all(p.exists() for p in _outputs(root, plan_catalog(config)))  # exists(): symlinks followed


# -- building ---------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[traffic] {msg}", file=sys.stderr, flush=True)


def _remove_previous(root: Path, family: str) -> None:
    """Everything an earlier build of this family's catalog may have left (any config), marker first."""
    for path in [
        root / MARKER_FILE,
        root / CATALOG_FILE,
        root / "models" / family,
        root / "models" / f"{family}.safetensors",
        *(root / "loras").glob(f"{family}-t-lora-*"),
        *(root / "controlnets").glob(f"{family}-t-cn-*"),
    ]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_symlink() or path.exists():
            path.unlink()


def _link_model(root: Path, zoo_root: Path, family: str) -> None:
    """models/<family> (and its single file) as relative symlinks into the zoo: no copy of the weights."""
    from swiftd.zoo.layout import zoo_paths

    paths = zoo_paths(zoo_root, family)
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    for target in [paths.model, paths.single_file]:
        if target is not None and target.exists():
            (models / target.name).symlink_to(os.path.relpath(target.resolve(), models.resolve()))


def _write_addons(root: Path, config: CatalogConfig, catalog: TrafficCatalog) -> None:
    import torch

    from swiftd.zoo.loras import WeightStdMemo, write_kohya_lora, write_peft_lora
    from swiftd.zoo.models import make_components, make_controlnet
    from swiftd.zoo.specs import SPECS

    spec = SPECS[config.family]
    lora_dtype = getattr(torch, config.lora_dtype)
    with torch.no_grad():
        parts = make_components(spec)  # the zoo family's weights, regenerated from their seeds
        if spec.fp16:
            parts = {name: m.half() if isinstance(m, torch.nn.Module) else m for name, m in parts.items()}
        for cn in catalog.controlnets:
            model = make_controlnet(spec, parts["unet"], cn.controlnet_id)  # seeded by its id: all differ
            model = model.half() if spec.fp16 else model
            model.save_pretrained(controlnet_path(root, cn.controlnet_id))
            del model
        std_of = WeightStdMemo()  # the base weights are the same for all 200 LoRAs
        for lora in catalog.loras:
            path = lora_path(root, lora.lora_id)
            if lora.format == "peft":
                write_peft_lora(spec, parts["unet"], lora.rank, path, lora.lora_id, lora_dtype, std_of)
            else:
                write_kohya_lora(
                    spec, parts, lora.rank, path, lora.lora_id, lora_dtype, lora.has_te, lora.has_conv, std_of
                )


def default_root(zoo_root: str | Path, family: str) -> Path:
    """Where a family's traffic catalog lives by default: beside the zoo's own folders."""
    return Path(zoo_root) / f"traffic-{family}"


def build_catalog(zoo_root: str | Path, config: CatalogConfig = CatalogConfig(), out: str | Path | None = None) -> Path:
    """Build the catalog `config` describes under `out` (default: default_root), the zoo family first
    if it is missing; skipped when `out` already holds it. Returns `out`, for load_catalog."""
    import torch

    from swiftd.zoo import build as build_zoo
    from swiftd.zoo.builder import _locked, _quiet_libraries  # the zoo's own lock and log silencing
    from swiftd.zoo.files import make_readable, write_json

    catalog = plan_catalog(config)  # ValueError for a config that cannot be built, before anything is
    zoo_root = Path(zoo_root)
    out = Path(out) if out is not None else default_root(zoo_root, config.family)
    if is_complete(out, config):
        _log(f"{out}: up to date")
        return out
    build_zoo(zoo_root, only=[config.family])
    with _locked(out):
        if is_complete(out, config):  # another builder finished while we waited
            return out
        t0 = time.perf_counter()
        _remove_previous(out, config.family)
        (out / "loras").mkdir(parents=True, exist_ok=True)
        (out / "controlnets").mkdir(parents=True, exist_ok=True)
        _link_model(out, zoo_root, config.family)
        with _quiet_libraries(), torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
            _write_addons(out, config, catalog)
        make_readable([lora_path(out, lora.lora_id) for lora in catalog.loras])
        make_readable([controlnet_path(out, cn.controlnet_id) for cn in catalog.controlnets])
        write_json(out / CATALOG_FILE, catalog.to_json(), sort_keys=False)
        (out / MARKER_FILE).write_text(marker_text(config))  # last: its presence means the catalog is whole
        _log(
            f"built {config.family} catalog in {time.perf_counter() - t0:.1f}s: "
            f"{len(catalog.loras)} LoRAs, {len(catalog.controlnets)} ControlNets under {out}"
        )
    return out
