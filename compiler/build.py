"""Building an artifact directory: export each part, compile it, check it against eager, write the manifest.

Used by `python -m compiler build` (the release pipeline) and by a service started with
`--compile-missing` on a directory that has no artifacts yet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from compiler import parts as P
from compiler.artifacts import (
    MANIFEST,
    BackendUnavailable,
    InputNotFound,
    Manifest,
    PartEntry,
    UsageError,
    VerificationFailed,
    file_sha256,
    library_versions,
    module_fingerprint,
    pipeline_fingerprint,
    platform_key,
    write_manifest,
)
from compiler.export import export_part

log = logging.getLogger(__name__)

BACKENDS = ("inductor", "graphs", "tensorrt")
ARTIFACT_SUFFIXES = (".pt2", ".trt.ep", ".bin", MANIFEST, ".tmp")  # what a build writes into its directory


def default_backend(device: str) -> str:
    """AOTInductor packages on CPU; on CUDA, where they crash on load (compiler/graphs.py), graphs."""
    return "graphs" if torch.device(device).type == "cuda" else "inductor"


# Compiled vs eager, max abs difference relative to the eager output's magnitude (max(1, max|x|)).
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def max_abs_diff(compiled, eager) -> tuple[float, float]:
    """(max abs difference over all outputs, max(1, max |eager|)) of two outputs of a part."""
    got, want = P.flat_tensors(compiled), P.flat_tensors(eager)
    if len(got) != len(want):
        raise VerificationFailed(f"compiled part returned {len(got)} tensors, eager {len(want)}")
    diff, scale = 0.0, 1.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise VerificationFailed(f"compiled output shape {tuple(g.shape)} != eager {tuple(w.shape)}")
        diff = max(diff, (g.float() - w.float()).abs().max().item())
        scale = max(scale, w.float().abs().max().item())
    return diff, scale


def part_plan(parts: Sequence[str], resolutions: Sequence[int], batch_sizes: Sequence[int]) -> list[P.PartSpec]:
    plan = []
    for resolution in resolutions:
        for name in parts:
            # The engine decodes one image per request.
            batches = (1,) if name == P.VAE_DECODER else tuple(sorted(set(batch_sizes)))
            plan.append(P.PartSpec(name, resolution, batches))
    return plan


def build(
    pipe,
    out: Path,
    *,
    model_id: str,
    backend: str | None = None,  # None: default_backend(device)
    resolutions: Sequence[int] = (512,),
    batch_sizes: Sequence[int] = (1, 2),
    parts: Sequence[str] = (P.UNET_ENCODER, P.UNET_DECODER, P.VAE_DECODER),
    controlnets: dict[str, torch.nn.Module] | None = None,
    device: str = "cpu",
    options: dict | None = None,  # None: the backend's defaults (compiler.inductor.default_options)
    tolerance: float | None = None,
    force: bool = False,
    progress: Callable[[str], None] = log.info,
) -> Manifest:
    """Compile `parts` of `pipe` for every resolution into `out`; returns the manifest written.

    `controlnets` (id -> ControlNetModel) are compiled once per architecture when the
    `controlnet` part is asked for. Raises a CompilerError subclass on any failure; the manifest is
    written last, so a directory whose build failed is never taken for a complete one.
    """
    backend = backend or default_backend(device)
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    unknown = [p for p in parts if p not in P.ALL_PARTS]
    if unknown:
        raise UsageError(f"unknown part(s) {unknown}; known: {', '.join(P.ALL_PARTS)}")
    if P.CONTROLNET in parts and not controlnets:
        raise InputNotFound("the controlnet part needs at least one ControlNet (--controlnet-id)")
    for resolution in resolutions:
        if resolution % (pipe.vae_scale_factor * 8) != 0:
            raise UsageError(f"resolution {resolution} is not a multiple of {pipe.vae_scale_factor * 8}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError("batch sizes must be positive")
    if backend == "graphs" and options:
        raise UsageError("backend graphs takes no --option: it compiles with torch.compile's mode for the device")
    if backend == "tensorrt":
        from compiler import tensorrt

        reason = tensorrt.unavailable_reason(device)
        if reason:
            raise BackendUnavailable(f"backend tensorrt: {reason}")

    out = Path(out)
    existing = sorted(out.iterdir()) if out.is_dir() else []
    if existing:
        if not force:
            raise UsageError(f"{out} is not empty; pass --force to replace its artifacts")
        # --force replaces artifacts, and nothing else: a directory holding other files is refused.
        foreign = [p.name for p in existing if not (p.is_file() and p.name.endswith(ARTIFACT_SUFFIXES))]
        if foreign:
            raise UsageError(f"{out} holds files that are not artifacts ({', '.join(foreign[:3])}); not replacing it")
        for path in existing:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    if options is None and backend == "inductor":
        from compiler.inductor import default_options

        options = default_options(device)
    dtype = dtype_name(pipe.unet.dtype)
    tol = DEFAULT_TOLERANCE.get(dtype, 1e-2) if tolerance is None else tolerance
    manifest = Manifest(
        backend=backend,
        model_id=model_id,
        model_fingerprint=pipeline_fingerprint(pipe),
        dtype=dtype,
        libraries=library_versions(backend),
        platform=platform_key(device),
        resolutions=sorted(set(resolutions)),
        batch_sizes=sorted(set(batch_sizes)),
        options=dict(options or {}),
        tolerance=tol,
        vae_scale_factor=pipe.vae_scale_factor,
    )

    # One ControlNet per architecture: weights are inputs, so one artifact serves them all.
    controlnet_by_fingerprint: dict[str, tuple[str, torch.nn.Module]] = {}
    for controlnet_id, model in (controlnets or {}).items():
        controlnet_by_fingerprint.setdefault(module_fingerprint(model), (controlnet_id, model))

    t_build = time.perf_counter()
    for spec in part_plan(parts, resolutions, batch_sizes):
        sources = (
            [(fp, cid, model) for fp, (cid, model) in controlnet_by_fingerprint.items()]
            if spec.name == P.CONTROLNET
            else [(None, "", None)]
        )
        for fingerprint, source_id, controlnet in sources:
            entry = _build_part(
                pipe, out, spec, backend, controlnet, source_id, fingerprint, options, tol, device, progress
            )
            manifest.parts.append(entry)
    if backend == "graphs":  # one compile cache for every part, written once all are compiled
        from compiler import graphs

        size = graphs.save_cache(out / graphs.CACHE_FILE)
        digest = file_sha256(out / graphs.CACHE_FILE)
        for entry in manifest.parts:
            entry.sha256 = digest
        progress(f"[compiler] compile cache: {size / 2**20:.1f} MiB")
    write_manifest(out, manifest)
    progress(f"[compiler] {len(manifest.parts)} parts in {time.perf_counter() - t_build:.0f} s -> {out}")
    return manifest


def _build_part(
    pipe, out, spec, backend, controlnet, source_id, fingerprint, options, tol, device, progress
) -> PartEntry:
    module = P.graph_module(spec.name, pipe, controlnet)
    if fingerprint is None:
        fingerprint = module_fingerprint(pipe.vae if spec.name == P.VAE_DECODER else pipe.unet)
    suffix = f"-{fingerprint[:8]}" if spec.name == P.CONTROLNET else ""
    label = f"{spec.name}{suffix} at {spec.resolution}px, batch {spec.batch_sizes[0]}..{spec.batch_sizes[-1]}"
    if backend != "graphs":  # torch.compile traces the module itself
        progress(f"[compiler] exporting {label} ...")
        inputs = P.example_inputs(spec.name, pipe, spec.resolution, max(spec.batch_sizes), controlnet)
        program = export_part(spec.name, module, inputs, spec.batch_sizes)

    progress(f"[compiler] compiling {label} ({backend}) ...")
    if backend == "inductor":
        from compiler import inductor

        filename = f"{spec.key}{suffix}.pt2"
        seconds, recipes = inductor.build_package(program, out / filename, options, module)
        compiled = inductor.PackagePart(out / filename, module, device, recipes)
    elif backend == "graphs":
        from compiler import graphs

        filename, recipes = graphs.CACHE_FILE, None
        compiled = graphs.GraphPart(module, device)
        t0 = time.perf_counter()
        for batch in spec.batch_sizes:  # one graph per batch size (dynamic=False)
            compiled(*P.example_inputs(spec.name, pipe, spec.resolution, batch, controlnet))
        seconds = time.perf_counter() - t0
    else:
        from compiler import tensorrt

        filename = f"{spec.key}{suffix}.trt.ep"
        recipes = None
        seconds = tensorrt.build_engine(
            program, inputs, out / filename, options, (min(spec.batch_sizes), max(spec.batch_sizes))
        )
        compiled = tensorrt.EnginePart(out / filename, module)

    worst = 0.0
    with torch.no_grad():
        for batch in spec.batch_sizes:
            sample_inputs = P.example_inputs(spec.name, pipe, spec.resolution, batch, controlnet, seed=batch)
            diff, scale = max_abs_diff(compiled(*sample_inputs), module(*sample_inputs))
            worst = max(worst, diff / scale)
            if diff > tol * scale:
                raise VerificationFailed(
                    f"{label}: compiled output differs from eager by {diff:.3g} at batch {batch} "
                    f"(tolerance {tol:g} x {scale:.3g})"
                )
    progress(f"[compiler]   {seconds:.0f} s, max |compiled - eager| / scale = {worst:.2e}")
    return PartEntry(
        name=spec.name,
        resolution=spec.resolution,
        batch_min=min(spec.batch_sizes),
        batch_max=max(spec.batch_sizes),
        file=filename,
        sha256="" if backend == "graphs" else file_sha256(out / filename),  # graphs: set with the cache
        fingerprint=fingerprint,
        compile_seconds=round(seconds, 2),
        max_diff=float(f"{worst:.3g}"),
        source_id=source_id,
        recipes=recipes,
    )
