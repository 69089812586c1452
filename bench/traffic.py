"""Serving under traffic: one trace replayed open-loop against three systems on the same two cores.

    make bench ONLY=traffic

Systems, each behind the same swiftd.v1.Gateway API and driven by the same load generator
(swiftd.traffic.loadgen), each given the same two cores (one "device" per core):
  diffusers_fuse      what people run today: one Diffusers pipeline process per core, each request
                      loads + fuses its LoRAs and unfuses + unloads them after, a least-loaded
                      FIFO dispatcher in front (bench.baselines, mode "fuse");
  diffusers_adapters  the stronger variant: LoRAs kept loaded as PEFT adapters (LRU), set per
                      request, never fused (mode "adapters");
  ours                the suite as deployed: a UNet worker and a ControlNet worker per core on
                      ahead-of-time compiled artifacts (compiler/, built once per machine and
                      verified, as a release pipeline does), the LoRA store and the gateway beside;
  ours_eager          the same without the artifacts.

The trace (swiftd.traffic.workload) is shaped after production traffic with add-ons, on the
traffic catalog of the bench model (swiftd.traffic.catalog: 200 LoRAs, 6 ControlNets), at a
smaller request size than the other groups (TRAFFIC_SIZE, TRAFFIC_STEPS, NUM_REQUESTS) so that
four to six loads on four systems fit in 15 minutes on this machine.

Each system first serves every request of the trace once, two at a time and unmeasured (a warm-up:
its caches as a server that has been up a while has them), then every other request alone, one at
a time (its isolated latencies). Offered loads are fractions of diffusers_fuse's capacity (2
devices / its mean isolated latency). The latency objective is 3x the median isolated latency on
diffusers_fuse. A system sustains a load when the p99 latency over every request of the run (a
refused or failed one counting as infinitely slow) is within the objective.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from bench.artifacts import compiled_artifacts
from bench.scenarios import BenchConfig, Figure, GroupResult
from swiftd.traffic.loadgen import (
    ReplayConfig,
    RequestRecord,
    at_rate,
    percentile,
    replay,
    run_isolated,
    summarize,
)
from swiftd.traffic.trace import TraceEntry

GROUP = "traffic"
TRAFFIC_SIZE = 128
TRAFFIC_STEPS = 8
NUM_REQUESTS = 16  # per run: with 16 samples p99 is the slowest request (nearest rank)
ISOLATED_EVERY = 2  # the isolated latencies: every other request of the trace, alone
LOADS = (0.5, 1.0, 1.5, 2.0)  # offered load, as fractions of diffusers_fuse's capacity: every system
BEYOND = (2.5, 3.0)  # and these while a system still holds the objective at every load before
OBJECTIVE_FACTOR = 3.0
SEED = 12
CORES = (0, 1)
RECORDS_FILE = Path(__file__).resolve().parent / "traffic_records.jsonl"
TRACE_FILE = Path(__file__).resolve().parent / "traffic_trace.jsonl"
PLOTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "img"


@dataclass
class SystemUnderTest:
    name: str
    start: Callable[[], object]  # returns a handle with .address and .stop()
    hardware: str


@dataclass
class RunResult:
    system: str
    load: float  # fraction of diffusers_fuse's capacity
    rate_rps: float
    summary: dict
    records: list[RequestRecord]


@contextmanager
def running(system: SystemUnderTest):
    handle = system.start()
    try:
        yield handle
    finally:
        handle.stop()


def sustained_load(runs: list[RunResult]) -> float:
    """The highest load of the run series the system held its objective at, with every lower one
    held too (0 if it missed at the lowest)."""
    best = 0.0
    for run in sorted(runs, key=lambda r: r.load):
        if not run.summary["meets_objective"]:
            break
        best = run.load
    return best


def worth_running(load: float, runs: list[RunResult]) -> bool:
    """Every system runs LOADS; a load beyond them only while it has held every load so far (one
    it missed before means it cannot sustain this one)."""
    return load not in BEYOND or not runs or sustained_load(runs) == max(r.load for r in runs)


@dataclass
class Calibration:
    """What diffusers_fuse's isolated sample sets for every system: the objective and the loads."""

    objective_s: float
    capacity_rps: float

    @classmethod
    def from_isolated(cls, isolated: list[RequestRecord]) -> Calibration:
        service_s = statistics.mean(r.latency_s for r in isolated)
        return cls(OBJECTIVE_FACTOR * _median_latency(isolated), len(CORES) / service_s)

    @property
    def rates(self) -> dict[float, float]:
        return {load: load * self.capacity_rps for load in LOADS + BEYOND}

    @property
    def deadline_s(self) -> float:
        # A request past twice the objective has missed it anyway; ending it bounds the backlog an
        # overloaded run leaves, so a run takes about the trace's span.
        return 2 * self.objective_s


