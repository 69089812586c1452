"""Placing a request: which UNet worker(s), where each ControlNet runs, which LoRAs to push.

A plan that is best for one request on an idle machine (every ControlNet on a device of its own)
wastes devices under load, so the placement follows the load the gateway sees, counted per
device, not per worker: a ControlNet worker pinned to the core of a busy UNet worker is no idle
device (swiftd/device.py says which workers share one). A device is idle when no worker on it
has a request running or queued (what the UNet workers report, or what this gateway has sent and
not yet seen finish, whichever is larger; ControlNet sessions this gateway opened).

1. **CFG split** (PLACEMENT_CFG_SPLIT), when the request uses classifier-free guidance, the
   gateway allows it (`--cfg-split auto`), and two UNet workers of the model sit on two idle
   devices, with the same dtype, each able to run the request's ControlNets in-process: the
   conditional half of the batch on one, the unconditional half on the other, each a batch of one
   with its own ControlNet residuals (services/unet/guidance.py). On CPU this takes a step from
   one batch-of-two UNet pass to one batch-of-one pass per core; a ControlNet spread instead
   would only hide behind the encoder half and still leave the decoder half on one device.
2. **Spread** (PLACEMENT_SPREAD), when some device other than the UNet worker's is idle: the
   ControlNets go to ControlNet workers on idle devices (one per device, then preferring one
   that shares memory with the UNet worker, so that its residuals need not cross the network,
   then one per worker, then one that has the model loaded), where they compute while the UNet
   runs its encoder half. A ControlNet no idle device serves runs in-process if the UNet worker
   can, else on a busy worker serving it: one that shares memory with the UNet worker first (a
   shared device costs less than a step's residuals as bytes over the network), then the least
   busy.
3. **Pack** (PLACEMENT_PACK), when every other device is busy: ControlNets in-process on the
   chosen UNet worker, so no device waits on another, and none takes on a second request's
   ControlNet beside its own work. (A request without ControlNets that is not split is packed.)
   If the UNet worker cannot run a ControlNet in-process, that one goes to a ControlNet worker
   serving it (as in 2: sharing memory first, then the least busy), and the plan says spread.

The UNet worker, in every case: among the workers serving the model, the one that already has the
request's LoRA set patched in (nothing to transfer or patch) if it has a free slot; otherwise the
least loaded. A request never waits behind another for affinity while a worker is free: with the
deltas prepared by the store and patched in place, a LoRA switch costs milliseconds, a wait costs
a whole request. Ties go to a worker whose device carries less other work, then one that has the
set applied anyway, then one holding its deltas, then one with no other LoRA set applied
(keeping that set's affinity for its own requests), then the first in the configuration.

The plan says which placement and why (`Plan.placement`, `Plan.reason`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from services.gateway.catalog import Listing
from swiftd import rpc, tracing
from swiftd.device import Device
from swiftd.discovery import WorkerTargets
from swiftd.errors import Unavailable
from swiftd.request import DEFAULT_GUIDANCE_SCALE, LoraKey, LoraSet, LoraSetKey, Request
from swiftd.v1 import gateway_pb2, unet_pb2, unet_pb2_grpc

log = logging.getLogger(__name__)

STATUS_POLLS = 16  # status calls in flight at once (workers behind a DNS name are not counted up front)
DOWN_SECONDS = 5.0
PACK, SPREAD, CFG_SPLIT = "pack", "spread", "cfg_split"
PLACEMENTS = {
    PACK: gateway_pb2.PLACEMENT_PACK,
    SPREAD: gateway_pb2.PLACEMENT_SPREAD,
    CFG_SPLIT: gateway_pb2.PLACEMENT_CFG_SPLIT,
}


def placement_name(value: int) -> str:
    """A Placement enum value by the name used in logs and traces ("pack", "spread", "cfg_split")."""
    return next((name for name, v in PLACEMENTS.items() if v == value), "")


@dataclass
class UNetWorkerState:
    address: str
    model_ids: list[str]
    applied: LoraSetKey  # the LoRA set patched in, in order
    cached: set[LoraKey]  # LoRA deltas held complete, ready to patch
    load: int  # requests running or queued there
    dtype: int = 0
    device: Device | None = None  # None: reported none, a device of its own
    local_controlnets: frozenset[str] = frozenset()  # ControlNets it can run in-process

    def __post_init__(self):
        if self.device is None:
            self.device = Device.of("", "", self.address)


@dataclass
class ControlNetWorkerState:
    address: str
    serves: frozenset[str] = frozenset()  # ControlNet ids it can run
    loaded: frozenset[str] = frozenset()  # those in memory now
    load: int = 0  # sessions this gateway opened there and has not seen end
    device: Device | None = None

    def __post_init__(self):
        if self.device is None:
            self.device = Device.of("", "", self.address)


@dataclass(frozen=True)
class Demand:
    """What a request asks of the workers."""

    loras: LoraSetKey = ()
    controlnet_ids: tuple[str, ...] = ()
    cfg: bool = True  # classifier-free guidance: each step predicts two halves


@dataclass
class Share:
    """One UNet worker's part of a plan: the worker, whether it has the LoRA set applied, and
    where each ControlNet runs for it ("" = in-process there)."""

    worker: UNetWorkerState
    lora_set_applied: bool
    controlnet_workers: list[str] = field(default_factory=list)


@dataclass
class Decision:
    placement: str  # PACK, SPREAD or CFG_SPLIT
    reason: str
    main: Share  # the request's UNet worker (with CFG split: the conditional half)
    partner: Share | None = None  # CFG split only: the unconditional half


class DeviceLoad:
    """Work on each device, summed over every worker on it."""

    def __init__(self, unets: list[UNetWorkerState], controlnets: list[ControlNetWorkerState]):
        self._loads = [(w.device, w.load) for w in unets] + [(c.device, c.load) for c in controlnets]

    def load(self, device: Device) -> int:
        return sum(load for d, load in self._loads if d.shares_with(device))

    def idle(self, device: Device) -> bool:
        return self.load(device) == 0


def choose_unet_worker(
    workers: list[UNetWorkerState],
    want: LoraSetKey,
    slots: int,
    device_load: Callable[[UNetWorkerState], int] | None = None,
) -> tuple[UNetWorkerState, bool]:
    """The worker for a request with LoRA set `want`, and whether that set is already applied there.

    `slots`: requests a worker runs at once; below that it has room. `device_load(w)`: the work
    on w's device, w's own included (None: workers do not share devices).
    """

    def rank(index_worker):
        index, w = index_worker
        same_set = bool(want) and w.applied == want
        holds_deltas = all(k in w.cached for k in want)
        other_set_applied = bool(w.applied) and w.applied != want
        neighbours = device_load(w) - w.load if device_load is not None else 0
        return (
            not (same_set and w.load < slots),
            w.load,
            neighbours,
            not same_set,
            not holds_deltas,
            other_set_applied,
            index,
        )

    _, best = min(enumerate(workers), key=rank)
    return best, bool(want) and best.applied == want


def assign_controlnets(
    controlnet_ids: list[str],
    hosts: dict[str, list[str]],
    loaded: dict[str, set[str]],
    busy: Counter,
    devices: dict[str, Device] | None = None,
    near: Device | None = None,
) -> list[str]:
    """One worker address per ControlNet of a request, spread across devices, then preferring
    workers that share memory with `near` (the UNet worker's device: residuals through shared
    memory or CUDA IPC, not the network), then spread across workers."""
    devices = devices or {}
    used: Counter = Counter()
    used_devices: list[Device] = []
    chosen = []
    for controlnet_id in controlnet_ids:
        candidates = hosts.get(controlnet_id, [])
        if not candidates:
            raise Unavailable(f"no reachable ControlNet worker serves {controlnet_id!r}")
        order = {address: i for i, address in enumerate(candidates)}

        def rank(a, controlnet_id=controlnet_id, order=order):
            device = devices.get(a)
            on_used_device = sum(device.shares_with(d) for d in used_devices) if device is not None else 0
            far = near is not None and not (device is not None and device.shares_memory_with(near))
            return (on_used_device, far, used[a], controlnet_id not in loaded.get(a, ()), busy[a], order[a])

        best = min(candidates, key=rank)
        used[best] += 1
        if best in devices:
            used_devices.append(devices[best])
        chosen.append(best)
    return chosen


def decide(
    demand: Demand,
    unets: list[UNetWorkerState],
    controlnets: list[ControlNetWorkerState],
    slots: int,
    allow_cfg_split: bool = True,
) -> Decision:
    """Where a request runs, given every worker's state (the rules in this module's docstring)."""
    if not unets:
        raise Unavailable("no reachable UNet worker serves the model")
    devices = DeviceLoad(unets, controlnets)
    split, why_not_split = _cfg_split(demand, unets, devices, slots, allow_cfg_split)
    if split is not None:
        return split
    worker, applied = choose_unet_worker(unets, demand.loras, slots, lambda w: devices.load(w.device))
    main = Share(worker, applied)
    if not demand.controlnet_ids:
        return Decision(PACK, f"no ControlNet; not split: {why_not_split}", main)

    ids = list(demand.controlnet_ids)
    idle = [c for c in controlnets if devices.idle(c.device) and not c.device.shares_with(worker.device)]
    spread = [i for i, cid in enumerate(ids) if any(cid in c.serves for c in idle)]
    # Whatever no idle device serves: in-process if the UNet worker can, else a busy ControlNet worker.
    unplaced = [i for i, cid in enumerate(ids) if i not in spread and cid not in worker.local_controlnets]
    main.controlnet_workers = [""] * len(ids)
    for indices, candidates in ((spread, idle), (unplaced, controlnets)):
        for i, address in zip(indices, _assign([ids[i] for i in indices], candidates, worker.device)):
            main.controlnet_workers[i] = address
    if spread:
        used = sorted({str(c.device) for c in idle if c.address in main.controlnet_workers})
        reason = f"idle device {', '.join(used)}: ControlNets there, beside the UNet on {worker.device}"
        return Decision(SPREAD, f"{reason}; not split: {why_not_split}", main)
    if not unplaced:
        reason = f"no other device idle: ControlNets in-process beside the UNet on {worker.device}"
        return Decision(PACK, f"{reason}; not split: {why_not_split}", main)
    missing = ", ".join(ids[i] for i in unplaced)
    reason = f"no other device idle, but {worker.address} cannot run {missing} in-process"
    return Decision(SPREAD, f"{reason}; not split: {why_not_split}", main)


def _assign(controlnet_ids: list[str], workers: list[ControlNetWorkerState], near: Device) -> list[str]:
    hosts = {cid: [c.address for c in workers if cid in c.serves] for cid in controlnet_ids}
    loaded = {c.address: set(c.loaded) for c in workers}
    busy = Counter({c.address: c.load for c in workers})
    return assign_controlnets(controlnet_ids, hosts, loaded, busy, {c.address: c.device for c in workers}, near)


def _cfg_split(
    demand: Demand, unets: list[UNetWorkerState], devices: DeviceLoad, slots: int, allowed: bool
) -> tuple[Decision | None, str]:
    """The CFG split of the request, if it can be split now; else None and why not."""
    if not allowed:
        return None, "CFG split is off (--cfg-split never)"
    if not demand.cfg:
        return None, "no classifier-free guidance (guidance_scale <= 1)"
    idle = [w for w in unets if devices.idle(w.device)]
    if not _pairable(idle):
        return None, "fewer than 2 idle devices with a UNet worker of the model"
    able = [w for w in idle if set(demand.controlnet_ids) <= w.local_controlnets]
    if not _pairable(able):
        return None, "the idle UNet workers cannot all run the request's ControlNets in-process"
    leader, leader_applied = choose_unet_worker(able, demand.loras, slots)
    others = [w for w in able if not w.device.shares_with(leader.device) and w.dtype == leader.dtype]
    if not others:
        return None, "no second idle UNet worker on another device with the same dtype"
    partner, partner_applied = choose_unet_worker(others, demand.loras, slots)
    local = [""] * len(demand.controlnet_ids)
    reason = f"2 idle devices: conditional half on {leader.device}, unconditional half on {partner.device}" + (
        ", each with its ControlNets in-process" if demand.controlnet_ids else ""
    )
    decision = Decision(
        CFG_SPLIT, reason, Share(leader, leader_applied, local), Share(partner, partner_applied, list(local))
    )
    return decision, ""


def _pairable(workers: list[UNetWorkerState]) -> bool:
    return any(not a.device.shares_with(b.device) for i, a in enumerate(workers) for b in workers[i + 1 :])


def _pushes(share: Share, loras: LoraSet) -> list[str]:
    """LoRA ids the store must push to a share's worker: those neither applied nor cached there."""
    if share.lora_set_applied:
        return []
    return [lora.lora_id for lora in loras if lora.key not in share.worker.cached]


