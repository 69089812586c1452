"""Latency on 1, 2, 4 and 8 GPUs, projected from the parts of a denoising step measured on one.

    python -m bench.projection --probe bench/gpu_probe_h100.json [--steps 30] [--transport-ms 1]
    python -m bench.projection --results bench/results.jsonl      (the CPU check: 2 cores = 2 devices)

A projection, not a measurement: it assumes each GPU runs one thing at a time and that the parts
of a step add up as the planner lays them out (services/gateway/planner.py):

  1 GPU            pack: E + n*C + D (ControlNets in-process, nothing to overlap with)
  g GPUs, no split spread: ControlNets on the g-1 other GPUs, overlapping the encoder half:
                   E + max(0, C_gpu + T - E) + D, C_gpu = the most ControlNet work one GPU has
  g >= 2, split    CFG split: two UNet workers, a batch of one each (f = batch-1 time / batch-2
                   time), exchanging noise predictions (X per step); each half's ControlNets on
                   its share of the other g-2 GPUs, else in-process

E, D, C: the encoder half, decoder half and a ControlNet step at batch 2 (CFG); T: a residual
handoff; fixed: text encoding and VAE decode, once per request. The planner splits when it can
(two idle UNet GPUs), so the projected latency on g >= 2 GPUs is the better of the two layouts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StepParts:
    encoder: float  # s, batch 2
    decoder: float
    controlnet: float  # one ControlNet step, hint cached
    transport: float = 0.001  # one residual handoff between processes on one host
    batch1_fraction: float = 0.55  # time at batch 1 / time at batch 2 (UNet halves and ControlNet)
    exchange: float = 0.001  # the CFG split's per-step exchange of noise predictions
    fixed: float = 0.0  # text encoding + VAE decode, once per request


def _spread_wait(encoder: float, controlnet: float, transport: float, controlnets: int, gpus: int) -> float:
    """Wait after the encoder half for ControlNets spread over `gpus` devices (0: in-process)."""
    if controlnets == 0:
        return 0.0
    if gpus <= 0:
        return controlnets * controlnet  # in-process, in turn
    per_gpu = -(-controlnets // gpus)  # the busiest device's ControlNets
    return max(0.0, per_gpu * controlnet + transport - encoder)


def step_seconds(parts: StepParts, gpus: int, controlnets: int, split: bool) -> float:
    if split:
        if gpus < 2:
            raise ValueError("a CFG split needs two GPUs")
        f = parts.batch1_fraction
        e, d, c = f * parts.encoder, f * parts.decoder, f * parts.controlnet
        spare = (gpus - 2) // 2  # each half's share of the other GPUs
        return e + _spread_wait(e, c, parts.transport, controlnets, spare) + d + parts.exchange
    spare = gpus - 1
    if spare == 0:
        return parts.encoder + controlnets * parts.controlnet + parts.decoder
    return (
        parts.encoder
        + _spread_wait(parts.encoder, parts.controlnet, parts.transport, controlnets, spare)
        + parts.decoder
    )


def project(parts: StepParts, steps: int, controlnets: int, gpu_counts=(1, 2, 4, 8)) -> list[dict]:
    """Per GPU count: the latency without and with the CFG split, and the layout the planner picks."""
    rows = []
    for gpus in gpu_counts:
        spread = parts.fixed + steps * step_seconds(parts, gpus, controlnets, split=False)
        split = parts.fixed + steps * step_seconds(parts, gpus, controlnets, split=True) if gpus >= 2 else None
        best = "split" if split is not None and split < spread else ("pack" if gpus == 1 else "spread")
        rows.append(
            {
                "gpus": gpus,
                "spread_s": spread,
                "split_s": split,
                "layout": best,
                "latency_s": min(spread, split or spread),
            }
        )
    return rows


def from_probe(entry: dict, transport_ms: float, batch1_fraction: float) -> StepParts:
    """StepParts from one `bench.gpu_probe` result (milliseconds, batch 2)."""
    return StepParts(
        encoder=entry["encoder_half_ms"] / 1e3,
        decoder=entry["decoder_half_ms"] / 1e3,
        controlnet=entry["controlnet_step_cached_hint_ms"] / 1e3,
        transport=transport_ms / 1e3,
        batch1_fraction=entry.get("batch1_fraction", batch1_fraction),
    )


def from_results(path: Path) -> tuple[StepParts, StepParts, int, dict[str, float]]:
    """The CPU's parts from `make bench` results (bench-sd15: `controlnet` and `baseline` groups):
    as timed with a ControlNet on the other core, and the UNet's halves as timed without (on a
    GPU each device is its own; on these two cores the ControlNet slows the UNet's halves); its
    step count, and the measured latencies to check the projection against."""
    figures = {}
    for line in path.read_text().splitlines():
        item = json.loads(line)
        figures[item["figure"]] = item["value"]
    steps = 20  # bench.run's default, which these results were made with
    fixed = figures["ours.stage_s.base.text_encode"] + figures["ours.stage_s.base.vae_decode"]
    parts = StepParts(
        encoder=figures["controlnet.step_s.encoder_half"],
        decoder=figures["controlnet.step_s.decoder_half"],
        controlnet=figures["controlnet.step_s.controlnet"],
        transport=figures["controlnet.step_s.transport"],
        fixed=fixed,
    )
    alone = StepParts(
        encoder=figures.get("controlnet.step_s.encoder_half.base", parts.encoder),
        decoder=figures.get("controlnet.step_s.decoder_half.base", parts.decoder),
        controlnet=parts.controlnet,
        fixed=fixed,
    )
    measured = {
        "base, 1 device": figures["controlnet.latency_s.ours.base"],
        "cn1, 2 devices (spread)": figures["controlnet.latency_s.ours.cn1"],
    }
    return parts, alone, steps, measured


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.projection", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--probe", type=Path, help="bench.gpu_probe JSON (per-part GPU timings)")
    source.add_argument("--results", type=Path, help="make bench results JSONL (the CPU check)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--transport-ms", type=float, default=1.0, help="residual handoff per step (CUDA IPC target)")
    parser.add_argument("--batch1-fraction", type=float, nargs="+", default=[0.55, 0.9])
    args = parser.parse_args(argv)
    if args.results:
        parts, alone, steps, measured = from_results(args.results)
        print("CPU check (2 cores as 2 devices): projected against measured")
        checks = {
            "base, 1 device": alone.fixed + steps * step_seconds(alone, 1, 0, split=False),
            "cn1, 2 devices (spread)": parts.fixed + steps * step_seconds(parts, 2, 1, split=False),
        }
        for name, value in checks.items():
            print(
                f"  {name}: projected {value:.2f} s, measured {measured[name]:.2f} s ({value / measured[name] - 1:+.1%})"
            )
        return 0
    probe = json.loads(args.probe.read_text())
    print(
        f"projection from {args.probe} ({probe.get('device', '')}); {args.steps} steps, transport {args.transport_ms} ms"
    )
    print(
        "| model | ControlNets | batch-1 fraction | "
        + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in (1, 2, 4, 8))
        + " |"
    )
    print("|---|---:|---:|" + "---:|" * 4)
    for entry in probe["results"]:
        for fraction in args.batch1_fraction:
            parts = from_probe(entry, args.transport_ms, fraction)
            for controlnets in (1, 2):
                rows = project(parts, args.steps, controlnets)
                cells = [f"{r['latency_s'] * 1e3:.0f} ms ({r['layout']})" for r in rows]
                print(
                    f"| {entry['family']} {entry['size']}² | {controlnets} | {fraction} | " + " | ".join(cells) + " |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
