"""LoRA store: catalog, base models, precompute once, cache tiers, scaled delta sets.

An entry is the prepared deltas of one (lora_id, base_model_id, dtype) at scale 1.0:
`prepare_deltas(extract_deltas(base_pipeline, file), 1.0, dtype)` — keys mapped to the base
model's parameter names, alpha/rank folded in, cast, factored wherever smaller than the full
matrix, validated against the base model — in the order the worker needs them. Lookup order:

    host tier (LRU under --host-budget-mib)  ->  disk tier (--cache-dir)  ->  the source file

Each lookup reports its tier ("host", "disk", "precompute"); the counters (`stats()`) and one log
line per lookup (`cache <tier> lora=... host_bytes=... host_budget=... precomputes=...`) make the
tiers observable. Concurrent lookups of one entry compute it once. A request's scale is folded
into a copy of the cached entry (`prepare_deltas(entry, scale, dtype)`), never into the entry.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from services.lora_store.catalog import LoraCatalog, LoraFileInfo, component_of
from services.lora_store.registry import RegistryFile
from services.lora_store.tiers import CacheKey, DiskTier, HostTier, PreparedLora
from swiftd import metrics
from swiftd.errors import FailedPrecondition, InvalidArgument, NotFound
from swiftd.loading import load_pipeline, pipeline_family, resolve
from swiftd.lora import LoraDeltas, extract_deltas, prepare_deltas
from swiftd.request import LoraSet, check_id

log = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class ServedLora:
    """One LoRA of a request, ready to send: its deltas with the request's scale folded in."""

    lora_id: str
    scale: float
    deltas: LoraDeltas
    tier: str  # where the scale-1 entry came from: "host", "disk" or "precompute"

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.deltas.values())


class BaseModels:
    """Base pipelines by id from `<root>/models/`, loaded on first use (CPU, fp32); the `max_loaded`
    most recently used are kept (each is a whole fp32 pipeline: GBs for SDXL)."""

    def __init__(self, root: Path, loader=load_pipeline, max_loaded: int = 2):
        self.root = Path(root)
        self._loader = loader
        self.max_loaded = max_loaded
        self._pipes: OrderedDict[str, DiffusionPipeline] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._info: dict[str, tuple[str, str]] = {}

    def _config_folder(self, model_id: str) -> Path:
        path = resolve(self.root, "models", model_id, "base_model_id")
        folder = path if path.is_dir() else path.with_suffix("")
        if not (folder / "model_index.json").is_file():
            raise FailedPrecondition(f"base model {model_id!r}: no Diffusers config folder at {folder.name}")
        return folder

    def info(self, model_id: str) -> tuple[str, str]:
        """(family, signature): the signature hashes the config files that fix names and shapes."""
        check_id("base_model_id", model_id)
        with self._lock:
            if model_id in self._info:
                return self._info[model_id]
        folder = self._config_folder(model_id)
        h = hashlib.sha256()
        for config in sorted([folder / "model_index.json", *folder.glob("*/config.json")]):
            h.update(config.relative_to(folder).as_posix().encode())
            h.update(config.read_bytes())
        info = (pipeline_family(folder), h.hexdigest())
        with self._lock:
            self._info[model_id] = info
        return info

    def pipeline(self, model_id: str) -> DiffusionPipeline:
        with self._lock:
            if model_id in self._pipes:
                self._pipes.move_to_end(model_id)
                return self._pipes[model_id]
            per_id = self._loading.setdefault(model_id, threading.Lock())
        with per_id:
            with self._lock:
                if model_id in self._pipes:
                    return self._pipes[model_id]
            path = resolve(self.root, "models", model_id, "base_model_id")
            t0 = time.perf_counter()
            pipe = self._loader(path)
            log.info("loaded base model %s in %.1f s", model_id, time.perf_counter() - t0)
            with self._lock:
                self._pipes[model_id] = pipe
                while len(self._pipes) > self.max_loaded:  # a caller still using one keeps its reference
                    evicted, _ = self._pipes.popitem(last=False)
                    log.info("unloaded base model %s (--max-base-models %d)", evicted, self.max_loaded)
            return pipe


