"""`python -m swiftd.zoo build --out DIR [--only FAMILY ...] [--full]`: generate the model zoo (idempotent)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import swiftd.zoo
from swiftd.zoo.builder import build
from swiftd.zoo.specs import SPECS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swiftd.zoo", description=swiftd.zoo.__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="generate the model zoo (idempotent)")
    b.add_argument("--out", default=".zoo", type=Path)
    b.add_argument("--only", nargs="+", metavar="FAMILY", choices=list(SPECS), help="build exactly these families")
    b.add_argument("--full", action="store_true", help="also build the full-size sd15 and sdxl families")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        build(args.out, only=args.only, full=args.full)
    return 0


if __name__ == "__main__":
    sys.exit(main())
