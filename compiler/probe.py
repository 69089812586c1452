"""What a worker does with artifacts it may not be able to use: try them in a child process
first, and when they cannot be used, serve eagerly and say why (or stop, if asked).

A native crash while loading or running compiled parts (seen with AOTInductor packages on CUDA:
the process ended with no Python exception) cannot be caught in the process it happens in. A
worker that crashed that way at every start would restart in a loop and never serve. So a worker
first runs `python -m compiler verify` on the artifacts in a child (every part loaded, bound to
the model's weights and compared with eager): only if the child passes does the worker load them
itself; otherwise it serves eagerly and says why.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from compiler.artifacts import ProbeFailed

log = logging.getLogger(__name__)


def probe_artifacts(
    artifacts: Path,
    *,
    model_root: Path,
    model_id: str,
    device: str,
    dtype: str,
    config: Path | None = None,
    timeout: float = 900.0,
) -> float:
    """Seconds the child took to verify the artifacts; ProbeFailed with its verdict otherwise."""
    argv = [sys.executable, "-X", "faulthandler", "-m", "compiler", "verify", "--artifacts", str(artifacts)]
    argv += ["--model-root", str(model_root), "--model-id", model_id, "--device", device, "--dtype", dtype]
    if config is not None:
        argv += ["--config", str(config)]
    t0 = time.monotonic()
    try:
        child = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ProbeFailed(f"verifying {artifacts} in a child process took over {timeout:.0f} s", 1) from None
    seconds = time.monotonic() - t0
    if child.returncode == 0:
        return seconds
    tail = (child.stderr or child.stdout).strip().splitlines()[-12:]
    if child.returncode < 0:  # a signal: the crash this probe exists for
        cause = f"ended by {signal.Signals(-child.returncode).name}"
        code = 1
    else:
        cause = f"exit code {child.returncode}"
        code = child.returncode
    log.error("compiler verify of %s in a child process: %s; its last lines:\n%s", artifacts, cause, "\n".join(tail))
    raise ProbeFailed(f"verifying {artifacts} in a child process failed ({cause})", code)


def add_unusable_artifacts_argument(parser, when: str) -> None:
    """`--on-unusable-artifacts`: `when` says what makes artifacts unusable for this worker."""
    parser.add_argument(
        "--on-unusable-artifacts",
        choices=["serve-eagerly", "exit"],
        default="serve-eagerly",
        help=f"when --compiled-artifacts {when}: serve eagerly and say so (default; a worker never restarts "
        "in a loop for want of artifacts), or exit with the compiler's exit code",
    )


def unusable(args, directory: Path, error) -> None:
    """The artifacts in `directory` cannot be used (`error`, a CompilerError): stop with the
    compiler's exit code under `--on-unusable-artifacts exit`; otherwise log that the worker
    serves eagerly, and return."""
    if args.on_unusable_artifacts == "exit":
        log.error("cannot serve on %s: %s", directory, error)
        raise SystemExit(error.exit_code) from None
    log.error("serving EAGERLY: the compiled artifacts in %s cannot be used here: %s", directory, error)
