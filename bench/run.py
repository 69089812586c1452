"""The benchmark: our services against plain Diffusers, side by side in one run, on the same core.

    python -m bench.run --zoo .zoo [--only GROUP[,GROUP]] [--repeats N]      (what `make bench` runs)

Each group measures one thing and returns figures, one JSON line each:
    {"figure": NAME, "value": NUMBER, "unit": "s" | "x", "group": GROUP}
printed to stdout and written to bench/results.jsonl (or --out), where the lines of the groups that
ran replace their previous lines and other groups' lines are kept.

Groups (GROUPS below; later work adds its own):
  baseline  request latency per scenario (base, cn1, cn1_lora1, cn2_lora2): Diffusers the usual way
            (bench.baseline_process) vs the UNet worker service (bench.ours), never at the same time
            (timed requests alternate between the sides); plus the per-stage breakdown of both.
            Hardware: our UNet worker on the device core and our ControlNet workers and LoRA store
            on the other core; Diffusers once on the device core (1 thread: `speedup.*`, unequal
            hardware) and once on both cores (2 threads: `speedup_equal_cores.*`). LoRA requests
            count our restore (timed on the worker) as Diffusers' count unfuse + unload. The run
            stops if the two sides' images differ beyond IMAGE_TOLERANCE.
  lora      the cost of switching one rank-64 LoRA in and out: Diffusers' load+fuse / unfuse+unload
            vs our in-place patch / restore of prepared deltas.
  gateway   the latency the gateway adds to a request (bench.gateway).
  traffic   one production-shaped trace replayed open loop against Diffusers (two ways) and the
            suite on the same two cores, at four loads (bench.traffic).
  quality   what the images show, scored, on the trained shape-world model (bench.quality):
            Diffusers against the suite on held-out prompts; BAL at K = 0, 2, 5, 10, float16
            residuals on the wire, compiled float32 and bfloat16 backbones; an image grid.
  compiler  ahead-of-time compiled UNet halves (bench.compiler): eager / compiled step on one core
            with the weights still patchable, and time to SERVING when a worker compiles at start
            vs when it loads artifacts (warm start).

On this 2-core CPU a "device" is one core (--device-core, default 0). The bench process itself
keeps off that core (it only waits on the device), so what it does is not measured against either
side. Every figure's JSON line carries the hardware of each side and the dtype. Ratios of one run
are what count; absolute CPU times are for orientation only.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.bal import images_by_arrival_step
from bench.baseline_process import BaselineProcess
from bench.compiler import group_compiler
from bench.fidelity import psnr, ssim
from bench.gateway import group_gateway
from bench.ours import OursWorker
from bench.quality import group_quality
from bench.scenarios import (
    DEFAULT_RESULTS,
    IMAGE_TOLERANCE,
    BenchConfig,
    Figure,
    GroupResult,
    Scenario,
    baseline_scenarios,
    check_same_image,
    hardware,
    median,
    rank64_lora_id,
)
from bench.traffic import group_traffic


class Session:
    """The processes of one invocation, started on first use and shared by the groups.

    Only one of them computes at any time: every call waits for its answer before the next.
    """

    def __init__(self, config: BenchConfig):
        self.config = config
        self._baselines: dict[tuple[int, ...], BaselineProcess] = {}
        self._ours: OursWorker | None = None

    def baseline(self, two_cores: bool = False) -> BaselineProcess:
        """Diffusers on the device core (1 thread), or on both cores (2 threads: equal hardware)."""
        c = self.config
        cores = (c.device_core, c.controlnet_core) if two_cores else (c.device_core,)
        if cores not in self._baselines:
            where = f"cores {','.join(map(str, cores))}, {len(cores)} thread(s)"
            c.log(f"[bench] starting the Diffusers baseline process ({c.family}, {where}) ...")
            self._baselines[cores] = BaselineProcess(c.zoo, c.family, list(cores))
            c.log(f"[bench]   loaded in {self._baselines[cores].ready['load_s']:.1f} s")
        return self._baselines[cores]

    def ours(self) -> OursWorker:
        if self._ours is None:
            c = self.config
            c.log(f"[bench] starting the UNet worker service ({c.family}, core {c.device_core}, 1 thread) ...")
            self._ours = OursWorker(c)
            c.log(f"[bench]   up at {self._ours.service.address} in {self._ours.start_s:.1f} s")
        return self._ours

    def close(self) -> None:
        if self._ours is not None:
            self._ours.close()
            self._ours = None
        for process in self._baselines.values():
            process.close()
        self._baselines.clear()


# -- groups ------------------------------------------------------------------------------------


def group_baseline(config: BenchConfig, session: Session) -> GroupResult:
    group = "baseline"
    hw = hardware(config)
    result = GroupResult(hardware={"ours": hw["ours"], "diffusers": hw["diffusers"]})
    equal = {"ours": hw["ours"], "diffusers": hw["diffusers_2cores"]}
    rows = []
    for scenario in baseline_scenarios(config.family, config.size):
        # Untimed warm-ups, then the timed requests alternating between the sides, so that
        # whatever else the machine does at the time weighs on all alike.
        config.log(f"[bench] {scenario.name}: warming up every side ...")
        baseline, baseline2, ours = session.baseline(), session.baseline(two_cores=True), session.ours()
        generate = dict(scenario=scenario.to_json(), size=config.size, steps=config.steps)
        baseline.call("generate", **generate)
        baseline2.call("generate", **generate)
        ours.warm_up(scenario)
        theirs_runs, theirs2_runs, ours_runs = [], [], []
        for i in range(config.repeats):
            config.log(f"[bench] {scenario.name}: timed request {i + 1}/{config.repeats} ...")
            theirs_runs.append(baseline.call("generate", **generate))
            theirs2_runs.append(baseline2.call("generate", **generate))
            ours_runs.append(ours.run_once(scenario))
        steps_applied = [r["lora_applied_at_step"] for r in ours_runs]
        if scenario.loras and any(step != 0 for step in steps_applied):
            raise RuntimeError(f"{scenario.name}: LoRA set not in place before the first step: {steps_applied}")

        # Diffusers' latency includes unfuse + unload: ours includes the restore of the LoRA set.
        d = median([r["latency_s"] for r in theirs_runs])
        d2 = median([r["latency_s"] for r in theirs2_runs])
        o = median([r["latency_s"] + r["restore_s"] for r in ours_runs])
        result.figures += [
            Figure(f"diffusers.latency_s.{scenario.name}", d, "s", group),
            Figure(f"diffusers_2cores.latency_s.{scenario.name}", d2, "s", group, hardware=equal),
            Figure(f"ours.latency_s.{scenario.name}", o, "s", group),
            Figure(f"speedup.{scenario.name}", d / o, "x", group),
            Figure(f"speedup_equal_cores.{scenario.name}", d2 / o, "x", group, hardware=equal),
        ]
        if scenario.loras:
            restore = median([r["restore_s"] for r in ours_runs])
            result.figures.append(Figure(f"ours.lora_restore_s.{scenario.name}", restore, "s", group))
        for side, runs in (("ours", ours_runs), ("diffusers", theirs_runs)):
            for stage in runs[0]["stages"]:
                value = median([r["stages"].get(stage, 0.0) for r in runs])
                result.figures.append(Figure(f"{side}.stage_s.{scenario.name}.{stage}", value, "s", group))
        ours_png = ours_runs[-1]["image_png"]
        diff = check_same_image(base64.b64decode(theirs_runs[-1]["image_png"]), ours_png, scenario.name)
        check_same_image(base64.b64decode(theirs2_runs[-1]["image_png"]), ours_png, f"{scenario.name} (2 cores)")
        rows.append((scenario.name, d, d2, o, d / o, d2 / o, diff))
        config.log(
            f"[bench] {scenario.name}: Diffusers {d:.2f} s (2 cores {d2:.2f} s), ours {o:.2f} s, "
            f"speedup {d / o:.2f}x (equal cores {d2 / o:.2f}x), max |dpx| {diff}"
        )

    lines = [
        f"baseline: {config.family}, {config.size}x{config.size}, {config.steps} steps, CFG 7.5, Euler, fp32, "
        f"median of {config.repeats}",
        f"  ours: {hw['ours']}",
        f"  diffusers: {hw['diffusers']}  |  diffusers 2c: {hw['diffusers_2cores']} (equal hardware)",
        f"  {'scenario':<12}{'diffusers s':>12}{'diff. 2c s':>11}{'ours s':>9}{'speedup':>9}{'equal cores':>13}"
        f"{'max |dpx|':>11}",
    ]
    lines += [
        f"  {name:<12}{d:>12.3f}{d2:>11.3f}{o:>9.3f}{s:>8.2f}x{s2:>12.2f}x{diff:>11d}"
        for name, d, d2, o, s, s2, diff in rows
    ]
    lines.append(
        f"  (ours with LoRAs includes the restore; max |dpx|: largest pixel difference between the sides' images, "
        f"0..255, at most {IMAGE_TOLERANCE} or the run stops)"
    )
    result.table = "\n".join(lines)
    return result


def group_lora(config: BenchConfig, session: Session) -> GroupResult:
    group = "lora"
    lora_id = rank64_lora_id(config.family)
    repeats = max(5, config.repeats)  # cheap, and noisier than whole requests
    config.log(f"[bench] lora: swapping {lora_id} ({repeats} rounds each side) ...")
    r = session.baseline().call("lora_swap", lora_id=lora_id, repeats=repeats)
    load_fuse, unfuse_unload = median(r["diffusers_load_fuse_s"]), median(r["diffusers_unfuse_unload_s"])
    apply_, restore = median(r["ours_apply_s"]), median(r["ours_restore_s"])
    swap_d = median([a + b for a, b in zip(r["diffusers_load_fuse_s"], r["diffusers_unfuse_unload_s"])])
    swap_o = median([a + b for a, b in zip(r["ours_apply_s"], r["ours_restore_s"])])
    # Our one-time preparation (parse, map, fold, cast) is done once per LoRA and base model,
    # ahead of requests; on a LoRA's first use it is paid as well: amortised over N uses it adds
    # prepare / N to each swap.
    prepare = r["ours_prepare_s"]
    first_use = swap_d / (swap_o + prepare)
    extra, extra_table = lora_service_figures(config, session, group)
    in_process = {"ours": hardware(config)["in_process"], "diffusers": hardware(config)["in_process"]}
    result = GroupResult(
        hardware={"ours": hardware(config)["ours"]},
        figures=extra
        + [
            Figure("diffusers.lora_load_fuse_s", load_fuse, "s", group, in_process),
            Figure("diffusers.lora_unfuse_unload_s", unfuse_unload, "s", group, in_process),
            Figure("ours.lora_apply_s", apply_, "s", group, in_process),
            Figure("ours.lora_restore_s", restore, "s", group, in_process),
            Figure("ours.lora_prepare_s", prepare, "s", group, in_process),
            Figure("lora.swap_s.diffusers", swap_d, "s", group, in_process),
            Figure("lora.swap_s.ours", swap_o, "s", group, in_process),
            Figure("lora.swap_speedup", swap_d / swap_o, "x", group, in_process),
            Figure("lora.swap_speedup.first_use", first_use, "x", group, in_process),
        ],
    )
    result.table = "\n".join(
        [
            f"lora: {lora_id} ({r['num_params']} layers, {r['num_weights'] / 1e6:.1f} M weights), scale 1.0, "
            f"core {config.device_core} x 1 thread, median of {repeats}",
            f"  {'':<34}{'diffusers s':>12}{'ours s':>10}",
            f"  {'load+fuse / apply (patch in)':<34}{load_fuse:>12.4f}{apply_:>10.4f}",
            f"  {'unfuse+unload / restore':<34}{unfuse_unload:>12.4f}{restore:>10.4f}",
            f"  {'swap (in + out)':<34}{swap_d:>12.4f}{swap_o:>10.4f}   speedup {swap_d / swap_o:.1f}x",
            f"  ours' one-time preparation (extract_deltas, cached): {prepare:.3f} s; first use, preparation "
            f"included: speedup {first_use:.2f}x",
            *extra_table,
        ]
    )
    return result


BAL_STEPS = (2, 5, 10)


def lora_service_figures(config: BenchConfig, session: Session, group: str) -> tuple[list[Figure], list[str]]:
    """LoRA store throughput, the LoRA's cost on a request's critical path, and BAL quality."""
    ours = session.ours()
    lora_id = rank64_lora_id(config.family)
    prefetch = ours.first_prefetch(lora_id)
    stream_s, stream_bytes = ours.stream_deltas(lora_id, 1.0)
    prepare_mb_s = prefetch.size_bytes / 1e6 / max(prefetch.prepare_seconds, 1e-9)
    stream_mb_s = stream_bytes / 1e6 / stream_s

    # Critical path: the same request with the LoRA (in the store's host tier, not on the worker:
    # each run uses a scale the worker has not seen) against without it.
    plain = Scenario("base")
    ours.warm_up(plain)
    config.log("[bench] lora: critical path (K=0 and K=2) ...")
    base_runs, k0_runs, k2_runs = [], [], []
    for i in range(max(3, config.repeats)):  # the spread is part of the figure
        base_runs.append(ours.run_once(plain)["latency_s"])
        k0_runs.append(
            ours.run_once(Scenario("lora", loras=((lora_id, 1.0 - 0.001 * (2 * i + 1)),)), lora_bound_steps=0)
        )
        k2_runs.append(
            ours.run_once(Scenario("lora", loras=((lora_id, 1.0 - 0.001 * (2 * i + 2)),)), lora_bound_steps=2)
        )
    base_s = median(base_runs)
    k0_s, k2_s = median([r["latency_s"] for r in k0_runs]), median([r["latency_s"] for r in k2_runs])
    # The LoRA's own stages on the worker (text-encoder patch, UNet patch including any wait for
    # deltas, restore afterwards) against the plain request: steadier than a latency difference.
    by_stages = sorted(
        (r["stages"].get("lora_text_encoder", 0.0) + r["stages"].get("lora_unet_patch", 0.0) + r["restore_s"]) / base_s
        for r in k0_runs
    )

    # BAL quality: UNet deltas landing at step K (in-process, forced) and when they really arrive
    # (over the services, bound at the last step), each against K = 0.
    config.log("[bench] lora: BAL quality ...")
    bal_steps = [k for k in BAL_STEPS if k < config.steps]
    images = images_by_arrival_step(config.zoo, config.family, lora_id, config.size, config.steps, [0, *bal_steps])
    scale = 0.777
    k0 = ours.run_once(Scenario("lora", loras=((lora_id, scale),)), lora_bound_steps=0)  # restores after
    arrival = ours.run_once(Scenario("lora", loras=((lora_id, scale + 0.001),)), lora_bound_steps=config.steps)
    finite = lambda x: min(x, 999.0)  # noqa: E731
    figures = [
        Figure("lora.store.prepare_mb_s", prepare_mb_s, "MB/s", group),
        Figure("lora.store.stream_mb_s", stream_mb_s, "MB/s", group),
        Figure("lora.store.delta_mb", stream_bytes / 1e6, "MB", group),
        Figure("lora.critical_path_fraction", k0_s / base_s - 1, "x", group),
        Figure("lora.critical_path_fraction.k2", k2_s / base_s - 1, "x", group),
        Figure("lora.critical_path_fraction.stages", median(by_stages), "x", group),
        Figure("lora.critical_path_fraction.stages_min", by_stages[0], "x", group),
        Figure("lora.critical_path_fraction.stages_max", by_stages[-1], "x", group),
        Figure("lora.bal_applied_step.on_arrival", arrival["lora_applied_at_step"], "step", group),
    ]
    rows = []
    for k in bal_steps:
        p, q = psnr(images[0], images[k]), ssim(images[0], images[k])
        figures += [
            Figure(f"lora.bal_psnr_db.k{k}", finite(p), "dB", group),
            Figure(f"lora.bal_ssim.k{k}", q, "x", group),
        ]
        rows.append(f"    K={k:<3} (deltas land before step {k})   PSNR {p:6.2f} dB   SSIM {q:.4f}")
    p, q = psnr(k0["image_png"], arrival["image_png"]), ssim(k0["image_png"], arrival["image_png"])
    figures += [
        Figure("lora.bal_psnr_db.on_arrival", finite(p), "dB", group),
        Figure("lora.bal_ssim.on_arrival", q, "x", group),
    ]
    rows.append(
        f"    on arrival (applied before step {arrival['lora_applied_at_step']})   PSNR {p:6.2f} dB   SSIM {q:.4f}  (scale 0.778 vs 0.777)"
    )
    table = [
        f"  LoRA store: prepare {prepare_mb_s:.0f} MB/s ({prefetch.size_bytes / 1e6:.1f} MB in {prefetch.prepare_seconds:.2f} s), "
        f"stream {stream_mb_s:.0f} MB/s over loopback gRPC",
        f"  critical path (LoRA from the store's host tier, not on the worker; no ControlNet): "
        f"base {base_s:.3f} s, K=0 {k0_s:.3f} s (+{k0_s / base_s - 1:.1%}), K=2 {k2_s:.3f} s (+{k2_s / base_s - 1:.1%}); "
        f"by the LoRA's stages (patch, wait, restore) {median(by_stages):.1%} "
        f"(min {by_stages[0]:.1%}, max {by_stages[-1]:.1%} over {len(by_stages)} runs)",
        "  BAL quality against K=0 (same seed):",
        *rows,
    ]
    return figures, table


def group_controlnet(config: BenchConfig, session: Session) -> GroupResult:
    """ControlNet as a service: add-on overhead, per-step split, transport, fp16 wire quality."""
    group = "controlnet"
    scenarios = {s.name: s for s in baseline_scenarios(config.family, config.size)}
    base, cn1 = scenarios["base"], scenarios["cn1"]
    baseline, ours = session.baseline(), session.ours()
    config.log("[bench] controlnet: warming up ...")
    for scenario in (base, cn1):
        baseline.call("generate", scenario=scenario.to_json(), size=config.size, steps=config.steps)
        ours.warm_up(scenario)
    ours.run_once(cn1, inline=True)  # warms the inline worker up
    runs: dict[str, list] = {"d_base": [], "d_cn1": [], "o_base": [], "o_cn1": [], "o_cn1_inline": []}
    # Each side's base and cn1 run back to back, and overheads are medians of those pairs' ratios:
    # this machine's speed drifts over seconds (other tenants), and a pair shares the drift. The
    # order within a pair alternates (base first, then cn1 first), so that a drift in one direction
    # does not always land on the same scenario.
    for i in range(config.repeats):
        config.log(f"[bench] controlnet: timed requests {i + 1}/{config.repeats} ...")
        order = (("base", base), ("cn1", cn1))[:: 1 if i % 2 == 0 else -1]
        for side, scenario in order:
            runs[f"d_{side}"].append(
                baseline.call("generate", scenario=scenario.to_json(), size=config.size, steps=config.steps)
            )
        for side, scenario in order:
            runs[f"o_{side}"].append(ours.run_once(scenario))
        runs["o_cn1_inline"].append(ours.run_once(cn1, inline=True))
    fp16 = ours.run_once(cn1, wire_dtype="float16")
    used = runs["o_cn1"][-1]["controlnet_transports"]

    latency = {k: median([r["latency_s"] for r in v]) for k, v in runs.items()}
    steps = config.steps

    def per_step(prefix: str, run: str = "o_cn1") -> float:
        return median([sum(v for k, v in r["stages"].items() if k.startswith(prefix)) for r in runs[run]]) / steps

    def controlnet_s(run: str, part: str) -> float:
        """Median over the run's requests of its ControlNets' `part`, summed (seconds per request)."""
        return median(
            [
                sum(v for k, v in r["stages"].items() if k.startswith("controlnet.") and k.endswith(f".{part}"))
                for r in runs[run]
            ]
        )

    def transport_s(run: str) -> float:
        return controlnet_s(run, "transport") / steps

    encoder, decoder = per_step("denoise.encoder_half"), per_step("denoise.decoder_half")
    # The same halves without a ControlNet running on the other core: what sharing the machine costs.
    encoder_base, decoder_base = per_step("denoise.encoder_half", "o_base"), per_step("denoise.decoder_half", "o_base")
    wait = per_step("denoise.controlnet_wait")
    transport, transport_inline = transport_s("o_cn1"), transport_s("o_cn1_inline")
    compute = controlnet_s("o_cn1", "compute") / steps
    reference_png = base64.b64decode(runs["d_cn1"][-1]["image_png"])
    check_same_image(reference_png, runs["o_cn1"][-1]["image_png"], "controlnet cn1 (fp32 wire)")
    psnr_fp32 = psnr(runs["o_cn1"][-1]["image_png"], reference_png)
    psnr_fp16 = psnr(fp16["image_png"], reference_png)
    finite = lambda x: min(x, 999.0)  # noqa: E731 - identical images give inf; JSON wants a number

    def paired(run: str, over: str) -> float:
        return median([a["latency_s"] / b["latency_s"] for a, b in zip(runs[run], runs[over])])

    overhead_ours = paired("o_cn1", "o_base")
    overhead_inline = paired("o_cn1_inline", "o_base")
    overhead_diffusers = paired("d_cn1", "d_base")
    hw = hardware(config)
    result = GroupResult(
        hardware={"ours": hw["ours"], "diffusers": hw["diffusers"]},
        figures=[
            Figure("controlnet.addon_overhead", overhead_ours, "x", group),
            Figure("controlnet.addon_overhead.diffusers", overhead_diffusers, "x", group),
            Figure("controlnet.addon_overhead.inline", overhead_inline, "x", group),
            Figure("controlnet.transport_fraction", transport / (encoder + decoder), "x", group),
            Figure("controlnet.transport_fraction.inline", transport_inline / (encoder + decoder), "x", group),
            Figure("controlnet.step_s.encoder_half", encoder, "s", group),
            Figure("controlnet.step_s.decoder_half", decoder, "s", group),
            Figure("controlnet.step_s.encoder_half.base", encoder_base, "s", group),
            Figure("controlnet.step_s.decoder_half.base", decoder_base, "s", group),
            Figure("controlnet.step_s.controlnet", compute, "s", group),
            Figure("controlnet.step_s.wait", wait, "s", group),
            Figure("controlnet.step_s.transport", transport, "s", group),
            Figure("controlnet.step_s.transport.inline", transport_inline, "s", group),
            # Included in step_s.transport: the offer step's, with the ring's creation and mapping.
            Figure("controlnet.first_step_s.transport", controlnet_s("o_cn1", "first_step_transport"), "s", group),
            Figure("controlnet.latency_s.ours.base", latency["o_base"], "s", group),
            Figure("controlnet.latency_s.ours.cn1", latency["o_cn1"], "s", group),
            Figure("controlnet.latency_s.diffusers.base", latency["d_base"], "s", group),
            Figure("controlnet.latency_s.diffusers.cn1", latency["d_cn1"], "s", group),
            Figure("controlnet.speedup.cn1", latency["d_cn1"] / latency["o_cn1"], "x", group),
            Figure("controlnet.fp32_wire_psnr_db", finite(psnr_fp32), "dB", group),
            Figure("controlnet.fp16_wire_psnr_db", finite(psnr_fp16), "dB", group, dtype="float16 on the wire"),
        ],
    )
    result.table = "\n".join(
        [
            f"controlnet: {config.family}, {config.size}x{config.size}, {steps} steps; UNet worker on core "
            f"{config.device_core}, ControlNet worker on core {config.controlnet_core}, 1 thread each; "
            f"Diffusers on core {config.device_core}; median of {config.repeats} (overheads: of back-to-back pairs)",
            f"  add-on overhead (cn1 / base)   ours {overhead_ours:.3f}x ({used[0]}), {overhead_inline:.3f}x (inline)   "
            f"diffusers {overhead_diffusers:.3f}x",
            f"  latency cn1                     ours {latency['o_cn1']:.3f} s   diffusers {latency['d_cn1']:.3f} s   "
            f"speedup {latency['d_cn1'] / latency['o_cn1']:.2f}x",
            f"  per step: encoder half {encoder:.3f} s, decoder half {decoder:.3f} s (without the ControlNet: "
            f"{encoder_base:.3f} s, {decoder_base:.3f} s), ControlNet {compute:.3f} s, "
            f"wait {wait:.3f} s, transport {transport:.4f} s over {used[0]} ({transport / (encoder + decoder):.2%} of "
            f"a UNet step; inline bytes {transport_inline:.4f} s, {transport_inline / (encoder + decoder):.2%})",
            f"  image PSNR against Diffusers: fp32 wire {psnr_fp32:.1f} dB, fp16 wire {psnr_fp16:.1f} dB",
        ]
    )
    return result


GroupFn = Callable[[BenchConfig, Session], GroupResult]
#: Group name -> function; `--only` picks among them, default: all, in this order.
GROUPS: dict[str, GroupFn] = {
    "baseline": group_baseline,
    "lora": group_lora,
    "controlnet": group_controlnet,
    "gateway": group_gateway,
    "compiler": group_compiler,
    "traffic": group_traffic,
    "quality": group_quality,
}


# -- results -----------------------------------------------------------------------------------


def write_results(path: Path, figures: list[Figure], groups_ran: list[str]) -> None:
    """Replace the lines of `groups_ran` in the JSONL file at `path`; keep every other group's lines."""
    path = Path(path)
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                group = json.loads(line).get("group")
            except json.JSONDecodeError:
                continue
            if group not in groups_ran:
                kept.append(line)
    lines = kept + [json.dumps(f.as_dict()) for f in figures]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def run(config: BenchConfig, groups: list[str]) -> list[Figure]:
    """Run `groups` (names in GROUPS), print their tables and figures, update config.out."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown group(s) {unknown}; known: {sorted(GROUPS)}")
    session = Session(config)
    results: dict[str, GroupResult] = {}
    try:
        for name in groups:
            results[name] = GROUPS[name](config, session)
    finally:
        session.close()
    for r in results.values():
        for f in r.figures:
            f.hardware = f.hardware or r.hardware
    figures = [f for r in results.values() for f in r.figures]
    print()
    for r in results.values():
        print(r.table + "\n")
    for f in figures:
        print(json.dumps(f.as_dict()))
    write_results(config.out, figures, groups)
    return figures


def _pin_off_device(device_core: int) -> None:
    """Keep the bench process (a client that mostly waits) off the device core, where possible."""
    others = os.sched_getaffinity(0) - {device_core}
    if others:
        os.sched_setaffinity(0, others)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path(".zoo"), help="model zoo root (python -m swiftd.zoo build)")
    parser.add_argument(
        "--only", action="append", default=[], help=f"group(s) to run, comma-separated or repeated: {', '.join(GROUPS)}"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed requests per scenario and side (median reported)")
    parser.add_argument("--family", default="bench-sd15", help="zoo family to benchmark")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device-core", type=int, default=0, help="the core both sides run on")
    parser.add_argument("--controlnet-core", type=int, default=1, help="the core our ControlNet workers run on")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="results JSONL file to update")
    parser.add_argument("--no-pin", action="store_true", help="leave the bench process's own CPU affinity alone")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    quality = parser.add_argument_group("quality group")
    quality.add_argument(
        "--quality-root", type=Path, default=BenchConfig.quality_root, help="trained shape-world model root"
    )
    quality.add_argument("--quality-count", type=int, default=BenchConfig.quality_count, help="held-out prompts")
    quality.add_argument("--quality-no-compiled", action="store_true", help="skip the compiled backbones")
    quality.add_argument("--quality-grid", type=Path, default=BenchConfig.quality_grid, help="image grid PNG to write")
    args = parser.parse_args(argv)
    groups = [g for item in args.only for g in item.split(",") if g.strip()] or list(GROUPS)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(GROUPS)}")
    if not args.no_pin:
        _pin_off_device(args.device_core)
    config = BenchConfig(
        zoo=args.zoo,
        family=args.family,
        size=args.size,
        steps=args.steps,
        repeats=args.repeats,
        device_core=args.device_core,
        controlnet_core=args.controlnet_core,
        out=args.out,
        verbose=not args.quiet,
        quality_root=args.quality_root,
        quality_count=args.quality_count,
        quality_compiled=not args.quality_no_compiled,
        quality_grid=args.quality_grid,
    )
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    run(config, groups)
    print(
        f"\n[bench] groups {', '.join(groups)} done in {time.perf_counter() - t0:.0f} s; results in {args.out}\n"
        f"[bench] 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
        f"(this run keeps about 1 core busy; more means something else shared the machine)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
