"""Writing the zoo's files reproducibly: safetensors with a stable header, JSON, permissions."""

from __future__ import annotations

import json
import os
from pathlib import Path


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


def write_json(path: Path, obj, sort_keys: bool = True) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n", encoding="utf-8")


def make_readable(paths: list[Path]) -> None:
    """Give every file under `paths` the default permissions (umask) rather than 0600.

    safetensors writes its files 0600; a model repository is read by other users (containers).
    """
    umask = os.umask(0)
    os.umask(umask)
    for root in paths:
        for f in [root] if root.is_file() else root.rglob("*"):
            if f.is_file():
                f.chmod(0o666 & ~umask)
