"""Group `compiler`: what the ahead-of-time compiler buys on the bench model, on one core.

    make bench ONLY=compiler          (python -m bench.run --only compiler)

Figures (group "compiler" in bench/results.jsonl):
  compiler.ready_s.cold / .warm / .eager   seconds from starting a UNet worker (core 0, 1 thread) to
                                           SERVING: compiling its artifacts at start (--compile-missing),
                                           on the artifacts that start left, and without artifacts
  compiler.warm_start_speedup              ready_s.cold / ready_s.warm (target >= 5)
  compiler.unet_step_s.<variant>           one UNet step (encoder half + decoder half, batch 2 = CFG,
                                           zero residuals), median of interleaved rounds, one thread
  compiler.unet_step_speedup.<variant>     eager / compiled, side by side in one process
  compiler.unet_step_speedup               the best variant whose weights stay patchable (target >= 1.10)
  compiler.lora_max_abs_diff.<variant>     compiled vs eager right after patching the rank-64 LoRA in place
  compiler.lora_recompilations             torch's compile counters over 10 LoRA swaps on the artifacts (0)
  compiler.request_s.eager / .compiled     one whole request (CFG, 20 steps, VAE decode) to a UNet worker
                                           without / on the artifacts, both on the device core with one
                                           thread, requests alternating between them; medians. Each
                                           timed request follows a LoRA request on its worker, so it
                                           includes restoring the base weights (and, compiled,
                                           re-packing them): the affinity-miss case
  compiler.request_speedup                 request_s.eager / request_s.compiled: what a caller sees
  compiler.lora_patch_s.eager / .compiled  the worker's `lora_unet_patch` stage in a request that
                                           patches the rank-64 LoRA in (the compiled worker re-packs
                                           the patched weights' constants there)

Variants: `aoti` (the artifacts services load, the CPU default: AOTInductor with freezing, the
constants computed from the live weights and re-packed when a LoRA patch changes them,
compiler/frozen.py), `aoti_no_freezing` (the compiled code reads the parameters in place),
`aoti_bf16` (the
default in bf16 against bf16 eager; `..._vs_fp32_eager` against fp32 eager), `jit_freezing`
(torch.compile with freezing: weights folded into the graph; for comparison: after a LoRA patch
its output is stale). compiler.lora_refresh_s.<variant>: how much longer the first step after a
LoRA patch takes (the re-packing of the patched weights).

The timing runs in a child process pinned to the device core (`python -m bench.compiler measure`),
the same core and one thread for eager and compiled, alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GROUP = "compiler"


# -- the pinned measuring process ------------------------------------------------------------------


def measure(args) -> dict:
    os.sched_setaffinity(0, {args.core})
    import torch

    torch.set_num_threads(1)
    from compiler import parts as P
    from compiler.runtime import CompiledBackbone, compile_activity
    from swiftd import zoo
    from swiftd.loading import DTYPES, load_pipeline
    from swiftd.lora import LoraPatcher, extract_deltas
    from swiftd.split_unet import SplitUNet

    paths = zoo.zoo_paths(args.zoo, args.family)
    pipe = load_pipeline(paths.model, dtype=DTYPES[args.dtype])
    eager = SplitUNet(pipe.unet)
    inputs = P.example_inputs(P.UNET_ENCODER, pipe, args.size, 2)
    lora_id = f"{args.family}-lora-peft-r64"
    deltas = extract_deltas(pipe, paths.loras[lora_id])
    patcher = LoraPatcher(pipe)

    def step(split):
        return split.decoder_half(split.encoder_half(*inputs))

    variants = {}
    for item in args.artifacts:
        label, directory = item.split("=", 1)
        variants[label] = CompiledBackbone.load(Path(directory), pipe).split_unet()
    if args.jit_freezing:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        split = SplitUNet(pipe.unet)

        class Jit:  # what `step` needs of a split UNet
            encoder_half = torch.compile(split.encoder_half)
            decoder_half = torch.compile(split.decoder_half)

        variants["jit_freezing"] = Jit

    result = {"dtype": args.dtype, "variants": {}}
    with torch.no_grad():
        reference = step(eager)
        for label, split in variants.items():
            t0 = time.perf_counter()
            out = step(split)  # the JIT variant compiles here
            first_s = time.perf_counter() - t0
            step(split)
            eager_s, compiled_s, ratios = [], [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                step(eager)
                t1 = time.perf_counter()
                step(split)
                t2 = time.perf_counter()
                eager_s.append(t1 - t0)
                compiled_s.append(t2 - t1)
                ratios.append((t1 - t0) / (t2 - t1))
            # Patch the LoRA in place: a patchable variant follows, a frozen one does not. The first
            # step after the patch pays for re-packing what the patch changed.
            patcher.apply([(lora_id, 1.0, deltas)])
            t0 = time.perf_counter()
            patched = step(split)
            refresh_s = time.perf_counter() - t0 - statistics.median(compiled_s)
            lora_diff = (patched.float() - step(eager).float()).abs().max().item()
            patcher.restore()
            step(split)
            result["variants"][label] = {
                "first_call_s": first_s,
                "eager_s": statistics.median(eager_s),
                "compiled_s": statistics.median(compiled_s),
                "speedup": statistics.median(ratios),
                "max_abs_diff": (out.float() - reference.float()).abs().max().item(),
                "lora_max_abs_diff": lora_diff,
                "lora_refresh_s": refresh_s,
            }
        if args.swaps and args.artifacts:
            label = args.artifacts[0].split("=", 1)[0]
            before = compile_activity()
            worst = 0.0
            for i in range(args.swaps):
                patcher.apply([(lora_id, 0.5 + 0.05 * i, deltas)]) if i % 2 == 0 else patcher.restore()
                worst = max(worst, (step(variants[label]).float() - step(eager).float()).abs().max().item())
            patcher.restore()
            after = compile_activity()
            result["swaps"] = {
                "variant": label,
                "count": args.swaps,
                "max_abs_diff": worst,
                "recompilations": sum(after[k] - before[k] for k in before),
            }
    return result


def _measure_in_child(
    config,
    artifacts: dict[str, Path],
    dtype: str = "float32",
    jit_freezing: bool = False,
    rounds: int = 8,
    swaps: int = 10,
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.compiler",
        "measure",
        "--zoo",
        str(config.zoo),
        "--family",
        config.family,
        "--size",
        str(config.size),
        "--core",
        str(config.device_core),
        "--dtype",
        dtype,
        "--rounds",
        str(rounds),
        "--swaps",
        str(swaps),
        *(["--jit-freezing"] if jit_freezing else []),
        "--artifacts",
        *[f"{k}={v}" for k, v in artifacts.items()],
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench.compiler measure failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _build(config, out: Path, dtype: str, options: dict) -> float:  # options over the defaults
    """Compile the UNet halves with the CLI (both cores: nothing is being timed meanwhile)."""
    cmd = [
        sys.executable,
        "-m",
        "compiler",
        "build",
        "--model-root",
        str(config.zoo),
        "--model-id",
        config.family,
        "--resolution",
        str(config.size),
        "--batch",
        "1",
        "2",
        "--parts",
        "unet_encoder",
        "unet_decoder",
        "--dtype",
        dtype,
        "--out",
        str(out),
        *[a for k, v in options.items() for a in ("--option", f"{k}={json.dumps(v)}")],
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiler build failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def _time_to_ready(config, extra_args: list[str]) -> float:
    from swiftd.launcher import start_unet

    t0 = time.monotonic()
    worker = start_unet(
        config.zoo, config.family, cpu_cores=[config.device_core], num_threads=1, timeout=3600, extra_args=extra_args
    )
    seconds = time.monotonic() - t0
    log = worker.log_tail(200)
    worker.stop()
    if "--compiled-artifacts" in extra_args and "compiled:" not in log:
        raise RuntimeError(f"the worker did not load its artifacts:\n{log}")
    return seconds


def _compare_requests(config, artifacts: Path, rounds: int = 5) -> dict:
    """Whole requests to a worker on `artifacts` and to an eager one, alternating, one core each
    in turn (both pinned to the device core: only one of them is busy at a time)."""
    from swiftd import rpc
    from swiftd.launcher import start_unet
    from swiftd.request import Request
    from swiftd.v1 import unet_pb2_grpc

    workers = {
        "compiled": start_unet(
            config.zoo,
            config.family,
            cpu_cores=[config.device_core],
            num_threads=1,
            extra_args=["--compiled-artifacts", str(artifacts)],
        ),
        "eager": start_unet(config.zoo, config.family, cpu_cores=[config.device_core], num_threads=1),
    }
    lora = [(f"{config.family}-lora-peft-r64", 0.8)]
    seconds = {name: [] for name in workers}
    patch = {name: [] for name in workers}
    try:
        stubs = {name: unet_pb2_grpc.UNetWorkerStub(rpc.create_channel(w.address)) for name, w in workers.items()}
        for i in range(-1, rounds):  # round -1 warms both up (and prepares the LoRA's deltas once)
            for loras in ([], lora):  # a LoRA request patches it in; the next plain one restores
                for name, stub in stubs.items():
                    request = Request(
                        prompt="a lighthouse at dusk",
                        width=config.size,
                        height=config.size,
                        num_inference_steps=20,
                        guidance_scale=7.5,
                        seed=i + 2,
                        scheduler="euler",
                        model_id=config.family,
                        loras=loras,
                    ).to_denoise_pb()
                    t0 = time.perf_counter()
                    response = stub.Denoise(request, timeout=1800)
                    elapsed = time.perf_counter() - t0
                    if i >= 0 and not loras:
                        seconds[name].append(elapsed)
                    if i >= 0 and loras:
                        patch[name].append(next(t.seconds for t in response.timings if t.stage == "lora_unet_patch"))
    finally:
        for worker in workers.values():
            worker.stop()
    return {
        "request_s": {k: statistics.median(v) for k, v in seconds.items()},
        "lora_patch_s": {k: statistics.median(v) for k, v in patch.items()},
    }


def group_compiler(config, session):
    from bench.scenarios import Figure, GroupResult

    figures: list[Figure] = []
    session.close()  # nothing else may share the device core while services start and steps are timed
    with tempfile.TemporaryDirectory(prefix="swiftd-compiler-bench-") as tmp:
        tmp = Path(tmp)
        artifacts = tmp / "aoti"
        config.log("[bench] compiler: UNet worker compiling its artifacts at start (one core; minutes) ...")
        cold = _time_to_ready(
            config,
            ["--compiled-artifacts", str(artifacts), "--compile-missing", "--compile-resolution", str(config.size)],
        )
        config.log(f"[bench]   ready after {cold:.1f} s; now on those artifacts, and without ...")
        warm = _time_to_ready(config, ["--compiled-artifacts", str(artifacts)])
        eager_ready = _time_to_ready(config, [])
        figures += [
            Figure("compiler.ready_s.cold", cold, "s", GROUP),
            Figure("compiler.ready_s.warm", warm, "s", GROUP),
            Figure("compiler.ready_s.eager", eager_ready, "s", GROUP),
            Figure("compiler.warm_start_speedup", cold / warm, "x", GROUP),
        ]

        config.log("[bench] compiler: building the other variants (both cores) ...")
        build_s = {
            "aoti_no_freezing": _build(config, tmp / "no-freezing", "float32", {"freezing": False}),
            "aoti_bf16": _build(config, tmp / "bf16", "bfloat16", {}),
        }
        config.log(
            "[bench] compiler: timing eager vs compiled UNet steps (core "
            f"{config.device_core}, 1 thread; torch.compile with freezing compiles in there) ..."
        )
        fp32 = _measure_in_child(
            config, {"aoti": artifacts, "aoti_no_freezing": tmp / "no-freezing"}, jit_freezing=True
        )
        bf16 = _measure_in_child(config, {"aoti_bf16": tmp / "bf16"}, dtype="bfloat16", swaps=0)
        config.log("[bench] compiler: whole requests, a worker on the artifacts vs an eager one ...")
        requests = _compare_requests(config, artifacts)
    request_speedup = requests["request_s"]["eager"] / requests["request_s"]["compiled"]
    figures += [
        *[Figure(f"compiler.request_s.{k}", v, "s", GROUP) for k, v in requests["request_s"].items()],
        Figure("compiler.request_speedup", request_speedup, "x", GROUP),
        *[Figure(f"compiler.lora_patch_s.{k}", v, "s", GROUP) for k, v in requests["lora_patch_s"].items()],
    ]

    variants = {**fp32["variants"], **bf16["variants"]}
    eager_fp32 = fp32["variants"]["aoti"]["eager_s"]
    rows = []
    for label, v in variants.items():
        patchable = label != "jit_freezing"
        figures += [
            Figure(f"compiler.unet_step_s.{label}", v["compiled_s"], "s", GROUP),
            Figure(f"compiler.unet_step_speedup.{label}", v["speedup"], "x", GROUP),
            Figure(f"compiler.lora_max_abs_diff.{label}", v["lora_max_abs_diff"], "x", GROUP),
            Figure(f"compiler.lora_refresh_s.{label}", v["lora_refresh_s"], "s", GROUP),
        ]
        rows.append((label, v, patchable))
    bf16_vs_fp32 = eager_fp32 / variants["aoti_bf16"]["compiled_s"]
    figures += [
        Figure("compiler.unet_step_s.eager", eager_fp32, "s", GROUP),
        Figure("compiler.unet_step_s.eager_bf16", variants["aoti_bf16"]["eager_s"], "s", GROUP),
        Figure("compiler.unet_step_speedup.aoti_bf16_vs_fp32_eager", bf16_vs_fp32, "x", GROUP),
        Figure("compiler.lora_recompilations", fp32["swaps"]["recompilations"], "x", GROUP),
        *[Figure(f"compiler.build_s.{k}", v, "s", GROUP) for k, v in build_s.items()],
    ]
    # The headline: the best fp32 variant that a LoRA patch reaches without recompiling.
    best = max(("aoti", "aoti_no_freezing"), key=lambda k: variants[k]["speedup"])
    figures.append(Figure("compiler.unet_step_speedup", variants[best]["speedup"], "x", GROUP))

    lines = [
        f"compiler: {config.family}, {config.size}x{config.size}, UNet step = encoder half + decoder half, batch 2; "
        f"core {config.device_core} x 1 thread",
        f"  time to SERVING: compiling at start {cold:.1f} s, on artifacts {warm:.1f} s, eager {eager_ready:.1f} s "
        f"-> warm start {cold / warm:.1f}x sooner",
        f"  {'variant':<20}{'eager s':>9}{'compiled s':>12}{'speedup':>9}{'|diff|':>10}{'after LoRA':>12}{'refresh s':>11}  weights",
    ]
    for label, v, patchable in rows:
        lines.append(
            f"  {label:<20}{v['eager_s']:>9.4f}{v['compiled_s']:>12.4f}{v['speedup']:>8.3f}x{v['max_abs_diff']:>10.1e}"
            f"{v['lora_max_abs_diff']:>12.1e}{v['lora_refresh_s']:>11.3f}  "
            f"{'patchable' if patchable else 'baked in (stale after a patch)'}"
        )
    lines += [
        f"  bf16 artifacts vs fp32 eager: {bf16_vs_fp32:.2f}x (bf16 numerics)",
        f"  whole request (CFG, 20 steps, VAE decode) to a UNet worker: eager {requests['request_s']['eager']:.2f} s, "
        f"on artifacts {requests['request_s']['compiled']:.2f} s -> {request_speedup:.3f}x; lora_unet_patch stage "
        f"eager {requests['lora_patch_s']['eager']:.3f} s, compiled {requests['lora_patch_s']['compiled']:.3f} s",
        f"  headline compiler.unet_step_speedup = {best}: {variants[best]['speedup']:.3f}x; "
        f"{fp32['swaps']['count']} LoRA swaps on it: {fp32['swaps']['recompilations']} compilations, "
        f"max |compiled - eager| {fp32['swaps']['max_abs_diff']:.1e}",
    ]
    one_core = f"core {config.device_core}, 1 thread"
    hardware = {"compiled": one_core, "eager": one_core}
    for f in figures:  # the bf16 variant's compiled side computes in bf16
        if "bf16" in f.figure:
            f.dtype = "bfloat16 (compiled) / float32 or bfloat16 (eager), as the figure's name says"
    return GroupResult(figures=figures, table="\n".join(lines), hardware=hardware)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compiler")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="(internal) time eager vs compiled UNet steps on one core")
    m.add_argument("--zoo", type=Path, required=True)
    m.add_argument("--family", default="bench-sd15")
    m.add_argument("--size", type=int, default=256)
    m.add_argument("--core", type=int, default=0)
    m.add_argument("--dtype", default="float32")
    m.add_argument("--rounds", type=int, default=8)
    m.add_argument("--swaps", type=int, default=10)
    m.add_argument("--jit-freezing", action="store_true")
    m.add_argument("--artifacts", nargs="*", default=[], metavar="LABEL=DIR")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
