"""Serving on a GPU: the whole suite against Diffusers on the same GPU(s), stage by stage.

    python -m bench.gpu_serve --out gpu_serve.json                          (a CUDA machine)
    python -m bench.gpu_serve --device cpu --families tiny-sd15 --steps 3 --out x.json
                                                                            (the CPU rehearsal)

Per family (default: full-size SD1.5 at 512² and SDXL at 1024², 30 steps, fp16, random weights
made on the box by `swiftd.zoo`, so no checkpoint is needed), for the scenarios base, cn1,
cn1_lora1 and cn2_lora2 (rank-64 PEFT LoRA over attention and feed-forward, and a kohya one):

  zoo              build the family's model, ControlNets and LoRAs (skipped when present)
  diffusers        Diffusers the usual way, in a process of its own on the first GPU: one
                   pipeline (ControlNet pipelines sharing its components), each request loading its
                   LoRAs from their safetensors files, fusing, generating, unfusing, unloading
  ours.<layout>    the suite as real processes: the LoRA store (CPU), one ControlNet worker per
                   ControlNet (on GPUs of their own when there are several, else beside the UNet),
                   a UNet worker and the gateway; requests through the gateway's public API.
                   layout `spread`: the UNet worker cannot run ControlNets itself, so every plan
                   streams residuals from the ControlNet workers (CUDA IPC on one host);
                   `pack`: the gateway places by load (on one GPU: ControlNets in-process)

Each side gets one untimed request per scenario, then --repeats timed ones (median reported):
end-to-end latency, add-on overhead (scenario / base), and from our side the per-step parts
(encoder half, decoder half, wait for residuals: GPU time on a GPU, read from CUDA events; the
ControlNet's compute and the transport, host times: on a GPU, the time to queue its step and hear
back), the first step's transport alone (the session's set-up on top of a handoff), every stage of the request and the time outside the denoising loop, and the transport
each ControlNet's residuals took; with --compiled, torch's compile counters on the UNet worker
after its first request and at the end (LoRA swaps in between must compile nothing). Results go to --out after every stage, so a run stopped by a
time limit keeps what it measured; --budget-s skips what would start after it. The last stage
writes a Markdown table (`table`) for docs/gpu.md.

The same code runs on the CPU with the tiny models (tests/test_gpu_serve.py), so the first GPU run
is not the first run.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

SCENARIOS = ("base", "cn1", "cn1_lora1", "cn2_lora2")
SIZES = {"sd15": 512, "sdxl": 1024, "bench-sd15": 256}


def default_size(family: str) -> int:
    return SIZES.get(family, 64)


class Run:
    """The results file, rewritten after every stage."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {**meta, "families": {}}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def stage(self, family: str, name: str, deadline: float, fn) -> dict | None:
        """Run `fn(progress)`; `progress` is a dict the stage fills as it goes and saves with
        `progress.save()`, so a stage cut off (an error, SIGTERM at a time limit) keeps what it
        measured under `partial`."""
        stages = self.data["families"].setdefault(family, {"stages": {}})["stages"]
        if time.monotonic() > deadline:
            stages[name] = {"skipped": "time budget spent"}
            self.save()
            return None
        print(f"[gpu_serve] {family}: {name} ...", flush=True)
        t0 = time.monotonic()
        progress = _Progress(self.save)
        stages[name] = {"started_at": round(time.time(), 1), "partial": progress}
        self.save()
        try:
            stages[name] = {"result": fn(progress), "seconds": round(time.monotonic() - t0, 2)}
        except Exception:  # noqa: BLE001 - one failed stage must not cost the others
            stages[name]["error"] = traceback.format_exc()
            print(stages[name]["error"], file=sys.stderr, flush=True)
        finally:  # SystemExit (SIGTERM) too: the stage's services are stopped by then
            stages[name]["seconds"] = round(time.monotonic() - t0, 2)
            stages[name]["ended_at"] = round(time.time(), 1)
            self.save()
        return stages[name].get("result")


class _Progress(dict):
    """What a running stage has measured so far; `save()` writes the results file."""

    def __init__(self, save):
        super().__init__()
        self.save = save


def devices(kind: str) -> list[str]:
    import torch

    if kind == "cuda":
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def scenarios(family: str, size: int, names: list[str]):
    from bench.scenarios import baseline_scenarios

    return [s for s in baseline_scenarios(family, size) if s.name in names]


