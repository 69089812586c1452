"""Compiled artifacts a benchmark group runs on, built once per machine and reused after that.

`python -m compiler build` takes minutes; `compiler verify` (same architecture, libraries, CPU;
every part still equal to eager) takes seconds, so a group verifies what an earlier run built and
rebuilds only what no longer fits.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def compiled_artifacts(
    root: Path,
    model_id: str,
    out: Path,
    resolution: int,
    batches: tuple[int, ...] = (2,),
    controlnet_ids: tuple[str, ...] = (),
    dtype: str = "float32",
    log: Callable[[str], None] = print,
) -> Path:
    """The artifact directory `out` for `model_id` of model root `root`: UNet halves, VAE decoder
    and the ControlNets' architectures at `resolution` for `batches`, in `dtype`."""
    model = ["--model-root", str(root), "--model-id", model_id, "--dtype", dtype]
    compiler = [sys.executable, "-m", "compiler"]
    t0 = time.perf_counter()
    if (out / "manifest.json").exists():
        verify = subprocess.run([*compiler, "verify", "--artifacts", str(out), *model], cwd=REPO, capture_output=True)
        if verify.returncode == 0:
            log(f"[bench] compiled artifacts {out}: verified ({time.perf_counter() - t0:.1f} s)")
            return out
        log(f"[bench] compiled artifacts {out}: verify exit {verify.returncode}; rebuilding")
    build = [*compiler, "build", *model, "--resolution", str(resolution), "--batch", *map(str, batches)]
    if controlnet_ids:
        build += ["--controlnet-id", *controlnet_ids]
    build += ["--out", str(out), "--force"]
    done = subprocess.run(build, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiler build failed ({done.returncode}):\n{done.stderr[-3000:]}")
    log(f"[bench] compiled artifacts {out}: built ({time.perf_counter() - t0:.1f} s, once per machine)")
    return out