class SourceHashes:
    """sha256 of LoRA files, recomputed only when (size, mtime) changes."""

    def __init__(self):
        self._known: dict[Path, tuple[tuple[int, int], str]] = {}
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> str:
        st = os.stat(path)
        stat = (st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._known.get(path)
        if known is not None and known[0] == stat:
            return known[1]
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        with self._lock:
            self._known[path] = (stat, digest)
        return digest


def check_targets(entry: LoraFileInfo, deltas: LoraDeltas, base_model_id: str) -> None:
    """Every target module of the file must have become a delta: never a partial LoRA.

    Diffusers/PEFT skip keys that match no module of the model (with a log warning only), so the
    number of deltas is compared with the number of target modules in the file; the missing ones
    are named by matching module names ('.' and '_' alike, kohya/PEFT prefixes removed, suffix
    match for text-encoder paths that differ by a wrapper such as `text_model`).
    """
    if len(deltas) >= entry.num_targets:
        return
    found: dict[str | None, list[str]] = {}
    for name in deltas:
        component, rest = component_of(name.removesuffix(".weight"))
        found.setdefault(component, []).append(rest)

    def matched(module: str) -> bool:
        component, rest = component_of(module)
        candidates = found.get(component, []) if component else [r for rs in found.values() for r in rs]
        return any(rest == r or rest.endswith("_" + r) or r.endswith("_" + rest) for r in candidates)

    missing = [m for m in entry.modules if not matched(m)]
    count = entry.num_targets - len(deltas)
    if missing and len(missing) <= count:
        names = ", ".join(repr(m) for m in missing[:5])
        raise FailedPrecondition(
            f"lora {entry.lora_id!r}: {count} target key(s) not found in base model {base_model_id!r}: {names}"
        )
    raise FailedPrecondition(
        f"lora {entry.lora_id!r}: only {len(deltas)} of its {entry.num_targets} target modules exist in base model "
        f"{base_model_id!r}"
    )


def check_shapes(lora_id: str, pipe: DiffusionPipeline, deltas: LoraDeltas) -> None:
    params = {}
    for name in deltas:
        component, _, rest = name.partition(".")
        module = getattr(pipe, component, None)
        if module is not None and not params.get(component):
            params[component] = dict(module.named_parameters())
        param = params.get(component, {}).get(rest)
        if param is None:
            raise FailedPrecondition(f"lora {lora_id!r}: parameter {name!r} not in the base model")
        delta = deltas[name]
        if delta.out_features != param.shape[0] or delta.out_features * delta.in_features != param.numel():
            raise FailedPrecondition(
                f"lora {lora_id!r}: delta for {name!r} is {delta.out_features}x{delta.in_features}, "
                f"the weight is {tuple(param.shape)}"
            )


class LoraStore:
    def __init__(
        self,
        model_root: Path,
        cache_dir: Path | None,
        host_budget_bytes: int,
        default_dtype: torch.dtype = torch.float32,
        pipeline_loader=load_pipeline,
        max_base_models: int = 2,
        registry: Path | None = None,
    ):
        self.model_root = Path(model_root)
        self.catalog = LoraCatalog(self.model_root, RegistryFile(registry) if registry else None, self._forget)
        self.bases = BaseModels(self.model_root, pipeline_loader, max_base_models)
        self.host = HostTier(host_budget_bytes)
        self.disk = DiskTier(cache_dir)
        self.default_dtype = default_dtype
        self._hashes = SourceHashes()
        self._lock = threading.Lock()  # counters, per-entry locks, tier writes vs removal
        self._computing: dict[CacheKey, threading.Lock] = {}
        self._failures: dict[CacheKey, tuple[str, str]] = {}  # key -> (source sha256, error), under its lock
        self._counts = {"precomputes": 0, "disk_hits": 0, "host_hits": 0}
        self.catalog.start()

    # -- catalog -----------------------------------------------------------------------------------

    def register(self, lora_id: str) -> tuple[LoraFileInfo, bool]:
        return self.catalog.register(lora_id)

    def remove(self, lora_id: str) -> bool:
        removed = self.catalog.remove(lora_id)  # first: an entry() from now on keeps nothing
        host = self._forget(lora_id)
        with self._lock:
            disk = self.disk.drop_lora(lora_id)
        if removed or host or disk:
            log.info("removed lora %s (%d host, %d disk entries dropped)", lora_id, host, disk)
        return removed

    def _forget(self, lora_id: str) -> int:
        """Drop what this process holds for `lora_id` (its disk entries are the remover's to drop)."""
        with self._lock:
            for key in [k for k in self._failures if k[0] == lora_id]:
                self._failures.pop(key, None)
            return self.host.drop(lambda key: key[0] == lora_id)

    def list(self, family: str = "") -> list[LoraFileInfo]:
        return self.catalog.list(family)

    # -- entries -----------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._counts)
        return {
            **counts,
            "host_bytes": self.host.nbytes,
            "host_budget": self.host.budget_bytes,
            "host_entries": len(self.host),
            "host_evictions": self.host.evictions,
        }

    def resolve_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        dtype = dtype or self.default_dtype
        if dtype not in DTYPE_NAMES:
            raise InvalidArgument("dtype", f"{dtype} is not a serving dtype (float32, float16, bfloat16)")
        return dtype

    def entry(
        self, lora_id: str, base_model_id: str, dtype: torch.dtype | None = None, field: str = "lora_id"
    ) -> tuple[PreparedLora, str, float]:
        """(prepared scale-1 entry, tier it came from, seconds spent). Fills the tiers above it."""
        t0 = time.perf_counter()
        dtype = self.resolve_dtype(dtype)
        info = self.catalog.get(lora_id, field)
        family, signature = self.bases.info(base_model_id)
        if info.family and info.family != family:
            raise FailedPrecondition(
                f"lora {lora_id!r} is a {info.family} LoRA; base model {base_model_id!r} is {family}"
            )
        key: CacheKey = (lora_id, base_model_id, DTYPE_NAMES[dtype])
        try:
            sha = self._hashes(info.path)
        except FileNotFoundError:
            raise NotFound(field, f"{lora_id} (its file is gone)") from None
        prepared = self.host.get(key)
        if prepared is not None and prepared.source_sha256 == sha:
            return self._report(key, prepared, "host", t0)
        with self._lock:
            per_key = self._computing.setdefault(key, threading.Lock())
        with per_key:  # one preparation per entry; concurrent callers wait and then hit the host tier
            prepared = self.host.get(key)
            if prepared is not None and prepared.source_sha256 == sha:
                return self._report(key, prepared, "host", t0)
            failed = self._failures.get(key)
            if failed is not None and failed[0] == sha:  # a file that did not fit stays refused, cheaply
                raise FailedPrecondition(failed[1])
            prepared = self.disk.load(key, sha, signature)
            tier = "disk"
            if prepared is None:
                try:
                    prepared = PreparedLora(self._precompute(info, base_model_id, dtype), sha)
                except FailedPrecondition as exc:
                    self._failures[key] = (sha, exc.message)
                    raise
                tier = "precompute"
            if tier == "precompute":
                self.disk.store(key, prepared, signature)
            with self._lock:
                if not self.catalog.is_current(info):  # removed (or replaced) meanwhile: keep nothing
                    self.disk.drop_lora(lora_id)
                elif not self.host.put(key, prepared):
                    log.warning(
                        "lora %s (%d bytes) exceeds the host budget (%d bytes): served from disk",
                        lora_id,
                        prepared.nbytes,
                        self.host.budget_bytes,
                    )
            return self._report(key, prepared, tier, t0)

    def _precompute(self, info: LoraFileInfo, base_model_id: str, dtype: torch.dtype) -> LoraDeltas:
        pipe = self.bases.pipeline(base_model_id)
        deltas = extract_deltas(pipe, info.path)  # FailedPrecondition for another family or shapes
        check_targets(info, deltas, base_model_id)
        check_shapes(info.lora_id, pipe, deltas)
        return prepare_deltas(deltas, 1.0, dtype)

    def _report(self, key: CacheKey, prepared: PreparedLora, tier: str, t0: float):
        seconds = time.perf_counter() - t0
        counter = {"host": "host_hits", "disk": "disk_hits", "precompute": "precomputes"}[tier]
        with self._lock:
            self._counts[counter] += 1
        metrics.LORA_LOOKUPS.labels("store_host", "hit" if tier == "host" else "miss").inc()
        if tier != "host":
            metrics.LORA_LOOKUPS.labels("store_disk", "hit" if tier == "disk" else "miss").inc()
        s = self.stats()
        log.info(
            "cache %s lora=%s base=%s dtype=%s bytes=%d seconds=%.4f host_bytes=%d host_budget=%d host_entries=%d "
            "precomputes=%d disk_hits=%d host_hits=%d",
            tier,
            *key,
            prepared.nbytes,
            seconds,
            s["host_bytes"],
            s["host_budget"],
            s["host_entries"],
            s["precomputes"],
            s["disk_hits"],
            s["host_hits"],
        )
        return prepared, tier, seconds

    def prefetch(self, lora_id: str, base_model_id: str, dtype: torch.dtype | None = None) -> tuple[bool, float, int]:
        """(already hot, seconds spent, bytes). Into the host tier when it fits the budget."""
        prepared, tier, seconds = self.entry(lora_id, base_model_id, dtype)
        hot = tier == "host"
        return hot, 0.0 if hot else seconds, prepared.nbytes

    def lora_set(self, loras: LoraSet, base_model_id: str, dtype: torch.dtype | None = None) -> list[ServedLora]:
        """Every LoRA of a request, prepared and scaled, before anything is sent (all or nothing)."""
        if not loras:
            raise InvalidArgument("loras", "at least one LoRA is required")
        check_id("base_model_id", base_model_id)
        dtype = self.resolve_dtype(dtype)
        loras = LoraSet.of(loras)
        for i, lora in enumerate(loras):
            check_id(f"loras[{i}].lora_id", lora.lora_id)
            if not math.isfinite(lora.scale):
                raise InvalidArgument(f"loras[{i}].scale", f"{lora.scale} is not finite")
        served = []
        for i, lora in enumerate(loras):
            lora_id, scale = lora.lora_id, lora.scale
            prepared, tier, _ = self.entry(lora_id, base_model_id, dtype, field=f"loras[{i}].lora_id")
            deltas = prepared.deltas if scale == 1.0 else prepare_deltas(prepared.deltas, scale, dtype)
            served.append(ServedLora(lora_id, scale, deltas, tier))
        return served
