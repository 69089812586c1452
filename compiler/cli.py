"""Ahead-of-time compilation of the split backbone, for the release pipeline.

    python -m compiler build   --model-root .zoo --model-id tiny-sd15 [--backend inductor|graphs|tensorrt] \\
                               --resolution 256 --batch 1 2 [--controlnet-id ID ...] --out DIR
    python -m compiler verify  --artifacts DIR --model-root .zoo --model-id tiny-sd15 [--publish DIR2]
    python -m compiler inspect DIR

build    exports and compiles the UNet encoder half, the UNet decoder half (ControlNet residuals
         are its inputs), the VAE decoder and, given --controlnet-id, the ControlNet (one artifact
         per ControlNet architecture), for every --resolution and the --batch range (1 = without
         CFG, 2 = with). Each part is run against eager on example inputs before the manifest is
         written; weights are not inside the artifacts (they are read from the serving model).
verify   checks that DIR fits the model and this environment (architecture, dtype, torch/diffusers
         versions, CPU instruction set or GPU), that every file is intact, loads every part and
         compares it with eager again; with --publish, then renames DIR to DIR2 (a release
         pipeline builds into a staging name and publishes only what verified).
inspect  prints the manifest.

Exit codes (what a release pipeline can act on):
    0  success
    1  unexpected error (a bug: the message and traceback say where)
    2  bad command line (also: --out not empty without --force, a resolution not a multiple of 64,
       --publish onto an existing directory)
    3  input not found: model folder, ControlNet or artifact directory
    4  backend unavailable here (tensorrt without torch-tensorrt/CUDA): build it where it is
    5  verification failed: a compiled part differs from eager beyond the tolerance
    6  artifacts do not fit: built for another model architecture, dtype, library version or
       platform: rebuild them for this one
    7  artifacts incomplete or corrupt: missing manifest or part file, checksum mismatch
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

from swiftd.cliargs import ExtendList

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    from compiler.build import BACKENDS
    from compiler.parts import ALL_PARTS
    from swiftd.loading import DTYPES

    parser = argparse.ArgumentParser(
        prog="python -m compiler", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def model_arguments(p):
        p.add_argument("--model-root", type=Path, required=True, help="model repository (models/, controlnets/)")
        p.add_argument("--model-id", required=True, help="base model: models/<id> folder or single file")
        p.add_argument("--config", type=Path, default=None, help="Diffusers config folder for a single-file checkpoint")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="serving dtype the artifacts are for")

    build = sub.add_parser("build", help="compile artifacts into --out")
    model_arguments(build)
    build.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="inductor: AOTInductor packages (the CPU default); graphs: torch.compile with CUDA graphs "
        "from a saved compile cache (the CUDA default: AOTInductor packages crash on load there, "
        "docs/gpu.md); tensorrt: refittable engines",
    )
    build.add_argument(
        "--resolution",
        nargs="+",
        action=ExtendList,
        item_type=int,
        required=True,
        help="image sides in pixels (square)",
    )
    build.add_argument(
        "--batch", type=int, nargs="+", default=[1, 2], help="batch sizes to serve: 1 without CFG, 2 with"
    )
    build.add_argument(
        "--parts",
        nargs="+",
        choices=ALL_PARTS,
        default=None,
        help="parts to compile (default: the UNet halves and the VAE decoder, plus the ControlNet "
        "when --controlnet-id is given)",
    )
    build.add_argument(
        "--controlnet-id", nargs="*", action=ExtendList, default=[], help="ControlNets whose architectures to compile"
    )
    build.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    build.add_argument("--force", action="store_true", help="replace the artifacts already in --out")
    build.add_argument(
        "--option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option: an Inductor config (default on CPU: freezing=true; freezing=false "
        "reads weights in place instead of re-packing patched ones) or a torch-tensorrt "
        "compile setting",
    )
    build.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max |compiled - eager| / max(1, max|eager|) accepted (default by dtype: fp32 1e-4, fp16 2e-2)",
    )

    verify = sub.add_parser("verify", help="check artifacts against a model and this environment")
    model_arguments(verify)
    verify.add_argument("--artifacts", type=Path, required=True)
    verify.add_argument(
        "--publish",
        type=Path,
        default=None,
        metavar="DIR",
        help="once verified, rename --artifacts to DIR (same filesystem: atomic), where workers "
        "load it from; DIR must not exist: a published directory is never replaced",
    )

    inspect = sub.add_parser("inspect", help="print an artifact directory's manifest")
    inspect.add_argument("artifacts", type=Path)
    return parser


def _load_pipe(args):
    from compiler.artifacts import InputNotFound
    from swiftd.errors import NotFound
    from swiftd.loading import DTYPES, load_pipeline, resolve

    try:
        path = resolve(args.model_root, "models", args.model_id, "model_id")
    except NotFound:
        raise InputNotFound(f"model {args.model_id!r} not found under {args.model_root}/models") from None
    return load_pipeline(path, dtype=DTYPES[args.dtype], device=args.device, config=args.config)


def _load_controlnets(args, ids) -> dict:
    from compiler.artifacts import InputNotFound
    from swiftd.errors import NotFound
    from swiftd.loading import DTYPES, load_controlnet, resolve

    models = {}
    for controlnet_id in ids:
        try:
            path = resolve(args.model_root, "controlnets", controlnet_id, "controlnet_id")
        except NotFound:
            raise InputNotFound(f"ControlNet {controlnet_id!r} not found under {args.model_root}/controlnets") from None
        models[controlnet_id] = load_controlnet(path, dtype=DTYPES[args.dtype], device=args.device)
    return models


def _options(args) -> dict:
    """The backend's defaults, overridden by --option."""
    defaults = {}
    if args.backend == "inductor":
        from compiler.inductor import default_options

        defaults = default_options(args.device)
    return {**defaults, **dict(args.option)}