# -- Diffusers -------------------------------------------------------------------------------------


def diffusers_side(args, family: str, size: int, device: str, out: _Progress) -> dict:
    from bench.baseline_process import BaselineProcess

    cores = sorted(os.sched_getaffinity(0)) if device.startswith("cuda") else [0]
    baseline = BaselineProcess(args.zoo, family, cores, device=device, dtype=args.dtype)
    try:
        out.update({"load_s": baseline.ready["load_s"], "device": device, "scenarios": {}})
        for scenario in scenarios(family, size, args.scenarios):
            command = dict(scenario=scenario.to_json(), size=size, steps=args.steps)
            baseline.call("generate", **command)  # warm-up
            runs = [baseline.call("generate", **command) for _ in range(args.repeats)]
            out["scenarios"][scenario.name] = {
                "latency_s": statistics.median(r["latency_s"] for r in runs),
                "stages": runs[-1]["stages"],
            }
            out.save()
        return dict(out)
    finally:
        baseline.close()


# -- ours ------------------------------------------------------------------------------------------


def _root_without_controlnets(zoo: Path, into: Path) -> Path:
    """The zoo's models and LoRAs but no ControlNets: a UNet worker that must stream residuals."""
    into.mkdir(parents=True, exist_ok=True)
    for section in ("models", "loras"):
        (into / section).symlink_to((zoo / section).resolve())
    return into


def ours_side(args, family: str, size: int, layout: str, gpus: list[str], out: _Progress) -> dict:
    from swiftd import transport
    from swiftd.client import Client
    from swiftd.launcher import start_controlnet, start_gateway, start_lora_store, start_unet
    from swiftd.request import ControlNet

    on_cpu = gpus == ["cpu"]
    work = Path(tempfile.mkdtemp(prefix="swiftd-gpu-serve-"))
    unet_root = _root_without_controlnets(args.zoo, work / "root") if layout == "spread" else args.zoo
    common = ["--dtype", args.dtype]
    # On the CPU (the rehearsal) the UNet worker and the ControlNet workers get a core each, as
    # two devices would be; on CUDA the ControlNets go to the other GPUs when there are some.
    cn_devices = gpus[1:] or gpus
    controlnet_ids = [f"{family}-cn-edges", f"{family}-cn-depth"]
    services = []
    t_start = time.monotonic()
    try:
        store = start_lora_store(
            args.zoo, work / "cache", [family], extra_args=["--default-dtype", args.dtype], wait=False
        )
        services.append(store)
        store.wait_ready()
        unet_args = [*common, "--device", gpus[0], "--metrics-port", "0"]
        if args.compiled:  # the device's default backend (graphs on CUDA), for what these requests run:
            # CFG batch 2 at one resolution; the VAE stays eager (SDXL's is upcast to fp32 anyway)
            unet_args += ["--compiled-artifacts", str(work / "artifacts"), "--compile-missing"]
            unet_args += ["--compile-resolution", str(size), "--compile-batch-sizes", "2"]
            unet_args += ["--compile-parts", "unet_encoder", "unet_decoder"]
            unet_args += ["--compile-backend", args.backend] if args.backend else []
        unet = start_unet(
            unet_root,
            family,
            store.address,
            extra_args=unet_args,
            cpu_cores=[0] if on_cpu else None,
            num_threads=1 if on_cpu else None,
            timeout=1800,
            wait=False,  # it compiles while the ControlNet artifacts are built
        )
        services.append(unet)
        cn_args = []
        if args.compiled:  # as a release pipeline does: the CLI builds them, the workers load them
            out["controlnet_build_s"] = _build_controlnet_artifacts(args, family, size, controlnet_ids, work)
            cn_args = ["--compiled-artifacts", str(work / "cn-artifacts")]
            out.save()
        cns = [
            start_controlnet(
                args.zoo,
                [cid],
                extra_args=[*common, *cn_args, "--device", cn_devices[i % len(cn_devices)]],
                cpu_cores=[1] if on_cpu else None,
                num_threads=1 if on_cpu else None,
                wait=False,
            )
            for i, cid in enumerate(controlnet_ids)
        ]
        services += cns
        unet.wait_ready()
        # What the workers said about compiling (with --compiled: the build, the warm-up, the cache).
        out["unet_compile_log"] = [line for line in unet.log_tail(300).splitlines() if "compil" in line][-12:]
        out.save()
        for cn in cns:
            cn.wait_ready()
        out["controlnet_compile_log"] = [
            line for cn in cns for line in cn.log_tail(200).splitlines() if "compil" in line or "warmed" in line
        ][-12:]
        gateway = start_gateway([unet.address], [c.address for c in cns], store.address)
        services.append(gateway)
        out["ready_s"] = round(time.monotonic() - t_start, 1)  # every service up (and compiled)
        out["devices"] = {"unet": gpus[0], "controlnets": [cn_devices[i % len(cn_devices)] for i in range(2)]}
        out["scenarios"] = {}
        compilations = {}  # on artifacts: torch's compile counters, after the first request and at the end
        with Client(gateway.address, timeout=600) as client:
            for scenario in scenarios(family, size, args.scenarios):
                fields = dict(
                    model_id=family,
                    width=size,
                    height=size,
                    num_inference_steps=args.steps,
                    seed=7,
                    loras=list(scenario.loras),
                    controlnets=[ControlNet(c.controlnet_id, c.image_png, c.scale) for c in scenario.controlnets],
                )
                client.generate("a photo of an astronaut riding a horse", **fields)  # warm-up
                compilations.setdefault("after_first_request", _compilations(unet.metrics_address))
                runs = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    result = client.generate("a photo of an astronaut riding a horse", **fields)
                    runs.append((time.perf_counter() - t0, result))
                latency = statistics.median(r[0] for r in runs)
                result = runs[-1][1]
                timings = dict(result.timings)
                out["scenarios"][scenario.name] = {
                    "latency_s": latency,
                    "per_step_s": per_step(timings, args.steps),
                    # Every stage of the last request, the gateway's and the worker's: what the
                    # time outside the denoising loop went to (text encoding, VAE, PNG, planning).
                    "stages_s": {k: round(v, 5) for k, v in timings.items()},
                    "outside_denoising_s": runs[-1][0] - timings.get("denoise", 0.0),
                    "placement": result.plan.placement,
                    "reason": result.plan.reason,
                    "transports": [transport.name(a.transport) for a in result.plan.controlnets],
                    "lora_applied_at_step": result.lora_applied_at_step,
                }
                out.save()
        compilations["at_end"] = _compilations(unet.metrics_address)  # LoRA swaps in between
        out["compilations"] = compilations
        return dict(out)
    finally:
        for service in reversed(services):
            service.stop()


