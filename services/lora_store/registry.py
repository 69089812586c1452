"""Which LoRAs are registered, in one JSON file that survives restarts and that replicas share.

Without a registry (`--registry` not given) the store registers every file under `<root>/loras/`
at start and forgets `RegisterLora`/`RemoveLora` when it stops: fine for one process on one box.

With one, the file is the truth for every store process that names it:

* first start (no file yet): every readable LoRA file is registered, and the file is written;
* after that: exactly the ids in the file. `RegisterLora` adds one, `RemoveLora` takes one out,
  and a file copied into `loras/` is served once someone registers it;
* each change is a read-modify-write under an exclusive `flock` on `<registry>.lock`, written to
  a temporary file, fsynced and renamed into place: a crash leaves the old list or the new one,
  and two replicas changing it at once lose nothing;
* a replica notices another's change at its next catalog call (one `stat` per call: inode,
  size, mtime and ctime). On NFS that waits for the client's attribute cache (`actimeo`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from services.lora_store.atomic import write_atomically

log = logging.getLogger(__name__)

FORMAT = "swiftd-lora-registry-1"

Stamp = tuple[int, int, int, int]  # (inode, size, mtime_ns, ctime_ns): a rename changes it


class RegistryFile:
    """The registered ids in `path` (JSON: {"format", "lora_ids": [...]})."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    def stamp(self) -> Stamp | None:
        """What identifies the current version of the file; None when there is none yet."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def read(self) -> tuple[set[str], Stamp | None] | None:
        """(ids, the stamp they were read at), or None when there is no file yet.

        A file that is not ours raises ValueError: serving a guessed catalog would be worse."""
        try:
            with open(self.path, "rb") as f:
                stamp = os.fstat(f.fileno())
                data = json.loads(f.read())
        except FileNotFoundError:
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("lora_ids"), list):
            raise ValueError(f"{self.path} is not a LoRA registry ({FORMAT})")
        ids = {i for i in data["lora_ids"] if isinstance(i, str)}
        return ids, (stamp.st_ino, stamp.st_size, stamp.st_mtime_ns, stamp.st_ctime_ns)

    @contextmanager
    def _locked(self):
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # across processes and pods on one volume
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write(self, ids: Iterable[str]) -> None:
        body = json.dumps({"format": FORMAT, "lora_ids": sorted(ids)}, indent=1).encode()
        write_atomically(self.path, lambda tmp: tmp.write_bytes(body))

    def initialize(self, first_ids: Callable[[], Iterable[str]]) -> set[str]:
        """The ids in the file; when there is none yet, `first_ids()` written as the first version."""
        with self._locked():
            current = self.read()
            if current is not None:
                return current[0]
            ids = set(first_ids())
            self._write(ids)
            log.info("lora registry %s created with %d lora(s) found under loras/", self.path, len(ids))
            return ids

    def update(self, change: Callable[[set[str]], None]) -> set[str]:
        """Apply `change` to the current ids (in place) and write the result; returns the ids as
        they were before (so a caller learns whether its id was listed)."""
        with self._locked():
            current = self.read()
            before = set() if current is None else current[0]
            ids = set(before)
            change(ids)
            if ids != before:
                self._write(ids)
            return before
