"""Generate the Python gRPC code of the swiftd.v1 API from ``protos/``.

``python -m swiftd.protogen`` (``make protos``) regenerates ``swiftd/v1/*_pb2*.py{,i}`` in the
repository; the checked-in files must equal what this produces (``tests/test_protocol.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PACKAGE_DIR = Path("swiftd") / "v1"
# Files protoc writes per .proto, relative to the output root.
_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The API's .proto files, sorted, as paths under ``proto_root``."""
    return sorted((proto_root / PACKAGE_DIR).glob("*.proto"))


def expected_outputs(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Paths (relative to an output root) of every file ``generate`` writes."""
    return [PACKAGE_DIR / (p.stem + suffix) for p in proto_files(proto_root) for suffix in _SUFFIXES]


def _protoc(args: list[str]) -> None:
    import importlib.resources

    from grpc_tools import protoc  # imported lazily: only generation needs grpcio-tools

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", *args])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} (args: {args})")


def generate(out_dir: str | Path) -> list[Path]:
    """Generate the Python modules into ``out_dir`` (as ``out_dir/swiftd/v1/...``).

    Returns the generated paths relative to ``out_dir``. Does not touch ``__init__.py`` files.
    """
    out = Path(out_dir)
    (out / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in proto_files()]
    if not files:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    _protoc([f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *files])
    produced = expected_outputs()
    missing = [str(p) for p in produced if not (out / p).is_file()]
    if missing:
        raise RuntimeError(f"protoc did not produce {missing}")
    return produced


def descriptor_set(out_file: str | Path, include_source_info: bool = True) -> Path:
    """Write a FileDescriptorSet of the API (with comments when ``include_source_info``)."""
    out = Path(out_file)
    args = [f"--descriptor_set_out={out}"]
    if include_source_info:
        args.append("--include_source_info")
    _protoc([*args, *(str(p) for p in proto_files())])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swiftd.protogen", description=__doc__)
    parser.add_argument("--out", default=str(REPO_ROOT), help="output root (default: the repository)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    stale = (
        {p.relative_to(out) for p in (out / PACKAGE_DIR).glob("*_pb2*.py*")} if (out / PACKAGE_DIR).is_dir() else set()
    )
    produced = generate(out)
    # Remove modules of .proto files that no longer exist.
    for rel in sorted(stale - set(produced)):
        (out / rel).unlink()
        print(f"removed stale {rel}")
    for rel in produced:
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
