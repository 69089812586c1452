"""GPU check of the compiler: what the CPU tests cannot show, in one run.

    python -m bench.gpu_check --out result.json                     (a CUDA machine: full-size SD1.5)
    python -m bench.gpu_check --device cpu --family tiny-sd15 --size 64 --dtype float32 --out x.json
                                                                     (the same code on the tiny model)

On a random-weight UNet built from the zoo's config (full-size SD1.5 by default: fp16, 512²,
batch 2 = CFG), split into the encoder and decoder halves the service runs:

  eager          time of one UNet step (encoder half + decoder half)
  compiled       the halves through torch.compile with --mode (default "reduce-overhead":
                 Inductor and, on CUDA, CUDA graphs; weights stay graph inputs): compile time,
                 step time, speedup over eager, max |compiled - eager|
  lora           LoRA swaps through swiftd.lora.LoraPatcher (rank 64 on attention and feed-forward
                 weights, --lora-strength): after each swap the compiled step equals the eager
                 step with the same weights, the LoRA moved the output by more than that
                 tolerance (so a stale compiled graph would fail the comparison), and torch's
                 compile counters (compiler.runtime.compile_activity) show no recompilation
  aoti           both halves as AOTInductor packages bound to the module's weights, as a worker on
                 artifacts runs them (compiler.inductor), with each weight binding (copy, then
                 live): build time, step time, agreement, and a LoRA patch seen by the next step
                 without a reload
  autotune       the halves through torch.compile with GEMM autotuning and CUDA graphs (mode
                 "max-autotune" less its per-kernel coordinate-descent tuning and fusion
                 benchmarking, which take longer than a call's limit on the full UNet; convolutions
                 from cuDNN): compile time, step time, speedup, 3 LoRA swaps with no recompilation
  tensorrt       if torch_tensorrt imports: the encoder half as a refittable engine
                 (compiler.tensorrt), a LoRA patch, a refit (not a rebuild), agreement with eager;
                 otherwise the reason it cannot run

Results are written to --out after every stage, so a run stopped by a time limit keeps what it
measured. Stages run in the order above; --stages picks some.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
import traceback

import torch

STAGES = ("eager", "compiled", "lora", "aoti", "tensorrt", "autotune")

# mode "max-autotune" is {max_autotune, triton.cudagraphs, coordinate_descent_tuning}; on the full
# UNet its coordinate-descent pass over every generated kernel and its benchmarking of fusions ran
# past a call's time limit (H100, first run). GEMM autotuning and CUDA graphs stay.
AUTOTUNE_OPTIONS = {
    "max_autotune": True,
    "triton.cudagraphs": True,
    "coordinate_descent_tuning": False,
    "benchmark_epilogue_fusion": False,
    "max_autotune_conv_backends": "ATEN",
}


class Timer:
    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def ms(self, fn, iters: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2] * 1e3


def max_diff(a, b) -> float:
    from compiler.parts import flat_tensors

    return max((x.float() - y.float()).abs().max().item() for x, y in zip(flat_tensors(a), flat_tensors(b)))


def lora_deltas(unet, rank: int, seed: int, strength: float = 0.1):
    """Rank-`rank` deltas on the attention and feed-forward weights, keyed as LoraPatcher expects;
    each delta's entries have `strength` times the standard deviation of its weight's."""
    from swiftd.lora import WeightDelta

    gen = torch.Generator(device=unet.device).manual_seed(seed)
    deltas = {}
    for name, p in unet.named_parameters():
        if (
            p.dim() == 2
            and name.endswith("weight")
            and any(k in name for k in ("to_q", "to_k", "to_v", "to_out.0", "ff.net"))
        ):
            scale = strength * p.float().std().item() / rank**0.5
            up = torch.randn(p.shape[0], rank, generator=gen, device=p.device, dtype=p.dtype) * scale
            down = torch.randn(rank, p.shape[1], generator=gen, device=p.device, dtype=p.dtype)
            deltas[f"unet.{name}"] = WeightDelta(up, down)
    return deltas


def main(argv=None) -> int:
    from compiler.inductor import WEIGHT_BINDINGS

    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="sd15", help="swiftd.zoo family whose UNet config to build")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--swaps", type=int, default=10, help="LoRA swaps in the lora stage")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode of the compiled stage")
    parser.add_argument(
        "--lora-strength", type=float, default=0.5, help="LoRA delta size relative to each weight's standard deviation"
    )
    parser.add_argument(
        "--aoti-weights",
        nargs="+",
        default=sorted(WEIGHT_BINDINGS),  # "copy" before "live": the suspect last
        choices=WEIGHT_BINDINGS,
        help="weight bindings the aoti stage loads, in this order (one each per process keeps a native "
        "crash of one from hiding the other)",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    # A native crash (the AOTInductor stage on CUDA has ended runs without a Python error) then
    # prints the Python stack it happened under.
    faulthandler.enable()

    from diffusers import UNet2DConditionModel

    from compiler.runtime import compile_activity
    from swiftd.lora import LoraPatcher
    from swiftd.split_unet import SplitUNet
    from swiftd.zoo import SPECS

    device, dtype = args.device, getattr(torch, args.dtype)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    result: dict = {
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "family": args.family,
        "size": args.size,
        "batch": args.batch,
        "dtype": args.dtype,
        "mode": args.mode,
        "stages": {},
    }

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    spec = SPECS[args.family]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**spec.unet).to(dtype).eval()
    split = SplitUNet(unet)
    latent = args.size // 8
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args.batch, unet.config.in_channels, latent, latent, generator=gen, device=device, dtype=dtype)
    hidden = torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=gen, device=device, dtype=dtype)
    t = torch.tensor(481.0, device=device)
    added: tuple = ()
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = (
            torch.randn(args.batch, pooled, generator=gen, device=device, dtype=dtype),
            torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * args.batch, device=device, dtype=dtype),
        )
    timer = Timer(device)
    result["unet_params_m"] = round(sum(p.numel() for p in unet.parameters()) / 1e6, 1)

    on_cuda = torch.device(device).type == "cuda"

    def step(encoder, decoder):
        if on_cuda and encoder is not split.encoder_half:
            # A new step: the previous step's CUDA-graph outputs may be overwritten from here on
            # (the encoder's outputs feed the decoder's graph within one step).
            torch.compiler.cudagraph_mark_step_begin()
        return decoder(encoder(x, t, hidden, *added))

    patcher = LoraPatcher(type("Pipe", (), {"unet": unet})())
    loras = [lora_deltas(unet, 64, seed, args.lora_strength) for seed in (11, 12)]
    result["lora_layers"] = len(loras[0])
    compiled_halves = None
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2  # of max(1, max |eager|)

    with torch.no_grad():
        eager_out = step(split.encoder_half, split.decoder_half)
        scale = max(1.0, eager_out.float().abs().max().item())
        for stage in [s for s in STAGES if s in args.stages]:  # in STAGES order, whatever the command line's
            t0 = time.perf_counter()
            result["stages"][stage] = {"started": True}  # stays so if the process dies in the stage
            save()
            try:
                if stage == "eager":
                    result["stages"]["eager"] = {
                        "step_ms": timer.ms(lambda: step(split.encoder_half, split.decoder_half), args.iters)
                    }
                elif stage == "compiled":
                    before = compile_activity()
                    enc = torch.compile(split.encoder_half, mode=args.mode)
                    dec = torch.compile(split.decoder_half, mode=args.mode)
                    t_compile = time.perf_counter()
                    step(enc, dec)
                    out = step(enc, dec).clone()  # CUDA graphs record on the second call; replays reuse outputs
                    compile_s = time.perf_counter() - t_compile
                    compiled_halves = (enc, dec)
                    step_ms = timer.ms(lambda enc=enc, dec=dec: step(enc, dec), args.iters)
                    eager_ms = timer.ms(lambda: step(split.encoder_half, split.decoder_half), args.iters)
                    result["stages"]["compiled"] = {
                        "compile_s": round(compile_s, 1),
                        "step_ms": step_ms,
                        "eager_step_ms": eager_ms,
                        "speedup": eager_ms / step_ms,
                        "max_abs_diff": max_diff(out, eager_out),
                        "eager_scale": scale,
                        "compile_activity": {k: compile_activity()[k] - before[k] for k in before},
                    }
                elif stage == "lora":
                    if compiled_halves is None:
                        raise RuntimeError("needs the compiled stage")
                    enc, dec = compiled_halves
                    before = compile_activity()
                    swaps, worst, changed, swap_ms, lora_moved = [], 0.0, True, [], []
                    for i in range(args.swaps):
                        deltas = loras[i % 2]
                        s0 = time.perf_counter()
                        patcher.apply([(f"lora{i % 2}", 1.0, deltas)]) if i % 3 != 2 else patcher.restore()
                        if device.startswith("cuda"):
                            torch.cuda.synchronize()
                        swap_ms.append((time.perf_counter() - s0) * 1e3)
                        ours = step(enc, dec).clone()  # CUDA-graph outputs are overwritten by the next replay
                        reference = step(split.encoder_half, split.decoder_half)
                        diff = max_diff(ours, reference)
                        worst = max(worst, diff)
                        if i % 3 != 2:  # the LoRA moves the output more than compiled may differ from eager
                            moved = max_diff(reference, eager_out)
                            lora_moved.append(round(moved, 4))
                            changed = changed and moved > tolerance * scale
                        swaps.append(round(diff, 6))
                    patcher.restore()
                    after = compile_activity()
                    result["stages"]["lora"] = {
                        "swaps": args.swaps,
                        "max_abs_diff_each": swaps,
                        "max_abs_diff": worst,
                        "within_tolerance": worst <= tolerance * scale,
                        "tolerance": tolerance * scale,
                        "lora_changes_output": changed,
                        "lora_moved_output_by": lora_moved,
                        "swap_ms_median": sorted(swap_ms)[len(swap_ms) // 2],
                        "compile_activity_during_swaps": {k: after[k] - before[k] for k in before},
                    }
                elif stage == "aoti":

                    def phase(name):
                        result["stages"]["aoti"]["phase"] = name
                        save()

                    result["stages"]["aoti"] = aoti_stage(
                        unet, split, x, t, hidden, added, patcher, loras[0], timer, args, tolerance * scale, phase
                    )
                elif stage == "tensorrt":
                    from compiler import tensorrt

                    reason = tensorrt.unavailable_reason(device)
                    if reason:
                        result["stages"]["tensorrt"] = {"skipped": reason}
                    else:
                        result["stages"]["tensorrt"] = tensorrt_stage(
                            unet, x, t, hidden, added, patcher, loras[0], timer, args
                        )
                elif stage == "autotune":
                    before = compile_activity()
                    torch._dynamo.reset()  # a graph of its own, not the compiled stage's
                    enc = torch.compile(split.encoder_half, options=AUTOTUNE_OPTIONS)
                    dec = torch.compile(split.decoder_half, options=AUTOTUNE_OPTIONS)
                    t_compile = time.perf_counter()
                    step(enc, dec)
                    out = step(enc, dec).clone()
                    compile_s = time.perf_counter() - t_compile
                    step_ms = timer.ms(lambda enc=enc, dec=dec: step(enc, dec), args.iters)
                    eager_ms = timer.ms(lambda: step(split.encoder_half, split.decoder_half), args.iters)
                    compiled_counts = compile_activity()
                    lora_diffs = []
                    for i in range(3):
                        patcher.apply([(f"lora{i % 2}", 1.0, loras[i % 2])]) if i < 2 else patcher.restore()
                        lora_diffs.append(
                            max_diff(step(enc, dec).clone(), step(split.encoder_half, split.decoder_half))
                        )
                    patcher.restore()
                    after = compile_activity()
                    result["stages"]["autotune"] = {
                        "options": AUTOTUNE_OPTIONS,
                        "compile_s": round(compile_s, 1),
                        "step_ms": step_ms,
                        "eager_step_ms": eager_ms,
                        "speedup": eager_ms / step_ms,
                        "max_abs_diff": max_diff(out, eager_out),
                        "lora_max_abs_diff_each": lora_diffs,
                        "tolerance": tolerance * scale,
                        "compile_activity_during_swaps": {k: after[k] - compiled_counts[k] for k in before},
                    }
            except Exception as exc:  # noqa: BLE001 - record and go on to the next stage
                result["stages"][stage] = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-2000:],
                }
            result["stages"].setdefault(stage, {})["wall_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps({stage: result["stages"][stage]})[:600], flush=True)
            save()
    return 0


class _Pipe:
    """What compiler.parts needs of a pipeline, for a bare UNet."""

    def __init__(self, unet):
        self.unet, self.vae_scale_factor, self.tokenizer = unet, 8, None


def exported_encoder(unet, x, t, hidden, added, batch: int):
    """The encoder half as the service runs it, its example inputs, and its exported program."""
    from compiler import parts as P
    from compiler.export import export_part

    module = P.graph_module(P.UNET_ENCODER, _Pipe(unet))
    inputs = (x, t, hidden, *added)
    return module, inputs, export_part(P.UNET_ENCODER, module, inputs, (batch,))


def exported_decoder(unet, encoded, batch: int):
    """The decoder half with zero ControlNet residuals (as a request without ControlNets runs it)."""
    from compiler import parts as P
    from compiler.export import export_part

    module = P.graph_module(P.UNET_DECODER, _Pipe(unet))
    skips = tuple(encoded.down_block_res_samples)
    inputs = (
        encoded.sample,
        encoded.emb,
        encoded.encoder_hidden_states,
        skips,
        tuple(torch.zeros_like(s) for s in skips),
        torch.zeros_like(encoded.sample),
    )
    return module, inputs, export_part(P.UNET_DECODER, module, inputs, (batch,))


def aoti_stage(unet, split, x, t, hidden, added, patcher, deltas, timer, args, tolerance: float, phase) -> dict:
    """Both halves as AOTInductor packages bound to the module's weights (compiler.inductor.PackagePart),
    with each weight binding of --aoti-weights (by default `copy` first, no user-managed constants,
    then `live`, the worker's default).

    `phase(name)` records (and saves) where the stage is, so a run that dies in it says where.
    """
    import tempfile

    from compiler.inductor import PackagePart, build_package

    phase("export")
    enc_module, enc_inputs, enc_program = exported_encoder(unet, x, t, hidden, added, args.batch)
    encoded = split.encoder_half(x, t, hidden, *added)
    dec_module, dec_inputs, dec_program = exported_decoder(unet, encoded, args.batch)

    def eager_step():
        return split.decoder_half(split.encoder_half(x, t, hidden, *added))

    result: dict = {"parts": ["unet_encoder", "unet_decoder"], "tolerance": tolerance, "bindings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths, build_s = {}, {}
        for name, module, program in (("encoder", enc_module, enc_program), ("decoder", dec_module, dec_program)):
            paths[name] = os.path.join(tmp, f"{name}.pt2")
            phase(f"build {name}")
            build_s[name], _ = build_package(program, paths[name], module=module)  # no options: weights read in place
        result["build_s"] = {k: round(v, 1) for k, v in build_s.items()}
        for weights in args.aoti_weights:
            phase(f"load and bind ({weights})")
            enc = PackagePart(paths["encoder"], enc_module, args.device, weights=weights)
            dec = PackagePart(paths["decoder"], dec_module, args.device, weights=weights)

            def aoti_step(enc=enc, dec=dec):
                out = enc(*enc_inputs)
                return dec(out[0], out[1], out[2], tuple(out[3:]), dec_inputs[4], dec_inputs[5])

            phase(f"run ({weights})")
            diff = max_diff(aoti_step(), eager_step())
            aoti_ms = timer.ms(aoti_step, args.iters)
            eager_ms = timer.ms(eager_step, args.iters)
            base = eager_step()
            patcher.apply([("lora0", 1.0, deltas)])
            patched = eager_step()
            patched_diff = max_diff(aoti_step(), patched)
            moved = max_diff(patched, base)
            patcher.restore()
            restored_diff = max_diff(aoti_step(), base)
            result["bindings"][weights] = {
                "step_ms": aoti_ms,
                "eager_step_ms": eager_ms,
                "speedup": eager_ms / aoti_ms,
                "max_abs_diff": diff,
                "max_abs_diff_after_lora": patched_diff,
                "lora_moved_output_by": moved,
                "max_abs_diff_after_restore": restored_diff,
                "lora_seen": patched_diff <= tolerance < moved,
            }
            del enc, dec
    return result


def tensorrt_stage(unet, x, t, hidden, added, patcher, deltas, timer, args) -> dict:
    """Refittable engine for the encoder half: build, run, LoRA patch, refit (not rebuild), compare."""
    import tempfile

    from compiler.tensorrt import EnginePart, build_engine, versions

    module, inputs, program = exported_encoder(unet, x, t, hidden, added, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "encoder.trt.ep")
        build_s = build_engine(program, inputs, path, {"enabled_precisions": {x.dtype}})
        part = EnginePart(path, module)
        ref = module(*inputs)
        diff = max_diff(part(*inputs), ref)
        trt_ms = timer.ms(lambda: part(*inputs), args.iters)
        patcher.apply([("lora0", 1.0, deltas)])
        t0 = time.perf_counter()
        patched = part(*inputs)  # refits first: the weights' version counters moved
        refit_s = time.perf_counter() - t0
        patched_diff = max_diff(patched, module(*inputs))
        patcher.restore()
        restored_diff = max_diff(part(*inputs), ref)
    return {
        "versions": versions(),
        "build_s": round(build_s, 1),
        "step_ms": trt_ms,
        "max_abs_diff": diff,
        "refit_s": round(refit_s, 2),
        "refits": part.refits,
        "max_abs_diff_after_lora": patched_diff,
        "max_abs_diff_after_restore": restored_diff,
    }


if __name__ == "__main__":
    sys.exit(main())
