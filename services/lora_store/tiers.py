"""The store's cache tiers for prepared deltas: host memory (LRU under a byte budget), then disk.

An entry is the prepared deltas of one (lora_id, base_model_id, dtype), at scale 1.0, stamped
with the sha256 of the source file they came from.

Disk layout: `<cache_dir>/<base_model_id>/<dtype>/<lora_id>.safetensors`, one file per entry, with
keys `<parameter>.up` + `<parameter>.down` (factored) or `<parameter>.full`, and `__metadata__`:

    format          DISK_FORMAT (bumped whenever the layout or the preparation changes)
    order           JSON list of the parameter names, in the order the worker needs them
                    (safetensors sorts its keys, so the order lives here)
    source_sha256   sha256 of the LoRA file the entry was prepared from
    base_signature  sha256 over the base model's config files (names and shapes come from them)
    lora_id, base_model_id, dtype   for people reading the folder

An entry whose metadata does not match (other source hash, format or base) is a miss and is
rewritten; writes go to a temporary file and are renamed into place, so a crash never leaves a
torn entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.lora_store.atomic import write_atomically
from swiftd.lora import LoraDeltas, WeightDelta

log = logging.getLogger(__name__)

DISK_FORMAT = "swiftd-lora-deltas-2"  # 2: content_sha256 over the tensors

CacheKey = tuple[str, str, str]  # (lora_id, base_model_id, dtype name, e.g. "float32")


@dataclass(frozen=True)
class PreparedLora:
    deltas: LoraDeltas  # scale 1.0, serving dtype, in the worker's order
    source_sha256: str

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.deltas.values())


class HostTier:
    """Prepared entries, least recently used evicted so that the total never exceeds the budget.

    An entry larger than the whole budget is not kept (it is served from disk each time).
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[CacheKey, PreparedLora] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[CacheKey]:
        with self._lock:
            return list(self._entries)

    def get(self, key: CacheKey) -> PreparedLora | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: CacheKey, entry: PreparedLora) -> bool:
        """Keep `entry` (evicting the least recently used); False when it alone exceeds the budget."""
        size = entry.nbytes
        with self._lock:
            self._pop_locked(key)
            if size > self.budget_bytes:
                return False
            while self._entries and self._nbytes + size > self.budget_bytes:
                evicted_key, _ = self._pop_locked(next(iter(self._entries)))
                self.evictions += 1
                log.info("host tier: evicted %s/%s/%s", *evicted_key)
            self._entries[key] = entry
            self._nbytes += size
            assert self._nbytes <= self.budget_bytes
            return True

    def drop(self, predicate) -> int:
        """Remove every entry whose key satisfies `predicate`; returns how many."""
        with self._lock:
            keys = [k for k in self._entries if predicate(k)]
            for key in keys:
                self._pop_locked(key)
            return len(keys)

    def _pop_locked(self, key: CacheKey):
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._nbytes -= entry.nbytes
        return key, entry


def content_sha256(deltas: LoraDeltas) -> str:
    """SHA-256 of every delta's names and tensor bytes, in order: what a disk entry must still hold."""
    h = hashlib.sha256()
    for name, delta in deltas.items():
        h.update(name.encode())
        for tensor in (delta.up, delta.down):
            if tensor is not None:
                h.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
                h.update(tensor.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


class DiskTier:
    """Prepared entries as safetensors files under `cache_dir` (None: no disk tier)."""

    def __init__(self, cache_dir: Path | None):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._remove_abandoned_writes()

    def _remove_abandoned_writes(self, older_than_s: float = 3600.0) -> None:
        """Temporary files a killed writer left. Old ones only: a replica may be writing one now."""
        cutoff = time.time() - older_than_s
        for tmp in self.cache_dir.glob("*/*/.*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    log.info("disk tier: removed %s, left by an interrupted write", tmp)
            except FileNotFoundError:
                pass

    def path(self, key: CacheKey) -> Path | None:
        if self.cache_dir is None:
            return None
        lora_id, base_model_id, dtype = key
        return self.cache_dir / base_model_id / dtype / f"{lora_id}.safetensors"

    def load(self, key: CacheKey, source_sha256: str, base_signature: str) -> PreparedLora | None:
        """The entry if present and prepared from this source for this base; else None."""
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if (meta.get("format"), meta.get("source_sha256"), meta.get("base_signature")) != (
                    DISK_FORMAT,
                    source_sha256,
                    base_signature,
                ):
                    log.info("disk tier: %s is stale (source, base or format changed)", path)
                    return None
                keys = set(f.keys())
                order = json.loads(meta["order"])
                deltas: LoraDeltas = {}
                for name in order:
                    if f"{name}.full" in keys:
                        deltas[name] = WeightDelta(f.get_tensor(f"{name}.full"))
                    else:
                        deltas[name] = WeightDelta(f.get_tensor(f"{name}.up"), f.get_tensor(f"{name}.down"))
                if len(keys) != sum(1 if d.down is None else 2 for d in deltas.values()):
                    raise ValueError("tensors and the recorded order disagree")
                if meta.get("content_sha256") != content_sha256(deltas):
                    raise ValueError("content checksum mismatch (the file is corrupt)")
        except Exception as exc:  # noqa: BLE001 - a damaged entry is a miss, rewritten after recompute
            log.warning("disk tier: ignoring unreadable %s: %s", path, exc)
            return None
        return PreparedLora(deltas, source_sha256)

    def store(self, key: CacheKey, entry: PreparedLora, base_signature: str) -> None:
        path = self.path(key)
        if path is None:
            return
        tensors: dict[str, torch.Tensor] = {}
        for name, delta in entry.deltas.items():
            if delta.down is None:
                tensors[f"{name}.full"] = delta.up.contiguous()
            else:
                tensors[f"{name}.up"] = delta.up.contiguous()
                tensors[f"{name}.down"] = delta.down.contiguous()
        lora_id, base_model_id, dtype = key
        meta = {
            "format": DISK_FORMAT,
            "order": json.dumps(list(entry.deltas)),
            "source_sha256": entry.source_sha256,
            "base_signature": base_signature,
            "lora_id": lora_id,
            "base_model_id": base_model_id,
            "dtype": dtype,
            "content_sha256": content_sha256(entry.deltas),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        except OSError as exc:  # a full or read-only disk costs the tier, not the request
            log.warning("disk tier: could not write %s: %s", path, exc)

    def drop_lora(self, lora_id: str) -> int:
        if self.cache_dir is None:
            return 0
        removed = 0
        for path in self.cache_dir.glob(f"*/*/{lora_id}.safetensors"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed
