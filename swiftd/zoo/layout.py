"""Where each artefact of a family lives under the zoo root, and whether a built family is whole.

The one place that knows the layout, so tests and benchmarks never hard-code it::

    <out>/models/<family>/                                   Diffusers pipeline folder
    <out>/models/<family>.safetensors                        single-file LDM checkpoint (sd15 kinds)
    <out>/controlnets/<family>-cn-<kind>/                    ControlNetModel folders
    <out>/loras/<family>-lora-<kind>.safetensors             LoRA files
    <out>/.complete-<family>                                  marker, written last
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from swiftd.zoo.specs import CONTROLNET_KINDS, LORA_KINDS, SPECS, ZOO_VERSION


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


def marker_text(family: str) -> str:
    """What `.complete-<family>` holds: the generator version and a hash of the family's spec."""
    spec_hash = hashlib.sha256((ZOO_VERSION + SPECS[family].as_json()).encode()).hexdigest()[:16]
    return f"{ZOO_VERSION} {family} {spec_hash}\n"


def is_complete(out: str | Path, family: str) -> bool:
    paths = zoo_paths(out, family)
    if not paths.marker.is_file() or paths.marker.read_text() != marker_text(family):
        return False
    return all(p.exists() for p in paths.all_outputs())
