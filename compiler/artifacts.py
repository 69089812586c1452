"""The artifact directory and its manifest: what was built, for what, with what.

    <dir>/manifest.json
    <dir>/<part>-<resolution>.pt2          AOTInductor package (backend inductor), weights not inside
    <dir>/<part>-<resolution>.trt.ep       torch-tensorrt program (backend tensorrt)

The manifest records the model's architecture fingerprint, the backend, the library versions and
platform the artifacts were built with, the shapes, and per part its file, batch range, checksum
and the compiled-vs-eager difference measured at build time. `check_compatible` refuses an
artifact directory built for another architecture, dtype, library version or platform, naming
every difference; services and `python -m compiler verify` both use it.

The fingerprint covers the architecture (component configs, parameter names, shapes), not the
weight values: weights are inputs of the compiled graphs, so another checkpoint of the same
architecture (a fine-tune, a merged LoRA) is served by the same artifacts.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CompilerError(Exception):
    """An error the CLI maps to its exit code (see compiler/cli.py)."""

    exit_code = 1


class UsageError(CompilerError):
    """A command line that cannot be carried out as given (like argparse's errors)."""

    exit_code = 2


class InputNotFound(CompilerError):
    exit_code = 3


class BackendUnavailable(CompilerError):
    exit_code = 4


class VerificationFailed(CompilerError):
    exit_code = 5


class ArtifactMismatch(CompilerError):
    """Artifacts built for another model, dtype, library version or platform."""

    exit_code = 6


class ArtifactCorrupt(CompilerError):
    """The directory lacks a manifest or a part file, or a file's checksum is wrong."""

    exit_code = 7


class ProbeFailed(CompilerError):
    """`compiler verify` in a child process did not pass: its exit code, or 1 when a signal
    (a native crash) ended it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# -- fingerprints ----------------------------------------------------------------------------------

_CONFIG_KEYS_IGNORED = ("_diffusers_version", "_name_or_path", "_use_default_values")


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a Diffusers model's config and its parameter/buffer names and shapes."""
    config = {k: v for k, v in dict(getattr(module, "config", {})).items() if k not in _CONFIG_KEYS_IGNORED}
    tensors = [(name, list(t.shape)) for name, t in (*module.named_parameters(), *module.named_buffers())]
    payload = json.dumps(
        {"class": type(module).__name__, "config": config, "tensors": tensors}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def pipeline_fingerprint(pipe) -> str:
    """The fingerprint of the parts the compiler compiles from a pipeline: UNet and VAE."""
    return hashlib.sha256(f"{module_fingerprint(pipe.unet)}:{module_fingerprint(pipe.vae)}".encode()).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- environment -----------------------------------------------------------------------------------


def library_versions(backend: str) -> dict[str, str]:
    """Versions that decide whether an artifact is loadable and computes the same graph."""
    import diffusers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    if backend == "tensorrt":
        from compiler import tensorrt

        versions.update(tensorrt.versions())
    return versions


def platform_key(device: str) -> dict[str, str]:
    """What compiled code depends on: CPU kernels on the instruction set, CUDA ones on the GPU."""
    key = {"machine": platform.machine(), "device_type": torch.device(device).type}
    if key["device_type"] == "cpu":
        key["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    elif key["device_type"] == "cuda":
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        key["cuda_capability"] = f"{major}.{minor}"
    return key


# -- manifest --------------------------------------------------------------------------------------


@dataclass
class PartEntry:
    name: str  # compiler.parts name
    resolution: int
    batch_min: int
    batch_max: int
    file: str  # relative to the artifact directory
    sha256: str
    fingerprint: str  # of the module it was compiled from (UNet, VAE or ControlNet architecture)
    compile_seconds: float
    max_diff: float  # max |compiled - eager| / max(1, max |eager|) on the build's example inputs
    source_id: str = ""  # the ControlNet id it was built from (any ControlNet of that architecture fits)
    # Frozen builds only: how each constant is computed from the parameters (compiler/frozen.py).
    recipes: dict | None = None

    def serves(self, resolution: int, batch: int) -> bool:
        return self.resolution == resolution and self.batch_min <= batch <= self.batch_max


@dataclass
class Manifest:
    backend: str
    model_id: str
    model_fingerprint: str
    dtype: str
    libraries: dict[str, str]
    platform: dict[str, str]
    resolutions: list[int]
    batch_sizes: list[int]
    options: dict  # backend options the artifacts were built with
    tolerance: float  # max abs difference compiled vs eager accepted at build time
    parts: list[PartEntry] = field(default_factory=list)
    vae_scale_factor: int = 8  # pixels per latent: maps a latent shape to the resolution served
    format_version: int = FORMAT_VERSION
    created_unix: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        # Fields added by a later compiler are ignored (format_version marks incompatible changes).
        part_fields = set(PartEntry.__dataclass_fields__)
        raw["parts"] = [PartEntry(**{k: v for k, v in p.items() if k in part_fields}) for p in raw.get("parts", [])]
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})

    def part(self, name: str, resolution: int, batch: int, fingerprint: str | None = None) -> PartEntry | None:
        for entry in self.parts:
            if (
                entry.name == name
                and entry.serves(resolution, batch)
                and (fingerprint is None or entry.fingerprint == fingerprint)
            ):
                return entry
        return None


def write_manifest(directory: Path, manifest: Manifest) -> None:
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(manifest.to_json() + "\n")
    tmp.replace(path)  # a reader never sees half a manifest


def read_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise InputNotFound(f"artifact directory {directory} does not exist")
    if not path.is_file():
        raise ArtifactCorrupt(f"{path} is missing: not an artifact directory, or its build did not finish")
    try:
        manifest = Manifest.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as exc:
        raise ArtifactCorrupt(f"{path} is not a valid manifest: {exc}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactMismatch(
            f"{path}: manifest format {manifest.format_version}, this compiler reads {FORMAT_VERSION}"
        )
    return manifest


def check_files(directory: Path, manifest: Manifest, names: set[str] | None = None) -> None:
    """Every part file (of the parts named in `names`; default all) is there and has the checksum the build recorded."""
    for entry in manifest.parts:
        if names is not None and entry.name not in names:
            continue
        path = Path(directory) / entry.file
        if not path.is_file():
            raise ArtifactCorrupt(f"{path} is missing (listed in the manifest)")
        if file_sha256(path) != entry.sha256:
            raise ArtifactCorrupt(f"{path}: checksum differs from the manifest's (file changed or truncated)")


def check_compatible(manifest: Manifest, *, model_fingerprint: str | None, dtype: str, device: str) -> None:
    """Raise ArtifactMismatch naming every difference between the artifacts and this process.

    `model_fingerprint` None: no base model to compare (a ControlNet worker; ControlNet parts are
    matched per ControlNet architecture instead)."""
    problems = []
    if model_fingerprint is not None and manifest.model_fingerprint != model_fingerprint:
        problems.append(
            f"model: built for {manifest.model_id!r} (architecture {manifest.model_fingerprint}), "
            f"this model's architecture is {model_fingerprint}"
        )
    if manifest.dtype != dtype:
        problems.append(f"dtype: built for {manifest.dtype}, serving {dtype}")
    here = library_versions(manifest.backend)
    for name, built in sorted(manifest.libraries.items()):
        if here.get(name) != built:
            problems.append(f"{name}: built with {built}, this process has {here.get(name, 'none')}")
    platform_here = platform_key(device)
    for name, built in sorted(manifest.platform.items()):
        if platform_here.get(name) != built:
            problems.append(f"platform {name}: built for {built}, this process has {platform_here.get(name, 'none')}")
    if problems:
        raise ArtifactMismatch(
            "compiled artifacts do not fit: " + "; ".join(problems) + " (rebuild with python -m compiler build)"
        )
