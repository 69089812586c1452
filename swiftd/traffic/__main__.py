"""`python -m swiftd.traffic catalog|generate|replay`: build a traffic catalog, generate a trace
over it, replay a trace open-loop against any endpoint serving swiftd.v1.Gateway.

    python -m swiftd.traffic catalog --zoo .zoo [--out .zoo/traffic-bench-sd15] \\
        [--family bench-sd15 --num-loras 200 --num-controlnets 6]
    python -m swiftd.traffic generate --catalog .zoo/traffic-bench-sd15 --out trace.jsonl \\
        [--seed 0 --rate 0.5 (--num-requests 200 | --duration S) --arrival poisson|bursty --size 128 ...]
    python -m swiftd.traffic replay --target HOST:PORT trace.jsonl [--rate R] [--objective S] \
        [--records records.jsonl]

`generate` prints the trace's popularity statistics (JSON) on stdout. Each subcommand is one
function that adds its parser and the function that runs it (SUBCOMMANDS); another subcommand
is one more such function in that list.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from swiftd.traffic.catalog import CatalogConfig, build_catalog, load_catalog
from swiftd.traffic.loadgen import ReplayConfig, at_rate, replay, summarize
from swiftd.traffic.trace import read_trace, write_trace
from swiftd.traffic.workload import ARRIVAL_PROCESSES, WorkloadConfig, generate, popularity_stats, trace_header


def add_catalog_command(subparsers) -> None:
    defaults = CatalogConfig()
    p = subparsers.add_parser("catalog", help="build a model repository with many LoRAs and ControlNets")
    p.add_argument("--zoo", type=Path, default=Path(".zoo"), help="the zoo (its family is built first if missing)")
    p.add_argument("--out", type=Path, help="the catalog's model root (default: <zoo>/traffic-<family>)")
    p.add_argument("--family", default=defaults.family, help="zoo family (default %(default)s)")
    p.add_argument("--num-loras", type=int, default=defaults.num_loras)
    p.add_argument("--num-controlnets", type=int, default=defaults.num_controlnets)
    p.set_defaults(run=run_catalog)


def run_catalog(args: argparse.Namespace) -> int:
    config = CatalogConfig(family=args.family, num_loras=args.num_loras, num_controlnets=args.num_controlnets)
    root = build_catalog(args.zoo, config, args.out)
    catalog = load_catalog(root)
    print(f"{root}: model {catalog.model_id}, {len(catalog.loras)} LoRAs, {len(catalog.controlnets)} ControlNets")
    return 0


def add_generate_command(subparsers) -> None:
    defaults = WorkloadConfig()
    p = subparsers.add_parser("generate", help="write a seeded production-shaped trace over a catalog")
    p.add_argument("--catalog", type=Path, required=True, help="a catalog built by `catalog`")
    p.add_argument("--out", type=Path, required=True, help="the trace file (JSONL)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--rate", type=float, default=defaults.rate_rps, help="mean arrivals per second")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--num-requests", type=int, default=defaults.num_requests)
    count.add_argument("--duration", type=float, help="seconds of arrivals instead of a number of requests")
    p.add_argument("--arrival", choices=ARRIVAL_PROCESSES, default=defaults.arrival)
    p.add_argument("--burst-factor", type=float, default=defaults.burst_factor, help="bursty: burst/quiet rate")
    p.add_argument("--burst-time-share", type=float, default=defaults.burst_time_share)
    p.add_argument("--burst-cycle", type=float, default=defaults.burst_cycle_s, help="bursty: mean seconds per cycle")
    p.add_argument("--addon-share", type=float, default=defaults.addon_share)
    p.add_argument("--size", type=int, default=defaults.width, help="width and height in pixels")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--guidance", type=float, default=defaults.guidance_scale)
    p.add_argument("--scheduler", default=defaults.scheduler)
    p.add_argument("--deadline", type=float, default=defaults.deadline_s, help="seconds per request")
    p.set_defaults(run=run_generate)


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(
        seed=args.seed,
        arrival=args.arrival,
        rate_rps=args.rate,
        num_requests=None if args.duration is not None else args.num_requests,
        duration_s=args.duration,
        burst_factor=args.burst_factor,
        burst_time_share=args.burst_time_share,
        burst_cycle_s=args.burst_cycle,
        addon_share=args.addon_share,
        width=args.size,
        height=args.size,
        steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        deadline_s=args.deadline,
    )


def run_generate(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    config = workload_config(args)
    entries = generate(config, catalog)
    write_trace(args.out, entries, header=trace_header(config, catalog))
    print(json.dumps(popularity_stats(entries), indent=2))
    return 0


def add_replay_command(subparsers) -> None:
    p = subparsers.add_parser("replay", help="send a trace's requests at their times (open loop), report latency")
    p.add_argument("trace", type=Path, help="a trace file (generated, or an operator's own in the same format)")
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="a swiftd.v1.Gateway endpoint")
    p.add_argument("--rate", type=float, default=None, help="rescale arrivals to this mean rate (req/s)")
    p.add_argument("--objective", type=float, default=60.0, help="latency objective for goodput, seconds")
    p.add_argument("--deadline", type=float, default=None, help="seconds per request (default: the trace's)")
    p.add_argument("--records", type=Path, default=None, help="write one JSON record per request here")
    p.add_argument("--system", default="", help="label written into every record")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    entries = read_trace(args.trace)
    if args.rate:
        entries = at_rate(entries, args.rate)
    config = ReplayConfig(
        target=args.target, system=args.system, deadline_s=args.deadline, progress=not args.no_progress
    )
    records = replay(entries, config)
    if args.records:
        args.records.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    summary = summarize(records, args.objective, duration_s=(entries[-1].at_s if entries else 0.0) or 1.0)
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["failed"] == 0 else 1


SUBCOMMANDS = [add_catalog_command, add_generate_command, add_replay_command]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swiftd.traffic", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in SUBCOMMANDS:
        add_command(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