def cmd_build(args) -> int:
    from compiler import parts as P
    from compiler.build import build, default_backend

    args.backend = args.backend or default_backend(args.device)
    parts = args.parts or [P.UNET_ENCODER, P.UNET_DECODER, P.VAE_DECODER] + (
        [P.CONTROLNET] if args.controlnet_id else []
    )
    if args.backend == "tensorrt":  # fail fast, before loading models
        from compiler import tensorrt
        from compiler.artifacts import BackendUnavailable

        reason = tensorrt.unavailable_reason(args.device)
        if reason:
            raise BackendUnavailable(f"backend tensorrt: {reason}")
    pipe = _load_pipe(args)
    controlnets = _load_controlnets(args, args.controlnet_id) if P.CONTROLNET in parts else {}
    manifest = build(
        pipe,
        args.out,
        model_id=args.model_id,
        backend=args.backend,
        resolutions=args.resolution,
        batch_sizes=args.batch,
        parts=parts,
        controlnets=controlnets,
        device=args.device,
        options=_options(args),
        tolerance=args.tolerance,
        force=args.force,
        progress=_say,
    )
    _say(f"[compiler] wrote {args.out}/manifest.json: {len(manifest.parts)} parts, backend {manifest.backend}")
    return EXIT_OK


def cmd_verify(args) -> int:
    import torch

    from compiler import parts as P
    from compiler.artifacts import VerificationFailed
    from compiler.build import max_abs_diff
    from compiler.runtime import CompiledBackbone

    pipe = _load_pipe(args)
    backbone = CompiledBackbone.load(args.artifacts, pipe, device=args.device)
    manifest = backbone.manifest
    ids = sorted({e.source_id for e in manifest.parts if e.name == P.CONTROLNET and e.source_id})
    controlnets = _load_controlnets(args, ids)
    failures = []
    with torch.no_grad():
        for entry in manifest.parts:
            controlnet = controlnets.get(entry.source_id)
            module = P.graph_module(entry.name, pipe, controlnet)
            from compiler.runtime import _load_part

            compiled = _load_part(args.artifacts, entry, module, manifest.backend, args.device)
            for batch in sorted({entry.batch_min, entry.batch_max}):
                inputs = P.example_inputs(entry.name, pipe, entry.resolution, batch, controlnet, seed=100 + batch)
                diff, scale = max_abs_diff(compiled(*inputs), module(*inputs))
                ok = diff <= manifest.tolerance * scale
                _say(
                    f"[compiler] {entry.file} batch {batch}: max |compiled - eager| {diff:.3g} "
                    f"(tolerance {manifest.tolerance:g} x {scale:.3g}) {'ok' if ok else 'FAILED'}"
                )
                if not ok:
                    failures.append(f"{entry.file} at batch {batch}")
    if failures:
        raise VerificationFailed(f"compiled differs from eager beyond the tolerance: {', '.join(failures)}")
    _say(f"[compiler] {args.artifacts}: {len(manifest.parts)} parts fit {args.model_id} and this environment")
    if args.publish is not None:
        _publish(args.artifacts, args.publish)
    return EXIT_OK


def _publish(artifacts: Path, target: Path) -> None:
    """Workers only ever see a verified directory, complete: a rename, not a copy."""
    import os

    from compiler.artifacts import UsageError

    if target.exists():
        raise UsageError(
            f"{target} exists: a published artifact directory is never replaced (publish under a new name)"
        )
    try:
        os.rename(artifacts, target)
    except OSError as exc:
        raise UsageError(f"cannot publish {artifacts} as {target}: {exc} (both must be on one filesystem)") from None
    _say(f"[compiler] published {artifacts} as {target}")


def cmd_inspect(args) -> int:
    from compiler.artifacts import read_manifest

    manifest = read_manifest(args.artifacts)
    for entry in manifest.parts:  # recipes of frozen builds are long: their count says enough
        if entry.recipes is not None:
            entry.recipes = {"constants": len(entry.recipes)}
    print(manifest.to_json())
    return EXIT_OK


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    from compiler.artifacts import CompilerError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on a bad command line, 0 for --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        code = {"build": cmd_build, "verify": cmd_verify, "inspect": cmd_inspect}[args.command](args)
    except CompilerError as exc:
        _say(f"error: {exc}")
        return exc.exit_code
    except Exception:  # noqa: BLE001 - a release pipeline needs a distinct code for "bug"
        traceback.print_exc()
        return EXIT_INTERNAL
    _say(f"[compiler] {args.command} done in {time.perf_counter() - t0:.1f} s")
    return code