def _assignments(ids: list[str], workers: list[str]) -> list[gateway_pb2.ControlNetAssignment]:
    return [gateway_pb2.ControlNetAssignment(controlnet_id=c, worker=w) for c, w in zip(ids, workers)]


def plan_pb(decision: Decision, loras: LoraSet, controlnet_ids: list[str]) -> gateway_pb2.Plan:
    main = decision.main
    plan = gateway_pb2.Plan(
        unet_worker=main.worker.address,
        controlnets=_assignments(controlnet_ids, main.controlnet_workers),
        lora_ids=loras.ids,
        lora_set_already_applied=main.lora_set_applied,
        pushed_lora_ids=_pushes(main, loras),
        placement=PLACEMENTS[decision.placement],
        reason=decision.reason,
    )
    if decision.partner is not None:
        partner = decision.partner
        plan.cfg_partner.CopyFrom(
            gateway_pb2.CfgPartner(
                unet_worker=partner.worker.address,
                controlnets=_assignments(controlnet_ids, partner.controlnet_workers),
                lora_set_already_applied=partner.lora_set_applied,
                pushed_lora_ids=_pushes(partner, loras),
            )
        )
    return plan


def remote_controlnet_workers(plan: gateway_pb2.Plan) -> list[str]:
    """The ControlNet workers a plan opens sessions on (each half's), one entry per session."""
    assignments = [*plan.controlnets, *plan.cfg_partner.controlnets]
    return [a.worker for a in assignments if a.worker]


