"""Placing a request: which UNet worker, which ControlNet worker per ControlNet, which LoRAs to push.

UNet worker: among the workers serving the model, the one that already has the request's LoRA set
patched in (nothing to transfer or patch) if it has a free slot; otherwise the least loaded. A
request never waits behind another for affinity while a worker is free: with the deltas prepared
by the store and patched in place, a LoRA switch costs milliseconds, a wait costs a whole request.
Load is what the worker reports (running + queued) or what this gateway has sent it and not yet
seen finish, whichever is larger, so two requests planned at the same moment do not pile onto one
worker. Ties go to a worker that has the set applied anyway, then to one holding its deltas, then
to one with no other LoRA set applied (keeping that set's affinity for its own requests), then to
the first in the configuration.

ControlNets: each on its own worker where possible (N ControlNets then cost max(), not sum()),
preferring a worker that has the model loaded, then the least busy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from swiftd import rpc, tracing
from swiftd.errors import Unavailable
from swiftd.request import LoraKey, LoraSet, LoraSetKey
from swiftd.v1 import gateway_pb2, unet_pb2, unet_pb2_grpc

log = logging.getLogger(__name__)

DOWN_SECONDS = 5.0


@dataclass
class UNetWorkerState:
    address: str
    model_ids: list[str]
    applied: LoraSetKey  # the LoRA set patched in, in order
    cached: set[LoraKey]  # LoRA deltas held complete, ready to patch
    load: int  # requests running or queued there
    dtype: int = 0


@dataclass
class ControlNetWorkerState:
    address: str
    loaded: set[str] = field(default_factory=set)


def choose_unet_worker(workers: list[UNetWorkerState], want: LoraSetKey, slots: int) -> tuple[UNetWorkerState, bool]:
    """The worker for a request with LoRA set `want`, and whether that set is already applied there.

    `slots`: requests a worker runs at once; below that it has room.
    """

    def rank(index_worker):
        index, w = index_worker
        same_set = bool(want) and w.applied == want
        holds_deltas = all(k in w.cached for k in want)
        other_set_applied = bool(w.applied) and w.applied != want
        return (not (same_set and w.load < slots), w.load, not same_set, not holds_deltas, other_set_applied, index)

    _, best = min(enumerate(workers), key=rank)
    return best, bool(want) and best.applied == want


def assign_controlnets(
    controlnet_ids: list[str], hosts: dict[str, list[str]], loaded: dict[str, set[str]], busy: Counter
) -> list[str]:
    """One worker address per ControlNet of a request, spread across workers."""
    used: Counter = Counter()
    chosen = []
    for controlnet_id in controlnet_ids:
        candidates = hosts.get(controlnet_id, [])
        if not candidates:
            raise Unavailable(f"no reachable ControlNet worker serves {controlnet_id!r}")
        order = {address: i for i, address in enumerate(candidates)}
        best = min(candidates, key=lambda a: (used[a], controlnet_id not in loaded.get(a, ()), busy[a], order[a]))
        used[best] += 1
        chosen.append(best)
    return chosen


class Planner:
    """Polls the UNet workers' status at plan time and records what this gateway has sent where."""

    def __init__(
        self, channels: rpc.ChannelPool, unet_workers: list[str], slots_per_worker: int, status_timeout: float
    ):
        self._channels = channels
        self._unet_workers = unet_workers
        self._slots = slots_per_worker
        self._status_timeout = status_timeout
        self._pool = futures.ThreadPoolExecutor(max_workers=max(2, len(unet_workers)), thread_name_prefix="status")
        self._lock = threading.Lock()
        self._outstanding: Counter = Counter()  # UNet worker -> requests sent and not finished
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
        ask = [a for a in self._unet_workers if self._down_until.get(a, 0.0) <= now] or self._unet_workers
        submit = tracing.submitter(self._pool)  # the polls are part of the request's trace
        pending = {a: submit(self._status, a, timeout) for a in ask}
        return {a: f.result() for a, f in pending.items()}

    def plan(
        self,
        model_id: str,
        loras: LoraSet,
        controlnet_ids: list[str],
        controlnet_hosts: dict[str, list[str]],
        controlnet_loaded: dict[str, set[str]],
        remaining: float,
    ) -> tuple[gateway_pb2.Plan, int]:
        """The plan and the chosen UNet worker's weight dtype (LoRA deltas are prepared in it).

        Reserves the workers: the caller must `release(plan)` when the request ends.
        """
        want = loras.key
        statuses = self._statuses(min(self._status_timeout, remaining))
        with self._lock:
            workers = [
                UNetWorkerState(
                    address=address,
                    model_ids=list(s.model_ids),
                    applied=LoraSet.from_pb(s.applied_loras).key,
                    cached={lora.key for lora in LoraSet.from_pb(s.cached_loras)},
                    load=max(s.requests_in_flight + s.queue_length, self._outstanding[address]),
                    dtype=s.dtype,
                )
                for address, s in statuses.items()
                if s is not None and model_id in s.model_ids
            ]
            if not workers:
                raise Unavailable(f"no reachable UNet worker serves model {model_id!r}")
            worker, already_applied = choose_unet_worker(workers, want, self._slots)
            controlnet_workers = assign_controlnets(
                controlnet_ids, controlnet_hosts, controlnet_loaded, self._controlnet_busy
            )
            self._outstanding[worker.address] += 1
            self._controlnet_busy.update(controlnet_workers)
        push = [] if already_applied else [lora.lora_id for lora in loras if lora.key not in worker.cached]
        plan = gateway_pb2.Plan(
            unet_worker=worker.address,
            controlnets=[
                gateway_pb2.ControlNetAssignment(controlnet_id=c, worker=w)
                for c, w in zip(controlnet_ids, controlnet_workers)
            ],
            lora_ids=loras.ids,
            lora_set_already_applied=already_applied,
            pushed_lora_ids=push,
        )
        return plan, worker.dtype

    def release(self, plan: gateway_pb2.Plan) -> None:
        with self._lock:
            self._outstanding[plan.unet_worker] -= 1
            self._controlnet_busy.subtract(a.worker for a in plan.controlnets)