def measure_system(
    system: SystemUnderTest, trace: list[TraceEntry], calibration: Calibration | None, log
) -> tuple[list[RequestRecord], list[RunResult], Calibration]:
    """The isolated pass, then one open-loop run per load, on a freshly started system.

    Without a calibration, this system's isolated pass makes it (diffusers_fuse runs first).
    """
    with running(system) as handle:
        log(f"[traffic] {system.name} up at {handle.address}")
        warm_up(trace, handle.address, system.name)
        isolated = run_isolated(trace[::ISOLATED_EVERY], handle.address, system.name)
        bad = [r for r in isolated if not r.ok]
        if bad:
            raise RuntimeError(f"{system.name}: isolated request {bad[0].request_id}: {bad[0].status} {bad[0].details}")
        calibration = calibration or Calibration.from_isolated(isolated)
        log(
            f"[traffic] {system.name}: isolated median {_median_latency(isolated):.2f} s, p99 "
            f"{_p99_latency(isolated):.2f} s; objective "
            f"{calibration.objective_s:.2f} s; capacity of diffusers_fuse {calibration.capacity_rps:.2f} req/s"
        )
        runs = []
        for load, rate in calibration.rates.items():
            if not worth_running(load, runs):
                break
            entries = at_rate(trace, rate)
            replay_config = ReplayConfig(
                target=handle.address, system=system.name, load=load, deadline_s=calibration.deadline_s
            )
            records = replay(entries, replay_config)
            summary = summarize(records, calibration.objective_s, duration_s=entries[-1].at_s or 1.0)
            runs.append(RunResult(system.name, load, rate, summary, records))
            log(
                f"[traffic] {system.name:<19} load {load:4.2f} ({rate:.2f} req/s): p50 {summary['p50_s']:6.2f} "
                f"p95 {summary['p95_s']:6.2f} p99 {summary['p99_s']:6.2f} s  ok {summary['ok']}/{summary['requests']}"
                f"  rejected {summary['rejected']} deadline {summary['deadline_exceeded']} failed {summary['failed']}"
                f"  {'meets' if summary['meets_objective'] else 'misses'} {calibration.objective_s:.1f} s"
                + ("" if summary["valid"] else f"  INVALID: the generator lagged {summary['max_send_lag_s']:.2f} s")
            )
            time.sleep(0.5)  # let the last cancelled requests leave the workers
    return isolated, runs, calibration


def warm_up(trace: list[TraceEntry], address: str, system: str) -> None:
    """Every request of the trace once, one per device at a time, unmeasured: first-use costs (a
    LoRA's first preparation, lazy initialisation) are not what a server that has been up a while
    shows, and would otherwise land on whichever run comes first."""
    at_once = [replace(entry, at_s=0.0) for entry in trace]
    config = ReplayConfig(target=address, system=system, max_concurrency=len(CORES), deadline_s=600, progress=False)
    failed = [r for r in replay(at_once, config) if not r.ok]
    if failed:
        raise RuntimeError(f"{system}: warm-up request {failed[0].request_id}: {failed[0].status} {failed[0].details}")


