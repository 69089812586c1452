"""The open-loop load generator: replays a trace against any endpoint serving swiftd.v1.Gateway.

Open loop: each request is sent at its trace time whether or not earlier ones have finished, and
its latency is counted from that scheduled time, not from when a busy client got round to
sending it. A closed-loop client (send the next when one returns) slows down with the server and
hides exactly the queueing a production server sees ("coordinated omission"). `send_lag_s` in
each record shows how late the generator itself was; a replay whose lag grows is invalid and
`summarize` says so.

Each request goes through GenerateStream with the trace's deadline, so the record has what the
server reported: time in its queue (`Started.queued_seconds`), the plan (where it ran and why),
and the final status (OK, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...). Every request ends as
exactly one record: nothing is lost silently.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import grpc
from google.protobuf import json_format

from swiftd import rpc
from swiftd.traffic.trace import TraceEntry
from swiftd.v1 import gateway_pb2_grpc

OK = "OK"
# A lagging generator (late by more than this) measures itself, not the server.
MAX_SEND_LAG_S = 0.25


@dataclass
class RequestRecord:
    """What happened to one request of the trace."""

    request_id: str
    scheduled_s: float  # trace time the request was due
    send_lag_s: float = 0.0  # how late the generator sent it
    status: str = OK  # gRPC status code name
    details: str = ""
    latency_s: float = math.inf  # scheduled send -> final event (inf unless OK)
    queue_s: float = 0.0  # server-reported admission wait
    first_progress_s: float = math.nan  # scheduled send -> first denoising step
    plan: dict = field(default_factory=dict)
    num_loras: int = 0
    num_controlnets: int = 0
    system: str = ""
    load: float = math.nan  # offered load label of the run (e.g. a fraction of a capacity)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("latency_s", "first_progress_s", "load"):
            if not math.isfinite(d[key]):
                d[key] = None  # JSON has no inf/nan
        return d


def at_rate(entries: Sequence[TraceEntry], rate_rps: float) -> list[TraceEntry]:
    """The same requests in the same order, arrival times scaled to a mean rate of `rate_rps`.

    Keeps the trace's shape (bursts stay bursts) while the offered load changes, so runs at
    different loads differ in load only.
    """
    if len(entries) < 2 or entries[-1].at_s <= entries[0].at_s:
        return list(entries)
    current = (len(entries) - 1) / (entries[-1].at_s - entries[0].at_s)
    factor = current / rate_rps
    start = entries[0].at_s
    return [replace(e, at_s=(e.at_s - start) * factor) for e in entries]


@dataclass
class ReplayConfig:
    target: str  # host:port of a Gateway-API endpoint
    system: str = ""  # label written into every record
    load: float = math.nan  # label of the offered load
    max_concurrency: int = 512  # client threads; requests beyond this are late (send_lag_s grows)
    deadline_s: float | None = None  # overrides the trace's deadlines (e.g. a multiple of the objective)
    progress: bool = True  # a progress bar on stderr


def _one(stub, entry: TraceEntry, t0: float, config: ReplayConfig) -> RequestRecord:
    request = entry.request
    record = RequestRecord(
        request_id=request.request_id,
        scheduled_s=entry.at_s,
        num_loras=len(request.loras),
        num_controlnets=len(request.controlnets),
        system=config.system,
        load=config.load,
    )
    due = t0 + entry.at_s
    record.send_lag_s = max(0.0, time.monotonic() - due)
    try:
        call = stub.GenerateStream(request, timeout=config.deadline_s or entry.deadline_s)
        for event in rpc.responses(call):
            kind = event.WhichOneof("event")
            if kind == "started":
                record.queue_s = event.started.queued_seconds
                record.plan = json_format.MessageToDict(event.started.plan, preserving_proto_field_name=True)
            elif kind == "progress" and math.isnan(record.first_progress_s):
                record.first_progress_s = time.monotonic() - due
            elif kind == "final":
                record.latency_s = time.monotonic() - due
                if event.final.HasField("plan"):
                    record.plan = json_format.MessageToDict(event.final.plan, preserving_proto_field_name=True)
        if math.isinf(record.latency_s):
            record.status, record.details = "UNKNOWN", "the stream ended without a final event"
    except grpc.RpcError as exc:
        record.status, record.details = exc.code().name, exc.details() or ""
    return record


def replay(entries: Sequence[TraceEntry], config: ReplayConfig) -> list[RequestRecord]:
    """Send every entry at its time (open loop); return one record per entry, in trace order."""
    channel = rpc.create_channel(config.target)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    records: list[RequestRecord | None] = [None] * len(entries)
    bar = _progress(len(entries), config) if config.progress else None
    done_lock = threading.Lock()

    def run(index: int, entry: TraceEntry) -> None:
        record = _one(stub, entry, t0, config)
        records[index] = record
        if bar is not None:
            with done_lock:
                bar.update(1)
                if not record.ok:
                    bar.set_postfix_str(f"last error {record.status}")

    try:
        with ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="loadgen") as pool:
            t0 = time.monotonic() + 0.05  # a little head room for the first send
            for index, entry in enumerate(entries):
                delay = t0 + entry.at_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(run, index, entry)
    finally:
        if bar is not None:
            bar.close()
        channel.close()
    return [r for r in records if r is not None]


def run_isolated(entries: Sequence[TraceEntry], target: str, system: str = "") -> list[RequestRecord]:
    """Each entry alone on an idle server (one at a time): the latency without queueing."""
    channel = rpc.create_channel(target)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    config = ReplayConfig(target=target, system=system, progress=False)
    try:
        return [_one(stub, replace(e, at_s=0.0), time.monotonic(), config) for e in entries]
    finally:
        channel.close()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with few samples, p99 is the worst one)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(records: Sequence[RequestRecord], objective_s: float, duration_s: float | None = None) -> dict:
    """Latency percentiles, goodput and failure counts of one run.

    Percentiles are over every request, a failed or rejected one counting as infinitely slow: a
    server must not look faster by refusing work. `p99_ok_s` is over the completed ones only.
    Goodput: requests completed within the objective, per second of the trace's span.
    """
    statuses = Counter(r.status for r in records)
    latencies = [r.latency_s for r in records]  # inf unless OK
    completed = [r.latency_s for r in records if r.ok]
    if duration_s is None:
        duration_s = max((r.scheduled_s for r in records), default=0.0) or 1.0
    within = sum(1 for latency in completed if latency <= objective_s)
    max_lag = max((r.send_lag_s for r in records), default=0.0)
    return {
        "requests": len(records),
        "ok": statuses.get(OK, 0),
        "rejected": statuses.get("RESOURCE_EXHAUSTED", 0),
        "deadline_exceeded": statuses.get("DEADLINE_EXCEEDED", 0),
        "failed": sum(n for s, n in statuses.items() if s not in (OK, "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")),
        "statuses": dict(statuses),
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "p99_s": percentile(latencies, 99),
        "p99_ok_s": percentile(completed, 99),
        "mean_queue_s": sum(r.queue_s for r in records) / max(1, len(records)),
        "goodput_rps": within / duration_s,
        "objective_s": objective_s,
        "meets_objective": percentile(latencies, 99) <= objective_s,
        "max_send_lag_s": max_lag,
        "valid": max_lag <= MAX_SEND_LAG_S,
    }


def _progress(total: int, config: ReplayConfig):
    from tqdm import tqdm

    label = config.system or config.target
    if not math.isnan(config.load):
        label += f" @ {config.load:g}"
    return tqdm(total=total, desc=label, unit="req", file=sys.stderr, leave=False, dynamic_ncols=True)