def _build_controlnet_artifacts(args, family: str, size: int, controlnet_ids: list[str], work: Path) -> float:
    """`python -m compiler build` of the ControlNet part (one per architecture), CFG batch 2, on
    the first device; seconds."""
    import subprocess

    device = "cpu" if args.device == "cpu" else "cuda:0"
    argv = [sys.executable, "-m", "compiler", "build", "--model-root", str(args.zoo), "--model-id", family]
    argv += ["--device", device, "--dtype", args.dtype, "--resolution", str(size), "--batch", "2"]
    argv += ["--parts", "controlnet", "--controlnet-id", *controlnet_ids, "--out", str(work / "cn-artifacts")]
    argv += ["--backend", args.backend] if args.backend else []
    # The CPU rehearsal's workers run one thread each: Inductor's CPU kernels are keyed by it.
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.device == "cpu" else None
    t0 = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"compiler build exited {done.returncode}: {done.stderr[-2000:]}")
    return round(time.monotonic() - t0, 1)


def _compilations(metrics_address: str) -> dict[str, float]:
    """The worker's `swiftd_compilations` by kind (empty when it serves eagerly)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    return {
        sample.labels["kind"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "swiftd_compilations"
    }


def per_step(timings: dict[str, float], steps: int) -> dict[str, float]:
    """Seconds per step of each part of a denoising step, from a response's stage timings."""
    parts = {
        "encoder_half": "denoise.encoder_half",
        "decoder_half": "denoise.decoder_half",
        "controlnet_wait": "denoise.controlnet_wait",
    }
    out = {name: sum(v for k, v in timings.items() if k.startswith(prefix)) / steps for name, prefix in parts.items()}

    def controlnets(part: str) -> float:  # summed over the request's ControlNets
        return sum(v for k, v in timings.items() if k.startswith("controlnet.") and k.endswith(f".{part}"))

    for part in ("compute", "transport"):
        out[f"controlnet_{part}"] = controlnets(part) / steps
    out["denoise"] = timings.get("denoise", 0.0) / steps
    # Once per request, not per step: the first step's transport, with the session's set-up (the
    # ring's creation and mapping, page-locking on GPUs) on top of a handoff.
    out["controlnet_first_step_transport"] = controlnets("first_step_transport")
    return out