def figures_of(
    runs_by_system: dict[str, list[RunResult]], isolated: dict[str, list[RequestRecord]], calibration: Calibration
) -> list[Figure]:
    figures = [
        Figure("traffic.objective_s", calibration.objective_s, "s", GROUP),
        Figure("traffic.capacity_rps.diffusers_fuse", calibration.capacity_rps, "req/s", GROUP),
    ]
    for system, runs in runs_by_system.items():
        figures.append(Figure(f"traffic.isolated_median_s.{system}", _median_latency(isolated[system]), "s", GROUP))
        figures.append(Figure(f"traffic.sustained_load.{system}", sustained_load(runs), "x", GROUP))
        for run in runs:
            key = f"{system}.{run.load:g}"
            s = run.summary
            figures += [
                Figure(f"traffic.p50_s.{key}", _finite(s["p50_s"]), "s", GROUP),
                Figure(f"traffic.p95_s.{key}", _finite(s["p95_s"]), "s", GROUP),
                Figure(f"traffic.p99_s.{key}", _finite(s["p99_s"]), "s", GROUP),
                Figure(f"traffic.goodput_rps.{key}", s["goodput_rps"], "req/s", GROUP),
                Figure(f"traffic.rejected.{key}", s["rejected"], "count", GROUP),
                Figure(f"traffic.deadline_exceeded.{key}", s["deadline_exceeded"], "count", GROUP),
                Figure(f"traffic.failed.{key}", s["failed"], "count", GROUP),
            ]
    sustained = {system: sustained_load(runs) for system, runs in runs_by_system.items()}
    for system in ("ours", "ours_eager"):
        if sustained.get(system):
            # The tail on a server that is not at its limit, against the same requests' tail alone:
            # how much queueing adds. Measured at the lowest load at or above half the sustained one.
            half = min((r for r in runs_by_system[system] if r.load >= sustained[system] / 2), key=lambda r: r.load)
            ratio = half.summary["p99_s"] / _p99_latency(isolated[system])
            figures.append(
                Figure(f"traffic.p99_at_half_sustained_over_isolated_p99.{system}", _finite(ratio), "x", GROUP)
            )
    for system, suffix in (("ours", ""), ("ours_eager", ".eager")):
        for baseline, figure in (
            ("diffusers_fuse", "traffic.throughput_ratio"),
            ("diffusers_adapters", "traffic.throughput_ratio.adapters"),
        ):
            if system in sustained and baseline in sustained:
                ratio = _ratio(sustained[system], sustained[baseline])
                figures.append(Figure(figure + suffix, ratio, "x", GROUP))
    return figures


def _median_latency(records: list[RequestRecord]) -> float:
    return statistics.median(r.latency_s for r in records)


def _p99_latency(records: list[RequestRecord]) -> float:
    return percentile([r.latency_s for r in records], 99)


def _finite(value: float) -> float:
    # JSON has no infinity: a percentile over failed requests is written as -1 (see the counts).
    return value if math.isfinite(value) else -1.0


def _ratio(ours: float, baseline: float) -> float:
    """Sustained-load ratio; a baseline that held no load counts as half the lowest load (a bound)."""
    return ours / (baseline if baseline > 0 else min(LOADS) / 2)


def write_records(runs_by_system: dict[str, list[RunResult]], path: Path) -> None:
    lines = [json.dumps(r.to_dict()) for runs in runs_by_system.values() for run in runs for r in run.records]
    path.write_text("\n".join(lines) + "\n")


# -- our side --------------------------------------------------------------------------------------


def traffic_artifacts(root: Path, catalog, log) -> Path:
    """The traffic model's compiled artifacts (UNet halves, ControlNet, VAE decoder at TRAFFIC_SIZE,
    batch 1 and 2), built once per machine beside the catalog."""
    return compiled_artifacts(
        root,
        catalog.model_id,
        root.parent / f"{root.name}-compiled-{TRAFFIC_SIZE}",
        TRAFFIC_SIZE,
        batches=(1, 2),
        controlnet_ids=(catalog.controlnet_ids[0],),  # the catalog's ControlNets share one architecture
        log=log,
    )


class OursSuite:
    """The suite as deployed on the two cores: per core a UNet worker and a ControlNet worker
    (one thread each), on compiled artifacts when given; the LoRA store and the gateway (which
    mostly wait) beside them."""

    def __init__(
        self,
        model_root: Path,
        model_id: str,
        cores=CORES,
        gateway_args: list[str] = (),
        compiled_artifacts: Path | None = None,
    ):
        import tempfile

        from swiftd.launcher import start_controlnet, start_gateway, start_lora_store, start_unet

        worker_args = ["--compiled-artifacts", str(compiled_artifacts)] if compiled_artifacts else []
        self._cache_dir = tempfile.TemporaryDirectory(prefix="swiftd-traffic-lora-cache-")
        self.services = []
        store = start_lora_store(
            model_root,
            Path(self._cache_dir.name),
            base_models=[model_id],
            cpu_cores=[cores[-1]],
            num_threads=1,
            wait=False,
        )
        controlnets = [
            start_controlnet(model_root, extra_args=worker_args, cpu_cores=[c], num_threads=1, wait=False)
            for c in cores
        ]
        unets = [
            start_unet(model_root, model_id, extra_args=worker_args, cpu_cores=[c], num_threads=1, wait=False)
            for c in cores
        ]
        self.services = [store, *controlnets, *unets]
        try:
            for service in self.services:
                service.wait_ready()
            gateway = start_gateway(
                [u.address for u in unets],
                [c.address for c in controlnets],
                store.address,
                cpu_cores=[cores[-1]],
                extra_args=list(gateway_args),
            )
        except BaseException:
            self.stop()
            raise
        self.services.append(gateway)
        self.address = gateway.address
        self.unet_addresses = [u.address for u in unets]

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self._cache_dir.cleanup()


# -- CFG split: one request on an idle machine ------------------------------------------------------

CFG_SIZE, CFG_STEPS, CFG_TIMED = 256, 20, 2  # the other groups' request size


def cfg_split_request(catalog, request_id: str):
    """cn1_lora1 of the other groups, with the catalog's first ControlNet and a rank-64 PEFT LoRA."""
    from bench.scenarios import GUIDANCE_SCALE, NEGATIVE_PROMPT, PROMPT
    from bench.scenarios import SEED as REQUEST_SEED
    from swiftd.images import edge_image
    from swiftd.request import ControlNet, Request

    lora = next(lora for lora in catalog.loras if lora.rank == 64 and lora.format == "peft")
    return Request(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        width=CFG_SIZE,
        height=CFG_SIZE,
        num_inference_steps=CFG_STEPS,
        guidance_scale=GUIDANCE_SCALE,
        seed=REQUEST_SEED,
        scheduler="euler",
        model_id=catalog.model_id,
        loras=[(lora.lora_id, 1.0)],
        controlnets=[ControlNet(catalog.controlnet_ids[0], edge_image(CFG_SIZE), 1.0)],
        request_id=request_id,
    ).to_pb()


def _timed(address: str, catalog, name: str):
    """Median wall time of CFG_TIMED requests after one warm-up (first use of the LoRA etc.), and
    the last response."""
    from swiftd import rpc
    from swiftd.v1 import gateway_pb2_grpc

    with rpc.create_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        times = []
        for i in range(CFG_TIMED + 1):
            t0 = time.perf_counter()
            response = stub.Generate(cfg_split_request(catalog, f"cfg-{name}-{i}"), timeout=600)
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times), response


