"""The LoRA catalog: files under `<root>/loras/`, and what can be read from them without a model.

A LoRA's id is its file stem (`<root>/loras/<id>.safetensors`); ids are names, never paths, and a
file whose real path leaves the root (a symlink pointing elsewhere) is refused.

Metadata comes from the safetensors header only (key names, shapes, `__metadata__`), so listing
and registering stay cheap even for thousands of 300 MB files:

* **format**: `peft` (`.lora_A/.lora_B` keys), `kohya` (`lora_unet_*/lora_te*_` with
  `.lora_down/.lora_up`), `diffusers` (the older `.lora.down` / `_lora.down` /
  `lora_linear_layer` attention-processor keys).
* **rank**: the largest first dimension of a down (A) factor.
* **num_targets**: the number of target modules (key prefixes once the LoRA suffixes are removed);
  each is one base-model parameter.
* **family** (`sd15` / `sdxl`, or "" when nothing tells), first rule that decides wins:
  1. names: kohya `lora_te1_`/`lora_te2_` or LDM block names (`lora_unet_input_blocks`,
     `output_blocks`, `middle_block`: sd-scripts writes SDXL UNets that way) -> sdxl; kohya
     `lora_te_` or Diffusers block names (`lora_unet_down_blocks`, as sd-scripts writes SD1.x)
     -> sd15; Diffusers/PEFT `text_encoder_2.` or `add_embedding` -> sdxl;
  2. structure: a `transformer_blocks.1` (SD1.5 has one transformer block per attention,
     SDXL up to ten) -> sdxl;
  3. the cross-attention context width (in-features of an `attn2.to_k/to_v` down factor): 768 ->
     sd15, 2048 -> sdxl (the released architectures);
  4. the base models under `<root>/models/`: the family of those whose UNet config has that
     `cross_attention_dim` and the same projection kind (conv `proj_in` for SD1.5-style, linear
     for SDXL-style), when they all agree (this is what classifies reduced-width zoo models).
  The family is a routing hint and an early, clear error; the authoritative check is still the
  mapping onto the base model at precompute time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from services.lora_store.registry import RegistryFile
from swiftd.errors import FailedPrecondition, InvalidArgument, NotFound
from swiftd.request import FAMILY_SD15, FAMILY_SDXL, check_id
from swiftd.v1 import common_pb2

log = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"

# The LoRA part of a key; what is left is the target module. Anything else (LoHa/LoKr factors,
# Tucker `lora_mid`, DoRA magnitudes, LoRA biases) is refused rather than silently dropped.
_SUFFIX = re.compile(
    r"(\.lora_(?P<peft>A|B)(?:\.[A-Za-z0-9_-]+)?\.weight"
    r"|\.lora_(?P<kohya>down|up)\.weight"
    r"|(?:\.lora|_lora|\.lora_linear_layer)\.(?P<diffusers>down|up)\.weight"
    r"|\.alpha)$"
)
_DOWN = {"A", "down"}
_FAMILY_OF_CONTEXT_DIM = {768: FAMILY_SD15, 2048: FAMILY_SDXL}


@dataclass(frozen=True)
class LoraFileInfo:
    """What the catalog knows about one LoRA file (the gRPC LoraInfo plus what validation needs)."""

    lora_id: str
    path: Path
    family: str
    rank: int
    num_targets: int
    size_bytes: int
    format: str
    modules: tuple[str, ...]  # target module key prefixes, in file order
    stat: tuple[int, int]  # (size, mtime_ns) when read; a change means the file was replaced

    def to_pb(self) -> common_pb2.LoraInfo:
        return common_pb2.LoraInfo(
            lora_id=self.lora_id,
            family=self.family,
            rank=self.rank,
            num_targets=self.num_targets,
            size_bytes=self.size_bytes,
            format=self.format,
        )


def module_of(key: str) -> tuple[str, str | None, str | None]:
    """(module prefix, 'peft'|'kohya'|'diffusers' or None for alpha, 'down'|'up' or None)."""
    match = _SUFFIX.search(key)
    if match is None:
        raise FailedPrecondition(f"unsupported LoRA key {key!r} (LoRA down/up, A/B and alpha keys only)")
    for fmt in ("peft", "kohya", "diffusers"):
        if match.group(fmt):
            part = match.group(fmt)
            return key[: match.start()], fmt, "down" if part in _DOWN else "up"
    return key[: match.start()], None, None


def component_of(module: str) -> tuple[str | None, str]:
    """(pipeline component or None when the key does not say, the rest with '_' separators)."""
    for prefix, component in (
        ("lora_unet_", "unet"),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te_", "text_encoder"),
        ("unet.", "unet"),
        ("text_encoder_2.", "text_encoder_2"),
        ("text_encoder.", "text_encoder"),
    ):
        if module.startswith(prefix):
            return component, module[len(prefix) :].replace(".", "_")
    rest = module.removeprefix("base_model.model.")
    return None, rest.replace(".", "_")


@dataclass(frozen=True)
class BaseSignature:
    """What the family inference needs of a base model: read from its UNet config only."""

    model_id: str
    family: str
    cross_attention_dim: int
    linear_projection: bool


def base_signatures(root: Path) -> list[BaseSignature]:
    out = []
    models = Path(root) / "models"
    if not models.is_dir():
        return out
    for folder in sorted(p for p in models.iterdir() if p.is_dir()):
        try:
            index = json.loads((folder / "model_index.json").read_text())
            unet = json.loads((folder / "unet" / "config.json").read_text())
        except (OSError, ValueError):
            continue
        family = FAMILY_SDXL if "XL" in index.get("_class_name", "") else FAMILY_SD15
        cross = unet.get("cross_attention_dim")
        cross = cross[0] if isinstance(cross, list) else cross
        out.append(BaseSignature(folder.name, family, int(cross or 0), bool(unet.get("use_linear_projection"))))
    return out


def infer_family(shapes: dict[str, list[int]], bases: list[BaseSignature]) -> str:
    """sd15 / sdxl / "" from key names and shapes (see the module docstring for the rules)."""
    keys = list(shapes)
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        return FAMILY_SDXL
    if any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block")) for k in keys):
        return FAMILY_SDXL
    if any(k.startswith("lora_te_") for k in keys):
        return FAMILY_SD15
    if any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for k in keys):
        return FAMILY_SD15
    if any(k.startswith("text_encoder_2.") or "add_embedding" in k for k in keys):
        return FAMILY_SDXL
    if any(re.search(r"transformer_blocks[._][1-9]", k) for k in keys):
        return FAMILY_SDXL
    context_dim, linear = None, None
    for key, shape in shapes.items():
        module, _, part = module_of(key)
        if part != "down":
            continue
        if context_dim is None and re.search(r"attn2[._]to_[kv]$", module):
            context_dim = shape[1]
        if linear is None and re.search(r"proj_in$", module):
            linear = len(shape) == 2
    if context_dim in _FAMILY_OF_CONTEXT_DIM:
        return _FAMILY_OF_CONTEXT_DIM[context_dim]
    if context_dim is not None:
        families = {
            b.family
            for b in bases
            if b.cross_attention_dim == context_dim and (linear is None or b.linear_projection == linear)
        }
        if len(families) == 1:
            return families.pop()
    return ""


def read_lora_file(lora_id: str, path: Path, bases: list[BaseSignature]) -> LoraFileInfo:
    """Catalog metadata from the safetensors header; FailedPrecondition if it is no LoRA we read."""
    st = path.stat()
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any parse failure is an unreadable file
        raise FailedPrecondition(f"lora {lora_id!r}: not a readable safetensors file ({exc})") from None
    modules: dict[str, None] = {}
    formats: dict[str, None] = {}
    rank = 0
    for key, shape in shapes.items():
        try:
            module, fmt, part = module_of(key)
        except FailedPrecondition as exc:
            raise FailedPrecondition(f"lora {lora_id!r}: {exc.message}") from None
        modules.setdefault(module)
        if fmt:
            formats.setdefault(fmt)
        if part == "down" and shape:
            rank = max(rank, int(shape[0]))
    if not modules or not formats:
        raise FailedPrecondition(f"lora {lora_id!r}: no LoRA weights in the file")
    return LoraFileInfo(
        lora_id=lora_id,
        path=path,
        family=infer_family(shapes, bases),
        rank=rank,
        num_targets=len(modules),
        size_bytes=st.st_size,
        format=next(iter(formats)),
        modules=tuple(modules),
        stat=(st.st_size, st.st_mtime_ns),
    )


class LoraCatalog:
    """Registered LoRA files by id. Thread-safe.

    With a `registry` (see registry.py) the registered ids are kept in that file, across restarts
    and for every replica naming it; each call first catches up with changes made elsewhere, and
    `on_forgotten(lora_id)` runs for an id another replica removed."""

    def __init__(
        self,
        root: Path,
        registry: RegistryFile | None = None,
        on_forgotten: Callable[[str], None] | None = None,
    ):
        self.root = Path(root)
        self.folder = self.root / "loras"
        self.registry = registry
        self._on_forgotten = on_forgotten or (lambda lora_id: None)
        self._entries: dict[str, LoraFileInfo] = {}
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._stamp = None  # the registry version the entries follow

    def path_of(self, lora_id: str, field: str = "lora_id") -> Path:
        """The file of `lora_id`: InvalidArgument for a non-id, NotFound for no such file."""
        check_id(field, lora_id)
        path = self.folder / f"{lora_id}{LORA_SUFFIX}"
        if not path.is_file():
            raise NotFound(field, lora_id)
        real, root = path.resolve(), self.root.resolve()
        if not real.is_relative_to(root):
            raise InvalidArgument(field, f"{lora_id!r} resolves outside the model root")
        return path

    def start(self) -> None:
        """Register what there is at start: every file under loras/ without a registry (and when
        the registry is created), else the ids the registry lists."""
        if self.registry is None:
            self.scan()
            return
        self.registry.initialize(lambda: [*self.scan(), *self._ids()])
        self._sync()

    def scan(self) -> list[str]:
        """Register every LoRA file present (unreadable ones are logged and skipped) in memory."""
        if not self.folder.is_dir():
            return []
        bases = base_signatures(self.root)
        added = []
        for path in sorted(self.folder.glob(f"*{LORA_SUFFIX}")):
            try:
                _, already = self._read(path.stem, bases)
            except (FailedPrecondition, InvalidArgument, NotFound) as exc:
                log.warning("skipping %s: %s", path.name, exc.message)
                continue
            if not already:
                added.append(path.stem)
        return added

    def _ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def _sync(self) -> None:
        """Follow the registry file when another process changed it since we last looked."""
        if self.registry is None or self.registry.stamp() == self._stamp:
            return
        with self._sync_lock:
            current = self.registry.read()
            if current is None or current[1] == self._stamp:
                return
            ids, stamp = current
            with self._lock:
                forgotten = [i for i in self._entries if i not in ids]
                for lora_id in forgotten:
                    del self._entries[lora_id]
                new = [i for i in ids if i not in self._entries]
            bases = base_signatures(self.root) if new else []
            for lora_id in sorted(new):
                try:
                    self._read(lora_id, bases)
                except (FailedPrecondition, InvalidArgument, NotFound) as exc:
                    log.warning("registered lora %s cannot be served: %s", lora_id, exc.message)
            for lora_id in forgotten:
                log.info("lora %s was removed from the registry elsewhere", lora_id)
                self._on_forgotten(lora_id)
            self._stamp = stamp

    def register(self, lora_id: str, bases: list[BaseSignature] | None = None) -> tuple[LoraFileInfo, bool]:
        """(entry, was already registered). Re-reads a registered file that changed on disk."""
        self._sync()
        info, already = self._read(lora_id, bases)  # a file we cannot serve is never listed
        if self.registry is not None:
            try:
                already = lora_id in self.registry.update(lambda ids: ids.add(lora_id))
            except BaseException:
                if not already:  # not registered anywhere, so not here either
                    with self._lock:
                        self._entries.pop(lora_id, None)
                raise
        return info, already

    def _read(self, lora_id: str, bases: list[BaseSignature] | None = None) -> tuple[LoraFileInfo, bool]:
        """Read (or re-read, when it changed) the file's header into the in-memory entries."""
        path = self.path_of(lora_id)
        with self._lock:
            entry = self._entries.get(lora_id)
        if entry is not None and _stat(path) == entry.stat:
            return entry, True
        info = read_lora_file(lora_id, path, base_signatures(self.root) if bases is None else bases)
        with self._lock:
            already = lora_id in self._entries
            self._entries[lora_id] = info
        log.info(
            "registered lora %s: %s, %s, rank %d, %d targets, %.1f MB",
            lora_id,
            info.family or "family unknown",
            info.format,
            info.rank,
            info.num_targets,
            info.size_bytes / 1e6,
        )
        return info, already

    def get(self, lora_id: str, field: str = "lora_id") -> LoraFileInfo:
        """The registered entry, re-read when the file changed since; NotFound if unregistered/gone."""
        check_id(field, lora_id)
        self._sync()
        with self._lock:
            entry = self._entries.get(lora_id)
        if entry is None:
            raise NotFound(field, lora_id)
        try:
            stat = _stat(entry.path)
        except FileNotFoundError:
            raise NotFound(field, f"{lora_id} (its file is gone)") from None
        if stat != entry.stat:
            entry, _ = self._read(lora_id)
        return entry

    def is_current(self, entry: LoraFileInfo) -> bool:
        with self._lock:
            return self._entries.get(entry.lora_id) is entry

    def remove(self, lora_id: str) -> bool:
        check_id("lora_id", lora_id)
        self._sync()
        listed = self.registry is not None and lora_id in self.registry.update(lambda ids: ids.discard(lora_id))
        with self._lock:
            return self._entries.pop(lora_id, None) is not None or listed

    def list(self, family: str = "") -> list[LoraFileInfo]:
        self._sync()
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.lora_id)
        return [e for e in entries if not family or e.family == family]


def _stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