def unet_workers(plan: gateway_pb2.Plan) -> list[str]:
    """The UNet workers a plan occupies (with CFG split: both halves')."""
    return [plan.unet_worker, *([plan.cfg_partner.unet_worker] if plan.cfg_partner.unet_worker else [])]


@dataclass
class PlannerConfig:
    unet_workers: WorkerTargets
    slots_per_worker: int = 1
    status_timeout: float = 2.0  # seconds for a worker's status call
    allow_cfg_split: bool = True  # --cfg-split auto (True) or never


class Planner:
    """Polls the UNet workers' status at plan time and records what this gateway has sent where."""

    def __init__(self, channels: rpc.ChannelPool, config: PlannerConfig):
        self._channels = channels
        self.config = config
        self._pool = futures.ThreadPoolExecutor(max_workers=STATUS_POLLS, thread_name_prefix="status")
        self._lock = threading.Lock()
        self._outstanding: Counter = Counter()  # UNet worker -> requests (or halves) sent and not finished
        self._controlnet_busy: Counter = Counter()  # ControlNet worker -> sessions sent and not finished
        self._down_until: dict[str, float] = {}  # workers that did not answer are left out for a while

    def _status(self, address: str, timeout: float) -> unet_pb2.GetWorkerStatusResponse | None:
        try:
            stub = unet_pb2_grpc.UNetWorkerStub(self._channels.get(address))
            status = stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=timeout)
            self._down_until.pop(address, None)
            return status
        except grpc.RpcError as exc:
            log.warning(
                "UNet worker %s skipped for %.0f s: status %s %s", address, DOWN_SECONDS, exc.code().name, exc.details()
            )
            self._down_until[address] = time.monotonic() + DOWN_SECONDS
            return None

    def _statuses(self, timeout: float) -> dict[str, unet_pb2.GetWorkerStatusResponse | None]:
        """Every worker's status, in parallel; one that failed lately is not asked again for a
        while (unless no other is left), so a dead worker does not slow every plan down."""
        now = time.monotonic()
        workers = self.config.unet_workers.addresses()  # as of the last catalog refresh
        ask = [a for a in workers if self._down_until.get(a, 0.0) <= now] or workers
        submit = tracing.submitter(self._pool)  # the polls are part of the request's trace
        pending = {a: submit(self._status, a, timeout) for a in ask}
        return {a: f.result() for a, f in pending.items()}

    def plan(self, request: Request, listing: Listing, remaining: float) -> tuple[gateway_pb2.Plan, int]:
        """The plan of a validated request and its UNet workers' weight dtype (LoRA deltas are
        prepared in it).

        Reserves the workers: the caller must `release(plan)` when the request ends.
        """
        model_id = request.model_id
        statuses = self._statuses(min(self.config.status_timeout, remaining))
        controlnet_ids = [cn.controlnet_id for cn in request.controlnets]
        guidance = request.guidance_scale or DEFAULT_GUIDANCE_SCALE  # 0 is the default, resolved by the worker
        demand = Demand(request.loras.key, tuple(controlnet_ids), guidance > 1.0)
        with self._lock:
            unets = [
                UNetWorkerState(
                    address=address,
                    model_ids=list(s.model_ids),
                    applied=LoraSet.from_pb(s.applied_loras).key,
                    cached={lora.key for lora in LoraSet.from_pb(s.cached_loras)},
                    load=max(s.requests_in_flight + s.queue_length, self._outstanding[address]),
                    dtype=s.dtype,
                    device=Device.of(s.host, s.device, address, s.host_identity),
                    local_controlnets=frozenset(listing.local_controlnets.get(address, ())),
                )
                for address, s in statuses.items()
                if s is not None and model_id in s.model_ids
            ]
            if not unets:
                raise Unavailable(f"no reachable UNet worker serves model {model_id!r}")
            serves: dict[str, set[str]] = {}
            for controlnet_id, addresses in listing.controlnet_hosts.items():
                for address in addresses:
                    serves.setdefault(address, set()).add(controlnet_id)
            controlnets = [
                ControlNetWorkerState(
                    address=address,
                    serves=frozenset(ids),
                    loaded=frozenset(c for c in ids if address in listing.controlnets[c].workers),
                    load=self._controlnet_busy[address],
                    device=listing.controlnet_devices.get(address),
                )
                for address, ids in serves.items()
            ]
            decision = decide(demand, unets, controlnets, self.config.slots_per_worker, self.config.allow_cfg_split)
            plan = plan_pb(decision, request.loras, controlnet_ids)
            self._outstanding.update(unet_workers(plan))
            self._controlnet_busy.update(remote_controlnet_workers(plan))
        return plan, decision.main.worker.dtype

    def mark_down(self, address: str) -> None:
        """Leave `address` out of plans for a while (it was unreachable when called)."""
        with self._lock:
            self._down_until[address] = time.monotonic() + DOWN_SECONDS

    def release(self, plan: gateway_pb2.Plan) -> None:
        with self._lock:
            self._outstanding.subtract(unet_workers(plan))
            self._controlnet_busy.subtract(remote_controlnet_workers(plan))