def measure_cfg_split(root: Path, catalog, log) -> tuple[list[Figure], str]:
    """Diffusers given both cores as two threads, against ours given both cores, on one request."""
    from bench.scenarios import check_same_image
    from swiftd.launcher import start_service
    from swiftd.v1 import gateway_pb2

    args = ["--model-root", str(root), "--model-id", catalog.model_id, "--mode", "fuse"]
    diffusers = start_service(
        "diffusers-2threads", "bench.baselines.worker", args, cpu_cores=list(CORES), num_threads=2
    )
    try:
        diffusers_s, diffusers_response = _timed(diffusers.address, catalog, "diffusers")
    finally:
        diffusers.stop()
    suite = OursSuite(root, catalog.model_id)
    try:
        split_s, split_response = _timed(suite.address, catalog, "split")
    finally:
        suite.stop()
    placement = gateway_pb2.Placement.Name(split_response.plan.placement)
    if placement != "PLACEMENT_CFG_SPLIT":
        raise RuntimeError(f"the idle suite did not split the request: {placement} ({split_response.plan.reason})")
    diff = check_same_image(diffusers_response.image_png, split_response.image_png, "cfg split")
    log(
        f"[traffic] cfg split: Diffusers 2 threads {diffusers_s:.2f} s; ours split {split_s:.2f} s; "
        f"image difference {diff} levels"
    )
    group = "traffic"
    figures = [
        Figure("cfg_split.latency_ratio", diffusers_s / split_s, "x", group),
        Figure("cfg_split.latency_s.diffusers_2threads", diffusers_s, "s", group),
        Figure("cfg_split.latency_s.ours_split", split_s, "s", group),
    ]
    hardware = {
        "diffusers": f"one Diffusers process on cores {CORES[0]},{CORES[1]}, 2 threads",
        "ours": "UNet worker + ControlNet worker per core (1 thread each); gateway and LoRA store on core 1",
    }
    for figure in figures:
        figure.hardware = hardware
    table = (
        f"cfg split: one cn1_lora1 request ({CFG_SIZE}x{CFG_SIZE}, {CFG_STEPS} steps) on an idle machine, median of "
        f"{CFG_TIMED} after a warm-up\n  Diffusers, 2 threads on both cores {diffusers_s:6.2f} s\n"
        f"  ours, CFG split over both cores     {split_s:6.2f} s  ratio {diffusers_s / split_s:.2f}x"
    )
    return figures, table


# -- the group -------------------------------------------------------------------------------------


