"""Files replaced whole: a crash or a power cut leaves the old version or the new one, never a torn
one, and two processes writing the same file at once (store replicas on one volume) never share a
temporary name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a fresh temporary file beside `path` (`.<name>.<random>.tmp`), which is
    fsynced and renamed onto `path`; the rename is made durable too. On any error the temporary
    file is removed and the error raised."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)