# -- report ----------------------------------------------------------------------------------------


def table(data: dict) -> str:
    """Markdown: per family and scenario, both sides' latency, speedup, add-on overhead, per-step
    wait and transport, the first step's transport (with the session's set-up) and the transports
    used."""
    lines = [
        "| family | scenario | Diffusers (s) | ours, layout (s) | speedup | add-on overhead: Diffusers / ours "
        "| wait / transport per step (ms) | first step's transport (ms) | residuals over |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def measured(stage: dict | None) -> dict:  # a finished stage's result, else what a cut-off one had
        stage = stage or {}
        return stage.get("result") or stage.get("partial") or {}

    for family, entry in data["families"].items():
        stages = entry["stages"]
        theirs = {"scenarios": {}, **measured(stages.get("diffusers"))}
        for name, stage in stages.items():
            if not name.startswith("ours."):
                continue
            ours = measured(stage).get("scenarios", {})
            for scenario, got in ours.items():
                d = theirs["scenarios"].get(scenario, {}).get("latency_s")
                d_base = theirs["scenarios"].get("base", {}).get("latency_s")
                o_base = ours.get("base", {}).get("latency_s")
                o = got["latency_s"]
                speedup = f"{d / o:.2f}x" if d else "n/a"
                overhead = f"{d / d_base:.2f} / {o / o_base:.2f}" if d and d_base and o_base else "n/a"
                steps = got["per_step_s"]
                cells = [
                    family,
                    scenario,
                    f"{d:.3f}" if d else "n/a",
                    f"{o:.3f} ({name[len('ours.') :]})",
                    speedup,
                    overhead,
                    f"{1e3 * steps['controlnet_wait']:.2f} / {1e3 * steps['controlnet_transport']:.2f}",
                    f"{1e3 * steps.get('controlnet_first_step_transport', 0.0):.1f}",
                    ", ".join(got["transports"]) or "-",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_serve", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="results file (with --table: the one to read)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out and stop")
    parser.add_argument("--zoo", type=Path, default=Path(".zoo"), help="where the models are (built if missing)")
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--size", type=int, default=None, help="default: 512 for sd15, 1024 for sdxl, 64 tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on the CPU")
    parser.add_argument("--layouts", nargs="+", default=["spread", "pack"], choices=["spread", "pack"])
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="the UNet worker on artifacts it compiles at start, the ControlNet workers on artifacts the CLI builds",
    )
    parser.add_argument("--backend", default=None, help="their backend (default: the device's, graphs on CUDA)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no stage after this many seconds")
    args = parser.parse_args(argv)
    if args.table:  # e.g. of a run cut off before its last stage wrote the table
        print(table(json.loads(args.out.read_text())))
        return 0
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    faulthandler.enable()
    # A time limit's SIGTERM unwinds like an exception: each stage stops its services (no worker
    # left holding the GPU) and the results file keeps the stage's partial figures.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import torch

    gpus = devices(args.device)
    if not gpus:
        print("[gpu_serve] no CUDA device", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    names = [torch.cuda.get_device_name(i) for i in range(len(gpus))] if args.device == "cuda" else ["cpu"]
    run = Run(
        args.out,
        {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "devices": names,
            "torch": torch.__version__,
            "args": {k: str(v) for k, v in vars(args).items()},
        },
    )
    for family in args.families:
        size = args.size or default_size(family)

        def build(progress, family=family):
            from swiftd.zoo import build as build_zoo

            t = time.monotonic()
            build_zoo(args.zoo, only=[family])
            return {"seconds": round(time.monotonic() - t, 1)}

        if run.stage(family, "zoo", deadline, build) is None:
            continue
        run.stage(
            family,
            "diffusers",
            deadline,
            lambda progress, family=family, size=size: diffusers_side(args, family, size, gpus[0], progress),
        )
        for layout in args.layouts:
            run.stage(
                family,
                f"ours.{layout}",
                deadline,
                lambda progress, family=family, size=size, layout=layout: ours_side(
                    args, family, size, layout, gpus, progress
                ),
            )
    run.data["table"] = table(run.data)
    run.data["seconds"] = round(time.monotonic() - t0, 1)
    run.save()
    print(run.data["table"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