def group_traffic(config: BenchConfig, session) -> GroupResult:
    from bench.baselines import start_baseline
    from swiftd.traffic.catalog import CatalogConfig, build_catalog, load_catalog
    from swiftd.traffic.trace import write_trace
    from swiftd.traffic.workload import WorkloadConfig, generate, popularity_stats, trace_header

    session.close()  # other groups' processes: nothing else may hold memory or cores during traffic
    log = config.log
    t0 = time.perf_counter()
    root = build_catalog(config.zoo, CatalogConfig(family=config.family))
    catalog = load_catalog(root)
    log(
        f"[traffic] catalog {root}: {len(catalog.lora_ids)} LoRAs, {len(catalog.controlnet_ids)} ControlNets "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    workload = WorkloadConfig(
        seed=SEED,
        num_requests=NUM_REQUESTS,
        rate_rps=1.0,
        width=TRAFFIC_SIZE,
        height=TRAFFIC_SIZE,
        steps=TRAFFIC_STEPS,
    )
    trace = generate(workload, catalog)
    write_trace(TRACE_FILE, trace, header=trace_header(workload, catalog))
    shape = popularity_stats(trace)
    log(f"[traffic] trace {TRACE_FILE.name}: {len(trace)} requests; {json.dumps(shape)}")

    cfg_figures, cfg_table = measure_cfg_split(root, catalog, log)
    artifacts = traffic_artifacts(root, catalog, log)

    one_per_core = ", ".join(f"core {c}" for c in CORES)
    systems = [
        SystemUnderTest(
            "diffusers_fuse",
            lambda: start_baseline(root, catalog.model_id, "fuse", list(CORES)),
            f"one Diffusers process per core ({one_per_core}; 1 thread each), LoRAs loaded+fused per request",
        ),
        SystemUnderTest(
            "diffusers_adapters",
            lambda: start_baseline(root, catalog.model_id, "adapters", list(CORES)),
            f"one Diffusers process per core ({one_per_core}; 1 thread each), LoRAs kept as PEFT adapters",
        ),
        SystemUnderTest(
            "ours",
            lambda: OursSuite(root, catalog.model_id, compiled_artifacts=artifacts),
            f"a UNet worker and a ControlNet worker per core ({one_per_core}; 1 thread each) on compiled "
            f"artifacts; LoRA store and gateway on core {CORES[-1]}",
        ),
        SystemUnderTest(
            "ours_eager",
            lambda: OursSuite(root, catalog.model_id),
            "as ours, without compiled artifacts",
        ),
    ]
    calibration = None
    isolated, runs = {}, {}
    for system in systems:
        isolated[system.name], runs[system.name], calibration = measure_system(system, trace, calibration, log)
    write_records(runs, RECORDS_FILE)
    plots = plot(runs, calibration, PLOTS_DIR)
    group_s = time.perf_counter() - t0
    figures = figures_of(runs, isolated, calibration) + cfg_figures + [Figure("traffic.group_s", group_s, "s", GROUP)]
    hardware = {s.name: s.hardware for s in systems}
    table = (
        traffic_table(runs, isolated, calibration, shape, plots)
        + "\n"
        + cfg_table
        + f"\ntraffic group: {group_s / 60:.1f} min (catalog and artifacts included when built)"
    )
    return GroupResult(figures, table, hardware=hardware)


def traffic_table(runs, isolated, calibration: Calibration, shape: dict, plots: list[Path]) -> str:
    lines = [
        f"traffic: {NUM_REQUESTS} requests of the bench model at {TRAFFIC_SIZE}x{TRAFFIC_SIZE}, {TRAFFIC_STEPS} steps, "
        f"open loop; loads as fractions of diffusers_fuse's capacity ({calibration.capacity_rps:.2f} req/s on "
        f"{len(CORES)} cores); objective p99 <= {calibration.objective_s:.2f} s",
        f"  trace: {json.dumps(shape)}",
        f"  {'system':<19} {'isolated p50/p99':>16}  "
        + "  ".join(f"{'p50/p99 @' + format(load, 'g'):>17}" for load in LOADS + BEYOND)
        + "  sustained",
    ]
    for system, system_runs in runs.items():
        by_load = {r.load: r for r in system_runs}
        cells = "  ".join(
            f"{_finite(r.summary['p50_s']):7.2f}/{_finite(r.summary['p99_s']):7.2f}  " if r else f"{'-':>17}"
            for r in (by_load.get(load) for load in LOADS + BEYOND)
        )
        lines.append(
            f"  {system:<19} {_median_latency(isolated[system]):7.2f}/{_p99_latency(isolated[system]):7.2f}  {cells}  "
            f"{sustained_load(system_runs):g}x"
        )
    lines.append("  (p99 -1: some request failed or was refused at that load; counts in the figures)")
    lines += [f"  plot: {p}" for p in plots]
    return "\n".join(lines)


def plot(runs: dict[str, list[RunResult]], calibration: Calibration, out_dir: Path) -> list[Path]:
    """Latency against offered load (p50 and p99) per system, and latency CDFs at load 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    cap = 2 * calibration.deadline_s  # where a failed request is drawn
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for system, system_runs in runs.items():
        loads = [r.load for r in system_runs]
        (line,) = ax.plot(loads, [min(r.summary["p99_s"], cap) for r in system_runs], marker="o", label=f"{system} p99")
        ax.plot(
            loads,
            [min(r.summary["p50_s"], cap) for r in system_runs],
            ls="--",
            marker=".",
            color=line.get_color(),
            label=f"{system} p50",
        )
    ax.axhline(calibration.objective_s, color="grey", lw=0.8, label="objective")
    ax.set_xlabel("offered load (fraction of diffusers_fuse capacity)")
    ax.set_ylabel("latency (s)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Latency under open-loop load, same 2 cores")
    fig.tight_layout()
    load_plot = out_dir / "traffic_latency_vs_load.png"
    fig.savefig(load_plot, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for system, system_runs in runs.items():
        run = min(system_runs, key=lambda r: abs(r.load - 1.0))
        latencies = sorted(min(r.latency_s, cap) for r in run.records)
        ax.step(
            latencies,
            [(i + 1) / len(latencies) for i in range(len(latencies))],
            where="post",
            label=f"{system} @ {run.load:g}",
        )
    ax.axvline(calibration.objective_s, color="grey", lw=0.8, label="objective")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.legend(fontsize=7)
    ax.set_title("Latency CDF at the same offered load")
    fig.tight_layout()
    cdf_plot = out_dir / "traffic_latency_cdf.png"
    fig.savefig(cdf_plot, dpi=120)
    plt.close(fig)
    return [load_plot, cdf_plot]
